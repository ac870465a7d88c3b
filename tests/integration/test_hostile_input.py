"""Hostile input over the wire: values outside protobuf's ranges, cursors that no stream
reached, malformed job ids, and task errors whose stored text is cut inside a character.
Each is a clear INVALID_ARGUMENT naming the field, or an answer, never INTERNAL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, timestamp_pb2

from queueservice.v1 import admin_service_pb2 as pb
from queueservice.v1 import admin_service_pb2_grpc, queue_service_pb2
from queueservice_server.core.keys import JobFields, QueueKeys, ServiceKeys, TimingFields, WorkerFields
from queueservice_server.core.redis import time_ms
from queueservice_server.monitor.events import parse_id
from queueservice_server.monitor.figures import MINUTE_MS
from queueservice_server.settings import Settings
from tests.integration.test_queue_api import Stub, rpc_error, violations
from tests.support import WorkerProcess, request, wait_all

Admin = admin_service_pb2_grpc.QueueAdminServiceStub

BAD_TIMESTAMPS = [
    timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=-1),
    timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=1_000_000_000),
    timestamp_pb2.Timestamp(seconds=-62_135_596_801),  # the second before 0001-01-01
    timestamp_pb2.Timestamp(seconds=253_402_300_800),  # the second after 9999-12-31T23:59:59
    timestamp_pb2.Timestamp(seconds=-(2**63)),
]
BAD_DURATIONS = [
    duration_pb2.Duration(seconds=5, nanos=-1),  # mixed signs
    duration_pb2.Duration(seconds=-5, nanos=1),
    duration_pb2.Duration(seconds=0, nanos=1_000_000_000),
    duration_pb2.Duration(seconds=0, nanos=-1_000_000_000),
    duration_pb2.Duration(seconds=315_576_000_001),  # past 10,000 years
    duration_pb2.Duration(seconds=-(2**63)),
]


def invalid(error: grpc.RpcError, field: str, fragment: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert fragment in violations(error)[field], violations(error)
    assert field in (error.details() or "")


@pytest.mark.parametrize("stamp", BAD_TIMESTAMPS, ids=str)
def test_schedule_time_outside_the_timestamp_range_is_invalid_argument(
    queue_stub: Stub, stamp: timestamp_pb2.Timestamp
) -> None:
    bad = request("diag.noop", schedule_time=stamp)
    invalid(rpc_error(lambda: queue_stub.Enqueue(bad)), "schedule_time", "not a valid Timestamp")
    batch = queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.noop")] * 3 + [bad])
    invalid(rpc_error(lambda: queue_stub.EnqueueBatch(batch)), "jobs[3].schedule_time", "not a valid Timestamp")
    # The edges themselves are valid Timestamps (the far one is past the delay limit).
    early = queue_stub.Enqueue(request("diag.noop", schedule_time=timestamp_pb2.Timestamp(seconds=-62_135_596_800)))
    assert early.job_id
    latest = timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    invalid(
        rpc_error(lambda: queue_stub.Enqueue(request("diag.noop", schedule_time=latest))), "schedule_time", "at most"
    )


@pytest.mark.parametrize("field", ["delay", "timeout"])
@pytest.mark.parametrize("duration", BAD_DURATIONS, ids=str)
def test_durations_outside_the_duration_range_or_with_mixed_signs_are_invalid_argument(
    queue_stub: Stub, admin_stub: Admin, field: str, duration: duration_pb2.Duration
) -> None:
    fields: dict[str, Any] = {field: duration}
    bad = request("diag.noop", **fields)
    invalid(rpc_error(lambda: queue_stub.Enqueue(bad)), field, "not a valid Duration")
    batch = queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.noop")] * 3 + [bad])
    invalid(rpc_error(lambda: queue_stub.EnqueueBatch(batch)), f"jobs[3].{field}", "not a valid Duration")
    window = pb.GetPerformanceRequest(window=duration)
    invalid(rpc_error(lambda: admin_stub.GetPerformance(window)), "window", "not a valid Duration")


def _stream_timings(admin: Admin, timeout: float = 5, **fields: Any) -> list[pb.StreamTimingsResponse]:
    return list(admin.StreamTimings(pb.StreamTimingsRequest(**fields), timeout=timeout))


def _stays_open(admin: Admin, **fields: Any) -> None:
    """The call was accepted: it stays open, live, until its deadline."""
    error = rpc_error(lambda: _stream_timings(admin, timeout=0.5, **fields))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()


@pytest.mark.parametrize(
    ("cursor", "fragment"),
    [
        (f"default/{2**64}-0/1", "past 64 bits"),
        (f"default/5-{2**64}/1", "past 64 bits"),
        (f"default/5-0/{2**63}", "past 64 bits"),
        ("default/+5-0/1", "unsigned numbers"),
        ("default/1_0-0/1", "unsigned numbers"),
        ("default/ 5-0/1", "unsigned numbers"),
        ("default/5/1", "unsigned numbers"),
    ],
)
def test_a_cursor_with_numbers_no_stream_has_is_invalid_argument(admin_stub: Admin, cursor: str, fragment: str) -> None:
    invalid(rpc_error(lambda: _stream_timings(admin_stub, cursor=cursor)), "cursor", fragment)


def test_a_cursor_ahead_of_the_newest_timing_is_invalid_argument(admin_stub: Admin, settings: Settings) -> None:
    # No timings yet: any position is ahead of the stream.
    error = rpc_error(lambda: _stream_timings(admin_stub, cursor="default/1-0/1"))
    invalid(error, "cursor", "queue 'default' at 1-0 is ahead of the newest timing in Redis (the stream is empty)")
    assert "without a cursor, or with last_n" in (error.details() or "")

    direct = redis.Redis.from_url(settings.redis_url)
    newest = {}
    for queue in ("default", "emails"):
        raw = direct.xadd(QueueKeys(settings.key_prefix, queue).timings, {TimingFields.SEQ: 1})
        newest[queue] = "-".join(map(str, parse_id(raw)))
    direct.close()
    ms, _, n = newest["default"].partition("-")
    at_end = f"default/{newest['default']}/1|emails/{newest['emails']}/1"
    _stays_open(admin_stub, cursor=at_end)
    ahead = f"default/{int(ms) + 1}-0/1|emails/{newest['emails']}/1"
    error = rpc_error(lambda: _stream_timings(admin_stub, cursor=ahead))
    invalid(error, "cursor", f"queue 'default' at {int(ms) + 1}-0 is ahead of the newest timing in Redis ({ms}-{n})")
    assert "emails" not in violations(error)["cursor"]
    # Ahead within one millisecond, too.
    invalid(rpc_error(lambda: _stream_timings(admin_stub, cursor=f"default/{ms}-{int(n) + 1}/1")), "cursor", "ahead")


@pytest.mark.parametrize(
    "job_id",
    ["hello", "default:x", "default:" + "A" * 32, "default:" + "é" * 32, ":" + "a" * 32, "bad queue!:" + "a" * 32],
)
def test_a_malformed_job_id_is_invalid_argument_saying_what_a_job_id_looks_like(
    queue_stub: Stub, admin_stub: Admin, job_id: str
) -> None:
    error = rpc_error(lambda: queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)))
    invalid(error, "job_id", "is not a job id: a job id is `queue:` and 32 lowercase hex digits")

    unknown = "default:" + "0" * 32
    retry = pb.RetryFailedRequest(queue="default", job_ids=[unknown, job_id])
    error = rpc_error(lambda: admin_stub.RetryFailed(retry))
    invalid(error, "job_ids[1]", "is not a job id")
    assert "job_ids[0]" not in violations(error)


def test_retry_failed_lists_malformed_ids_and_answers_well_formed_unknown_ones(admin_stub: Admin) -> None:
    unknown = ["default:" + "0" * 32, "emails:" + "1" * 32]
    answer = admin_stub.RetryFailed(pb.RetryFailedRequest(queue="default", job_ids=unknown))
    assert sorted(answer.not_found_job_ids) == unknown and answer.retried_count == 0

    many = [f"junk-{i}" for i in range(25)]
    error = rpc_error(lambda: admin_stub.RetryFailed(pb.RetryFailedRequest(queue="default", job_ids=many)))
    found = violations(error)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f"job_ids[{i}]" for i in range(10)] == [field for field in found if field != "job_ids"]
    assert found["job_ids[9]"] == "'junk-9' is not a job id"
    assert found["job_ids"].startswith("and 15 more ids that are not job ids; a job id is `queue:` and 32")


def test_long_hostile_text_is_echoed_cut_so_the_error_still_reaches_the_caller(
    queue_stub: Stub, admin_stub: Admin
) -> None:
    """Errors travel in metadata that clients cap at 8 KiB: what they echo of the input is cut."""
    long = "é" * 3000
    error = rpc_error(lambda: queue_stub.Enqueue(request(long)))
    invalid(error, "task", "unknown task '\\xe9\\xe9")
    assert "(3000 characters)" in violations(error)["task"]
    invalid(rpc_error(lambda: queue_stub.Enqueue(request("diag.noop", queue=long))), "queue", "is not a queue name")
    invalid(rpc_error(lambda: queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=long))), "job_id", "not a job")
    retry = pb.RetryFailedRequest(queue="default", job_ids=[long] * 100)
    invalid(rpc_error(lambda: admin_stub.RetryFailed(retry)), "job_ids[9]", "is not a job id")
    invalid(rpc_error(lambda: _stream_timings(admin_stub, task=long)), "task", "unknown task")
    cursor = "default/" + "9" * 4000 + "-0/1"
    invalid(
        rpc_error(lambda: _stream_timings(admin_stub, cursor=cursor)), "cursor", "part 1 (default) has a number past"
    )
    # The worst the limits allow: non-ASCII (percent-encoded threefold in grpc-message) in every field of
    # every job of a full batch, and as many 4-byte-character ids as RetryFailed takes.
    emoji = "😀" * 256
    batch = queue_service_pb2.EnqueueBatchRequest(jobs=[request(emoji[:64], queue=emoji[:64])] * 1000)
    error = rpc_error(lambda: queue_stub.EnqueueBatch(batch))
    invalid(error, "jobs[0].task", "unknown task")
    assert len(error.details() or "") < 1000
    retry = pb.RetryFailedRequest(queue="default", job_ids=[emoji[:64]] * 10_000)
    invalid(rpc_error(lambda: admin_stub.RetryFailed(retry)), "job_ids[0]", "is not a job id")


# Each cuts the timings record's 500 bytes inside a multi-byte character, at every offset:
# format_error() prefixes "RuntimeError: " (14 bytes).
CUT_MESSAGES = [
    "x" + "é" * 400,
    "x" + "€" * 300,
    "xy" + "€" * 300,
    "x" + "😀" * 200,
    "xy" + "😀" * 200,
    "xyz" + "😀" * 200,
]


def _reads_answer(queue_stub: Stub, admin_stub: Admin, job_ids: list[str]) -> list[pb.StreamTimingsResponse]:
    """GetStats, GetPerformance, GetJob and StreamTimings all answer; the jobs' records and timings."""
    (stats,) = admin_stub.GetStats(pb.GetStatsRequest(queue="default")).queues
    assert stats.counts.failed == len(job_ids)
    admin_stub.GetStats(pb.GetStatsRequest())
    admin_stub.GetPerformance(pb.GetPerformanceRequest())
    for job_id in job_ids:
        assert queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)).job.id == job_id
    call = admin_stub.StreamTimings(pb.StreamTimingsRequest(queue="default", last_n=len(job_ids)), timeout=10)
    timings: list[pb.StreamTimingsResponse] = []
    for timing in call:
        timings.append(timing)
        if len(timings) == len(job_ids):
            break
    call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
    return timings


