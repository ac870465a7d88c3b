"""Row 7: the chaos run (tests/reliability/test_chaos.py) as a measurement.

Every run starts from nothing: a fresh Redis persisting with AOF (`appendfsync everysec`,
so the chaos restarts it with SIGTERM, never SIGKILL), one `queue-service serve` on it, and 3
`queue-service worker` processes (tests.chaos_tasks, concurrency 2, 2 s stall interval, rate
limit off, retention that keeps everything) reaching it through tests/proxy.py's FaultProxy.
`jobs` chaos.work jobs (10-50 ms each, 5% failing once) are enqueued through the API as fast
as it accepts them, and the consumers drain them: once with no fault (clean), once while
tests/chaos.py's seeded driver SIGKILLs worker processes, restarts Redis and loses TAKE /
SETTLE replies for the first `seconds` of the drain (or all of it, if shorter). Clean and
chaos runs of one repeat share a seed, so they carry the same jobs.

The figure is the drain rate: accepted jobs over the time from the first enqueue to the
last job's finish (its record's finished_at), chaos over clean repeat by repeat. After every
run tests/invariants.py reads everything back; the target is that every invariant holds
after every run. A violation is reported in the row's cell, not raised.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import redis

from bench.harness import Row, Summary, interleaved, log, ratios
from bench.infra import PREFIX, Child, GrpcServer, serve_process, worker_process
from queueservice_server.core.keys import JobFields, ServiceKeys
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from tests.chaos import CONSUMERS, Driver, Enqueuer, Tally, chaos_settings, executions_key, running_pids, unfinished
from tests.invariants import Counts, check
from tests.proxy import FaultProxy
from tests.support import job_hashes

START_SECONDS = 60.0
POLL = 0.05
_SHOWN = 160


@dataclass(frozen=True)
class ChaosRun:
    """One drain, clean or under chaos, and what the checker found after it."""

    chaos: bool
    seed: int
    jobs: int  # accepted by the API
    seconds: float  # first enqueue to the last job's finish
    fault_seconds: float  # how long the driver ran (0 for a clean run)
    tally: Tally
    dropped: int  # replies the proxy lost
    fail_once: int
    counts: Counts
    problems: list[str]  # invariant violations, and consumers that died

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    @property
    def kind(self) -> str:
        return "chaos" if self.chaos else "clean"

    def faults(self) -> str:
        t, c = self.tally, self.counts
        return (
            f"{t.kills} kills, {t.redis_restarts} Redis restarts, {self.dropped} replies dropped,"
            f" {c.stalled} stalls, {c.retried} retries, {c.executions:,} executions for {self.jobs:,} jobs"
        )


def base_settings(redis_url: str) -> Settings:
    """The bench's usual settings (bench.infra.Bench.settings), for the chaos run's processes."""
    base = Settings(
        redis_url=redis_url,
        key_prefix=PREFIX,
        shutdown_grace=5.0,
        grpc_grace=1.0,
        log_level="WARNING",
        rate_limit_max=0,
    )
    return chaos_settings(base, redis_url)


def _poll(until: Callable[[], bool], timeout: float, what: str, alive: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive()
        try:
            if until():
                return
        except redis.RedisError:
            pass  # Redis is restarting
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL)


def _last_finish(settings: Settings, job_ids: list[str]) -> float | None:
    """The latest finished_at (epoch seconds) of the jobs' records."""
    finished = [
        int(record[JobFields.FINISHED_AT.encode()])
        for record in job_hashes(settings, job_ids).values()
        if record.get(JobFields.FINISHED_AT.encode())
    ]
    return max(finished) / 1000 if finished else None


@dataclass(frozen=True)
class Processes:
    """One run's Redis, fault proxy, `serve` process and consumers."""

    server: RedisServer
    proxy: FaultProxy
    settings: Settings  # on Redis directly; the consumers' redis_url is the proxy's
    serve: GrpcServer
    consumers: list[Child]

    def alive(self) -> None:
        self.serve.check_alive()
        for consumer in self.consumers:
            consumer.check_alive()


