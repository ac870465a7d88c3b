"""Settings from QUEUE_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueservice_server.settings import Settings, SettingsError


def test_defaults_match_the_design() -> None:
    settings = Settings.from_env({})
    assert settings.grpc_address == "127.0.0.1:50051"
    assert settings.embedded_redis and settings.run_workers_in_serve
    assert settings.concurrency == 3
    assert (settings.keep_completed, settings.keep_failed) == (50, 25)
    assert settings.default_timeout == 300
    assert settings.default_max_attempts == 3
    assert settings.retry_delay == 2
    assert settings.stall_interval == 30
    assert settings.max_payload_bytes == 1024 * 1024
    assert settings.max_batch_size == 1000
    assert settings.queues == ("default",)
    assert (settings.rate_limit_max, settings.rate_limit_window) == (100, 60)
    assert settings.max_stalls == 2
    assert settings.grpc_max_message_bytes == 8 * 1024 * 1024
    assert (settings.grpc_max_concurrent_rpcs, settings.stream_max_subscribers, settings.max_waiting) == (300, 100, 0)


def test_prod_concurrency_and_overrides() -> None:
    assert Settings.from_env({"QUEUE_ENV": "prod"}).concurrency == 10
    settings = Settings.from_env(
        {
            "QUEUE_ENV": "prod",
            "QUEUE_WORKER_CONCURRENCY": "4",
            "QUEUE_REDIS_URL": "rediss://cache.internal:6380/0",
            "QUEUE_QUEUES": "default, emails ,reports",
            "QUEUE_TASK_MODULES": "myapp.tasks,other.tasks",
            "QUEUE_DATA_DIR": "/var/lib/queue",
            "QUEUE_DIAG_TASKS": "off",
        }
    )
    assert settings.concurrency == 4
    assert not settings.embedded_redis and not settings.run_workers_in_serve
    assert settings.queues == ("default", "emails", "reports")
    assert settings.task_modules == ("myapp.tasks", "other.tasks")
    assert settings.data_dir == Path("/var/lib/queue")
    assert settings.diag_tasks is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUEUE_ENV", "staging"),
        ("QUEUE_WORKER_CONCURRENCY", "many"),
        ("QUEUE_WORKER_CONCURRENCY", "0"),
        ("QUEUE_REDIS_URL", "http://localhost"),
        ("QUEUE_QUEUES", "ok,not ok"),
        ("QUEUE_DIAG_TASKS", "maybe"),
        ("QUEUE_RATE_LIMIT_MAX", "-1"),
        ("QUEUE_PREFETCH", "0"),
        ("QUEUE_STALL_INTERVAL", "0"),
        # Smaller than one job at QUEUE_MAX_PAYLOAD_BYTES (1 MiB) with its other fields.
        ("QUEUE_GRPC_MAX_MESSAGE_BYTES", str(1024 * 1024)),
        ("QUEUE_STREAM_MAX_SUBSCRIBERS", "300"),
        ("QUEUE_STREAM_MAX_SUBSCRIBERS", "0"),
        ("QUEUE_MAX_WAITING", "-1"),
        ("QUEUE_PERFORMANCE_MAX_MINUTES", "60"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_settings_round_trip_through_the_environment() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", queues=("a", "b"), worker_concurrency=2, serve_workers=True)
    assert Settings.from_env(settings.to_env()) == settings
