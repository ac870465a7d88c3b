"""Start-up as an operator meets it: real `queue-service serve` and `worker` processes
with QUEUE_* variables. What cannot start says so in one line naming the setting (never a
traceback); a second server never shares an address or a data directory; a misspelled
variable is warned about; diagnostic tasks are off in prod; no password reaches the output."""

from __future__ import annotations

import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from queueservice.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.api.server import BindError, create_server
from queueservice_server.embedded import RedisServer, free_port
from queueservice_server.settings import Settings
from tests.support import Serve, ServerThread, WorkerProcess, request, run_cli, stub_for, wait_for

ServeFactory = Callable[..., Serve]


def one_line(text: str) -> str:
    """The whole of `text`, asserted to be a single line and no traceback."""
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# The embedded Redis without in-process workers: these tests are about what `serve` holds.
NO_WORKERS = {"QUEUE_SERVE_WORKERS": "false"}


def assert_keeps_answering(address: str) -> None:
    """Enqueue once, then GetJob ten times on fresh connections: every one finds the job."""
    job_id = stub_for(address).Enqueue(request("diag.noop"), timeout=10).job_id
    for _ in range(10):
        # A new connection each time: with a shared port, the kernel spreads connections over both servers.
        with grpc.insecure_channel(address) as channel:
            stub = queue_service_pb2_grpc.QueueServiceStub(channel)
            assert stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id), timeout=10).job.id == job_id


def state(stub: queue_service_pb2_grpc.QueueServiceStub, job_id: str) -> int:
    return stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id), timeout=10).job.state


def test_a_second_serve_on_an_address_in_use_fails_and_the_first_keeps_answering(
    serve_factory: ServeFactory, tmp_path: Path
) -> None:
    first = serve_factory(NO_WORKERS)
    assert first.banner, first.stderr_text()

    second = serve_factory(NO_WORKERS, data_dir=tmp_path / "other-data", port=int(first.address.rpartition(":")[2]))
    assert second.process.wait(30) == 1
    line = one_line(second.stderr_text())
    assert "QUEUE_GRPC_ADDRESS" in line and first.address in line and "in use" in line
    # It failed before starting anything: no embedded Redis of its own was ever started.
    assert not (tmp_path / "other-data" / "redis").exists()
    assert_keeps_answering(first.address)


def test_a_second_serve_on_a_data_dir_in_use_fails_and_the_first_keeps_answering(
    serve_factory: ServeFactory, tmp_path: Path
) -> None:
    first = serve_factory(NO_WORKERS)
    assert first.banner, first.stderr_text()

    second = serve_factory(NO_WORKERS)  # the same tmp_path/data, another port
    assert second.process.wait(30) == 1
    line = one_line(second.stderr_text())
    assert "QUEUE_DATA_DIR" in line and str((tmp_path / "data").resolve()) in line
    assert "another queue-service holds it" in line
    assert_keeps_answering(first.address)
    # The lock lives as long as `serve`: once the first has stopped, a new one starts on the same data.
    assert first.stop() == 0
    third = serve_factory(NO_WORKERS)
    assert third.banner, third.stderr_text()
    assert third.stop() == 0


def test_grpc_does_not_share_a_port_another_server_holds(settings: Settings) -> None:
    """gRPC's default SO_REUSEPORT would let two servers share the port, each taking half the connections."""
    first = ServerThread(settings)
    address = first.start()
    try:

        async def second() -> None:
            create_server(settings, settings.redis_url, address)

        with pytest.raises(BindError, match="in use"):
            first.run(second())
    finally:
        first.stop()


