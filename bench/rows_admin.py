"""Rows 4 and 5: the operators' RPCs.

Row 4: GetStats / GetPerformance latency, one call in flight, on three
queues of one Redis holding 0, 100,000 and 1,000,000 waiting jobs, measured
interleaved (with the bare echo server sent the same request bytes, for
scale). Flat in backlog size means the 1M queue within 1.2x of the empty one.

Row 5: StreamTimings, with a worker draining a burst of jobs: delivery
latency (the job's finish time to the subscriber's receipt) with 10
subscribers against 1; events/s delivered to 10 subscribers against what
keeping up would take (10 x the workers' finish rate); and the workers' rate
with 10 subscribers against none (a subscriber must never slow workers).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from bench import echo_server
from bench.harness import Row, Summary, interleaved, log, percentile, ratios, verdict
from bench.infra import QUEUE, Bench, ClientLoop, echo_process, fresh_redis, noop_spec, serve_process, worker_process
from bench.rows_grpc import Load, Unary, closed_loop, ms, raw_unary
from queueservice.v1 import admin_service_pb2, admin_service_pb2_grpc
from queueservice_server.core.producer import Producer
from queueservice_server.core.redis import async_client

if TYPE_CHECKING:
    from queueservice.v1.admin_service_pb2_grpc import QueueAdminServiceAsyncStub

ADMIN = "/queueservice.v1.QueueAdminService/"


def backlog_label(count: int) -> str:
    if count >= 1_000_000:
        return f"{count / 1_000_000:g}M"
    return f"{count / 1000:g}k" if count >= 1000 else str(count)


def row_stats(workdir: Path, *, backlogs: tuple[int, ...], seconds: float, repeats: int) -> list[Row]:
    queues = {backlog: f"backlog-{backlog_label(backlog)}" for backlog in backlogs}
    titles = {
        name: f"{name} latency, 1 in flight, at {' / '.join(backlog_label(b) for b in backlogs)} waiting jobs"
        for name in ("GetStats", "GetPerformance")
    }
    requests = {
        "GetStats": {b: admin_service_pb2.GetStatsRequest(queue=q).SerializeToString() for b, q in queues.items()},
        "GetPerformance": {
            b: admin_service_pb2.GetPerformanceRequest(queue=q).SerializeToString() for b, q in queues.items()
        },
    }
    # name -> (per backlog: loads), echo loads
    results: dict[str, tuple[dict[int, list[Load]], list[Load]]] = {}
    with fresh_redis(workdir) as bench:
        settings = bench.settings(queues=tuple(queues.values()))
        with (
            serve_process(settings, workdir) as ours,
            echo_process(settings, workdir) as echo,
            ClientLoop() as client,
        ):
            echo_call = raw_unary(client.channel(echo.target), echo_server.METHOD)
            ours_channel = client.channel(ours.target)
            calls = {name: raw_unary(ours_channel, ADMIN + name) for name in requests}
            for backlog, queue in queues.items():
                log(f"  row 4: filling {queue} with {backlog:,} jobs")
                client.run(bench.fill_async(backlog, queue=queue, chunk=5000))

            def run(call: Unary, request: bytes) -> Load:
                server = echo if call is echo_call else ours
                return client.run(closed_loop(call, request, 1, seconds, server.cpu_seconds))

            for name in requests:
                series = [
                    *(partial(run, calls[name], requests[name][b]) for b in backlogs),
                    partial(run, echo_call, requests[name][backlogs[0]]),
                ]
                measured = interleaved(repeats, series)
                results[name] = (dict(zip(backlogs, measured, strict=False)), measured[-1])
                log(f"  row 4: {name}: " + ", ".join(f"{ms(r[0].p50):.2f} ms" for r in measured))
    rows = []
    for index, (name, title) in enumerate(titles.items()):
        label = f"4{'ab'[index]}"
        by_backlog, echo_loads = results[name]
        subject = "; ".join(
            f"{backlog_label(b)}: p50 {Summary.of([ms(x.p50) for x in loads]).fmt('ms')}, "
            f"p99 {Summary.of([ms(x.p99) for x in loads]).fmt('ms')}"
            for b, loads in by_backlog.items()
        )
        empty, largest = by_backlog[backlogs[0]], by_backlog[backlogs[-1]]
        growth = ratios([x.p50 for x in largest], [x.p50 for x in empty])
        p99_growth = ratios([x.p99 for x in largest], [x.p99 for x in empty])
        echo_p50 = Summary.of([ms(x.p50) for x in echo_loads])
        versus_echo = ratios([x.p50 for x in empty], [x.p50 for x in echo_loads])
        rows.append(
            Row(
                label,
                title + " (lower is better)",
                subject,
                f"the same call on the empty queue; bare echo: p50 {echo_p50.fmt('ms')}",
                f"{backlog_label(backlogs[-1])} / empty: p50 {growth.fmt('x')}, p99 {p99_growth.fmt('x')}; "
                f"empty / echo: p50 {versus_echo.fmt('x')}",
                f"{backlog_label(backlogs[-1])} p50 <= 1.2x empty",
                verdict(growth, 1.2, at_most=True),
            )
        )
    return rows


@dataclass
class Subscriber:
    """What one StreamTimings subscriber has received since `reset`."""

    latencies: list[float] = field(default_factory=list)
    dropped: int = 0
    last_received: float = 0.0

    def reset(self) -> None:
        self.latencies.clear()
        self.dropped = 0

    async def run(self, stub: QueueAdminServiceAsyncStub) -> None:
        call = stub.StreamTimings(admin_service_pb2.StreamTimingsRequest(queue=QUEUE))
        try:
            async for message in call:
                now = time.time()
                self.latencies.append(now - message.timing.finish_time.ToNanoseconds() / 1e9)
                self.dropped += message.dropped_count
                self.last_received = time.perf_counter()
        finally:
            call.cancel()


@dataclass(frozen=True)
class FanOut:
    """One run: delivery latencies (s), events/s delivered to all subscribers, jobs/s
    finished, events the server reported dropped and events that never came (within
    10 s of the last job finishing), and the bench's own CPU meanwhile (cores),
    which receives and decodes every event."""

    p50: float
    p99: float
    delivered_rate: float
    finish_rate: float
    dropped: int
    missing: int
    client_cores: float


async def _until(condition: bool, tasks: list[asyncio.Task[None]]) -> bool:
    """One polling step: re-raises a subscriber's failure, then says whether `condition` holds."""
    for task in tasks:
        if task.done():
            task.result()
    if not condition:
        await asyncio.sleep(0.01)
    return condition


