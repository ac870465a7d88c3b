"""No job is lost: worker processes SIGKILLed or stopped mid-run, Redis killed and
restarted, tasks that never return, tasks that kill their own process."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import redis
from google.protobuf import duration_pb2

from queueservice.v1 import queue_service_pb2_grpc
from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.redis import time_ms
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from tests.support import WorkerProcess, enqueue_counted, job_hashes, request, states, stub_for, wait_all, wait_for

Stub = queue_service_pb2_grpc.QueueServiceStub
StartWorker = Callable[..., WorkerProcess]
JOBS = 500


def redis_ms(client: redis.Redis) -> int:
    return time_ms(client.time())


def group_pids(group: int) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == group:
                    pids.add(int(entry))
            except ProcessLookupError:
                continue
    return pids


def held_by(settings: Settings, pids: set[int]) -> dict[str, dict[bytes, bytes]]:
    """The active jobs whose worker process is one of `pids`."""
    client = redis.Redis.from_url(settings.redis_url)
    locals_: list[bytes] = client.zrange(QueueKeys(settings.key_prefix, "default").active, 0, -1)  # type: ignore[assignment]
    records = job_hashes(settings, [f"default:{local.decode()}" for local in locals_])
    return {job_id: r for job_id, r in records.items() if int(r[b"worker"].split(b":")[-1]) in pids}


def test_sigkilled_worker_loses_nothing(lc: Settings, server_factory: Any, worker_factory: StartWorker) -> None:
    settings = replace(lc, worker_concurrency=5, stall_interval=4.0)
    client = redis.Redis.from_url(settings.redis_url)
    counter = f"{settings.key_prefix}:runs"
    job_ids = enqueue_counted(stub_for(server_factory(settings)), counter, JOBS, 0.2)
    victim, survivor = worker_factory(settings), worker_factory(settings)
    wait_for(lambda: client.hlen(counter) >= 100, 60, what="100 jobs run")
    assert victim.process is not None and survivor.process is not None
    victim_pids = group_pids(victim.process.pid)
    killed_at = redis_ms(client)
    victim.kill_group()
    held = held_by(settings, victim_pids)
    assert held, "the victim held no job when it was killed"

    wait_all(settings, job_ids, "COMPLETED", timeout=90)
    runs = client.hgetall(counter)
    assert len(runs) == JOBS  # every job ran at least once
    records = job_hashes(settings, list(held))
    for job_id, record in records.items():
        # Back within the stall interval, plus the time a slot needs to free up on the survivor.
        back_within = int(record[b"started_at"]) - killed_at
        assert back_within <= settings.stall_interval * 1000 + 3000, (job_id, back_within)
        assert int(record[b"stalls"]) == 1
        assert record[b"worker"] != held[job_id][b"worker"]


def test_sigterm_mid_run_loses_nothing_and_runs_nothing_twice(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    settings = replace(lc, worker_concurrency=5, shutdown_grace=5.0)
    client = redis.Redis.from_url(settings.redis_url)
    counter = f"{settings.key_prefix}:runs"
    job_ids = enqueue_counted(stub_for(server_factory(settings)), counter, JOBS, 0.2)
    stopping = worker_factory(settings)
    worker_factory(settings)
    wait_for(lambda: client.hlen(counter) >= 100, 60, what="100 jobs run")
    stopping.signal(signal.SIGTERM)
    assert stopping.wait(settings.shutdown_grace + 5) == 0

    wait_all(settings, job_ids, "COMPLETED", timeout=90)
    runs = {int(n): int(count) for n, count in client.hgetall(counter).items()}
    assert sorted(runs) == list(range(JOBS))
    assert set(runs.values()) == {1}, {n: c for n, c in runs.items() if c != 1}
    assert all(int(r.get(b"stalls", 0)) == 0 for r in job_hashes(settings, job_ids).values())


def test_redis_killed_and_restarted_under_load(
    lc: Settings, tmp_path: Path, server_factory: Any, worker_factory: StartWorker
) -> None:
    with RedisServer(tmp_path / "redis") as server:
        settings = replace(lc, redis_url=server.url, stall_interval=3.0, worker_concurrency=2)
        stub = stub_for(server_factory(settings))
        worker_factory(settings)
        accepted: list[str] = []
        refused = 0
        stop = threading.Event()

        def produce() -> None:
            nonlocal refused
            while not stop.is_set():
                try:
                    accepted.append(stub.Enqueue(request("diag.noop"), timeout=2).job_id)
                except grpc.RpcError as exc:
                    assert exc.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}, exc
                    refused += 1
                    time.sleep(0.05)
                time.sleep(0.005)

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            time.sleep(1.5)
            server.stop(kill=True)
            time.sleep(1.0)
            server.start()
            time.sleep(1.5)
        finally:
            stop.set()
            producer.join(10)
        assert refused > 0, "Redis was down, yet no Enqueue was refused"
        assert len(accepted) > 50
        wait_all(settings, accepted, "COMPLETED", timeout=60)


def test_task_spinning_in_c_is_killed_and_the_worker_goes_on(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    settings = replace(lc, worker_concurrency=1, timeout_grace=1.0)
    stub = stub_for(server_factory(settings))
    worker_factory(settings)
    spin = stub.Enqueue(request("test.spin_in_c", timeout=duration_pb2.Duration(seconds=1), max_attempts=2)).job_id
    after = stub.Enqueue(request("diag.noop")).job_id
    wait_all(settings, [spin], "FAILED", timeout=30)
    record = job_hashes(settings, [spin])[spin]
    assert int(record[b"attempts"]) == 2
    assert record[b"error"].startswith(b"TaskTimeout: killed after running past its timeout of 1s")
    wait_all(settings, [after], "COMPLETED", timeout=10)
    stream = QueueKeys(settings.key_prefix, "default").timings
    timings: list[tuple[bytes, dict[bytes, bytes]]] = redis.Redis.from_url(settings.redis_url).xrange(stream)  # type: ignore[assignment]
    outcomes = [fields[b"outcome"] for _, fields in timings if fields[b"job"] == spin.split(":")[1].encode()]
    # Both attempts ran out of time; the first was retried, the second failed the job.
    assert outcomes == [b"TIMED_OUT", b"TIMED_OUT"]
    counters = redis.Redis.from_url(settings.redis_url).hmget(
        QueueKeys(settings.key_prefix, "default").counters, "total_retried", "total_failed"
    )
    assert counters == [b"1", b"1"]


def test_job_that_keeps_killing_its_worker_fails_after_max_stalls(
    lc: Settings, server_factory: Any, worker_factory: StartWorker
) -> None:
    settings = replace(lc, worker_concurrency=1, max_stalls=2)
    stub = stub_for(server_factory(settings))
    worker_factory(settings)
    crash = stub.Enqueue(request("test.crash")).job_id
    wait_all(settings, [crash], "FAILED", timeout=30)
    record = job_hashes(settings, [crash])[crash]
    assert record[b"error"] == b"stalled 3 times (its worker process died)"
    assert int(record[b"stalls"]) == 3
    after = stub.Enqueue(request("diag.noop")).job_id
    wait_all(settings, [after], "COMPLETED", timeout=10)
    assert states(settings, [crash, after]) == {"FAILED": 1, "COMPLETED": 1}
