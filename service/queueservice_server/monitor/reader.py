"""What monitoring reads from Redis, on redis.asyncio: queue counts and the head
of the waiting set, per-minute figures over a window, the worker registry,
collector snapshots, recent failures, and Redis itself.

A reading costs two pipelined round trips for any number of queues, and
constant work per queue however long its backlog: ZCARDs, a few hash reads,
the waiting set's head, one hash per minute of the window. Every time is the
Redis clock (TIME), as the workers stamp theirs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio
import redis.exceptions

from queueservice_server.core.keys import QueueKeys, ServiceKeys
from queueservice_server.core.redis import time_ms
from queueservice_server.monitor.alerts import Capacity, Failing
from queueservice_server.monitor.figures import MINUTE_MS, SCALAR_FIELDS, Figures, Window, window_minutes
from queueservice_server.settings import Settings

# Recommendations name the failing task from this many of the newest attempts.
FAILURE_SAMPLE = 200
_SCALAR_KEYS = tuple(name.encode() for name in SCALAR_FIELDS)


@dataclass(frozen=True)
class Counts:
    waiting: int
    active: int
    delayed: int
    completed: int
    failed: int
    evicted_completed: int
    evicted_failed: int
    # Age of the head of the waiting set, i.e. of the job that runs next: with
    # priorities that is the oldest job of the highest waiting priority.
    oldest_wait_ms: int


@dataclass(frozen=True)
class WorkerEntry:
    """A live `queue-service worker` (one consumer and its worker processes)."""

    id: str
    host: str
    pid: int
    concurrency: int
    busy: int
    rss_bytes: int
    queues: tuple[str, ...]
    heartbeat_ms: int


@dataclass(frozen=True)
class QueueReading:
    queue: str
    counts: Counts
    window: Window
    # Waiting jobs in the window's first and last collector snapshots, and the minutes between.
    backlog_change: tuple[int, int, float] | None


@dataclass(frozen=True)
class Reading:
    now_ms: int
    queues: list[QueueReading]
    workers: list[WorkerEntry]

    def capacity(self, queues: Sequence[str]) -> Capacity:
        serving = [w for w in self.workers if set(w.queues) & set(queues)]
        return Capacity(
            workers=len(serving),
            slots=sum(w.concurrency for w in serving),
            busy=sum(w.busy for w in serving),
        )


@dataclass(frozen=True)
class RedisFacts:
    used_memory: int
    max_memory: int
    fragmentation: float
    clients: int
    ping_ms: float


@dataclass(frozen=True)
class Totals:
    """All-time figures of one queue, for Prometheus."""

    queue: str
    counts: Counts
    completed: int
    failed: int
    retried: int
    # Finished minutes folded by the collector (see collector.py).
    folded: Figures


def _int(value: Any) -> int:
    return int(value) if value else 0


def _decode_worker(worker_id: str, heartbeat_ms: int, fields: dict[bytes, bytes]) -> WorkerEntry:
    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode()

    return WorkerEntry(
        id=worker_id,
        host=text("host"),
        pid=_int(text("pid")),
        concurrency=_int(text("concurrency")),
        busy=_int(text("busy")),
        rss_bytes=_int(text("rss_bytes")),
        queues=tuple(q for q in text("queues").split(",") if q),
        heartbeat_ms=heartbeat_ms,
    )


class Reader:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.client = client
        self.service_keys = ServiceKeys(settings.key_prefix)

    def keys(self, queue: str) -> QueueKeys:
        return QueueKeys(self.settings.key_prefix, queue)

    async def now_ms(self) -> int:
        return time_ms(await self.client.time())

    def _queue_counts(self, pipe: Any, keys: QueueKeys) -> None:
        for key in (keys.waiting, keys.active, keys.delayed, keys.completed, keys.failed):
            pipe.zcard(key)
        pipe.hmget(keys.counters, "evicted_completed", "evicted_failed")
        pipe.zrange(keys.waiting, 0, 0)

    async def read(self, queues: Sequence[str], window_s: float, histograms: bool) -> Reading:
        """Counts, the minutes of the `window_s` seconds ending now (with their histograms when
        `histograms`), backlog snapshots over that window, and the live workers."""
        service = self.service_keys
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.time()
            for queue in queues:
                self._queue_counts(pipe, self.keys(queue))
            pipe.zrange(service.workers, 0, -1, withscores=True)
            first = await pipe.execute()
        now_ms = time_ms(first[0])
        per_queue = [first[1 + 7 * i : 8 + 7 * i] for i in range(len(queues))]
        registry: list[tuple[bytes, float]] = first[-1]
        dead_before = now_ms - int(self.settings.stall_interval * 1000)
        live = [(member.decode(), int(score)) for member, score in registry if score >= dead_before]
        minutes = window_minutes(now_ms, window_s)
        since_ms = now_ms - int(window_s * 1000)

        async with self.client.pipeline(transaction=False) as pipe:
            for queue, replies in zip(queues, per_queue, strict=True):
                keys = self.keys(queue)
                head: list[bytes] = replies[6]
                if head:
                    pipe.hget(keys.job(head[0].decode()), "ready_at")
                else:
                    pipe.echo(b"")
                for minute in minutes:
                    if histograms:
                        pipe.hgetall(keys.minute(minute))
                    else:
                        pipe.hmget(keys.minute(minute), *SCALAR_FIELDS)
                pipe.xrange(keys.snapshots, min=str(since_ms), max="+", count=1)
                pipe.xrevrange(keys.snapshots, max="+", min=str(since_ms), count=1)
            for worker_id, _ in live:
                pipe.hgetall(service.worker(worker_id))
            if len(live) < len(registry):
                # Dead workers drop out of the registry (their hash expires on its own).
                pipe.zremrangebyscore(service.workers, "-inf", f"({dead_before}")
            second = await pipe.execute()

        readings: list[QueueReading] = []
        stride = len(minutes) + 3
        for index, (queue, replies) in enumerate(zip(queues, per_queue, strict=True)):
            part = second[index * stride : (index + 1) * stride]
            ready_at = _int(part[0])
            evicted = replies[5]
            counts = Counts(
                waiting=replies[0],
                active=replies[1],
                delayed=replies[2],
                completed=replies[3],
                failed=replies[4],
                evicted_completed=_int(evicted[0]),
                evicted_failed=_int(evicted[1]),
                oldest_wait_ms=max(0, now_ms - ready_at) if replies[6] and ready_at else 0,
            )
            figures = [
                Figures.from_hash(raw if histograms else dict(zip(_SCALAR_KEYS, raw, strict=True)))
                for raw in part[1 : 1 + len(minutes)]
            ]
            readings.append(
                QueueReading(
                    queue=queue,
                    counts=counts,
                    window=Window(now_ms, list(zip(minutes, figures, strict=True))),
                    backlog_change=_backlog_change(part[-2], part[-1]),
                )
            )
        worker_hashes = second[len(queues) * stride : len(queues) * stride + len(live)]
        workers = [
            _decode_worker(worker_id, heartbeat, fields)
            for (worker_id, heartbeat), fields in zip(live, worker_hashes, strict=True)
            if fields
        ]
        return Reading(now_ms=now_ms, queues=readings, workers=workers)

    async def failing(self, queues: Sequence[str]) -> list[Failing]:
        """Tasks among the newest FAILURE_SAMPLE attempts of each queue, most failures first."""
        async with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.xrevrange(self.keys(queue).timings, count=FAILURE_SAMPLE)
            replies: list[list[tuple[bytes, dict[bytes, bytes]]]] = await pipe.execute()
        counts: Counter[str] = Counter()
        errors: dict[str, str] = {}
        sample = 0
        for entries in replies:
            for _, fields in entries:
                sample += 1
                if fields.get(b"outcome") in (b"FAILED", b"RETRY"):
                    task = fields.get(b"task", b"").decode()
                    counts[task] += 1
                    errors.setdefault(task, fields.get(b"error", b"").decode())
        return [Failing(task, count, sample, errors[task]) for task, count in counts.most_common()]

    async def redis_facts(self) -> RedisFacts:
        started = time.perf_counter()
        await self.client.ping()
        ping_ms = (time.perf_counter() - started) * 1000
        try:
            memory = await self.client.info("memory")
            clients = await self.client.info("clients")
        except redis.exceptions.ResponseError:
            # Some managed Redis services refuse INFO; the rest of the report stands.
            memory, clients = {}, {}
        return RedisFacts(
            used_memory=_int(memory.get("used_memory")),
            max_memory=_int(memory.get("maxmemory")),
            fragmentation=float(memory.get("mem_fragmentation_ratio") or 0.0),
            clients=_int(clients.get("connected_clients")),
            ping_ms=ping_ms,
        )

    async def totals(self, queues: Sequence[str]) -> list[Totals]:
        """Counts, all-time outcome totals and folded histograms: one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.time()
            for queue in queues:
                keys = self.keys(queue)
                self._queue_counts(pipe, keys)
                pipe.hmget(keys.counters, "total_completed", "total_failed", "total_retried")
                pipe.hgetall(keys.histograms)
            replies = await pipe.execute()
        found: list[Totals] = []
        for index, queue in enumerate(queues):
            part = replies[1 + 9 * index : 10 + 9 * index]
            evicted, outcomes = part[5], part[7]
            counts = Counts(part[0], part[1], part[2], part[3], part[4], _int(evicted[0]), _int(evicted[1]), 0)
            completed, failed, retried = (_int(value) for value in outcomes)
            found.append(Totals(queue, counts, completed, failed, retried, Figures.from_hash(part[8])))
        return found


def _backlog_change(
    first: list[tuple[bytes, dict[bytes, bytes]]], last: list[tuple[bytes, dict[bytes, bytes]]]
) -> tuple[int, int, float] | None:
    if not first or not last or first[0][0] == last[0][0]:
        return None
    start_ms = int(first[0][0].split(b"-")[0])
    end_ms = int(last[0][0].split(b"-")[0])
    before, after = _int(first[0][1].get(b"waiting")), _int(last[0][1].get(b"waiting"))
    return before, after, (end_ms - start_ms) / MINUTE_MS
