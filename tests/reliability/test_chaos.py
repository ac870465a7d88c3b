"""The chaos run: thousands of jobs through three consumers while a seeded driver SIGKILLs
worker processes, restarts Redis and loses TAKE / SETTLE replies, then every invariant of
tests/invariants.py, read back from Redis.

The consumers reach Redis through a FaultProxy (tests/proxy.py), so their replies can be
lost; the gRPC server and the checker talk to Redis directly. Redis persists with AOF and
`appendfsync everysec`, so it is restarted with SIGTERM (which flushes the AOF): a SIGKILL
could lose the last second of writes, which no queue on that setting can promise to keep.

The enqueuer, the fault driver and the processes' settings are in tests/chaos.py, which the
bench's row 7 (bench/rows_chaos.py) drives too.

CHAOS_SEED=<n> replays a run's sequence of faults (their targets depend on timing).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from tests.chaos import CONSUMERS, Driver, Enqueuer, Tally, chaos_settings, executions_key, running_pids, unfinished
from tests.invariants import assert_holds, check
from tests.proxy import FaultProxy
from tests.support import WorkerProcess, states, wait_for

StartWorker = Callable[..., WorkerProcess]

JOBS = 5000
# Faults are injected for this long; the batches are spread over its first ENQUEUE_SECONDS.
CHAOS_SECONDS = 40.0
ENQUEUE_SECONDS = 30.0
DRAIN_SECONDS = 120.0


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
        settings = chaos_settings(lc, server.url)
        executions = executions_key(settings)
        address = server_factory(settings)
        consumers = [worker_factory(replace(settings, redis_url=proxy.url)) for _ in range(CONSUMERS)]
        try:
            enqueuer = Enqueuer(address, executions, random.Random(seed + 1), tally, jobs=JOBS, spread=ENQUEUE_SECONDS)
            driver = Driver(
                rng=rng,
                server=server,
                proxy=proxy,
                key_prefix=settings.key_prefix,
                consumer_pids=running_pids(consumers),
                tally=tally,
            )
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
            wait_for(lambda: unfinished(settings) == 0, DRAIN_SECONDS, interval=0.5, what="every job finished")
            drained = time.monotonic()
            left = {
                state: n
                for state, n in states(settings, enqueuer.accepted).items()
                if state not in ("COMPLETED", "FAILED")
            }
            assert not left, f"accepted jobs not finished: {left}"
            report = check(settings, enqueuer.accepted, executions)
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