@contextmanager
def started(directory: Path) -> Iterator[Processes]:
    """Everything of a run, ready: the consumers have registered. Stopped in reverse on the way out."""
    directory.mkdir(parents=True)
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(directory / "redis"))
        proxy = stack.enter_context(FaultProxy.from_url(server.url))
        settings = base_settings(server.url)
        serve = stack.enter_context(serve_process(settings, directory))
        consumers: list[Child] = []
        for index in range(CONSUMERS):
            log_dir = directory / f"consumer-{index}"
            log_dir.mkdir()
            consumers.append(stack.enter_context(worker_process(replace(settings, redis_url=proxy.url), log_dir)))
        processes = Processes(server, proxy, settings, serve, consumers)
        registry = stack.enter_context(redis.Redis.from_url(settings.redis_url))
        workers_key = ServiceKeys(settings.key_prefix).workers

        def registered() -> bool:
            return int(registry.zcard(workers_key)) >= CONSUMERS

        _poll(registered, START_SECONDS, "the consumers to register", processes.alive)
        yield processes


def drain(processes: Processes, enqueuer: Enqueuer, driver: Driver | None, *, jobs: int, seconds: float) -> float:
    """Starts the enqueuer (and the driver), stops the driver after `seconds`, and returns once every
    accepted job has finished: the seconds the driver ran."""
    began = time.monotonic()
    fault_seconds = 0.0

    def stop_faults() -> None:
        nonlocal fault_seconds
        if driver is not None and not driver.stop.is_set():
            driver.stop.set()
            fault_seconds = time.monotonic() - began

    def drained() -> bool:
        if time.monotonic() - began >= seconds:
            stop_faults()
        if enqueuer.error is not None:
            raise RuntimeError(f"enqueueing failed: {enqueuer.error!r}")
        if driver is not None and driver.error is not None:
            raise RuntimeError(f"the chaos driver failed: {driver.error!r}")
        return not enqueuer.is_alive() and unfinished(processes.settings) == 0

    enqueuer.start()
    if driver is not None:
        driver.start()
    try:
        # Not `processes.alive`: a consumer that dies is reported with the violations.
        _poll(drained, seconds + 120 + jobs / 20, f"{jobs} jobs to finish", processes.serve.check_alive)
    finally:
        stop_faults()
        if driver is not None:
            driver.join(30)
    if driver is not None and driver.error is not None:
        raise RuntimeError(f"the chaos driver failed: {driver.error!r}")
    return fault_seconds


def run_once(directory: Path, *, jobs: int, seconds: float, chaos: bool, seed: int) -> ChaosRun:
    began = time.monotonic()
    tally = Tally()
    with started(directory) as processes:
        settings = processes.settings
        executions = executions_key(settings)
        enqueuer = Enqueuer(processes.serve.target, executions, random.Random(seed + 1), tally, jobs=jobs, spread=0.0)
        driver = Driver(
            rng=random.Random(seed),
            server=processes.server,
            proxy=processes.proxy,
            key_prefix=settings.key_prefix,
            consumer_pids=running_pids(processes.consumers),
            tally=tally,
            say=lambda line: None,  # kept in tally.log
        )
        fault_seconds = drain(processes, enqueuer, driver if chaos else None, jobs=jobs, seconds=seconds)
        last = _last_finish(settings, enqueuer.accepted)
        if enqueuer.first_sent is None or last is None:
            raise RuntimeError("no job was enqueued or none finished")
        report = check(settings, enqueuer.accepted, executions)
        problems = list(report.violations)
        problems += [
            f"consumer {index} exited with {consumer.process.returncode}"
            for index, consumer in enumerate(processes.consumers)
            if consumer.process is not None and consumer.process.poll() is not None
        ]
        dropped = processes.proxy.dropped
    run = ChaosRun(
        chaos,
        seed,
        len(enqueuer.accepted),
        last - enqueuer.first_sent,
        fault_seconds,
        tally,
        dropped,
        enqueuer.fail_once,
        report.counts,
        problems,
    )
    log(
        f"  row 7: {run.kind} (seed {seed}): {run.jobs:,} jobs in {run.seconds:.1f} s = {run.rate:,.0f} jobs/s"
        + (f"; faults for {run.fault_seconds:.1f} s: {run.faults()}" if chaos else "")
        + f"; {len(problems)} invariant violations; run took {time.monotonic() - began:.0f} s"
    )
    for line in problems[:20]:
        log(f"  row 7: VIOLATION {line}")
    if problems and chaos:
        for line in tally.log:
            log(f"  row 7: {line}")
    return run


