"""Row 6: Redis memory per job, from INFO used_memory deltas over many jobs
on a fresh Redis.

Ours: N waiting jobs with payload {"n": i} written through the producer's
ENQUEUE script; then the same jobs run to COMPLETED by a worker, with every
record kept (as retention keeps the newest QUEUE_KEEP_COMPLETED). Plain
Huey: N queued messages of the same task call (pickle, LPUSH); a finished
Huey task leaves nothing behind (a None result is not stored), so its queued
message is the baseline for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.harness import Row, Summary, interleaved, log, ratios
from bench.huey_app import PlainHuey
from bench.infra import Bench, fresh_redis, worker_process


@dataclass(frozen=True)
class PerJob:
    """Redis bytes per job of one run: waiting, and (ours only) after completion."""

    waiting: float
    completed: float = 0.0
    encoding: str = ""


def job_hash_encoding(bench: Bench) -> str:
    """OBJECT ENCODING of one job record: `ziplist` is compact, `hashtable` costs several times more."""
    keys = bench.keys()
    first: list[bytes] = bench.redis.zrange(keys.completed, 0, 0)  # type: ignore[assignment]
    if not first:
        return "?"
    encoding: bytes = bench.redis.object("encoding", keys.job(first[0].decode()))
    return encoding.decode()


def ours(bench: Bench, jobs: int) -> PerJob:
    bench.flush()
    before = bench.used_memory()
    bench.fill(jobs)
    waiting = bench.used_memory() - before
    with worker_process(bench.settings(keep_completed=jobs), bench.dir) as worker:
        bench.measure_drain(lambda: jobs - bench.waiting(), lambda: sum(bench.finished()), jobs, worker.check_alive)
    completed = bench.used_memory() - before
    encoding = job_hash_encoding(bench)
    log(f"  row 6: ours: {waiting / jobs:,.0f} B waiting, {completed / jobs:,.0f} B completed ({encoding})")
    return PerJob(waiting / jobs, completed / jobs, encoding)


def huey(bench: Bench, jobs: int) -> PerJob:
    bench.flush()
    app = PlainHuey(bench.url)
    try:
        before = bench.used_memory()
        app.enqueue_pipelined([{"n": i} for i in range(jobs)])
        queued = bench.used_memory() - before
    finally:
        app.close()
    log(f"  row 6: Huey: {queued / jobs:,.0f} B queued")
    return PerJob(queued / jobs)


def row_memory(workdir: Path, *, jobs: int, repeats: int) -> list[Row]:
    with fresh_redis(workdir) as bench:
        our_runs, huey_runs = interleaved(repeats, [lambda: ours(bench, jobs), lambda: huey(bench, jobs)])
    waiting = [run.waiting for run in our_runs]
    completed = [run.completed for run in our_runs]
    encodings = "/".join(sorted({run.encoding for run in our_runs}))
    queued = [run.waiting for run in huey_runs]
    huey_cell = f"plain Huey queued message: {Summary.of(queued).fmt('B')}"
    return [
        Row(
            "6a",
            f'Redis bytes per waiting job ({jobs:,} jobs, payload {{"n": i}}; lower is better)',
            Summary.of(waiting).fmt("B"),
            huey_cell,
            ratios(waiting, queued).fmt("x"),
        ),
        Row(
            "6b",
            "Redis bytes per completed job, record kept (Huey keeps nothing for a None result)",
            f"{Summary.of(completed).fmt('B')} (job hash encoding: {encodings})",
            huey_cell,
            ratios(completed, queued).fmt("x"),
        ),
    ]
