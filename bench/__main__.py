"""`python -m bench [--quick] [--rows 1,3] [--output PATH]` (`make bench`).

Runs the rows, prints one table and, for a full run of every row, writes it
with the machine line to docs/benchmarks.md. A row that fails says so in its
cell; the others still run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.harness import Machine, Row, log, table
from bench.infra import ROOT
from bench.rows_admin import row_stats, row_stream
from bench.rows_auth import row_auth
from bench.rows_chaos import row_chaos
from bench.rows_grpc import row_batch, row_unary
from bench.rows_memory import row_memory
from bench.rows_processing import row_drain
from queueservice_server.embedded import redis_server_binary

DOC = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Sizes:
    repeats: int
    load_seconds: float
    batch_jobs: int
    drain_jobs: int
    drain_repeats: int
    backlogs: tuple[int, ...]
    admin_seconds: float
    stream_jobs: int
    memory_jobs: int
    chaos_jobs: int
    chaos_seconds: float
    chaos_repeats: int


# Sized so that a full run stays under 10 minutes on a 2-core machine.
FULL = Sizes(
    repeats=5,
    load_seconds=1.5,
    batch_jobs=20_000,
    drain_jobs=20_000,
    drain_repeats=3,
    backlogs=(0, 100_000, 1_000_000),
    admin_seconds=1.0,
    stream_jobs=3_000,
    memory_jobs=10_000,
    chaos_jobs=3_000,
    chaos_seconds=30.0,
    chaos_repeats=2,
)
QUICK = Sizes(
    repeats=3,
    load_seconds=0.5,
    batch_jobs=5_000,
    drain_jobs=3_000,
    drain_repeats=2,
    backlogs=(0, 10_000, 100_000),
    admin_seconds=0.3,
    stream_jobs=500,
    memory_jobs=2_000,
    chaos_jobs=1_000,
    chaos_seconds=10.0,
    chaos_repeats=1,
)

RowRunner = Callable[[Path, Sizes], list[Row]]
ROWS: dict[int, tuple[str, RowRunner]] = {
    1: ("unary Enqueue vs bare echo", lambda d, s: row_unary(d, seconds=s.load_seconds, repeats=s.repeats)),
    2: ("EnqueueBatch vs plain Huey enqueue", lambda d, s: row_batch(d, jobs=s.batch_jobs, repeats=s.repeats)),
    3: ("drain vs plain Huey consumer", lambda d, s: row_drain(d, jobs=s.drain_jobs, repeats=s.drain_repeats)),
    4: (
        "GetStats/GetPerformance vs backlog",
        lambda d, s: row_stats(d, backlogs=s.backlogs, seconds=s.admin_seconds, repeats=s.repeats),
    ),
    5: ("StreamTimings fan-out", lambda d, s: row_stream(d, jobs=s.stream_jobs, repeats=3)),
    6: ("Redis memory per job", lambda d, s: row_memory(d, jobs=s.memory_jobs, repeats=3)),
    7: ("chaos", lambda d, s: row_chaos(d, jobs=s.chaos_jobs, seconds=s.chaos_seconds, repeats=s.chaos_repeats)),
    8: (
        "authentication cost",
        lambda d, s: row_auth(d, seconds=s.load_seconds, repeats=s.repeats, batch_jobs=s.batch_jobs),
    ),
}

METHOD = """\
Every figure is measured next to its baseline in the same run, on a Redis the
bench starts for the row (the embedded `redis-server`, no persistence, a free
loopback port), with servers and workers as child processes started the way
operators start them (`queue-service serve|worker`, QUEUE_* variables; rate
limit off). Subject and baseline alternate (A B, B A, ...) over the repeats;
each cell is the median with the min-max over repeats, and each ratio is taken
repeat by repeat. Targets are judged on the median ratio. The machine is
shared and noisy: compare ratios, not absolute figures, across runs.
"""


ROWS_TEXT = """\
1. Unary `Enqueue` (diag.noop, payload {"n": 1}) at 1 and 16 calls in flight
   against a bare grpc.aio echo server sent the same request bytes with the
   same server options; "server CPU" is the server process's CPU per call.
2. `EnqueueBatch` of 1,000 jobs per call (requests built per call) against plain
   Huey (`RedisHuey`, its default pickle setup) enqueueing the same payloads by
   calling the task once per job on the same Redis; 2b, for scale, against
   Huey's messages pushed in pipelines (not something Huey's API does).
