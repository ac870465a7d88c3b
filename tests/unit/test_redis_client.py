"""The Redis client tuning (timeouts, keep-alive, pool, TLS checks, retries), as handed to redis-py."""

from __future__ import annotations

import logging

import pytest
import redis

from queueservice_server.core.redis import client_options, redacted_url, sync_client
from queueservice_server.embedded import free_port
from queueservice_server.settings import Settings


def test_timeouts_keepalive_pool_and_health_checks() -> None:
    options = client_options(Settings(), f"redis://127.0.0.1:{free_port()}/0")
    assert options["socket_timeout"] == 5
    assert options["socket_connect_timeout"] == 10
    assert options["health_check_interval"] == 30
    assert options["socket_keepalive"] is True
    assert options["max_connections"] == 50
    assert "ssl_cert_reqs" not in options


def test_tls_verifies_certificate_and_host_name_by_default() -> None:
    options = client_options(Settings(), "rediss://cache.example:6380/0")
    assert (options["ssl_cert_reqs"], options["ssl_check_hostname"]) == ("required", True)


def test_turning_tls_checks_off_is_explicit_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        options = client_options(Settings(redis_tls_insecure=True), "rediss://cache.example:6380/0")
    assert (options["ssl_cert_reqs"], options["ssl_check_hostname"]) == ("none", False)
    assert "checks are OFF" in caplog.text


def test_a_dead_redis_fails_at_once_without_retries() -> None:
    client = sync_client(Settings(), f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(redis.ConnectionError):
        client.ping()


def test_a_broken_connection_is_retried_once_and_timeouts_never() -> None:
    client = sync_client(Settings(), f"redis://127.0.0.1:{free_port()}/0")
    retry = client.connection_pool.connection_kwargs["retry"]
    assert retry.get_retries() == 1
    assert retry._supported_errors == (redis.ConnectionError,)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@cache:6400/0", "redis://:***@cache:6400/0"),
        ("rediss://app:hunter2@cache:6380/1", "rediss://app:***@cache:6380/1"),
        ("redis://:p%40ss%3Aw@cache:6400/0", "redis://:***@cache:6400/0"),
        ("redis://a:b@c@cache:6400/0", "redis://a:***@cache:6400/0"),
        ("unix://:hunter2@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("unix:///run/redis.sock?db=2&password=hunter2", "unix:///run/redis.sock?db=2&password=***"),
        ("redis://app@cache:6400/0", "redis://app@cache:6400/0"),
        ("redis://127.0.0.1:6400/0", "redis://127.0.0.1:6400/0"),
        ("redis://:hunter2@[::1:6400/0", "<unparsable Redis URL>"),
    ],
)
def test_redacted_url_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
