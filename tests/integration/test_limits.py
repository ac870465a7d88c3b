"""Resource limits over the wire: concurrent RPCs, StreamTimings subscribers, message size,
waiting jobs per queue (with several servers on one Redis)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from queueservice.v1 import admin_service_pb2 as pb
from queueservice.v1 import admin_service_pb2_grpc, queue_service_pb2
from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.keys import TimingFields as T
from queueservice_server.monitor.events import Event
from queueservice_server.settings import Settings
from tests.support import QueueStub, WorkerProcess, request, stub_for, wait_for

StartServer = Callable[[Settings], str]
# A StreamTimings call: an iterator of responses that can be cancelled (grpc-stubs types neither well).
Stream = Any


def admin_for(address: str) -> admin_service_pb2_grpc.QueueAdminServiceStub:
    return admin_service_pb2_grpc.QueueAdminServiceStub(grpc.insecure_channel(address))


def seed_timings(settings: Settings, count: int, queue: str = "default") -> None:
    """`count` finished attempts in the queue's timings stream, as SETTLE writes them."""
    client = redis.Redis.from_url(settings.redis_url)
    key = QueueKeys(settings.key_prefix, queue).timings
    with client.pipeline(transaction=False) as pipe:
        for seq in range(1, count + 1):
            fields = {T.SEQ: seq, T.JOB: f"{seq:032x}", T.TASK: "diag.noop", T.OUTCOME: "COMPLETED"}
            fields.update({T.ATTEMPT: 1, T.WAIT: 3, T.PROC: 1, T.START: 1, T.FINISH: 2, T.WORKER: "w", T.ERROR: ""})
            pipe.xadd(key, fields)  # type: ignore[arg-type]
        pipe.execute()
    client.close()


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    """StreamTimings calls a test opened, cancelled at its end."""
    opened: list[Stream] = []
    yield opened
    for call in opened:
        call.cancel()


def open_stream(admin: admin_service_pb2_grpc.QueueAdminServiceStub, streams: list[Stream]) -> Stream:
    """A live stream that has its first message (the seeded entry, via last_n=1): the server holds it open."""
    call: Stream = admin.StreamTimings(pb.StreamTimingsRequest(queue="default", last_n=1), timeout=60)
    streams.append(call)
    next(call)
    return call


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    return error


