"""Row 3: draining a backlog of no-op jobs, end to end.

Ours: N `diag.noop` jobs written first through the service's producer (the
ENQUEUE script that EnqueueBatch runs), then one `queue-service worker` at a
few concurrencies, with the service's defaults otherwise (records, retention,
timings, reliable take) and the rate limit off. Plain Huey: the same number
of no-op task messages on the same Redis, then its consumer at a few thread
and process counts. Each side is reported at its best configuration (highest
median); the clock runs from the first job taken to the last one done, so
process start-up is not timed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.harness import Row, Summary, interleaved, log, ratios, verdict
from bench.huey_app import PlainHuey
from bench.infra import Bench, Drain, fresh_redis, huey_process, worker_process

OUR_CONCURRENCY = (2, 4)
# (worker type, workers, label)
HUEY_WORKERS = (
    ("thread", 1, "1 thread"),
    ("thread", 4, "4 threads"),
    ("process", 2, "2 processes"),
    ("process", 4, "4 processes"),
    ("process", 8, "8 processes"),
)


def drain_ours(bench: Bench, jobs: int, concurrency: int) -> Drain:
    bench.flush()
    bench.fill(jobs)
    with worker_process(bench.settings(worker_concurrency=concurrency), bench.dir) as worker:
        left = bench.waiting
        drain = bench.measure_drain(lambda: jobs - left(), lambda: sum(bench.finished()), jobs, worker.check_alive)
    completed, failed = bench.finished()
    if (completed, failed) != (jobs, 0):
        raise RuntimeError(f"our worker completed {completed} and failed {failed} of {jobs} jobs")
    log(f"  row 3: ours c={concurrency}: {drain.rate:,.0f} jobs/s")
    return drain


def drain_huey(bench: Bench, jobs: int, worker_type: str, workers: int) -> Drain:
    bench.flush()
    huey = PlainHuey(bench.url)
    try:
        huey.enqueue_pipelined([{"n": i} for i in range(jobs)])
        with huey_process(bench.url, workers, worker_type, bench.dir) as consumer:
            # Huey keeps no record of a finished no-op: "done" is its queue running empty.
            left = huey.waiting
            drain = bench.measure_drain(lambda: jobs - left(), lambda: jobs - left(), jobs, consumer.check_alive)
    finally:
        huey.close()
    log(f"  row 3: Huey, {workers} x {worker_type}: {drain.rate:,.0f} jobs/s")
    return drain


def _best(results: dict[str, list[Drain]]) -> str:
    return max(results, key=lambda name: Summary.of([d.rate for d in results[name]]).median)


def _cell(results: dict[str, list[Drain]], best: str) -> str:
    """The best configuration's rate, where the CPU went meanwhile, and the other configurations' medians."""
    drains = results[best]
    rate = Summary.of([d.rate for d in drains])
    redis_us = Summary.of([d.redis_us_per_job for d in drains])
    others_us = Summary.of([d.others_us_per_job for d in drains])
    busy = Summary.of([100 * d.machine_busy for d in drains])
    others = ", ".join(
        f"{name} {Summary.of([d.rate for d in v]).median:,.0f}" for name, v in results.items() if name != best
    )
    return (
        f"{best}: {rate.fmt('jobs/s')}; CPU per job: Redis {redis_us.fmt('µs')}, other processes {others_us.fmt('µs')};"
        f" cores {busy.fmt('% busy')}"
        f" (other configurations, median jobs/s: {others})"
    )


def alternate(first: list[str], second: list[str]) -> list[str]:
    """a1 b1 a2 b2 ...: each repeat interleaves ours with Huey's configurations."""
    out: list[str] = []
    for i in range(max(len(first), len(second))):
        out += first[i : i + 1] + second[i : i + 1]
    return out


def row_drain(workdir: Path, *, jobs: int, repeats: int) -> list[Row]:
    with fresh_redis(workdir) as bench:
        ours: dict[str, Callable[[], Drain]] = {
            f"concurrency {c}": partial(drain_ours, bench, jobs, c) for c in OUR_CONCURRENCY
        }
        huey: dict[str, Callable[[], Drain]] = {
            label: partial(drain_huey, bench, jobs, kind, n) for kind, n, label in HUEY_WORKERS
        }
        runs = {**ours, **huey}
        names = alternate(list(ours), list(huey))
        results = dict(zip(names, interleaved(repeats, [runs[name] for name in names]), strict=True))
    ours_results = {name: results[name] for name in ours}
    huey_results = {name: results[name] for name in huey}
    ours_best, huey_best = _best(ours_results), _best(huey_results)
    ratio = ratios([d.rate for d in ours_results[ours_best]], [d.rate for d in huey_results[huey_best]])
    return [
        Row(
            "3",
            f"drain {jobs:,} waiting diag.noop jobs, first take to last done, each side at its best configuration",
            "one `queue-service worker`, " + _cell(ours_results, ours_best),
            "plain Huey consumer, " + _cell(huey_results, huey_best),
            ratio.fmt("x"),
            ">= 4x",
            verdict(ratio, 4.0),
        )
    ]