async def enqueue_paced(producer: Producer, jobs: int, pace: float | None) -> None:
    """`jobs` diag.noop jobs: `pace` per second one by one, or (None) all at once in pipelined chunks."""
    start = time.perf_counter()
    chunk = 1 if pace else 500
    for offset in range(0, jobs, chunk):
        if pace:
            await asyncio.sleep(max(0.0, start + offset / pace - time.perf_counter()))
        end = min(jobs, offset + chunk)
        await producer.enqueue([noop_spec(producer.settings, i) for i in range(offset, end)])


async def fan_out(
    bench: Bench, stub: QueueAdminServiceAsyncStub, subscribers: int, jobs: int, pace: float | None
) -> FanOut:
    """Opens `subscribers` streams, then enqueues `jobs` (at `pace` per second, or
    all at once; a worker is draining) and waits until the worker finished them
    and every subscriber received them."""
    settings = bench.settings()
    client = async_client(settings, bench.url)
    producer = Producer(settings, client)
    subs = [Subscriber() for _ in range(subscribers)]
    tasks = [asyncio.create_task(sub.run(stub)) for sub in subs]
    try:
        # A stream delivers live events only once the server reads for it: feed
        # single jobs until every subscriber has seen one, then start counting.
        deadline = time.monotonic() + 15
        while not all(sub.latencies for sub in subs):
            if time.monotonic() > deadline:
                raise TimeoutError("StreamTimings subscribers received nothing")
            await producer.enqueue([noop_spec(settings, 0)])
            await asyncio.sleep(0.2)
        done_before = sum(bench.finished())
        for sub in subs:
            sub.reset()
        start, client_cpu = time.perf_counter(), time.process_time()
        await enqueue_paced(producer, jobs, pace)
        deadline = time.monotonic() + 60 + jobs / 100
        while not await _until(sum(bench.finished()) - done_before >= jobs, tasks):
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not finish the burst")
        finished = time.perf_counter()
        deadline = time.monotonic() + 10
        while not await _until(all(len(s.latencies) + s.dropped >= jobs for s in subs), tasks):
            if time.monotonic() > deadline:
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
    latencies = sorted(latency for sub in subs for latency in sub.latencies)
    delivered_until = max((sub.last_received for sub in subs), default=finished)
    client_cores = (time.process_time() - client_cpu) / (time.perf_counter() - start)
    return FanOut(
        p50=percentile(latencies, 0.5) if latencies else float("nan"),
        p99=percentile(latencies, 0.99) if latencies else float("nan"),
        delivered_rate=len(latencies) / (delivered_until - start),
        finish_rate=jobs / (finished - start),
        dropped=sum(sub.dropped for sub in subs),
        missing=sum(max(0, jobs - len(sub.latencies) - sub.dropped) for sub in subs),
        client_cores=client_cores,
    )