@pytest.fixture
def listening() -> Iterator[str]:
    """A loopback address a plain socket listens on (no SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# (command, QUEUE_* variables, exit code, the setting the line names, what it says); {listening}
# is an address a plain socket listens on, {file} a file where a directory should be.
START_UP_ERRORS = [
    ("serve", {"QUEUE_TASK_MODULES": "nope.missing"}, 2, "QUEUE_TASK_MODULES", "'nope.missing': ModuleNotFoundError"),
    ("serve", {"QUEUE_TASK_MODULES": "tests.broken_tasks"}, 2, "QUEUE_TASK_MODULES", "RuntimeError: broken on purpose"),
    ("worker", {"QUEUE_TASK_MODULES": "nope.missing"}, 2, "QUEUE_TASK_MODULES", "No module named 'nope'"),
    ("serve", {"QUEUE_LOG_LEVEL": "loud"}, 2, "QUEUE_LOG_LEVEL", "'loud'"),
    ("serve", {"QUEUE_PREFETCH": "many"}, 2, "QUEUE_PREFETCH", "invalid literal"),
    ("worker", {"QUEUE_PREFETCH": "0"}, 2, "QUEUE_PREFETCH", "between 1 and 256"),
    ("worker", {"QUEUE_REDIS_URL": ""}, 2, "QUEUE_REDIS_URL", "embedded Redis lives inside `serve`"),
    ("serve", {"QUEUE_GRPC_ADDRESS": "nonsense"}, 1, "QUEUE_GRPC_ADDRESS=nonsense", "not host:port"),
    ("serve", {"QUEUE_GRPC_ADDRESS": "{listening}"}, 1, "QUEUE_GRPC_ADDRESS={listening}", "in use"),
    ("serve", {"QUEUE_METRICS_ADDRESS": "{listening}"}, 1, "QUEUE_METRICS_ADDRESS={listening}", "in use"),
    ("serve", {"QUEUE_DATA_DIR": "{file}"}, 1, "QUEUE_DATA_DIR={file}", "not a directory"),
]


@pytest.mark.parametrize("case", START_UP_ERRORS, ids=lambda case: f"{case[0]}-{'-'.join(case[1])}-{case[4][:20]}")
def test_start_up_errors_are_one_line_naming_the_setting(
    case: tuple[str, dict[str, str], int, str, str], listening: str, tmp_path: Path
) -> None:
    command, env, code, named, says = case
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    values = {"listening": listening, "file": str(a_file)}
    queue = {
        # A worker needs some QUEUE_REDIS_URL; nothing listens there, and these fail before connecting.
        "QUEUE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0" if command == "worker" else "",
        "QUEUE_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        "QUEUE_DATA_DIR": str(tmp_path / "data"),
        **{name: value.format(**values) for name, value in env.items()},
    }
    result = run_cli(command, queue)
    assert result.returncode == code, result.stderr
    line = one_line(result.stderr)
    assert line.startswith("queue-service: ")
    assert named.format(**values) in line and says in line
    assert result.stdout == ""


def test_an_unreachable_redis_at_start_is_said_once_and_serve_runs_on(serve_factory: ServeFactory) -> None:
    nothing_there = f"redis://:hunter2-{uuid.uuid4().hex}@127.0.0.1:{free_port()}/0"
    server = serve_factory({"QUEUE_REDIS_URL": nothing_there})
    assert server.banner, server.stderr_text()
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.stop() == 0
    output = server.banner + server.stderr_text()
    said = [line for line in output.splitlines() if "QUEUE_REDIS_URL" in line]
    assert len(said) == 1 and "does not answer" in said[0] and "NOT_SERVING" in said[0], output
    assert "Traceback" not in output
    assert "hunter2" not in output and ":***@127.0.0.1" in said[0]


def test_an_unreachable_redis_at_start_is_said_once_by_a_worker(
    worker_factory: Callable[..., WorkerProcess],
) -> None:
    nothing_there = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", worker_concurrency=1, shutdown_grace=5)
    worker = worker_factory(nothing_there)
    # Its consumer loop is running (and handles SIGTERM) once the supervisor has met the outage too.
    wait_for(lambda: "supervisor retries" in worker.log_text(), 30, what="the worker's consumer loop")
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    output = worker.log_text()
    said = [line for line in output.splitlines() if "QUEUE_REDIS_URL" in line]
    assert len(said) == 1 and "does not answer" in said[0] and "workers wait" in said[0], output
    assert "Traceback" not in output


def test_a_misspelled_variable_is_warned_about_once_with_the_closest_setting(serve_factory: ServeFactory) -> None:
    # Embedded Redis, so `serve` starts its in-process `worker` too: that one must not warn again.
    server = serve_factory({"QUEUE_WORKER_CONCURENCY": "1"})
    assert server.banner, server.stderr_text()
    # A job done means the in-process workers run (and have had their chance to warn).
    stub = stub_for(server.address)
    job_id = stub.Enqueue(request("diag.noop"), timeout=10).job_id
    wait_for(lambda: state(stub, job_id) == job_pb2.JOB_STATE_COMPLETED, 30, what="diag.noop COMPLETED")
    assert server.stop() == 0
    warned = [line for line in server.stderr_text().splitlines() if "QUEUE_WORKER_CONCURENCY" in line]
    assert len(warned) == 1, server.stderr_text()
    assert "WARNING" in warned[0] and "did you mean QUEUE_WORKER_CONCURRENCY?" in warned[0]
    # Nothing else warns: the variables the suite sets itself are all settings.
    assert server.stderr_text().count("is not a setting") == 1


@pytest.mark.parametrize(
    ("env", "diag"),
    [
        ({"QUEUE_ENV": "prod", "QUEUE_AUTH": "false"}, False),
        ({"QUEUE_ENV": "prod", "QUEUE_AUTH": "false", "QUEUE_DIAG_TASKS": "true"}, True),
        ({}, True),
    ],
    ids=["prod-default-off", "prod-explicit-on", "dev-default-on"],
)
def test_diag_tasks_are_off_by_default_in_prod(
    serve_factory: ServeFactory, redis_url: str, env: dict[str, str], diag: bool
) -> None:
    server = serve_factory({"QUEUE_REDIS_URL": redis_url, "QUEUE_KEY_PREFIX": f"qs-test-{uuid.uuid4().hex[:8]}", **env})
    assert server.banner, server.stderr_text()
    stub = stub_for(server.address)
    if diag:
        assert stub.Enqueue(request("diag.noop"), timeout=10).job_id
    else:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Enqueue(request("diag.noop"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown task" in (caught.value.details() or "")
    assert server.stop() == 0


def test_a_redis_password_never_reaches_stdout_or_stderr(
    serve_factory: ServeFactory, redis_binary: str, tmp_path: Path
) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    with RedisServer(tmp_path / "redis", binary=redis_binary, password=secret) as redis_server:
        server = serve_factory(
            {
                "QUEUE_REDIS_URL": redis_server.url,
                # Workers in-process too, so their logs are part of what is searched.
                "QUEUE_SERVE_WORKERS": "true",
                "QUEUE_WORKER_CONCURRENCY": "1",
                "QUEUE_LOG_LEVEL": "DEBUG",
            }
        )
        assert server.banner, server.stderr_text()
        assert f"Redis redis://:***@127.0.0.1:{redis_server.port}/0" in server.banner
        stub = stub_for(server.address)
        job_id = stub.Enqueue(request("diag.noop"), timeout=10).job_id
        wait_for(lambda: state(stub, job_id) == job_pb2.JOB_STATE_COMPLETED, 30, what="diag.noop COMPLETED")
        assert server.stop() == 0
    assert server.process.stdout is not None
    output = server.banner + server.process.stdout.read().decode() + server.stderr_text()
    assert secret not in output
