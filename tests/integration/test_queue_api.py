"""QueueService over the wire: Enqueue, EnqueueBatch, GetJob and every bad input."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from queueservice.v1 import admin_service_pb2, job_pb2, queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.settings import Settings

Stub = queue_service_pb2_grpc.QueueServiceStub


def payload(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def details(error: grpc.RpcError) -> list[object]:
    """The google.rpc details the server attached."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "error carries no google.rpc.Status"
    out: list[object] = []
    for any_detail in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ResourceInfo, error_details_pb2.QuotaFailure):
            if any_detail.Is(cls.DESCRIPTOR):
                message = cls()
                any_detail.Unpack(message)
                out.append(message)
    return out


def violations(error: grpc.RpcError) -> dict[str, str]:
    (bad_request,) = [d for d in details(error) if isinstance(d, error_details_pb2.BadRequest)]
    return {v.field: v.description for v in bad_request.field_violations}


def test_enqueue_then_get_job_reads_waiting(queue_stub: Stub) -> None:
    response = queue_stub.Enqueue(
        queue_service_pb2.EnqueueRequest(task="diag.sleep", payload=payload(seconds=1.5), priority=7)
    )
    assert response.job_id.startswith("default:")
    assert not response.deduplicated
    job = queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=response.job_id)).job
    assert job.id == response.job_id
    assert job.state == job_pb2.JOB_STATE_WAITING
    assert job.task == "diag.sleep"
    assert job.queue == "default"
    assert job.priority == 7
    assert job.attempts == 0
    assert job.max_attempts == 3
    assert dict(job.payload) == {"seconds": 1.5}
    assert job.enqueue_time == response.enqueue_time
    assert job.timeout.seconds == 300


def test_enqueue_on_named_queue_with_overrides(queue_stub: Stub) -> None:
    response = queue_stub.Enqueue(
        queue_service_pb2.EnqueueRequest(
            task="diag.noop", queue="emails", max_attempts=5, timeout=duration_pb2.Duration(seconds=9)
        )
    )
    job = queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=response.job_id)).job
    assert (job.queue, job.max_attempts, job.timeout.seconds) == ("emails", 5, 9)


def test_delay_and_schedule_time_make_the_job_delayed(queue_stub: Stub) -> None:
    delayed = queue_stub.Enqueue(
        queue_service_pb2.EnqueueRequest(task="diag.noop", delay=duration_pb2.Duration(seconds=60))
    )
    job = queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=delayed.job_id)).job
    assert job.state == job_pb2.JOB_STATE_DELAYED
    assert job.schedule_time.ToMilliseconds() - job.enqueue_time.ToMilliseconds() == 60_000

    at = timestamp_pb2.Timestamp()
    at.FromSeconds(delayed.enqueue_time.seconds + 3600)
    scheduled = queue_stub.Enqueue(queue_service_pb2.EnqueueRequest(task="diag.noop", schedule_time=at))
    job = queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=scheduled.job_id)).job
    assert job.state == job_pb2.JOB_STATE_DELAYED
    assert job.schedule_time == at


def test_enqueue_batch_returns_results_in_order(queue_stub: Stub) -> None:
    requests = [queue_service_pb2.EnqueueRequest(task="diag.sleep", payload=payload(seconds=i)) for i in range(25)]
    response = queue_stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=requests))
    assert len(response.results) == 25
    assert len({r.job_id for r in response.results}) == 25
    for i, result in enumerate(response.results):
        job = queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=result.job_id)).job
        assert dict(job.payload) == {"seconds": i}


def test_idempotency_key_returns_the_first_job(queue_stub: Stub) -> None:
    request = queue_service_pb2.EnqueueRequest(task="diag.noop", idempotency_key="order-42")
    first = queue_stub.Enqueue(request)
    second = queue_stub.Enqueue(request)
    assert not first.deduplicated
    assert second.deduplicated
    assert second.job_id == first.job_id
    assert second.enqueue_time == first.enqueue_time
    other_queue = queue_stub.Enqueue(
        queue_service_pb2.EnqueueRequest(task="diag.noop", idempotency_key="order-42", queue="emails")
    )
    assert other_queue.job_id != first.job_id


