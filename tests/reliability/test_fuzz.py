"""Hostile input against a real `serve` process: at least 100,000 well-formed hostile requests
across every RPC the protos declare (tests/fuzz_strategies.py), then raw garbage on its
HTTP/2 port. No reply may be INTERNAL, UNKNOWN or DATA_LOSS; the server must still be
SERVING afterwards, and its memory back near where it started.

One Redis version (the embedded 6.2): the fuzz exercises the service's own input handling,
and a second version would double the slow lane's longest test. One worker process runs the
jobs the fuzz enqueues, at the dev default rate limit (100 jobs/min), so GetJob,
RetryFailed, GetStats and StreamTimings also see completed, failed and timed-out jobs whose
error texts are hostile, without the worker competing for the CPU.

Reproduce a run with FUZZ_SEED=<the printed seed>.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from queueservice.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.api.auth import new_token
from queueservice_server.embedded import RedisServer, free_port
from queueservice_server.settings import Settings
from tests.fuzz_strategies import MAX_REQUEST_BYTES, SERVICES, Hints, Rpc, all_rpcs, describe, minimise, rpc_calls
from tests.support import ServeProcess, WorkerProcess, request, stub_for, wait_for

REQUESTS = 100_000
BATCH = 50
SEED = int(os.environ.get("FUZZ_SEED", "20260410"))
# What no request may cause. UNAVAILABLE too: Redis is up the whole time, so it would mean
# the server dropped the connection; and DEADLINE_EXCEEDED on a unary call means it hung.
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE}
UNARY_DEADLINE_S = 30.0
# StreamTimings runs until the client leaves: read a few messages, or stop at this deadline.
STREAM_DEADLINE_S = 0.2
STREAM_MESSAGES = 3
# In flight at once on the one channel: enough to keep the server busy, few enough that a
# queue of waiting calls never reaches the unary deadline on a loaded 2-core machine.
IN_FLIGHT = 128
# Memory: RSS after the run may exceed RSS after the warm-up by this much. 64 MiB is what
# allocator slack for 512 KiB requests and gRPC's buffers can plausibly hold on to; a leak of
# 700 bytes per request (a request's text kept, say) over 100,000 requests is more.
RSS_SLACK = 64 * 1024 * 1024
RPCS = all_rpcs()
# Calls per method, relative: GetPerformance costs the server ~5 ms of CPU (a whole report),
# ten times an Enqueue; a third as many of them keeps the run's length in check.
WEIGHTS = {"GetPerformance": 1}


Metadata = tuple[tuple[str, str], ...]


@dataclass
class Failure:
    rpc: Rpc
    request: Message
    code: str
    details: str
    # The metadata it was sent with to the server with auth on; None: the one with auth off.
    identity: Metadata | None = None

    def signature(self) -> tuple[str, str]:
        return (self.rpc.name, self.code)


@dataclass
class Tally:
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    # The first few details per (rpc, code), to print: what the server answers most.
    samples: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return sum(self.codes.values())

    def accepted(self, rpc: Rpc) -> int:
        """Calls that got past validation: OK, or for a stream, one that ran until we left."""
        fine = ("OK", "STREAM_LEFT") if rpc.server_streaming else ("OK",)
        return sum(self.codes[(rpc.name, code)] for code in fine)


class Sender:
    """grpc.aio channels on a loop in a background thread; batches are sent concurrently and
    pipelined with their generation (a bounded number in flight). With a `secured` server (auth
    on), every fourth batch goes there instead, each call as one of `identities` in turn."""

    def __init__(self, address: str, secured: str = "", identities: Sequence[Metadata] = ()) -> None:
        self.tally = Tally()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pending: list[Future[None]] = []
        self.identities = identities
        self.batches = 0
        self._call(self._open(address, secured)).result(30)

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _open(self, address: str, secured: str) -> None:
        self.channels = [grpc.aio.insecure_channel(address)]
        if secured:
            self.channels.append(grpc.aio.insecure_channel(secured))
        self.limit = asyncio.Semaphore(IN_FLIGHT)
        self.methods: list[dict[str, Any]] = []
        for channel in self.channels:
            methods = {}
            for rpc in RPCS:
                make = channel.unary_stream if rpc.server_streaming else channel.unary_unary
                methods[rpc.path] = make(
                    rpc.path,
                    request_serializer=rpc.request_cls.SerializeToString,
                    response_deserializer=rpc.response_cls.FromString,
                )
            self.methods.append(methods)

    async def outcome(self, rpc: Rpc, message: Message, identity: Metadata | None = None) -> tuple[str, str]:
        """(code name, details) of one call (to the secured server when `identity` is given);
        STREAM_LEFT when we ended a healthy stream."""
        method = self.methods[0 if identity is None else 1][rpc.path]
        extra = {} if identity is None else {"metadata": identity}
        try:
            if not rpc.server_streaming:
                await method(message, timeout=UNARY_DEADLINE_S, **extra)
                return "OK", ""
            call = method(message, timeout=STREAM_DEADLINE_S, **extra)
            received = 0
            async for _ in call:
                received += 1
                if received >= STREAM_MESSAGES:
                    call.cancel()
                    return "STREAM_LEFT", ""
            return "OK", ""
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if rpc.server_streaming and code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return "STREAM_LEFT", ""
            return code.name, exc.details() or ""

    async def _one(self, rpc: Rpc, message: Message, identity: Metadata | None) -> None:
        async with self.limit:
            code, details = await self.outcome(rpc, message, identity)
        self.tally.codes[(rpc.name, code)] += 1
        examples = self.tally.samples.setdefault((rpc.name, code), [])
        if len(examples) < 2 and details:
            examples.append(details[:160])
        # A reply the client's transport refused (trailers over its metadata limit) never reached the caller.
        refused = code == "RESOURCE_EXHAUSTED" and "metadata size" in details
        if code in {c.name for c in FORBIDDEN} or refused or (code == "DEADLINE_EXCEEDED" and not rpc.server_streaming):
            self.tally.failures.append(Failure(rpc, message, code, details, identity))

    async def _batch(self, batch: list[tuple[Rpc, Message]]) -> None:
        number, self.batches = self.batches, self.batches + 1
        secured = len(self.channels) > 1 and number % 4 == 3
        identities = [
            self.identities[(number + i) % len(self.identities)] if secured else None for i in range(len(batch))
        ]
        await asyncio.gather(
            *(self._one(rpc, message, who) for (rpc, message), who in zip(batch, identities, strict=True))
        )

    def submit(self, batch: list[tuple[Rpc, Message]], max_pending: int = 4) -> None:
        self.pending.append(self._call(self._batch(batch)))
        while len(self.pending) > max_pending:
            self.pending.pop(0).result(UNARY_DEADLINE_S * 2)

    def drain(self) -> None:
        for pending in self.pending:
            pending.result(UNARY_DEADLINE_S * 2)
        self.pending.clear()

    def code_of(self, rpc: Rpc, message: Message, identity: Metadata | None = None) -> str:
        return str(self._call(self.outcome(rpc, message, identity)).result(UNARY_DEADLINE_S * 2)[0])

    def close(self) -> None:
        for channel in self.channels:
            self._call(channel.close(None)).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class FuzzTarget:
    serve: ServeProcess
    settings: Settings
    job_ids: list[str]
    # The same service with auth on, and the metadata of each identity the fuzz calls it as.
    secured: ServeProcess
    identities: list[Metadata]

    @property
    def address(self) -> str:
        return self.serve.address


@pytest.fixture(scope="module")
def target(embedded_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # Dev defaults (auth off, rate limit 100/min), diag tasks on explicitly (prod turns them
    # off), two queues so cursors and GetStats span more than one; a short collector period
    # so the figures are computed from hostile data again and again during the run.
    settings = Settings(
        env="dev",
        redis_url=embedded_redis.url,
        grpc_address=f"127.0.0.1:{free_port()}",
        key_prefix=f"qs-fuzz-{uuid.uuid4().hex[:8]}",
        data_dir=tmp / "data",
        diag_tasks=True,
        queues=("default", "emails"),
        metrics_interval=2.0,
        worker_concurrency=2,
        shutdown_grace=2.0,
        grpc_grace=0.5,
    )
    serve = ServeProcess(settings, tmp / "serve.log")
    # Every role, a token nobody holds, and none: the auth wrapper's paths get hostile bodies too.
    tokens = {role: new_token() for role in ("operator", "producer", "viewer")}
    (tmp / "auth").write_text("".join(f"{role} {role} {credential}\n" for role, (_, credential) in tokens.items()))
    identities: list[Metadata] = [(("authorization", f"Bearer {token}"),) for token, _ in tokens.values()]
    identities += [(("authorization", "Bearer qs_unknown"),), ()]
    secured = ServeProcess(
        replace(settings, grpc_address=f"127.0.0.1:{free_port()}", auth=True, auth_file=str(tmp / "auth")),
        tmp / "secured.log",
    )
    worker = WorkerProcess(settings, tmp / "worker.log")
    try:
        serve.start()
        secured.start()
        worker.start()
        yield FuzzTarget(serve, settings, _real_jobs(serve.address), secured, identities)
    finally:
        worker.stop()
        secured.stop()
        serve.stop()


def _real_jobs(address: str) -> list[str]:
    """Real job ids for the hints: completed, failed and delayed jobs on both queues. The
    failed ones' error is cut by the worker inside a UTF-8 character (an odd-length prefix
    before two-byte characters), an error text the reports must survive."""
    stub = stub_for(address)
    ids = [stub.Enqueue(request("diag.noop", queue=queue)).job_id for queue in ("default", "emails")] + [
        stub.Enqueue(request("diag.fail", {"message": "x" + "é" * 300}, max_attempts=1, queue=q)).job_id
        for q in ("default", "emails")
    ]

    def state(job_id: str) -> int:
        return stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)).job.state

    finished = {job_pb2.JOB_STATE_COMPLETED, job_pb2.JOB_STATE_FAILED}
    wait_for(lambda: all(state(job_id) in finished for job_id in ids), 30, interval=0.1, what="seed jobs finished")
    delayed = stub.Enqueue(request("diag.noop", delay={"seconds": 3600})).job_id
    return [*ids, delayed]


def _check_serving(address: str) -> None:
    """A normal Enqueue and GetJob work, and health says SERVING."""
    with grpc.insecure_channel(address) as channel:
        stub = queue_service_pb2_grpc.QueueServiceStub(channel)
        job_id = stub.Enqueue(request("diag.noop"), timeout=10).job_id
        assert stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id), timeout=10).job.id == job_id
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def _settled_rss(serve: ServeProcess) -> int:
    """RSS once the server had a moment to finish what it was doing (the smallest of a few reads)."""
    gc.collect()
    readings = []
    for _ in range(5):
        time.sleep(0.5)
        readings.append(serve.rss())
    return min(readings)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _report(tally: Tally, sender: Sender, log: str) -> str:
    """The first few distinct failures, each minimised to what still fails the same way."""
    lines = [f"{len(tally.failures)} forbidden replies (FUZZ_SEED={SEED}); first of each kind, minimised:"]
    seen: set[tuple[str, str]] = set()
    for failure in tally.failures:
        if failure.signature() in seen or len(seen) >= 5:
            continue
        seen.add(failure.signature())

        def same_failure(message: Message, failure: Failure = failure) -> bool:
            return sender.code_of(failure.rpc, message, failure.identity) == failure.code

        small = minimise(failure.request, same_failure, max_tries=150)
        lines.append(f"  {failure.rpc.path} -> {failure.code}: {failure.details}\n    {describe(small)}")
        lines += [f"    server log: {line}" for line in _logged_error(log, failure.details)]
    return "\n".join(lines)


def _logged_error(log: str, details: str) -> list[str]:
    """The last line of the traceback the server logged for an INTERNAL reply's reference."""
    ref = details.partition("reference ")[2].partition(" ")[0]
    for line in log.splitlines() if ref else []:
        if ref in line:
            entry = json.loads(line)
            return [str(entry.get("exc", entry.get("message", ""))).strip().splitlines()[-1][:300]]
    return []