def _seeds(repeats: int) -> list[int]:
    """CHAOS_SEED=<n> replays repeats seeded n, n+2, ... (their faults' targets depend on timing)."""
    given = os.environ.get("CHAOS_SEED")
    first = int(given) if given else random.SystemRandom().randrange(2**32)
    return [first + 2 * repeat for repeat in range(repeats)]


def _runner(workdir: Path, seeds: list[int], *, jobs: int, seconds: float, chaos: bool) -> Callable[[], ChaosRun]:
    remaining: Iterator[tuple[int, int]] = iter(enumerate(seeds))

    def run() -> ChaosRun:
        repeat, seed = next(remaining)
        kind = "chaos" if chaos else "clean"
        return run_once(workdir / f"{kind}-{repeat}", jobs=jobs, seconds=seconds, chaos=chaos, seed=seed)

    return run


def _violations(runs: list[ChaosRun]) -> str:
    """'' if every invariant held after every run, else the cell's INVARIANT VIOLATED: ... text."""
    bad = [run for run in runs if run.problems]
    if not bad:
        return ""
    first = bad[0]
    total = sum(len(run.problems) for run in bad)
    return (
        f"INVARIANT VIOLATED: {total} violations in {len(bad)} of {len(runs)} runs;"
        f" first, {first.kind} run seed {first.seed}: {first.problems[0][:_SHOWN]}. "
    )


def row_chaos(workdir: Path, *, jobs: int, seconds: float, repeats: int) -> list[Row]:
    seeds = _seeds(repeats)
    log(f"  row 7: seeds {seeds} (CHAOS_SEED={seeds[0]} replays them)")
    clean = _runner(workdir, seeds, jobs=jobs, seconds=seconds, chaos=False)
    chaos = _runner(workdir, seeds, jobs=jobs, seconds=seconds, chaos=True)
    clean_runs, chaos_runs = interleaved(repeats, [clean, chaos])
    ratio = ratios([run.rate for run in chaos_runs], [run.rate for run in clean_runs])
    violated = _violations(clean_runs + chaos_runs)
    per_run = "; ".join(
        f"run {index + 1} ({run.fault_seconds:.0f} s of faults): {run.faults()}" for index, run in enumerate(chaos_runs)
    )
    checked = f"{len(clean_runs) + len(chaos_runs)} runs checked"
    held = f"invariants: 0 violations, {checked}" if not violated else checked
    return [
        Row(
            "7",
            f"chaos: drain {jobs:,} chaos.work jobs (10-50 ms, 5% fail once) by 3 consumers x 2 behind a fault proxy,"
            f" first enqueue to last finish, under up to {seconds:g} s of faults (SIGKILL worker processes,"
            " Redis restarts, lost TAKE/SETTLE replies) vs none",
            f"{violated}under chaos: {Summary.of([run.rate for run in chaos_runs]).fmt('jobs/s')}; {per_run}; {held}",
            f"no faults: {Summary.of([run.rate for run in clean_runs]).fmt('jobs/s')}",
            ratio.fmt("x"),
            "invariants hold",
            "NOT met" if violated else "met",
        )
    ]
