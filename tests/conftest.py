"""Fixtures over real servers: Redis processes the suite starts itself (and the
machine's Redis on 127.0.0.1:6379 too, when it answers), gRPC on port 0,
workers as separate processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from queueservice.v1 import admin_service_pb2_grpc, queue_service_pb2_grpc
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from tests.support import ServerThread, WorkerProcess

SYSTEM_REDIS = "redis://127.0.0.1:6379/0"


def _system_redis_answers() -> bool:
    try:
        return bool(redis.Redis.from_url(SYSTEM_REDIS, socket_connect_timeout=0.3).ping())
    except redis.RedisError:
        return False


REDIS_TARGETS = ["embedded", *(["system"] if _system_redis_answers() else [])]


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=REDIS_TARGETS)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Integration tests run on the suite's own Redis, and on the machine's where it answers."""
    if request.param == "system":
        return SYSTEM_REDIS
    server: RedisServer = request.getfixturevalue("embedded_redis")
    return server.url


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    """Fast intervals, and a key prefix of its own so tests never see each other's keys."""
    return Settings(
        redis_url=redis_url,
        key_prefix=f"qs-test-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path / "data",
        queues=("default", "emails"),
        poll_interval=0.02,
        stall_interval=5.0,
        shutdown_grace=5.0,
        grpc_grace=0.5,
        worker_concurrency=2,
        retry_backoff_base=0.2,
        # Tests that are not about the rate limit must not wait for it.
        rate_limit_max=0,
    )


@pytest.fixture
def server_factory() -> Iterator[Callable[[Settings], str]]:
    servers: list[ServerThread] = []

    def start(settings: Settings) -> str:
        server = ServerThread(settings)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def address(settings: Settings, server_factory: Callable[[Settings], str]) -> str:
    return server_factory(settings)


@pytest.fixture
def channel(address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture
def queue_stub(channel: grpc.Channel) -> queue_service_pb2_grpc.QueueServiceStub:
    return queue_service_pb2_grpc.QueueServiceStub(channel)


@pytest.fixture
def admin_stub(channel: grpc.Channel) -> admin_service_pb2_grpc.QueueAdminServiceStub:
    return admin_service_pb2_grpc.QueueAdminServiceStub(channel)


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(settings: Settings, **overrides: Any) -> WorkerProcess:
        worker = WorkerProcess(replace(settings, **overrides), tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker.start())
        return worker

    yield start
    for worker in workers:
        worker.stop()
