"""The lifecycle when things fail at the wrong moment, with real worker processes: Redis
away for longer than a lease, a task stuck in C at shutdown, Redis killed at a hard
deadline, a rate-limited queue beside a free one, a job the reaper fails."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import redis
from google.protobuf import duration_pb2

from queueservice.v1 import admin_service_pb2, admin_service_pb2_grpc
from queueservice_server.core.keys import QueueKeys
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from tests.support import WorkerProcess, enqueue_counted, job_hashes, request, stub_for, wait_all, wait_for

StartWorker = Callable[..., WorkerProcess]


def timings_of(settings: Settings, queue: str = "default") -> dict[str, list[bytes]]:
    """Outcomes in the queue's timings stream, per job id."""
    entries: list[tuple[bytes, dict[bytes, bytes]]] = redis.Redis.from_url(settings.redis_url).xrange(
        QueueKeys(settings.key_prefix, queue).timings
    )  # type: ignore[assignment]
    found: dict[str, list[bytes]] = {}
    for _, fields in entries:
        found.setdefault(f"{queue}:{fields[b'job'].decode()}", []).append(fields[b"outcome"])
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) runs nothing.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] != "Z"


def test_an_outage_longer_than_the_lease_runs_every_job_once(
    lc: Settings, tmp_path: Path, redis_binary: str, server_factory: Any, worker_factory: StartWorker
) -> None:
    """Two consumers, jobs longer than the lease, Redis stopped for twice the lease: when it is
    back, the first consumer to tick must not reap the other's running jobs."""
    with RedisServer(tmp_path / "redis", binary=redis_binary) as server:
        settings = replace(lc, redis_url=server.url, stall_interval=2.0, worker_concurrency=2)
        counter = f"{settings.key_prefix}:runs"
        job_ids = enqueue_counted(stub_for(server_factory(settings)), counter, 4, 7.0)
        worker_factory(settings)
        worker_factory(settings)
        client = redis.Redis.from_url(settings.redis_url)
        active = QueueKeys(settings.key_prefix, "default").active
        wait_for(lambda: client.zcard(active) == 4, 20, what="all four jobs running")
        client.close()
        server.stop()  # SIGTERM: the AOF is flushed
        time.sleep(3.0)  # the lease is 1.5 s
        server.start()
        wait_all(settings, job_ids, "COMPLETED", timeout=60)
        runs = redis.Redis.from_url(settings.redis_url).hgetall(counter)
        assert {int(n): int(c) for n, c in runs.items()} == dict.fromkeys(range(4), 1)
        outcomes = timings_of(settings)
        assert {job_id: outcomes.get(job_id) for job_id in job_ids} == {job_id: [b"COMPLETED"] for job_id in job_ids}
        assert all(int(r.get(b"stalls", 0)) == 0 for r in job_hashes(settings, job_ids).values())


