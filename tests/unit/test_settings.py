"""Settings from QUEUE_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueservice_server.settings import Settings, SettingsError, unknown_variables


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
    assert Settings.from_env({"QUEUE_ENV": "prod", "QUEUE_AUTH": "false"}).concurrency == 10
    settings = Settings.from_env(
        {
            "QUEUE_ENV": "prod",
            "QUEUE_WORKER_CONCURRENCY": "4",
            "QUEUE_REDIS_URL": "rediss://cache.internal:6380/0",
            "QUEUE_QUEUES": "default, emails ,reports",
            "QUEUE_TASK_MODULES": "myapp.tasks,other.tasks",
            "QUEUE_DATA_DIR": "/var/lib/queue",
            "QUEUE_DIAG_TASKS": "off",
            "QUEUE_AUTH_FILE": "/etc/queue/auth",
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


def test_auth_is_on_in_prod_and_off_in_dev_unless_set() -> None:
    assert not Settings.from_env({}).auth_enabled
    assert Settings.from_env({"QUEUE_ENV": "prod", "QUEUE_AUTH_FILE": "/etc/queue/auth"}).auth_enabled
    assert Settings.from_env({"QUEUE_AUTH": "true", "QUEUE_AUTH_FILE": "auth"}).auth_enabled
    with pytest.raises(SettingsError, match="QUEUE_AUTH_FILE is not set"):
        Settings.from_env({"QUEUE_ENV": "prod"})
    with pytest.raises(SettingsError, match="QUEUE_TLS_CERT and QUEUE_TLS_KEY go together"):
        Settings.from_env({"QUEUE_TLS_CERT": "server.crt"})
    with pytest.raises(SettingsError, match="QUEUE_TLS_CLIENT_CA"):
        Settings.from_env({"QUEUE_TLS_CLIENT_CA": "ca.pem"})


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, True),
        ({"QUEUE_ENV": "prod", "QUEUE_AUTH": "false"}, False),
        ({"QUEUE_ENV": "prod", "QUEUE_AUTH": "false", "QUEUE_DIAG_TASKS": "true"}, True),
        ({"QUEUE_DIAG_TASKS": "false"}, False),
        ({"QUEUE_ENV": "prod", "QUEUE_AUTH": "false", "QUEUE_DIAG_TASKS": ""}, False),
    ],
)
def test_diag_tasks_are_on_in_dev_and_off_in_prod_unless_set(environ: dict[str, str], on: bool) -> None:
    settings = Settings.from_env(environ)
    assert settings.diag_enabled is on
    assert Settings.from_env(settings.to_env()).diag_enabled is on


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    found = unknown_variables(
        {"QUEUE_WORKER_CONCURENCY": "4", "QUEUE_REDIS_ULR": "x", "QUEUE_ZZZ": "1", "QUEUE_ENV": "dev", "PATH": "/bin"}
    )
    assert found == {
        "QUEUE_REDIS_ULR": "QUEUE_REDIS_URL",
        "QUEUE_WORKER_CONCURENCY": "QUEUE_WORKER_CONCURRENCY",
        "QUEUE_ZZZ": None,
    }


def test_every_setting_is_a_known_variable() -> None:
    """What the suite hands its processes (every field, from to_env) never warns; a renamed
    variable stops the process with its own message instead."""
    assert unknown_variables(Settings().to_env()) == {}
    assert unknown_variables({"QUEUE_RETRY_BACKOFF_BASE": "2"}) == {}