def test_batch_with_repeated_idempotency_keys_across_queues(queue_stub: Stub) -> None:
    jobs = [
        queue_service_pb2.EnqueueRequest(task="diag.noop", idempotency_key="a"),
        queue_service_pb2.EnqueueRequest(task="diag.noop", idempotency_key="a", queue="emails"),
        queue_service_pb2.EnqueueRequest(task="diag.noop", idempotency_key="a"),
        queue_service_pb2.EnqueueRequest(task="diag.noop"),
    ]
    results = queue_stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=jobs)).results
    assert [r.deduplicated for r in results] == [False, False, True, False]
    assert results[2].job_id == results[0].job_id
    assert [r.job_id.split(":")[0] for r in results] == ["default", "emails", "default", "default"]
    assert len({results[0].job_id, results[1].job_id, results[3].job_id}) == 3


def test_racing_enqueues_with_one_idempotency_key_create_one_job(queue_stub: Stub) -> None:
    request = queue_service_pb2.EnqueueRequest(task="diag.noop", idempotency_key="race")
    barrier = threading.Barrier(16)
    results: list[queue_service_pb2.EnqueueResponse] = []

    def enqueue() -> None:
        barrier.wait()
        results.append(queue_stub.Enqueue(request))

    threads = [threading.Thread(target=enqueue) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({r.job_id for r in results}) == 1
    assert sum(not r.deduplicated for r in results) == 1


@pytest.mark.parametrize(
    ("request_", "field", "fragment"),
    [
        (queue_service_pb2.EnqueueRequest(), "task", "required"),
        (queue_service_pb2.EnqueueRequest(task="no.such.task"), "task", "unknown task 'no.such.task'"),
        (queue_service_pb2.EnqueueRequest(task="diag.noop", priority=-1), "priority", "between 0 and 1000"),
        (queue_service_pb2.EnqueueRequest(task="diag.noop", priority=1001), "priority", "between 0 and 1000"),
        (queue_service_pb2.EnqueueRequest(task="diag.noop", max_attempts=0), "max_attempts", "between 1 and 100"),
        (
            queue_service_pb2.EnqueueRequest(task="diag.noop", delay=duration_pb2.Duration(seconds=-5)),
            "delay",
            "between 0",
        ),
        (
            queue_service_pb2.EnqueueRequest(task="diag.noop", timeout=duration_pb2.Duration(seconds=0)),
            "timeout",
            "positive",
        ),
        (queue_service_pb2.EnqueueRequest(task="diag.noop", idempotency_key="k" * 300), "idempotency_key", "256"),
        (queue_service_pb2.EnqueueRequest(task="diag.noop", queue="bad name!"), "queue", "not a queue name"),
        (
            queue_service_pb2.EnqueueRequest(
                task="diag.noop", schedule_time=timestamp_pb2.Timestamp(seconds=253402300799)
            ),
            "schedule_time",
            "at most",
        ),
    ],
)
def test_malformed_enqueue_is_invalid_argument_naming_the_field(
    queue_stub: Stub, request_: queue_service_pb2.EnqueueRequest, field: str, fragment: str
) -> None:
    error = rpc_error(lambda: queue_stub.Enqueue(request_))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in violations(error)[field]
    assert field in (error.details() or "")


def test_unknown_queue_is_not_found(queue_stub: Stub) -> None:
    error = rpc_error(lambda: queue_stub.Enqueue(queue_service_pb2.EnqueueRequest(task="diag.noop", queue="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no queue named 'nope'" in (error.details() or "")
    (info,) = details(error)
    assert isinstance(info, error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("queue", "nope")


def test_payload_over_the_limit_is_resource_exhausted(
    settings: Settings, server_factory: Callable[[Settings], str]
) -> None:
    address = server_factory(replace(settings, max_payload_bytes=1000))
    with grpc.insecure_channel(address) as channel:
        stub = Stub(channel)
        stub.Enqueue(queue_service_pb2.EnqueueRequest(task="diag.noop", payload=payload(blob="x" * 900)))
        big = payload(blob="x" * 1000)
        error = rpc_error(lambda: stub.Enqueue(queue_service_pb2.EnqueueRequest(task="diag.noop", payload=big)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"payload is {big.ByteSize()} bytes; the limit is 1000 bytes" in (error.details() or "")


def test_default_payload_limit_is_one_mebibyte(queue_stub: Stub) -> None:
    error = rpc_error(
        lambda: queue_stub.Enqueue(
            queue_service_pb2.EnqueueRequest(task="diag.noop", payload=payload(blob="x" * (1024 * 1024)))
        )
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_batch_over_the_limit_is_resource_exhausted(queue_stub: Stub) -> None:
    jobs = [queue_service_pb2.EnqueueRequest(task="diag.noop")] * 1001
    error = rpc_error(lambda: queue_stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=jobs)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 1000" in (error.details() or "")
    response = queue_stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=jobs[:1000]))
    assert len(response.results) == 1000


def test_batch_is_all_or_nothing(queue_stub: Stub, settings: Settings) -> None:
    jobs = [queue_service_pb2.EnqueueRequest(task="diag.noop", idempotency_key=f"b{i}") for i in range(3)]
    jobs.append(queue_service_pb2.EnqueueRequest(task="missing"))
    error = rpc_error(lambda: queue_stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=jobs)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs[3].task" in violations(error)
    # Nothing from the rejected batch was written: the keys are still fresh.
    first = queue_stub.Enqueue(jobs[0])
    assert not first.deduplicated


def test_empty_batch_is_invalid_argument(queue_stub: Stub) -> None:
    error = rpc_error(lambda: queue_stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jobs" in violations(error)


# Well-formed ids that name no job; malformed ones are INVALID_ARGUMENT (test_hostile_input.py).
@pytest.mark.parametrize("job_id", ["default:" + "0" * 32, "nope:" + "a" * 32])
def test_unknown_job_id_is_not_found(queue_stub: Stub, job_id: str) -> None:
    error = rpc_error(lambda: queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert job_id in (error.details() or "")


def test_empty_job_id_is_invalid_argument(queue_stub: Stub) -> None:
    error = rpc_error(lambda: queue_stub.GetJob(queue_service_pb2.GetJobRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job_id" in violations(error)


def test_garbage_bytes_get_a_clear_error_and_the_server_keeps_serving(channel: grpc.Channel, queue_stub: Stub) -> None:
    raw = channel.unary_unary("/queueservice.v1.QueueService/Enqueue", None, None)
    for garbage in [b"\xff\xff\xff\xff", b"\x0a\x05ab", bytes(range(256))]:
        error = rpc_error(lambda g=garbage: raw(g))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request body does not parse" in (error.details() or "")
    assert queue_stub.Enqueue(queue_service_pb2.EnqueueRequest(task="diag.noop")).job_id


def test_admin_monitoring_rpcs_answer_over_the_wire(admin_stub: Any, queue_stub: Stub) -> None:
    queue_stub.Enqueue(queue_service_pb2.EnqueueRequest(task="diag.noop", queue="emails"))
    stats = admin_stub.GetStats(admin_service_pb2.GetStatsRequest())
    assert [(q.queue, q.counts.waiting) for q in stats.queues] == [("default", 0), ("emails", 1)]
    assert all(q.health.level == admin_service_pb2.HEALTH_LEVEL_EXCELLENT for q in stats.queues)
    (emails,) = admin_stub.GetStats(admin_service_pb2.GetStatsRequest(queue="emails")).queues
    assert emails.counts.waiting == 1 and emails.oldest_waiting_age.ToNanoseconds() >= 0

    report = admin_stub.GetPerformance(admin_service_pb2.GetPerformanceRequest(queue="default"))
    assert report.queue == "default"
    assert 3600 <= report.window.seconds <= 3660
    assert report.wait_time.count == 0 and report.alerts == []
    assert len(report.throughput.history) == 61
    assert report.redis.used_memory_bytes > 0 and report.redis.connected_clients > 0

    # A stream with nothing to send stays open, live, until the caller's deadline.
    stream = admin_stub.StreamTimings(admin_service_pb2.StreamTimingsRequest(last_n=5), timeout=0.5)
    error = rpc_error(lambda: list(stream))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    for call, request in [
        ("GetStats", admin_service_pb2.GetStatsRequest(queue="nope")),
        ("GetPerformance", admin_service_pb2.GetPerformanceRequest(queue="nope")),
    ]:
        error = rpc_error(lambda c=call, r=request: getattr(admin_stub, c)(r))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.NOT_FOUND