def test_task_errors_cut_inside_a_character_leave_every_read_answering(
    settings: Settings, queue_stub: Stub, admin_stub: Admin, worker_factory: Callable[..., WorkerProcess]
) -> None:
    jobs = [request("diag.fail", {"message": message}, max_attempts=1) for message in CUT_MESSAGES]
    job_ids = [r.job_id for r in queue_stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=jobs)).results]
    worker_factory(settings)
    wait_all(settings, job_ids, "FAILED", 30)

    timings = _reads_answer(queue_stub, admin_stub, job_ids)
    assert sorted(t.timing.job_id for t in timings) == sorted(job_ids)
    for job_id, message in zip(job_ids, CUT_MESSAGES, strict=True):
        assert queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)).job.error == f"RuntimeError: {message}"
    # The stored record itself is cut at a character boundary, as close to 500 bytes as it goes.
    direct = redis.Redis.from_url(settings.redis_url)
    entries = cast(
        list[tuple[bytes, dict[bytes, bytes]]], direct.xrange(QueueKeys(settings.key_prefix, "default").timings)
    )
    direct.close()
    assert len(entries) == len(CUT_MESSAGES)
    for _, fields in entries:
        stored = fields[TimingFields.ERROR.encode()]
        text = stored.decode()  # strict: raises if cut inside a character
        assert 497 <= len(stored) <= 500 and text.startswith("RuntimeError: x")