def quota_subjects(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    subjects: list[str] = []
    for detail in status.details:
        quota = error_details_pb2.QuotaFailure()
        if detail.Unpack(quota):
            subjects += [violation.subject for violation in quota.violations]
    return subjects


# -- concurrent RPCs and StreamTimings subscribers ---------------------------------


def test_open_streams_count_against_the_concurrent_rpc_cap(
    settings: Settings, server_factory: StartServer, streams: list[Stream]
) -> None:
    # Deliberately past validate() (which keeps the subscriber cap below this one): grpc's own cap alone.
    capped = replace(settings, grpc_max_concurrent_rpcs=2, stream_max_subscribers=10)
    seed_timings(capped, 1)
    address = server_factory(capped)
    admin = admin_for(address)
    first = open_stream(admin, streams)
    open_stream(admin, streams)

    error = refused(lambda: admin.GetStats(pb.GetStatsRequest(), timeout=10))
    assert error.details() == "Concurrent RPC limit exceeded!"
    refused(lambda: open_stream(admin, streams))

    # A slot frees when a stream ends.
    first.cancel()
    wait_for(
        lambda: _admitted(lambda: admin.GetStats(pb.GetStatsRequest(), timeout=10)),
        10,
        what="GetStats answered once a stream ended",
    )


def _admitted(call: Callable[[], object]) -> bool:
    """Whether `call` got in; the only refusal it may meet is RESOURCE_EXHAUSTED."""
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        return False
    return True


def test_subscribers_beyond_the_cap_are_refused_naming_the_setting(
    settings: Settings, server_factory: StartServer, streams: list[Stream]
) -> None:
    capped = replace(settings, stream_max_subscribers=2)
    seed_timings(capped, 1)
    address = server_factory(capped)
    admin = admin_for(address)
    first = open_stream(admin, streams)
    open_stream(admin, streams)

    error = refused(lambda: open_stream(admin, streams))
    assert "2 StreamTimings subscribers" in str(error.details())
    assert "QUEUE_STREAM_MAX_SUBSCRIBERS" in str(error.details())
    assert quota_subjects(error) == ["QUEUE_STREAM_MAX_SUBSCRIBERS"]
    # Unary calls still have room, and a subscriber that leaves makes room for another.
    admin.GetStats(pb.GetStatsRequest(), timeout=10)
    first.cancel()
    wait_for(lambda: _admitted(lambda: open_stream(admin, streams)), 10, what="a new subscriber accepted")


def test_subscribers_at_the_largest_last_n_hold_no_backlog(
    settings: Settings, server_factory: StartServer, streams: list[Stream]
) -> None:
    # Each subscriber once kept every event of its last_n for as long as it stayed open (~5 MB at 10,000).
    retained = 2000
    sized = replace(settings, timings_retained=retained)
    seed_timings(sized, retained)
    admin = admin_for(server_factory(sized))
    streams += [admin.StreamTimings(pb.StreamTimingsRequest(queue="default", last_n=retained)) for _ in range(3)]
    for call in streams:
        got = [next(call).timing.job_id for _ in range(retained)]
        assert got == [f"default:{seq:032x}" for seq in range(1, retained + 1)]
    # The server (in this process) now only waits for live events.
    gc.collect()
    alive = sum(isinstance(thing, Event) for thing in gc.get_objects())
    assert alive < retained // 10, f"{alive} timing events still held by 3 idle subscribers"


# -- message size -------------------------------------------------------------------


def test_a_message_over_the_limit_is_refused_by_grpc(settings: Settings, server_factory: StartServer) -> None:
    stub = stub_for(server_factory(settings))
    limit = settings.grpc_max_message_bytes
    assert limit == 8 * 1024 * 1024
    blob = "x" * (settings.max_payload_bytes - 64)

    def batch(jobs: int) -> queue_service_pb2.EnqueueBatchRequest:
        return queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.noop", {"blob": blob}) for _ in range(jobs)])

    # Seven max-size jobs fit; nine do not, whatever each one's size.
    fits = batch(7)
    assert fits.ByteSize() < limit
    assert len(stub.EnqueueBatch(fits, timeout=30).results) == 7
    big = batch(9)
    assert big.ByteSize() > limit
    error = refused(lambda: stub.EnqueueBatch(big, timeout=30))
    assert error.details() == f"SERVER: Received message larger than max ({big.ByteSize()} vs. {limit})"


# -- waiting jobs per queue -------------------------------------------------------


def batch_of(*jobs: queue_service_pb2.EnqueueRequest) -> queue_service_pb2.EnqueueBatchRequest:
    return queue_service_pb2.EnqueueBatchRequest(jobs=list(jobs))


def waiting_and_delayed(settings: Settings, queue: str = "default") -> int:
    client = redis.Redis.from_url(settings.redis_url)
    keys = QueueKeys(settings.key_prefix, queue)
    try:
        return int(client.zcard(keys.waiting)) + int(client.zcard(keys.delayed))
    finally:
        client.close()


def test_enqueue_past_max_waiting_is_refused_naming_the_queue(
    settings: Settings, server_factory: StartServer, worker_factory: Callable[..., WorkerProcess]
) -> None:
    capped = replace(settings, max_waiting=3)
    stub = stub_for(server_factory(capped))
    stub.Enqueue(request("diag.noop"))
    stub.Enqueue(request("diag.noop", idempotency_key="order-1"))
    stub.Enqueue(request("diag.noop", delay={"seconds": 3600}))  # delayed jobs count too: 3 of 3

    error = refused(lambda: stub.Enqueue(request("diag.noop")))
    assert str(error.details()).startswith(
        "queue 'default' has 3 waiting or delayed jobs and its limit is 3 (QUEUE_MAX_WAITING)"
    )
    assert quota_subjects(error) == ["queue:default"]
    # A repeat of an existing job is answered, not refused.
    again = stub.Enqueue(request("diag.noop", idempotency_key="order-1"))
    assert again.deduplicated
    # A batch spanning queues: the full queue's part is refused whole, the other queue's is written.
    error = refused(lambda: stub.EnqueueBatch(batch_of(request("diag.noop"), request("diag.noop", queue="emails"))))
    assert "its 1 new jobs were not enqueued" in str(error.details())
    assert "this batch's jobs 1 for queue 'emails' were enqueued" in str(error.details())
    assert (waiting_and_delayed(capped), waiting_and_delayed(capped, "emails")) == (3, 1)

    # Jobs that leave waiting make room.
    worker_factory(capped)
    wait_for(lambda: waiting_and_delayed(capped) == 1, 30, what="the waiting jobs done")
    # Delayed, so that the running worker cannot take them and make room again.
    later = {"seconds": 3600}
    response = stub.EnqueueBatch(batch_of(request("diag.noop", delay=later), request("diag.noop", delay=later)))
    assert len(response.results) == 2
    refused(lambda: stub.Enqueue(request("diag.noop", delay=later)))


def test_max_waiting_holds_across_servers_on_one_redis(settings: Settings, server_factory: StartServer) -> None:
    capped = replace(settings, max_waiting=25)
    stubs = [stub_for(server_factory(capped)) for _ in range(2)]
    outcomes: list[grpc.StatusCode] = []

    def send(stub: QueueStub, jobs: int) -> None:
        for _ in range(jobs):
            try:
                stub.EnqueueBatch(batch_of(request("diag.noop"), request("diag.noop")), timeout=30)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                outcomes.append(exc.code())

    threads = [threading.Thread(target=send, args=(stubs[n % 2], 10)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # 80 jobs in pairs against a cap of 25: exactly 12 pairs fit, the odd slot stays free.
    assert outcomes.count(grpc.StatusCode.OK) == 12
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 28
    assert waiting_and_delayed(capped) == 24


# -- GetPerformance's cost ----------------------------------------------------------


def test_get_performance_past_its_minute_budget_is_refused(settings: Settings, server_factory: StartServer) -> None:
    # 2 queues x 121 minutes (a 2 h window) = 242 minute records; one queue's 121 fit.
    budget = replace(settings, performance_max_minutes=200)
    admin = admin_for(server_factory(budget))
    two_hours = duration_pb2.Duration(seconds=7200)
    admin.GetPerformance(pb.GetPerformanceRequest(window=duration_pb2.Duration(seconds=3600)), timeout=10)
    admin.GetPerformance(pb.GetPerformanceRequest(queue="default", window=two_hours), timeout=10)
    error = refused(lambda: admin.GetPerformance(pb.GetPerformanceRequest(window=two_hours), timeout=10))
    assert "reads 242 minute records; the limit is 200 (QUEUE_PERFORMANCE_MAX_MINUTES)" in str(error.details())
    assert quota_subjects(error) == ["QUEUE_PERFORMANCE_MAX_MINUTES"]
