"""Rows 1 and 2: the enqueue path through gRPC.

Row 1: unary `Enqueue` at 1 and 16 calls in flight against a bare grpc.aio
echo server sent the same request bytes, by the same client code
(pre-serialized bytes in, bytes out), so only the server side differs.

Row 2: `EnqueueBatch` of 1,000 jobs per call (the request built per call, as
a producer would) against plain Huey enqueueing the same payloads one task
call at a time; and, for scale, against Huey's best case, pipelined LPUSHes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc
import grpc.aio
from google.protobuf import struct_pb2

from bench import echo_server
from bench.harness import Row, Summary, interleaved, log, percentile, ratios, verdict
from bench.huey_app import PlainHuey
from bench.infra import Bench, ClientLoop, echo_process, fresh_redis, serve_process
from queueservice.v1 import queue_service_pb2, queue_service_pb2_grpc

ENQUEUE_METHOD = "/queueservice.v1.QueueService/Enqueue"
Unary = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]


def raw_unary(channel: grpc.aio.Channel, method: str) -> Unary:
    """A callable that sends and returns bytes as they are: no (de)serialization on the client."""
    call: Unary = channel.unary_unary(method, None, None)
    return call


@dataclass(frozen=True)
class Load:
    """One closed-loop load run: calls per second, latency percentiles and the
    server process's CPU time per call (seconds)."""

    qps: float
    p50: float
    p99: float
    server_cpu: float


