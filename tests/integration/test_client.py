"""The client package against the real server (gRPC on port 0, real Redis, real workers)."""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import pytest

# Submodules rather than the package: the package's __init__ is exercised in a
# subprocess below, as an installed client would import it.
from queueservice.aio import AsyncQueueClient
from queueservice.client import QueueClient
from queueservice.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    QueueError,
    ResourceExhausted,
    Unavailable,
)
from queueservice.options import job_request
from queueservice.v1 import admin_service_pb2, job_pb2
from queueservice_server.settings import Settings
from tests.support import ROOT, WorkerProcess, wait_for

# Well-formed (a malformed id is INVALID_ARGUMENT), of no job.
UNKNOWN_JOB = "default:" + "0" * 32

StartWorker = Callable[..., WorkerProcess]
StartServer = Callable[[Settings], str]


@pytest.fixture
def client(address: str) -> Iterator[QueueClient]:
    with QueueClient(address) as client:
        yield client


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never speaks HTTP/2: calls hang until their deadline."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def dead_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# Round trips.


def test_enqueue_returns_an_id_that_get_job_reads(client: QueueClient) -> None:
    job_id = client.enqueue("diag.noop", {"n": 1, "tags": ["a", "b"]})
    assert job_id.startswith("default:")
    job = client.get_job(job_id)
    assert job.id == job_id
    assert job.state == job_pb2.JOB_STATE_WAITING
    assert job.task == "diag.noop"
    assert job.queue == "default"
    assert dict(job.payload) == {"n": 1, "tags": ["a", "b"]}


def test_job_options_reach_the_job(client: QueueClient) -> None:
    delayed = client.get_job(
        client.enqueue(
            "diag.noop",
            queue="emails",
            delay=datetime.timedelta(minutes=5),
            priority=7,
            max_attempts=9,
            timeout=12.5,
            idempotency_key="options-1",
        )
    )
    assert delayed.queue == "emails"
    assert delayed.state == job_pb2.JOB_STATE_DELAYED
    assert delayed.priority == 7
    assert delayed.max_attempts == 9
    assert delayed.timeout.ToMilliseconds() == 12_500
    assert delayed.idempotency_key == "options-1"
    assert delayed.schedule_time.ToMilliseconds() - delayed.enqueue_time.ToMilliseconds() == pytest.approx(
        300_000, abs=2_000
    )

    at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    scheduled = client.get_job(client.enqueue("diag.noop", schedule_time=at))
    assert scheduled.state == job_pb2.JOB_STATE_DELAYED
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    assert scheduled.schedule_time.ToMilliseconds() == (at - epoch) // datetime.timedelta(milliseconds=1)


def test_job_with_a_worker_reaches_completed(
    client: QueueClient, settings: Settings, worker_factory: StartWorker
) -> None:
    worker_factory(settings)
    job_id = client.enqueue("diag.noop")

    def completed() -> job_pb2.Job | None:
        job = client.get_job(job_id)
        return job if job.state == job_pb2.JOB_STATE_COMPLETED else None

    job = wait_for(completed, 30, what=f"{job_id} COMPLETED")
    assert job.attempts == 1
    assert job.worker_id


def test_enqueue_batch_keeps_request_order(client: QueueClient) -> None:
    results = client.enqueue_batch(
        [
            job_request("diag.sleep", {"seconds": 0}, queue="emails"),
            {"task": "diag.noop", "payload": {"i": 1}},
            {"task": "diag.fail", "queue": "emails", "priority": 3},
        ]
    )
    assert len(results) == 3
    assert len({r.job_id for r in results}) == 3
    jobs = [client.get_job(r.job_id) for r in results]
    assert [(j.task, j.queue) for j in jobs] == [
        ("diag.sleep", "emails"),
        ("diag.noop", "default"),
        ("diag.fail", "emails"),
    ]
    assert dict(jobs[1].payload) == {"i": 1}
    assert jobs[2].priority == 3


def test_idempotency_key_returns_the_first_job(client: QueueClient) -> None:
    first = client.enqueue_job("diag.noop", {"v": 1}, idempotency_key="order-42")
    second = client.enqueue_job("diag.noop", {"v": 2}, idempotency_key="order-42")
    assert not first.deduplicated
    assert second.deduplicated
    assert second.job_id == first.job_id
    assert client.enqueue("diag.noop", idempotency_key="order-42") == first.job_id
    assert dict(client.get_job(first.job_id).payload) == {"v": 1}


# Errors.