def test_sigterm_with_a_task_stuck_in_c_never_hands_back_a_running_job(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    settings = replace(lc, worker_concurrency=1, shutdown_grace=1.0)
    stub = stub_for(server_factory(settings))
    spin = stub.Enqueue(request("test.spin_in_c", timeout=duration_pb2.Duration(seconds=120))).job_id
    worker = worker_factory(settings)
    wait_for(lambda: job_hashes(settings, [spin])[spin].get(b"state") == b"ACTIVE", 20, what="the spin running")
    pid = int(job_hashes(settings, [spin])[spin][b"worker"].rsplit(b":", 1)[1])
    worker.signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.shutdown_grace + 15
    while worker.process is not None and worker.process.poll() is None:
        state = job_hashes(settings, [spin])[spin][b"state"]
        assert not (state == b"WAITING" and alive(pid)), "the job is waiting while its process still runs it"
        assert time.monotonic() < deadline, "the consumer did not exit"
        time.sleep(0.05)
    assert worker.wait(1) == 0
    assert not alive(pid)
    back = job_hashes(settings, [spin])[spin]
    # Interrupted by the shutdown: back where it stood, the attempt not counted.
    assert (back[b"state"], back[b"attempts"]) == (b"WAITING", b"0")


def test_redis_killed_just_before_a_hard_deadline(
    lc: Settings, tmp_path: Path, redis_binary: str, server_factory: Any, worker_factory: StartWorker
) -> None:
    """The consumer kills the overdue process while Redis is down, records the timeout once Redis
    is back, retries the job by its policy, and keeps serving."""
    with RedisServer(tmp_path / "redis", binary=redis_binary) as server:
        settings = replace(lc, redis_url=server.url, worker_concurrency=1, timeout_grace=1.0, stall_interval=3.0)
        stub = stub_for(server_factory(settings))
        spin = stub.Enqueue(request("test.spin_in_c", timeout=duration_pb2.Duration(seconds=2), max_attempts=2)).job_id
        worker = worker_factory(settings)
        wait_for(lambda: job_hashes(settings, [spin])[spin].get(b"state") == b"ACTIVE", 20, what="the spin running")
        time.sleep(1.5)  # the AOF is fsynced every second; the hard deadline is 3 s after the start
        server.stop(kill=True)
        time.sleep(3.0)
        server.start()
        wait_all(settings, [spin], "FAILED", timeout=40)
        record = job_hashes(settings, [spin])[spin]
        assert int(record[b"attempts"]) == 2
        assert record[b"error"].startswith(b"TaskTimeout: killed after running past its timeout of 2s")
        assert timings_of(settings)[spin] == [b"TIMED_OUT", b"TIMED_OUT"]
        after = stub.Enqueue(request("diag.noop")).job_id
        wait_all(settings, [after], "COMPLETED", timeout=15)
        assert worker.process is not None and worker.process.poll() is None
        # One line for the outage and one for the recovery, not one per loop.
        assert worker.log_text().count("redis unreachable") <= 4


def test_a_queue_at_its_rate_limit_does_not_hold_back_the_next(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    """Each queue has its own window of 5 starts a minute: once `limited` has used its 5 with
    more waiting, `free` (listed after it) still gets its 5 at once."""
    settings = replace(lc, queues=("limited", "free"), rate_limit_max=5, rate_limit_window=60.0)
    stub = stub_for(server_factory(settings))
    limited = [stub.Enqueue(request("diag.noop", queue="limited")).job_id for _ in range(7)]
    worker_factory(settings)
    wait_for(lambda: sum(r.get(b"state") == b"COMPLETED" for r in job_hashes(settings, limited).values()) == 5, 20)
    free = [stub.Enqueue(request("diag.noop", queue="free")).job_id for _ in range(5)]
    wait_all(settings, free, "COMPLETED", timeout=10)
    assert sorted(r[b"state"] for r in job_hashes(settings, limited).values()) == [b"COMPLETED"] * 5 + [b"WAITING"] * 2


def test_an_empty_queue_at_its_rate_limit_does_not_hold_back_the_next(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    settings = replace(lc, queues=("limited", "free"), rate_limit_max=2, rate_limit_window=60.0)
    stub = stub_for(server_factory(settings))
    used = [stub.Enqueue(request("diag.noop", queue="limited")).job_id for _ in range(2)]
    worker_factory(settings)
    wait_all(settings, used, "COMPLETED", timeout=20)
    free = [stub.Enqueue(request("diag.noop", queue="free")).job_id for _ in range(2)]
    wait_all(settings, free, "COMPLETED", timeout=10)


def test_a_job_the_reaper_fails_is_in_the_timings_and_the_failed_total(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    settings = replace(lc, worker_concurrency=1, max_stalls=0)
    address = server_factory(settings)
    crash = stub_for(address).Enqueue(request("test.crash")).job_id
    worker_factory(settings)
    wait_all(settings, [crash], "FAILED", timeout=30)
    assert job_hashes(settings, [crash])[crash][b"error"] == b"stalled 1 times (its worker process died)"
    with grpc.insecure_channel(address) as channel:
        admin = admin_service_pb2_grpc.QueueAdminServiceStub(channel)
        stream = admin.StreamTimings(admin_service_pb2.StreamTimingsRequest(last_n=5), timeout=3)
        first = next(iter(stream))
        stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves cancel untyped
    assert first.timing.job_id == crash
    assert first.timing.outcome == admin_service_pb2.JOB_OUTCOME_FAILED
    counters = redis.Redis.from_url(settings.redis_url).hmget(
        QueueKeys(settings.key_prefix, "default").counters, "total_failed", "total_n"
    )
    assert counters == [b"1", b"1"]