async def closed_loop(
    call: Unary, request: bytes, in_flight: int, seconds: float, server_cpu: Callable[[], float]
) -> Load:
    """`in_flight` callers, each sending its next call when the last one answers, for `seconds`."""
    latencies: list[float] = []

    async def caller(deadline: float) -> None:
        clock = time.perf_counter
        while clock() < deadline:
            start = clock()
            await call(request, timeout=10)
            latencies.append(clock() - start)

    # Warm up (connection, caches, a sleeping core) without recording.
    warm_until = time.perf_counter() + min(0.3, seconds / 4)
    await asyncio.gather(*(caller(warm_until) for _ in range(in_flight)))
    latencies.clear()
    cpu_before = server_cpu()
    start = time.perf_counter()
    await asyncio.gather(*(caller(start + seconds) for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    cpu = (server_cpu() - cpu_before) / len(latencies)
    latencies.sort()
    return Load(len(latencies) / elapsed, percentile(latencies, 0.50), percentile(latencies, 0.99), cpu)


def ms(seconds: float) -> float:
    return seconds * 1000


def load_cell(loads: list[Load]) -> str:
    qps = Summary.of([x.qps for x in loads])
    p50 = Summary.of([ms(x.p50) for x in loads])
    p99 = Summary.of([ms(x.p99) for x in loads])
    cpu = Summary.of([x.server_cpu * 1e6 for x in loads])
    return f"{qps.fmt('calls/s')}; p50 {p50.fmt('ms')}; p99 {p99.fmt('ms')}; server CPU {cpu.fmt('µs/call')}"


def row_unary(workdir: Path, *, seconds: float, repeats: int) -> list[Row]:
    request_message = queue_service_pb2.EnqueueRequest(task="diag.noop")
    request_message.payload.update({"n": 1})
    request = request_message.SerializeToString()
    rows: list[Row] = []
    with fresh_redis(workdir) as bench:
        settings = bench.settings()
        with (
            serve_process(settings, workdir) as ours,
            echo_process(settings, workdir) as echo,
            ClientLoop() as client,
        ):
            enqueue = raw_unary(client.channel(ours.target), ENQUEUE_METHOD)
            echo_call = raw_unary(client.channel(echo.target), echo_server.METHOD)

            def run(call: Unary, name: str, in_flight: int) -> Load:
                # Every repeat of ours starts on an empty queue.
                if call is enqueue:
                    bench.flush()
                server = ours if call is enqueue else echo
                load = client.run(closed_loop(call, request, in_flight, seconds, server.cpu_seconds))
                log(f"  row 1: {name}, {in_flight} in flight: {load.qps:,.0f} calls/s")
                return load

            for in_flight, label in ((1, "1a"), (16, "1b")):
                subject, baseline = interleaved(
                    repeats,
                    [partial(run, enqueue, "Enqueue", in_flight), partial(run, echo_call, "echo", in_flight)],
                )
                qps = ratios([x.qps for x in subject], [x.qps for x in baseline])
                p50 = ratios([x.p50 for x in subject], [x.p50 for x in baseline])
                p99 = ratios([x.p99 for x in subject], [x.p99 for x in baseline])
                rows.append(
                    Row(
                        label,
                        f"unary Enqueue, {in_flight} in flight, vs bare grpc.aio echo ({len(request)} B request)",
                        load_cell(subject),
                        load_cell(baseline),
                        f"QPS {qps.fmt('x')}; p50 {p50.fmt('x')}; p99 {p99.fmt('x')}",
                        "QPS >= 0.7x",
                        verdict(qps, 0.7),
                    )
                )
    return rows


def batch_request(offset: int, jobs: int) -> queue_service_pb2.EnqueueBatchRequest:
    requests = []
    for i in range(offset, offset + jobs):
        payload = struct_pb2.Struct()
        payload.update({"n": i})
        requests.append(queue_service_pb2.EnqueueRequest(task="diag.noop", payload=payload))
    return queue_service_pb2.EnqueueBatchRequest(jobs=requests)


def timed_enqueue(bench: Bench, jobs: int, action: Callable[[], None]) -> float:
    """Jobs per second of `action`, starting on an empty Redis."""
    bench.flush()
    start = time.perf_counter()
    action()
    return jobs / (time.perf_counter() - start)


def row_batch(workdir: Path, *, jobs: int, repeats: int, batch: int = 1000) -> list[Row]:
    payloads = [{"n": i} for i in range(jobs)]
    with (
        fresh_redis(workdir) as bench,
        serve_process(bench.settings(), workdir) as ours,
        ClientLoop() as client,
    ):
        stub = queue_service_pb2_grpc.QueueServiceStub(client.channel(ours.target))
        huey = PlainHuey(bench.url)
        # Where our time goes: the server's CPU per job, and Redis's time in the ENQUEUE script per job.
        server_cpu: list[float] = []
        try:

            async def batches() -> None:
                cpu_before = ours.cpu_seconds()
                for offset in range(0, jobs, batch):
                    await stub.EnqueueBatch(batch_request(offset, min(batch, jobs - offset)), timeout=30)
                server_cpu.append((ours.cpu_seconds() - cpu_before) / jobs * 1e6)

            # Warm-up: connections, script load.
            client.run(stub.EnqueueBatch(batch_request(0, batch), timeout=30))
            bench.redis.config_resetstat()

            def measure(name: str, action: Callable[[], None]) -> Callable[[], float]:
                def run() -> float:
                    rate = timed_enqueue(bench, jobs, action)
                    log(f"  row 2: {name}: {rate:,.0f} jobs/s")
                    return rate

                return run

            subject, one_by_one, pipelined = interleaved(
                repeats,
                [
                    measure("EnqueueBatch", lambda: client.run(batches())),
                    measure("Huey one at a time", lambda: huey.enqueue_one_at_a_time(payloads)),
                    measure("Huey pipelined", lambda: huey.enqueue_pipelined(payloads)),
                ],
            )
            # One ENQUEUE call carries a whole batch: Redis's time is shared out per job.
            redis_us = bench.script_usec() / (len(subject) * jobs)
        finally:
            huey.close()
    ours_cell = (
        f"{Summary.of(subject).fmt('jobs/s')}; server CPU {Summary.of(server_cpu).fmt('µs/job')}, "
        f"Redis {redis_us:.1f} µs/job"
    )
    ratio = ratios(subject, one_by_one)
    return [
        Row(
            "2a",
            f"EnqueueBatch of {batch:,} ({jobs:,} jobs) vs plain Huey task calls, one at a time",
            ours_cell,
            Summary.of(one_by_one).fmt("jobs/s"),
            ratio.fmt("x"),
            ">= 4x",
            verdict(ratio, 4.0),
        ),
        Row(
            "2b",
            f"EnqueueBatch of {batch:,} vs Huey's messages LPUSHed in pipelines of {batch:,} (not Huey's API)",
            ours_cell,
            Summary.of(pipelined).fmt("jobs/s"),
            ratios(subject, pipelined).fmt("x"),
        ),
    ]