def test_unknown_task_is_invalid_argument_naming_the_field(client: QueueClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.enqueue("no.such.task")
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "no.such.task" in error.message
    assert [field for field, _ in error.field_violations] == ["task"]
    assert isinstance(error.__cause__, grpc.RpcError)


def test_batch_violations_name_the_job(client: QueueClient) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.enqueue_batch([job_request("diag.noop"), job_request("diag.noop", priority=5000)])
    assert [field for field, _ in caught.value.field_violations] == ["jobs[1].priority"]


def test_unknown_job_and_unknown_queue_are_not_found(client: QueueClient) -> None:
    with pytest.raises(NotFound) as job_missing:
        client.get_job(UNKNOWN_JOB)
    assert (job_missing.value.resource_type, job_missing.value.resource_name) == ("job", UNKNOWN_JOB)

    with pytest.raises(NotFound) as queue_missing:
        client.enqueue("diag.noop", queue="nope")
    assert (queue_missing.value.resource_type, queue_missing.value.resource_name) == ("queue", "nope")
    assert "nope" in queue_missing.value.message


def test_payload_over_the_limit_is_resource_exhausted(settings: Settings, server_factory: StartServer) -> None:
    address = server_factory(replace(settings, max_payload_bytes=100))
    with QueueClient(address) as client:
        client.enqueue("diag.noop", {"small": 1})
        with pytest.raises(ResourceExhausted) as caught:
            client.enqueue("diag.noop", {"blob": "x" * 200})
    assert [subject for subject, _ in caught.value.quota_violations] == ["payload"]
    assert "100 bytes" in caught.value.message


def test_default_deadline_applies_to_every_call(silent_port: int) -> None:
    # Without a deadline such a call ends UNAVAILABLE after gRPC's 20 s handshake
    # timeout; DEADLINE_EXCEEDED shows the client's deadline was applied.
    with QueueClient(f"127.0.0.1:{silent_port}", timeout=0.2) as client, pytest.raises(DeadlineExceeded):
        client.get_job("default:x")


def test_per_call_deadline_overrides_the_default(silent_port: int) -> None:
    with QueueClient(f"127.0.0.1:{silent_port}", timeout=None) as client, pytest.raises(DeadlineExceeded):
        client.enqueue("diag.noop", deadline=0.2)


def test_dead_port_fails_fast() -> None:
    with QueueClient(f"127.0.0.1:{dead_port()}", timeout=2) as client, pytest.raises((Unavailable, DeadlineExceeded)):
        client.get_job("default:x")


def test_admin_calls(client: QueueClient, settings: Settings, worker_factory: StartWorker) -> None:
    assert [q.queue for q in client.get_stats().queues] == ["default", "emails"]
    report = client.get_performance("default", window=datetime.timedelta(minutes=5))
    assert (report.queue, len(report.throughput.history)) == ("default", 6)
    with pytest.raises(InvalidArgument) as invalid:
        client.get_performance(window=datetime.timedelta(seconds=1))
    assert [field for field, _ in invalid.value.field_violations] == ["window"]
    with pytest.raises(NotFound):
        client.get_stats("nope")
    assert list(client.retry_failed("default", job_ids=[UNKNOWN_JOB]).not_found_job_ids) == [UNKNOWN_JOB]

    worker_factory(settings)
    job_id = client.enqueue("diag.noop")
    stream = client.stream_timings(last_n=10, deadline=15)
    first = next(stream)
    assert (first.timing.job_id, first.timing.outcome) == (job_id, admin_service_pb2.JOB_OUTCOME_COMPLETED)
    assert first.cursor
    stream.close()  # type: ignore[attr-defined]
    # Resuming after the last event, with nothing new, waits live until the deadline.
    with pytest.raises(DeadlineExceeded):
        next(client.stream_timings(cursor=first.cursor, deadline=0.5))


# Metadata and channels.


if TYPE_CHECKING:
    _Interceptor = grpc.UnaryUnaryClientInterceptor[Any, Any]
else:  # not subscriptable at run time
    _Interceptor = grpc.UnaryUnaryClientInterceptor


class _RecordingInterceptor(_Interceptor):
    """Sees each call as it leaves the client."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None, tuple[tuple[str, str], ...]]] = []

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        self.calls.append(
            (client_call_details.method, client_call_details.timeout, tuple(client_call_details.metadata or ()))
        )
        return continuation(client_call_details, request)


def test_metadata_and_deadline_go_with_every_call(address: str) -> None:
    recorder = _RecordingInterceptor()
    with grpc.insecure_channel(address) as raw:
        channel = grpc.intercept_channel(raw, recorder)
        client = QueueClient.from_channel(channel, timeout=7, metadata=[("authorization", "Bearer t0ken")])
        job_id = client.enqueue("diag.noop")
        client.get_job(job_id, deadline=3)
        client.close()
        # The channel belongs to the caller: still usable after the client closes.
        assert QueueClient.from_channel(raw).get_job(job_id).id == job_id
    auth = (("authorization", "Bearer t0ken"),)
    assert [(method.rsplit("/", 1)[1], metadata) for method, _, metadata in recorder.calls] == [
        ("Enqueue", auth),
        ("GetJob", auth),
    ]
    assert [timeout for _, timeout, _ in recorder.calls] == [pytest.approx(7, abs=0.5), pytest.approx(3, abs=0.5)]


# The asyncio client.


def test_async_client_round_trip(address: str) -> None:
    async def run() -> None:
        async with AsyncQueueClient(address, metadata=[("x-caller", "tests")]) as client:
            job_id = await client.enqueue("diag.noop", {"k": "v"}, queue="emails")
            job = await client.get_job(job_id)
            assert (job.id, job.queue, job.state) == (job_id, "emails", job_pb2.JOB_STATE_WAITING)
            assert dict(job.payload) == {"k": "v"}

            first = await client.enqueue_job("diag.noop", idempotency_key="async-1")
            again = await client.enqueue_job("diag.noop", idempotency_key="async-1")
            assert (again.job_id, again.deduplicated) == (first.job_id, True)

            results = await client.enqueue_batch([{"task": "diag.noop"}, job_request("diag.fail", queue="emails")])
            tasks = [(await client.get_job(r.job_id)).task for r in results]
            assert tasks == ["diag.noop", "diag.fail"]

            with pytest.raises(InvalidArgument) as invalid:
                await client.enqueue("no.such.task")
            assert [field for field, _ in invalid.value.field_violations] == ["task"]
            with pytest.raises(NotFound):
                await client.get_job("emails:" + "0" * 32)
            stats = await client.get_stats("emails")
            assert [(q.queue, q.counts.waiting) for q in stats.queues] == [("emails", 2)]
            report = await client.get_performance("emails")
            assert report.queue == "emails" and report.health_level == admin_service_pb2.HEALTH_LEVEL_EXCELLENT
            with pytest.raises(DeadlineExceeded):
                async for _ in client.stream_timings("emails", last_n=5, deadline=0.5):
                    pass

    asyncio.run(run())


def test_async_client_deadline(silent_port: int) -> None:
    async def run() -> None:
        async with AsyncQueueClient(f"127.0.0.1:{silent_port}", timeout=0.2) as client:
            with pytest.raises(DeadlineExceeded):
                await client.get_job("default:x")

    asyncio.run(run())


# Request building, no server needed.


def test_job_request_rejects_what_the_server_cannot_mean() -> None:
    with pytest.raises(ValueError, match="not both"):
        job_request("diag.noop", delay=1, schedule_time=datetime.datetime.now(datetime.UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        job_request("diag.noop", schedule_time=datetime.datetime(2030, 1, 1))
    with pytest.raises(TypeError, match="unknown job options: prio"):
        misspelt: dict[str, Any] = {"prio": 1}
        job_request("diag.noop", **misspelt)
    with pytest.raises(ValueError, match="metadata key"):
        QueueClient("127.0.0.1:1", metadata=[("Authorization", "x")])
    with pytest.raises(ValueError, match="timeout"):
        QueueClient("127.0.0.1:1", timeout=0)


def test_job_request_fields() -> None:
    request = job_request("diag.noop", {"a": [1, None]}, delay=1.5, timeout=datetime.timedelta(seconds=3))
    assert request.WhichOneof("schedule") == "delay"
    assert request.delay.ToMilliseconds() == 1500
    assert request.timeout.ToMilliseconds() == 3000
    assert not request.HasField("max_attempts")
    assert job_request("diag.noop", max_attempts=1).max_attempts == 1
    assert not job_request("diag.noop").HasField("payload")


# The installed package.

_PACKAGE_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.modules["google.rpc"] = None  # googleapis-common-protos not installed
    import queueservice

    loaded = sorted(m for m in ("redis", "huey", "queueservice_server", "grpc_status") if m in sys.modules)
    with queueservice.QueueClient(sys.argv[1]) as client:
        try:
            client.enqueue("no.such.task")
        except queueservice.InvalidArgument as error:
            result = {"message": error.message, "details": len(error.details), "fields": error.field_violations}
    result["loaded"] = loaded
    result["exports"] = sorted(queueservice.__all__)
    print(json.dumps(result))
    """
)


def test_package_needs_only_grpcio_and_protobuf(address: str) -> None:
    """Imported as a client machine would: no server modules, and no google.rpc for the details."""
    completed = subprocess.run(
        [sys.executable, "-c", _PACKAGE_CHECK, address],
        env={"PYTHONPATH": str(ROOT / "client"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["loaded"] == []
    assert "no.such.task" in result["message"]
    assert (result["details"], result["fields"]) == (0, [])
    assert {"QueueClient", "AsyncQueueClient", "QueueError", "job_request", "Job", "JobState"} <= set(result["exports"])


def test_error_is_a_queue_error_with_a_readable_str(client: QueueClient) -> None:
    with pytest.raises(QueueError) as caught:
        client.get_job("")
    assert isinstance(caught.value, InvalidArgument)
    assert str(caught.value).startswith("INVALID_ARGUMENT: job_id")