@pytest.mark.timeout(420)
def test_hostile_requests_on_every_rpc_never_internal(target: FuzzTarget) -> None:
    hints = Hints(queues=target.settings.queues, job_ids=tuple(target.job_ids))
    requests = rpc_calls(hints, weights={rpc.name: WEIGHTS.get(rpc.name, 3) for rpc in RPCS})
    batches = st.lists(requests, min_size=BATCH, max_size=BATCH)
    sender = Sender(target.address, target.secured.address, target.identities)
    print(f"\nfuzz: FUZZ_SEED={SEED}, {len(RPCS)} RPCs: {', '.join(rpc.name for rpc in RPCS)}")

    def run(examples: int, run_seed: int) -> None:
        @seed(run_seed)
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            # Failures are collected and minimised below, not raised: no shrink phase, so
            # the run takes the same time whatever it finds.
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(batches)
        def send(batch: list[tuple[Rpc, Message]]) -> None:
            sender.submit(batch)

        send()
        sender.drain()

    try:
        # Warm-up: the server's first calls of each kind allocate what it keeps (caches,
        # pools, compiled scripts); the memory check starts after them.
        run(20, SEED + 1)
        start_rss = _settled_rss(target.serve)
        warmup = sender.tally.sent
        began, cpu_began, server_cpu_began = time.monotonic(), time.process_time(), _cpu_seconds(target.serve.pid)
        # In two halves, different seeds: the RSS between them shows growth that keeps going.
        half = -(-REQUESTS // BATCH) // 2
        run(half, SEED)
        middle_rss = _settled_rss(target.serve)
        run(-(-REQUESTS // BATCH) - half, SEED + 2)
        elapsed = time.monotonic() - began
        cpu = time.process_time() - cpu_began, _cpu_seconds(target.serve.pid) - server_cpu_began
        tally = sender.tally
        sent = tally.sent - warmup
        per_rpc = {rpc.name: dict(sorted((c, n) for (r, c), n in tally.codes.items() if r == rpc.name)) for rpc in RPCS}
        print(
            f"fuzz: {sent} requests in {elapsed:.1f} s ({sent / elapsed:.0f}/s) after {warmup} warm-up;"
            f" CPU s: fuzz {cpu[0]:.1f}, server {cpu[1]:.1f}"
        )
        for name, codes in per_rpc.items():
            print(f"  {name}: {codes}")
            for code in codes:
                for example in tally.samples.get((name, code), []):
                    print(f"    {code}: {example!r}")
        logs = target.serve.log_text() + target.secured.log_text()
        failures = _report(tally, sender, logs) if tally.failures else ""
    finally:
        sender.close()

    # Memory is read before the assertions, so that a run with failures reports it too.
    assert target.serve.alive(), target.serve.log_text()[-3000:]
    assert target.secured.alive(), target.secured.log_text()[-3000:]
    # A quarter of the calls went to the server with auth on, as each identity in turn.
    refusals = {code for (_, code), n in tally.codes.items() if n}
    assert {"UNAUTHENTICATED", "PERMISSION_DENIED"} <= refusals
    end_rss = _settled_rss(target.serve)
    peak = target.serve.status("VmHWM")
    print(
        f"fuzz: server RSS {start_rss >> 20} MiB after warm-up, {middle_rss >> 20} MiB half-way,"
        f" {end_rss >> 20} MiB after, peak {peak >> 20} MiB"
    )
    assert not failures, failures
    assert sent >= REQUESTS
    for rpc in RPCS:
        # The hints work: every RPC often gets past its first check (else the fuzz only
        # ever tests the validator's first line).
        calls = sum(per_rpc[rpc.name].values())
        assert tally.accepted(rpc) >= calls // 20, (rpc.name, per_rpc[rpc.name])
    _check_serving(target.address)
    assert end_rss <= start_rss + RSS_SLACK, (start_rss, end_rss)


# --- raw bytes on the HTTP/2 port --------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    """An HTTP/2 frame; `length` overrides the real payload length (to lie about it)."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream & 0xFFFFFFFF) + payload


def hpack_literal(headers: list[tuple[bytes, bytes]]) -> bytes:
    """Headers as HPACK literals without indexing and without Huffman (names and values < 127 bytes)."""
    out = b""
    for name, value in headers:
        out += b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
    return out


def grpc_headers(path: bytes) -> bytes:
    return hpack_literal(
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path),
            (b":authority", b"fuzz"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
    )


def exchange(port: int, data: bytes, read_for: float = 0.3) -> bytes:
    """Sends `data` on a fresh connection and returns what the server answered within `read_for`."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return received  # the server hung up mid-send: also an answer
        sock.settimeout(read_for)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, OSError):
            pass
    return received


def malformed_frames() -> list[tuple[str, bytes]]:
    """After a valid preface and SETTINGS: frames that break the protocol in one way each."""
    enqueue = b"/queueservice.v1.QueueService/Enqueue"
    valid_headers = frame(HEADERS, END_HEADERS, 1, grpc_headers(enqueue))
    cases = [
        ("settings length not a multiple of 6", frame(SETTINGS, 0, 0, b"\x00\x01\x00")),
        ("settings on a stream", frame(SETTINGS, 0, 1, b"")),
        ("settings ack with payload", frame(SETTINGS, ACK, 0, b"\x00" * 6)),
        ("settings: huge initial window", frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 2**31))),
        ("settings: bad max frame size", frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 1))),
        ("settings: unknown id", frame(SETTINGS, 0, 0, struct.pack(">HI", 0xBEEF, 7))),
        ("length larger than max frame size", frame(DATA, 0, 1, b"x" * 10, length=2**24 - 1)),
        ("length larger than what follows", frame(PING, 0, 0, b"12345678", length=4096)),
        ("ping of 7 bytes", frame(PING, 0, 0, b"1234567")),
        ("ping on a stream", frame(PING, 0, 3, b"12345678")),
        ("unknown frame type", frame(0xFA, 0xFF, 1, b"whatever")),
        ("unknown frame type, large", frame(0x42, 0, 0, os.urandom(16000))),
        ("garbage HPACK", frame(HEADERS, END_HEADERS, 1, os.urandom(64))),
        ("HPACK index 0", frame(HEADERS, END_HEADERS, 1, b"\x80")),
        ("HPACK index past the tables", frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff\x0f")),
        ("HPACK integer overflow", frame(HEADERS, END_HEADERS, 1, b"\x0f" + b"\xff" * 20)),
        ("HPACK table size update past the limit", frame(HEADERS, END_HEADERS, 1, b"\x3f\xff\xff\xff\xff\x0f")),
        ("headers on stream 0", frame(HEADERS, END_HEADERS, 0, grpc_headers(enqueue))),
        ("headers on an even stream", frame(HEADERS, END_HEADERS, 2, grpc_headers(enqueue))),
        (
            "headers without END_HEADERS, then DATA",
            frame(HEADERS, 0, 1, grpc_headers(enqueue)) + frame(DATA, 0, 1, b"x"),
        ),
        ("continuation without headers", frame(CONTINUATION, END_HEADERS, 1, grpc_headers(enqueue))),
        ("headers with padding longer than the frame", frame(HEADERS, END_HEADERS | 0x8, 1, b"\xff" + b"\x00" * 4)),
        (
            "headers depending on itself",
            frame(HEADERS, END_HEADERS | 0x20, 1, struct.pack(">IB", 1, 16) + grpc_headers(enqueue)),
        ),
        ("priority of 4 bytes", frame(PRIORITY, 0, 1, b"\x00\x00\x00")),
        ("data on stream 0", frame(DATA, 0, 0, b"abc")),
        ("data on an idle stream", frame(DATA, END_STREAM, 7, b"abc")),
        ("rst on an idle stream", frame(RST_STREAM, 0, 9, b"\x00\x00\x00\x08")),
        ("window update of 0", frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00")),
        ("window update overflowing the window", frame(WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff") * 2),
        ("push promise from a client", frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02")),
        ("goaway with garbage", frame(GOAWAY, 0, 0, os.urandom(40))),
        (
            "gRPC call: message length larger than the body",
            valid_headers + frame(DATA, END_STREAM, 1, b"\x00\xff\xff\xff\xf0ab"),
        ),
        (
            "gRPC call: compressed flag without an encoding",
            valid_headers + frame(DATA, END_STREAM, 1, b"\x01\x00\x00\x00\x02ab"),
        ),
        ("gRPC call: flag byte 0x7f", valid_headers + frame(DATA, END_STREAM, 1, b"\x7f\x00\x00\x00\x00")),
        ("gRPC call: half a length prefix", valid_headers + frame(DATA, END_STREAM, 1, b"\x00\x00")),
        ("gRPC call: unknown method", frame(HEADERS, END_HEADERS | END_STREAM, 1, grpc_headers(b"/nope.Nope/Nope"))),
        ("gRPC call: path without a method", frame(HEADERS, END_HEADERS | END_STREAM, 1, grpc_headers(b"/"))),
        (
            "gRPC call: stream ids going backwards",
            valid_headers + frame(HEADERS, END_HEADERS, 1, grpc_headers(enqueue)),
        ),
        (
            "many streams reset at once",
            b"".join(
                frame(HEADERS, END_HEADERS, n, grpc_headers(enqueue)) + frame(RST_STREAM, 0, n, b"\x00\x00\x00\x08")
                for n in range(1, 400, 2)
            ),
        ),
    ]
    return cases


def raw_protobuf_bodies(rng: random.Random) -> list[bytes]:
    """Request bodies no protobuf library would write: random bytes, truncations, wrong wire
    types, and a Struct nested far past protobuf's recursion limit."""
    deep = b""
    for _ in range(300):
        # Struct{fields: {"n": Value{struct_value: deep}}}: map entry key 1, value 2; Value.struct_value = 5.
        value = b"\x2a" + _varint(len(deep)) + deep
        entry = b"\x0a\x01n" + b"\x12" + _varint(len(value)) + value
        deep = b"\x0a" + _varint(len(entry)) + entry
    enqueue_deep = b"\x0a\x09diag.noop" + b"\x12" + _varint(len(deep)) + deep
    bodies = [
        enqueue_deep,
        b"\x0a",
        b"\x0a\xff\xff\xff\xff\x0f",
        b"\x08" + b"\xff" * 11,
        b"\xff" * 16,
        b"\x0b\x0c",
        b"\x0f",
    ]
    bodies += [rng.randbytes(rng.randint(1, 200)) for _ in range(150)]
    return bodies


def _varint(n: int) -> bytes:
    out = b""
    while n > 0x7F:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def test_garbage_on_the_http2_port_leaves_the_server_serving(target: FuzzTarget) -> None:
    rng = random.Random(SEED)
    port = int(target.address.rpartition(":")[2])
    _check_serving(target.address)
    start_rss, start_fds = _settled_rss(target.serve), target.serve.open_fds()

    # (a) random bytes, (b) the preface and then random bytes.
    for prefix in (b"", PREFACE):
        for _ in range(60):
            exchange(port, prefix + rng.randbytes(rng.choice([1, 9, 24, 100, 4096, 70_000])), read_for=0.05)
        _check_serving(target.address)

    # (c) a valid preface and SETTINGS, then one malformed frame (or sequence) per connection.
    hello = PREFACE + frame(SETTINGS, 0, 0, b"")
    for name, data in malformed_frames():
        exchange(port, hello + data, read_for=0.1)
        try:
            _check_serving(target.address)
        except Exception as exc:
            raise AssertionError(f"after {name!r}: {exc!r}") from exc

    # Request bodies that do not parse, through a real client on every RPC.
    codes: Counter[tuple[str, str]] = Counter()
    with grpc.insecure_channel(target.address) as channel:
        for rpc in RPCS:
            make = channel.unary_stream if rpc.server_streaming else channel.unary_unary
            call = make(rpc.path, request_serializer=None, response_deserializer=None)
            for body in raw_protobuf_bodies(rng):
                try:
                    result = call(body, timeout=STREAM_DEADLINE_S if rpc.server_streaming else 10)
                    if rpc.server_streaming:
                        for _ in zip(range(STREAM_MESSAGES), result, strict=False):
                            pass
                    codes[(rpc.name, "OK")] += 1
                except grpc.RpcError as exc:
                    codes[(rpc.name, exc.code().name)] += 1
    print(f"\nraw bodies: {dict(codes)}")
    forbidden = {key: n for key, n in codes.items() if key[1] in {c.name for c in FORBIDDEN}}
    assert not forbidden, forbidden
    _check_serving(target.address)

    # (d) half-open connections: many that never send anything, and some that stop mid-preface.
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(400)]
    for sock in idle[:100]:
        sock.sendall(PREFACE[: rng.randint(1, len(PREFACE) - 1)])
    try:
        _check_serving(target.address)
    finally:
        for sock in idle:
            sock.close()
    _check_serving(target.address)

    assert target.serve.alive()
    wait_for(lambda: target.serve.open_fds() <= start_fds + 10, 10, interval=0.2, what="connections closed")
    end_rss = _settled_rss(target.serve)
    print(
        f"garbage: server RSS {start_rss >> 20} MiB before, {end_rss >> 20} MiB after;"
        f" fds {start_fds} -> {target.serve.open_fds()}"
    )
    assert end_rss <= start_rss + RSS_SLACK, (start_rss, end_rss)


def test_strategies_stay_bounded_and_the_minimiser_shrinks() -> None:
    """The strategies themselves: every RPC drawn, every request under the size bound, and
    the minimiser keeps only what a failure needs."""
    seen: Counter[str] = Counter()

    @seed(SEED)
    @settings(max_examples=300, deadline=None, database=None, phases=[Phase.generate])
    @given(rpc_calls(Hints(queues=("default", "emails"))))
    def draw(call: tuple[Rpc, Message]) -> None:
        seen[call[0].name] += 1
        assert call[1].ByteSize() <= MAX_REQUEST_BYTES

    draw()
    assert set(seen) == {rpc.name for rpc in RPCS}

    big = queue_service_pb2.EnqueueBatchRequest(
        jobs=[request("diag.noop", {"a": list(range(50))}, queue="q" * 30, priority=n) for n in range(40)]
    )
    big.jobs[17].schedule_time.nanos = -1

    def still_fails(message: Message) -> bool:
        assert isinstance(message, queue_service_pb2.EnqueueBatchRequest)
        return any(job.schedule_time.nanos < 0 for job in message.jobs)

    small = minimise(big, still_fails, max_tries=500)
    expected = queue_service_pb2.EnqueueBatchRequest(jobs=[queue_service_pb2.EnqueueRequest()])
    expected.jobs[0].schedule_time.nanos = -1
    assert small == expected, describe(small)


def test_fuzz_covers_every_rpc_the_protos_declare() -> None:
    # A new RPC is fuzzed without touching the strategies: they come from the descriptors.
    names = {rpc.path for rpc in RPCS}
    assert "/queueservice.v1.QueueService/Enqueue" in names
    assert "/queueservice.v1.QueueAdminService/StreamTimings" in names
    assert len(names) == sum(len(service.methods) for service in SERVICES) >= 7
