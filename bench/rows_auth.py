"""Row 8: what authentication costs on the enqueue path.

Rows 1 and 2's loads against two `queue-service serve` processes on one Redis,
alike but for QUEUE_AUTH: one with a bearer token checked on every call and an
audit line written per call (log level INFO, as in production), one with auth
off at the same log level.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.harness import Row, Summary, interleaved, log, ratios, verdict
from bench.infra import ClientLoop, fresh_redis, serve_process
from bench.rows_grpc import (
    ENQUEUE_METHOD,
    Load,
    Unary,
    batch_request,
    closed_loop,
    load_cell,
    raw_unary,
    timed_enqueue,
)
from queueservice.v1 import queue_service_pb2_grpc
from queueservice_server.api.auth import new_token


def row_auth(workdir: Path, *, seconds: float, repeats: int, batch_jobs: int, batch: int = 1000) -> list[Row]:
    request_message = batch_request(0, 1).jobs[0]
    request = request_message.SerializeToString()
    token, credential = new_token()
    auth_file = workdir / "auth"
    workdir.mkdir(parents=True, exist_ok=True)
    auth_file.write_text(f"bench producer {credential}\n")
    metadata = (("authorization", f"Bearer {token}"),)
    rows: list[Row] = []
    with fresh_redis(workdir) as bench:
        plain_settings = bench.settings(log_level="INFO", auth=False)
        auth_settings = bench.settings(log_level="INFO", auth=True, auth_file=str(auth_file))
        (workdir / "plain").mkdir(exist_ok=True)
        (workdir / "auth-on").mkdir(exist_ok=True)
        with (
            serve_process(plain_settings, workdir / "plain") as plain,
            serve_process(auth_settings, workdir / "auth-on") as secured,
            ClientLoop() as client,
        ):
            calls = {
                "auth on": (raw_unary(client.channel(secured.target), ENQUEUE_METHOD), metadata, secured),
                "auth off": (raw_unary(client.channel(plain.target), ENQUEUE_METHOD), (), plain),
            }

            def run(name: str, in_flight: int) -> Load:
                call, extra, server = calls[name]
                bench.flush()
                signed: Unary = partial(call, metadata=extra) if extra else call  # type: ignore[assignment]
                load = client.run(closed_loop(signed, request, in_flight, seconds, server.cpu_seconds))
                log(f"  row 8: Enqueue {name}, {in_flight} in flight: {load.qps:,.0f} calls/s")
                return load

            for in_flight, label in ((1, "8a"), (16, "8b")):
                subject, baseline = interleaved(
                    repeats, [partial(run, "auth on", in_flight), partial(run, "auth off", in_flight)]
                )
                qps = ratios([x.qps for x in subject], [x.qps for x in baseline])
                cpu = Summary.of([(a.server_cpu - b.server_cpu) * 1e6 for a, b in zip(subject, baseline, strict=True)])
                rows.append(
                    Row(
                        label,
                        f"unary Enqueue, {in_flight} in flight, bearer token + audit line vs auth off",
                        load_cell(subject),
                        load_cell(baseline),
                        f"QPS {qps.fmt('x')}; server CPU {cpu.fmt('µs/call')} more",
                        "QPS >= 0.95x",
                        verdict(qps, 0.95),
                    )
                )

            stubs = {
                "auth on": (queue_service_pb2_grpc.QueueServiceStub(client.channel(secured.target)), metadata),
                "auth off": (queue_service_pb2_grpc.QueueServiceStub(client.channel(plain.target)), ()),
            }

            def batches(name: str) -> Callable[[], float]:
                stub, extra = stubs[name]

                async def send() -> None:
                    for offset in range(0, batch_jobs, batch):
                        size = min(batch, batch_jobs - offset)
                        await stub.EnqueueBatch(batch_request(offset, size), timeout=30, metadata=extra)

                def timed() -> float:
                    rate = timed_enqueue(bench, batch_jobs, lambda: client.run(send()))
                    log(f"  row 8: EnqueueBatch {name}: {rate:,.0f} jobs/s")
                    return rate

                return timed

            subject_jobs, baseline_jobs = interleaved(repeats, [batches("auth on"), batches("auth off")])
            ratio = ratios(subject_jobs, baseline_jobs)
            rows.append(
                Row(
                    "8c",
                    f"EnqueueBatch of {batch:,} ({batch_jobs:,} jobs), bearer token + audit line vs auth off",
                    Summary.of(subject_jobs).fmt("jobs/s"),
                    Summary.of(baseline_jobs).fmt("jobs/s"),
                    ratio.fmt("x"),
                    ">= 0.95x",
                    verdict(ratio, 0.95),
                )
            )
    return rows