3. Draining 20,000 waiting diag.noop jobs by one `queue-service worker` (service
   defaults: records, retention, timings stream, per-minute figures, reliable
   take; rate limit off) against plain Huey's consumer on the same Redis, each
   at its best of a few concurrencies. CPU per job splits Redis's share from the
   rest of the machine's (mostly the workers).
4. `GetStats` / `GetPerformance` latency, one call in flight, on queues holding
   0, 100,000 and 1,000,000 waiting jobs in one Redis, measured interleaved.
5. `StreamTimings` with a worker running diag.noop jobs: delivery latency (job
   finish time to receipt) at a steady 200 jobs/s, 10 subscribers against 1;
   with bursts of jobs, events/s delivered to 10 subscribers against 10 x the
   jobs finished per second, and the workers' rate against no subscriber.
6. Redis memory per waiting and per completed job (INFO used_memory deltas over
   many jobs, fresh Redis) against one plain Huey queued message.
7. Chaos: draining 3,000 chaos.work jobs (3 consumers behind a fault proxy, AOF
   Redis) while the chaos test's driver (tests/chaos.py) kills worker processes,
   restarts Redis and drops replies, against the same load with no fault; every
   invariant of tests/invariants.py must hold after every run.
8. Authentication's cost: rows 1 and 2's loads against two servers on one Redis,
   one with QUEUE_AUTH on (a bearer token checked per call, an audit line per
   call written at log level INFO) and one with it off at the same log level.
"""


# Written by hand from a profiling session; the page carries it along.
PROFILE = Path(__file__).with_name("profile.md")


def parse_rows(text: str) -> list[int]:
    rows = sorted({int(part) for part in text.split(",") if part.strip()})
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"no such row: {unknown}; rows are {sorted(ROWS)}")
    return rows


def run_row(number: int, workdir: Path, sizes: Sizes) -> tuple[list[Row], bool]:
    """The row's lines, and whether it ran without failing."""
    name, runner = ROWS[number]
    log(f"row {number}: {name}")
    start = time.monotonic()
    try:
        rows = runner(workdir / f"row{number}", sizes)
    except Exception as exc:
        traceback.print_exc()
        first_line = (str(exc).splitlines() or [""])[0][:200]
        return [Row.unavailable(str(number), name, f"failed: {type(exc).__name__}: {first_line}")], False
    log(f"row {number}: done in {time.monotonic() - start:.0f} s")
    return rows, True


def document(machine: Machine, rows: list[Row], wall: float, quick: bool) -> str:
    run = "`python -m bench --quick`" if quick else "`make bench` (`python -m bench`)"
    return (
        "# Benchmarks\n\n"
        f"Written by {run}; re-run it to refresh this page. `--quick` runs small sizes,\n"
        "`--rows 1,3` picks rows.\n\n"
        f"Machine: {machine.line()}. Wall time of the run: {wall:.0f} s.\n\n"
        f"{table(rows)}\n\n"
        f"## Rows\n\n{ROWS_TEXT}\n"
        f"{PROFILE.read_text()}"
        f"## Method\n\n{METHOD}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about 1-2 minutes, for trying it out")
    parser.add_argument("--rows", type=parse_rows, default=sorted(ROWS), help="comma-separated rows, e.g. 1,3")
    parser.add_argument(
        "--output", type=Path, help=f"write the page here (default: {DOC.relative_to(ROOT)} for a full run of all rows)"
    )
    args = parser.parse_args()
    output: Path | None = args.output
    if output is None and not args.quick and args.rows == sorted(ROWS):
        output = DOC
    sizes = QUICK if args.quick else FULL
    machine = Machine(redis_server_binary())
    started = time.monotonic()
    rows: list[Row] = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="queue-bench-") as tmp:
        for number in args.rows:
            row_lines, row_ok = run_row(number, Path(tmp), sizes)
            rows += row_lines
            ok = ok and row_ok
    wall = time.monotonic() - started
    machine.finish()
    print(f"Machine: {machine.line()}. Wall time: {wall:.0f} s.\n")
    print(table(rows))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(document(machine, rows, wall, args.quick))
        log(f"wrote {output}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
