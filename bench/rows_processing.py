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
from bench.infra import Bench, fresh_redis, huey_process, measure_drain, worker_process

OUR_CONCURRENCY = (2, 4)
HUEY_WORKERS = (("thread", 1), ("thread", 4), ("process", 2))


def drain_ours(bench: Bench, jobs: int, concurrency: int) -> float:
    bench.flush()
    bench.fill(jobs)
    with worker_process(bench.settings(worker_concurrency=concurrency), bench.dir) as worker:
        drain = measure_drain(
            lambda: jobs - bench.waiting(),
            lambda: sum(bench.finished()),
            jobs,
            worker.check_alive,
            timeout=60 + jobs / 100,
        )
    completed, failed = bench.finished()
    if (completed, failed) != (jobs, 0):
        raise RuntimeError(f"our worker completed {completed} and failed {failed} of {jobs} jobs")
    log(f"  row 3: ours c={concurrency}: {drain.rate:,.0f} jobs/s")
    return drain.rate


def drain_huey(bench: Bench, jobs: int, worker_type: str, workers: int) -> float:
    bench.flush()
    huey = PlainHuey(bench.url)
    try:
        huey.enqueue_pipelined([{"n": i} for i in range(jobs)])
        with huey_process(bench.url, workers, worker_type, bench.dir) as consumer:
            # Huey keeps no record of a finished no-op: "done" is its queue running empty.
            drain = measure_drain(
                lambda: jobs - huey.waiting(),
                lambda: jobs - huey.waiting(),
                jobs,
                consumer.check_alive,
                timeout=60 + jobs / 100,
            )
    finally:
        huey.close()
    log(f"  row 3: Huey {workers} {worker_type}s: {drain.rate:,.0f} jobs/s")
    return drain.rate


def _best(results: dict[str, list[float]]) -> str:
    return max(results, key=lambda name: Summary.of(results[name]).median)


def _others(results: dict[str, list[float]], best: str) -> str:
    others = ", ".join(f"{name} {Summary.of(v).median:,.0f}" for name, v in results.items() if name != best)
    return f" (other configurations, medians: {others})" if others else ""


def alternate(first: list[str], second: list[str]) -> list[str]:
    """a1 b1 a2 b2 ...: each repeat interleaves ours with Huey's configurations."""
    out: list[str] = []
    for i in range(max(len(first), len(second))):
        out += first[i : i + 1] + second[i : i + 1]
    return out


def row_drain(workdir: Path, *, jobs: int, repeats: int) -> list[Row]:
    with fresh_redis(workdir) as bench:
        ours: dict[str, Callable[[], float]] = {
            f"concurrency {c}": partial(drain_ours, bench, jobs, c) for c in OUR_CONCURRENCY
        }
        huey: dict[str, Callable[[], float]] = {
            f"{n} {kind}s": partial(drain_huey, bench, jobs, kind, n) for kind, n in HUEY_WORKERS
        }
        runs = {**ours, **huey}
        names = alternate(list(ours), list(huey))
        results = dict(zip(names, interleaved(repeats, [runs[name] for name in names]), strict=True))
    ours_results = {name: results[name] for name in ours}
    huey_results = {name: results[name] for name in huey}
    ours_best, huey_best = _best(ours_results), _best(huey_results)
    ratio = ratios(ours_results[ours_best], huey_results[huey_best])
    return [
        Row(
            "3",
            f"drain {jobs:,} waiting diag.noop jobs, first take to last done, each side at its best configuration",
            f"{ours_best}: {Summary.of(ours_results[ours_best]).fmt('jobs/s')}{_others(ours_results, ours_best)}",
            f"plain Huey, {huey_best}: {Summary.of(huey_results[huey_best]).fmt('jobs/s')}"
            f"{_others(huey_results, huey_best)}",
            ratio.fmt("x"),
            ">= 4x",
            verdict(ratio, 4.0),
        )
    ]