def losses(runs: list[FanOut]) -> str:
    """Events lost to subscribers over all runs, when any were."""
    dropped, missing = sum(x.dropped for x in runs), sum(x.missing for x in runs)
    return f"; lost: {dropped:,} reported dropped, {missing:,} never arrived" if dropped or missing else ""


def latency_cell(runs: list[FanOut]) -> str:
    return (
        f"p50 {Summary.of([ms(x.p50) for x in runs]).fmt('ms')}, p99 {Summary.of([ms(x.p99) for x in runs]).fmt('ms')}"
    )


def row_stream(workdir: Path, *, jobs: int, repeats: int, subscribers: int = 10, pace: float = 200) -> list[Row]:
    """Latency is measured at a modest steady `pace` (the fan-out keeps up, so it
    is the delivery delay itself); capacity with a burst of `jobs` at once."""
    paced_jobs = max(100, round(pace * 2))
    titles = {
        "5a": f"StreamTimings delivery latency (job finished -> subscriber got it), {subscribers} subscribers vs 1",
        "5b": f"StreamTimings events/s delivered to {subscribers} subscribers vs {subscribers} x jobs finished/s",
        "5c": f"worker drain rate with {subscribers} StreamTimings subscribers vs none",
    }
    with fresh_redis(workdir) as bench:
        settings = bench.settings(worker_concurrency=2)
        with serve_process(settings, workdir) as ours, ClientLoop() as client:
            stub: QueueAdminServiceAsyncStub = admin_service_pb2_grpc.QueueAdminServiceStub(client.channel(ours.target))
            with worker_process(settings, workdir):

                def run(n: int, burst: bool) -> FanOut:
                    result = client.run(fan_out(bench, stub, n, jobs if burst else paced_jobs, None if burst else pace))
                    log(
                        f"  row 5: {n} subscribers, {'burst' if burst else 'paced'}: p50 {ms(result.p50):.1f} ms, "
                        f"{result.delivered_rate:,.0f} events/s, {result.finish_rate:,.0f} jobs/s"
                    )
                    return result

                paced_many, paced_one, burst_many, burst_none = interleaved(
                    repeats,
                    [
                        partial(run, subscribers, False),
                        partial(run, 1, False),
                        partial(run, subscribers, True),
                        partial(run, 0, True),
                    ],
                )
    delivered = [x.delivered_rate for x in burst_many]
    offered = [subscribers * x.finish_rate for x in burst_many]
    return [
        Row(
            "5a",
            titles["5a"] + f" ({pace:g} jobs/s for {paced_jobs / pace:g} s; lower is better)",
            latency_cell(paced_many) + losses(paced_many),
            "1 subscriber: " + latency_cell(paced_one) + losses(paced_one),
            f"p50 {ratios([x.p50 for x in paced_many], [x.p50 for x in paced_one]).fmt('x')}; "
            f"p99 {ratios([x.p99 for x in paced_many], [x.p99 for x in paced_one]).fmt('x')}",
        ),
        Row(
            "5b",
            titles["5b"] + f" ({jobs:,}-job bursts)",
            f"{Summary.of(delivered).fmt('events/s')}; latency {latency_cell(burst_many)}; "
            f"the bench's subscribers used {Summary.of([x.client_cores for x in burst_many]).fmt('cores')}"
            + losses(burst_many),
            Summary.of(offered).fmt("events/s"),
            ratios(delivered, offered).fmt("x"),
            "~1x (keeps up)",
        ),
        Row(
            "5c",
            titles["5c"] + f" ({jobs:,}-job bursts, worker concurrency 2)",
            Summary.of([x.finish_rate for x in burst_many]).fmt("jobs/s"),
            "no subscriber: " + Summary.of([x.finish_rate for x in burst_none]).fmt("jobs/s"),
            ratios([x.finish_rate for x in burst_many], [x.finish_rate for x in burst_none]).fmt("x"),
            "~1x",
        ),
    ]
