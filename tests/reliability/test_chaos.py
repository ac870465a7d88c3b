"""The chaos run: thousands of jobs through three consumers while a seeded driver SIGKILLs
worker processes, restarts Redis and loses TAKE / SETTLE replies, then every invariant of
tests/invariants.py, read back from Redis.

The consumers reach Redis through a FaultProxy (tests/proxy.py), so their replies can be
lost; the gRPC server and the checker talk to Redis directly. Redis persists with AOF and
`appendfsync everysec`, so it is restarted with SIGTERM (which flushes the AOF): a SIGKILL
could lose the last second of writes, which no queue on that setting can promise to keep.

CHAOS_SEED=<n> replays a run's sequence of faults (their targets depend on timing).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from queueservice.v1 import queue_service_pb2
from queueservice_server.core import lua
from queueservice_server.core.keys import QueueKeys
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from tests import chaos_tasks
from tests.invariants import assert_holds, check
from tests.proxy import FaultProxy
from tests.support import WorkerProcess, request, states, stub_for, wait_for

StartWorker = Callable[..., WorkerProcess]

JOBS = 5000
BATCH = 100
CONSUMERS = 3
# Faults are injected for this long; the batches are spread over its first ENQUEUE_SECONDS.
CHAOS_SECONDS = 40.0
ENQUEUE_SECONDS = 30.0
DRAIN_SECONDS = 120.0
FAIL_ONCE_SHARE = 0.05
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


@dataclass
class Tally:
    kills: int = 0
    kills_skipped: int = 0  # no worker process was running a job at that moment
    redis_restarts: int = 0
    drops_armed: dict[str, int] = field(default_factory=lambda: {"TAKE": 0, "SETTLE": 0})
    batches_refused: int = 0
    log: list[str] = field(default_factory=list)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return 0 if fields[0] == "Z" else int(fields[1])


class Enqueuer(threading.Thread):
    """Enqueues JOBS chaos.work jobs in batches over ENQUEUE_SECONDS; a refused batch is sent
    again as new jobs (new ids, new `n`): only the ids of accepted batches are kept."""

    def __init__(self, address: str, executions_key: str, rng: random.Random, tally: Tally) -> None:
        super().__init__(name="chaos-enqueuer", daemon=True)
        self.stub = stub_for(address)
        self.executions_key = executions_key
        self.rng = rng
        self.tally = tally
        self.accepted: list[str] = []
        self.fail_once = 0
        self.error: BaseException | None = None
        self._next_n = 0

    def _batch(self) -> tuple[queue_service_pb2.EnqueueBatchRequest, int]:
        jobs, failing = [], 0
        for _ in range(BATCH):
            fail_once = self.rng.random() < FAIL_ONCE_SHARE
            failing += fail_once
            seconds = round(self.rng.uniform(0.01, 0.05), 3)
            payload = chaos_tasks.payload(self.executions_key, self._next_n, seconds, fail_once=fail_once)
            jobs.append(request(chaos_tasks.TASK, payload))
            self._next_n += 1
        return queue_service_pb2.EnqueueBatchRequest(jobs=jobs), failing

    def run(self) -> None:
        began = time.monotonic()
        try:
            for index in range(JOBS // BATCH):
                time.sleep(max(0.0, began + index * ENQUEUE_SECONDS / (JOBS // BATCH) - time.monotonic()))
                while True:
                    batch, failing = self._batch()
                    try:
                        response = self.stub.EnqueueBatch(batch, timeout=10)
                    except grpc.RpcError as exc:
                        if exc.code() not in RETRYABLE:
                            raise
                        self.tally.batches_refused += 1
                        time.sleep(0.2)
                        continue
                    self.accepted += [result.job_id for result in response.results]
                    self.fail_once += failing
                    break
        except BaseException as exc:
            self.error = exc


class Driver(threading.Thread):
    """Every 0.2-1.5 s (seeded), one fault: SIGKILL a worker process that is running a job,
    restart Redis (SIGTERM, ~1 s down), or lose the reply of the next TAKE or SETTLE."""

    def __init__(
        self,
        *,
        rng: random.Random,
        server: RedisServer,
        proxy: FaultProxy,
        settings: Settings,
        consumers: list[WorkerProcess],
        tally: Tally,
    ) -> None:
        super().__init__(name="chaos-driver", daemon=True)
        self.rng = rng
        self.server = server
        self.proxy = proxy
        self.settings = settings
        self.consumers = consumers
        self.tally = tally
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.began = time.monotonic()

    def note(self, text: str) -> None:
        line = f"chaos t={time.monotonic() - self.began:5.1f}s {text}"
        self.tally.log.append(line)
        print(line)

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.2, 1.5)):
                action = self.rng.choices(["kill", "redis", "TAKE", "SETTLE"], weights=[4, 2, 2, 2])[0]
                if action == "kill":
                    self.kill_a_worker_process()
                elif action == "redis":
                    self.restart_redis(self.rng.uniform(0.8, 1.2))
                else:
                    self.drop(action)
        except BaseException as exc:
            self.error = exc

    def kill_a_worker_process(self) -> None:
        """A worker process (not a consumer, not its scheduler) that holds an active job."""
        consumer_pids = {worker.process.pid for worker in self.consumers if worker.process is not None}
        client = redis.Redis.from_url(self.server.url, socket_timeout=2)
        try:
            keys = QueueKeys(self.settings.key_prefix, "default")
            active: list[bytes] = client.zrange(keys.active, 0, -1)  # type: ignore[assignment]
            with client.pipeline(transaction=False) as pipe:
                for local in active:
                    pipe.hget(keys.job(local.decode()), "worker")
                holders: list[bytes | None] = pipe.execute()
        except redis.RedisError as exc:
            self.note(f"kill skipped: {exc!r}")
            self.tally.kills_skipped += 1
            return
        finally:
            client.close()
        pids = {int(holder.rsplit(b":", 1)[1]) for holder in holders if holder}
        candidates = sorted(pid for pid in pids if _parent(pid) in consumer_pids)
        if not candidates:
            self.note("kill skipped: no worker process is running a job")
            self.tally.kills_skipped += 1
            return
        victim = self.rng.choice(candidates)
        parent = _parent(victim)
        try:
            os.kill(victim, 9)
        except ProcessLookupError:
            self.tally.kills_skipped += 1
            return
        self.tally.kills += 1
        self.note(f"SIGKILL worker process {victim} (of consumer {parent})")

    def restart_redis(self, down: float) -> None:
        self.server.stop()
        self.note(f"redis stopped (SIGTERM) for {down:.2f}s")
        time.sleep(down)
        self.server.start()
        self.tally.redis_restarts += 1
        self.note("redis started")

    def drop(self, script: str) -> None:
        digest = sha(lua.TAKE if script == "TAKE" else lua.SETTLE)

        def matches(command: bytes) -> bool:
            return digest in command

        self.proxy.drop_reply_matching(matches)
        self.tally.drops_armed[script] += 1
        self.note(f"drop the next {script} reply")


def _unfinished(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        keys = QueueKeys(settings.key_prefix, "default")
        with client.pipeline(transaction=False) as pipe:
            for key in (keys.waiting, keys.delayed, keys.active):
                pipe.zcard(key)
            sizes: list[int] = pipe.execute()
        return sum(sizes)
    finally:
        client.close()


@pytest.mark.timeout(420)
def test_chaos_run_keeps_every_invariant(
    lc: Settings, tmp_path: Path, redis_binary: str, server_factory: Any, worker_factory: StartWorker
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nchaos seed {seed} (CHAOS_SEED={seed} replays the faults), redis {redis_binary}")
    rng = random.Random(seed)
    tally = Tally()
    began = time.monotonic()
    with RedisServer(tmp_path / "redis", binary=redis_binary) as server, FaultProxy.from_url(server.url) as proxy:
        settings = replace(
            lc,
            redis_url=server.url,
            queues=("default",),
            task_modules=("tests.chaos_tasks",),
            worker_concurrency=2,
            stall_interval=2.0,
            rate_limit_max=0,
            keep_completed=1_000_000,
            keep_failed=1_000_000,
            timings_retained=1_000_000,
        )
        executions_key = f"{settings.key_prefix}:chaos:executions"
        address = server_factory(settings)
        consumers = [worker_factory(replace(settings, redis_url=proxy.url)) for _ in range(CONSUMERS)]
        try:
            enqueuer = Enqueuer(address, executions_key, random.Random(seed + 1), tally)
            driver = Driver(rng=rng, server=server, proxy=proxy, settings=settings, consumers=consumers, tally=tally)
            enqueuer.start()
            driver.start()
            driver.stop.wait(CHAOS_SECONDS)
            driver.stop.set()
            driver.join(30)
            enqueuer.join(60)
            chaos_done = time.monotonic()
            assert driver.error is None, f"the chaos driver failed: {driver.error!r}"
            assert enqueuer.error is None, f"enqueueing failed: {enqueuer.error!r}"
            assert not enqueuer.is_alive(), "the enqueuer did not finish"
            wait_for(lambda: _unfinished(settings) == 0, DRAIN_SECONDS, interval=0.5, what="every job finished")
            drained = time.monotonic()
            left = {
                state: n
                for state, n in states(settings, enqueuer.accepted).items()
                if state not in ("COMPLETED", "FAILED")
            }
            assert not left, f"accepted jobs not finished: {left}"
            report = check(settings, enqueuer.accepted, executions_key)
            checked = time.monotonic()
            alive = [worker.process is not None and worker.process.poll() is None for worker in consumers]
        finally:
            for worker in consumers:
                worker.stop()
    counts = report.counts
    print(
        f"chaos seed {seed}: {counts.jobs} jobs accepted ({counts.unconfirmed} more written by refused batches, "
        f"{tally.batches_refused} batches refused), {counts.completed} completed, {counts.failed} failed "
        f"({counts.reaper_failed} by the reaper); {counts.executions} executions ({counts.finished_executions} "
        f"finished, {counts.unfinished_executions} cut short, {counts.reruns} re-runs); {counts.attempts} attempts "
        f"recorded, {counts.retried} retried ({enqueuer.fail_once} jobs fail once), {counts.stalled} stalls; "
        f"faults: {tally.kills} worker processes killed ({tally.kills_skipped} kills skipped), "
        f"{tally.redis_restarts} redis restarts, drops armed {tally.drops_armed}, {proxy.dropped} replies dropped"
    )
    print(
        f"chaos timings: chaos {chaos_done - began:.1f}s, drain {drained - chaos_done:.1f}s, "
        f"check {checked - drained:.1f}s, total {time.monotonic() - began:.1f}s"
    )
    for line in report.violations[:50]:
        print(f"VIOLATION {line}")
    assert_holds(report)
    assert all(alive), f"a consumer died during the run: {alive}"
