"""The job lifecycle around the runs: the global rate limit, retention with
eviction counts, RetryFailed, and bytes in the queue that are not a job."""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from queueservice.v1 import admin_service_pb2, admin_service_pb2_grpc, job_pb2, queue_service_pb2
from queueservice_server.core.keys import QueueKeys
from queueservice_server.settings import Settings
from tests.support import WorkerProcess, job_hashes, request, stub_for, wait_all, wait_for

StartWorker = Callable[..., WorkerProcess]
NO_SUCH_JOB = "default:" + "0" * 32


@pytest.fixture
def lc(settings: Settings) -> Settings:
    return replace(settings, task_modules=("tests.lifecycle_tasks",), keep_completed=1000, keep_failed=1000)


def keys_of(settings: Settings) -> QueueKeys:
    return QueueKeys(settings.key_prefix, "default")


def test_rate_limit_holds_in_every_sliding_window_without_rescheduling(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    settings = replace(lc, rate_limit_max=20, rate_limit_window=5.0, worker_concurrency=3)
    stub = stub_for(server_factory(settings))
    batch = queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.noop") for _ in range(50)])
    job_ids = [r.job_id for r in stub.EnqueueBatch(batch).results]
    worker_factory(settings)
    worker_factory(settings)
    wait_all(settings, job_ids, "COMPLETED", timeout=40)

    records = job_hashes(settings, job_ids).values()
    starts = sorted(int(r[b"started_at"]) for r in records)
    busiest = max(sum(1 for t in starts if start <= t < start + 5000) for start in starts)
    assert busiest == 20  # the limit was reached, never exceeded
    assert {int(r[b"attempts"]) for r in records} == {1}
    client = redis.Redis.from_url(settings.redis_url)
    timings: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(keys_of(settings).timings)  # type: ignore[assignment]
    assert [fields[b"outcome"] for _, fields in timings] == [b"COMPLETED"] * 50


def test_retention_caps_hold_and_evictions_are_counted_exactly(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    settings = replace(lc, keep_completed=5, keep_failed=3, worker_concurrency=1)
    stub = stub_for(server_factory(settings))
    done = [stub.Enqueue(request("diag.noop")).job_id for _ in range(12)]
    failed = [stub.Enqueue(request("diag.fail", max_attempts=1)).job_id for _ in range(7)]
    worker_factory(settings)
    client = redis.Redis.from_url(settings.redis_url)
    keys = keys_of(settings)

    def settled() -> bool:
        counters = client.hgetall(keys.counters)
        return int(counters.get(b"total_n", 0)) == 19

    wait_for(settled, 20, what="19 attempts settled")
    counters = client.hgetall(keys.counters)
    assert client.zcard(keys.completed) == 5
    assert client.zcard(keys.failed) == 3
    assert int(counters[b"evicted_completed"]) == 7
    assert int(counters[b"evicted_failed"]) == 4
    records = job_hashes(settings, done + failed)
    # Evicted records are gone, not just unlisted (which ones is decided by finish time).
    assert sum(bool(records[j]) for j in done) == 5
    assert sum(bool(records[j]) for j in failed) == 3
    evicted = next(j for j in done if not records[j])
    with pytest.raises(grpc.RpcError) as gone:
        stub.GetJob(queue_service_pb2.GetJobRequest(job_id=evicted))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def admin_for(address: str) -> admin_service_pb2_grpc.QueueAdminServiceStub:
    return admin_service_pb2_grpc.QueueAdminServiceStub(grpc.insecure_channel(address))


def test_retry_failed_by_ids_task_and_all(lc: Settings, server_factory: Any, worker_factory: StartWorker) -> None:
    address = server_factory(lc)
    stub, admin = stub_for(address), admin_for(address)
    fails = [stub.Enqueue(request("diag.fail", {"i": i}, max_attempts=2)).job_id for i in range(5)]
    others = [stub.Enqueue(request("test.fail_other", max_attempts=1)).job_id for _ in range(4)]
    ok = stub.Enqueue(request("diag.noop")).job_id
    worker = worker_factory(lc)
    wait_all(lc, fails + others, "FAILED", timeout=30)
    wait_all(lc, [ok], "COMPLETED", timeout=10)
    worker.stop()

    by_ids = admin.RetryFailed(admin_service_pb2.RetryFailedRequest(job_ids=[fails[0], NO_SUCH_JOB, ok]))
    assert list(by_ids.retried_job_ids) == [fails[0]]
    assert list(by_ids.not_found_job_ids) == [NO_SUCH_JOB]
    assert list(by_ids.not_failed_job_ids) == [ok]
    job = stub.GetJob(queue_service_pb2.GetJobRequest(job_id=fails[0])).job
    assert (job.state, job.attempts, job.error, dict(job.payload)) == (job_pb2.JOB_STATE_WAITING, 0, "", {"i": 0})

    by_task = admin.RetryFailed(admin_service_pb2.RetryFailedRequest(task="test.fail_other", limit=3))
    assert by_task.retried_count == 3
    assert set(by_task.retried_job_ids) <= set(others)

    rest = admin.RetryFailed(admin_service_pb2.RetryFailedRequest())
    assert sorted(rest.retried_job_ids) == sorted(set(fails[1:] + others) - set(by_task.retried_job_ids))
    assert admin.RetryFailed(admin_service_pb2.RetryFailedRequest()).retried_count == 0

    # Retried jobs run again with every attempt back, and fail again the same way.
    worker_factory(lc)
    wait_all(lc, fails + others, "FAILED", timeout=30)
    records = job_hashes(lc, fails + others)
    assert {int(records[j][b"attempts"]) for j in fails} == {2}
    assert {int(records[j][b"attempts"]) for j in others} == {1}


def test_retry_failed_bad_requests(lc: Settings, server_factory: Any) -> None:
    admin = admin_for(server_factory(lc))
    for req, code in [
        (admin_service_pb2.RetryFailedRequest(queue="nope"), grpc.StatusCode.NOT_FOUND),
        (admin_service_pb2.RetryFailedRequest(limit=-1), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            admin.RetryFailed(req)
        assert error.value.code() == code
        assert error.value.details()


def test_concurrent_retry_failed_calls_enqueue_each_job_once(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    address = server_factory(lc)
    stub, admin = stub_for(address), admin_for(address)
    batch = queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.fail", max_attempts=1) for _ in range(30)])
    job_ids = [r.job_id for r in stub.EnqueueBatch(batch).results]
    worker = worker_factory(lc)
    wait_all(lc, job_ids, "FAILED", timeout=30)
    worker.stop()

    barrier = threading.Barrier(4)
    answers: list[admin_service_pb2.RetryFailedResponse] = []

    def retry() -> None:
        barrier.wait()
        answers.append(admin.RetryFailed(admin_service_pb2.RetryFailedRequest()))

    threads = [threading.Thread(target=retry) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    retried = [job_id for answer in answers for job_id in answer.retried_job_ids]
    assert sorted(retried) == sorted(job_ids)  # each once, across all calls
    assert redis.Redis.from_url(lc.redis_url).zcard(keys_of(lc).waiting) == 30


class _Exploit:
    """Unpickling this runs a shell command: what a pickle-based queue would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_bytes_written_into_the_queue_by_hand_fail_clearly(
    lc: Settings, tmp_path: Path, server_factory: Any, worker_factory: StartWorker
) -> None:
    stub = stub_for(server_factory(lc))
    worker_factory(lc)
    client = redis.Redis.from_url(lc.redis_url)
    keys = keys_of(lc)
    marker = tmp_path / "pwned"
    bare, pickled = "f" * 32, "e" * 32
    client.hset(keys.job(pickled), mapping={"msg": pickle.dumps(_Exploit(marker)), "task": "diag.noop", "seq": 0})
    client.zadd(keys.waiting, {bare: 0, pickled: 0, "not-even-an-id": 0})
    after = stub.Enqueue(request("diag.noop")).job_id

    wait_all(lc, [after], "COMPLETED", timeout=10)
    wait_all(lc, [f"default:{bare}", f"default:{pickled}"], "FAILED", timeout=10)
    records = job_hashes(lc, [f"default:{bare}", f"default:{pickled}"])
    assert records[f"default:{bare}"][b"error"].startswith(b"no job record")
    assert records[f"default:{pickled}"][b"error"].startswith(b"cannot run this job: MessageDecodeError")
    assert client.zscore(keys.failed, "not-even-an-id") is not None
    assert not marker.exists()


def test_scripts_lost_by_redis_are_loaded_again(lc: Settings, server_factory: Any, worker_factory: StartWorker) -> None:
    """A Redis restarted without its script cache answers NOSCRIPT; pipelines load the scripts and go on."""
    stub = stub_for(server_factory(lc))
    worker_factory(lc)
    first = [
        r.job_id
        for r in stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.noop")] * 3)).results
    ]
    wait_all(lc, first, "COMPLETED", timeout=10)
    redis.Redis.from_url(lc.redis_url).script_flush()
    again = [
        r.job_id
        for r in stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.noop")] * 3)).results
    ]
    again.append(stub.Enqueue(request("diag.noop")).job_id)
    wait_all(lc, again, "COMPLETED", timeout=10)