def test_stored_text_cut_inside_a_character_is_read_with_replacement(
    settings: Settings, queue_stub: Stub, admin_stub: Admin
) -> None:
    """Records an older version (or a hand) wrote with a truncated UTF-8 sequence still read."""
    job_id = queue_stub.Enqueue(request("diag.noop")).job_id
    keys = QueueKeys(settings.key_prefix, "default")
    local = job_id.partition(":")[2]
    broken = "RuntimeError: é".encode()[:-1]
    direct = redis.Redis.from_url(settings.redis_url)
    direct.hset(keys.job(local), mapping={JobFields.STATE: "FAILED", JobFields.ERROR: broken})
    direct.zadd(keys.failed, {local: 1})
    T = TimingFields
    entry: dict[str, str | bytes | int] = {
        T.SEQ: 1, T.JOB: local, T.TASK: b"diag.\xff", T.OUTCOME: "FAILED", T.ATTEMPT: 1, T.ERROR: broken
    }  # fmt: skip
    direct.xadd(keys.timings, entry)  # type: ignore[arg-type]
    # A failed attempt in this minute's figures: the failure-rate alert makes GetStats and
    # GetPerformance read the failing task and its error from the stream.
    now_ms = time_ms(direct.time())
    direct.hset(keys.minute(now_ms // MINUTE_MS), mapping={"n": 1, "failed": 1})
    # A live worker whose registry entry has bytes that are not UTF-8.
    service = ServiceKeys(settings.key_prefix)
    direct.zadd(service.workers, {"hostile-worker": now_ms})
    direct.hset(service.worker("hostile-worker"), mapping={WorkerFields.HOST: b"h\xc3", WorkerFields.QUEUES: "default"})
    direct.close()

    (timing,) = _reads_answer(queue_stub, admin_stub, [job_id])
    assert timing.timing.task == "diag.\ufffd"
    report = admin_stub.GetPerformance(pb.GetPerformanceRequest(queue="default"))
    assert any(a.kind == pb.ALERT_KIND_HIGH_FAILURE_RATE for a in report.alerts)
    assert [w.host for w in report.workers] == ["h\ufffd"]
    assert queue_stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)).job.error == "RuntimeError: \ufffd"
