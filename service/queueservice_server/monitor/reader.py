"""What monitoring reads from Redis, on redis.asyncio: queue counts and the head
of the waiting set, per-minute figures over a window, the worker registry,
collector snapshots, recent failures, and Redis itself.

A reading costs two pipelined round trips for any number of queues, and
constant work per queue however long its backlog: ZCARDs, a few hash reads,
the waiting set's head, one hash per minute of the window. Every time is the
Redis clock (TIME), as the workers stamp theirs.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio
import redis.exceptions

from queueservice_server.core.keys import CounterFields as C
from queueservice_server.core.keys import JobFields as J
from queueservice_server.core.keys import QueueKeys, ServiceKeys
from queueservice_server.core.keys import SnapshotFields as S
from queueservice_server.core.keys import TimingFields as T
from queueservice_server.core.keys import WorkerFields as W
from queueservice_server.core.redis import queued, time_ms
from queueservice_server.core.timings import Outcome
from queueservice_server.monitor.alerts import Capacity, Failing
from queueservice_server.monitor.figures import MINUTE_MS, SCALAR_FIELDS, Figures, Window, window_minutes
from queueservice_server.settings import Settings

# Recommendations name the failing task from this many of the newest attempts.
FAILURE_SAMPLE = 200
_SCALAR_KEYS = tuple(name.encode() for name in SCALAR_FIELDS)
_OUTCOME = T.OUTCOME.encode()
_FAILURES = {outcome.value.encode() for outcome in (Outcome.FAILED, Outcome.RETRY, Outcome.TIMED_OUT)}


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
        return fields.get(name.encode(), b"").decode(errors="replace")

    return WorkerEntry(
        id=worker_id,
        host=text(W.HOST),
        pid=_int(text(W.PID)),
        concurrency=_int(text(W.CONCURRENCY)),
        busy=_int(text(W.BUSY)),
        rss_bytes=_int(text(W.RSS_BYTES)),
        queues=tuple(q for q in text(W.QUEUES).split(",") if q),
        heartbeat_ms=heartbeat_ms,
    )


@dataclass(frozen=True)
class _CountReplies:
    """Where one queue's count commands sit in a pipeline's replies."""

    sets: tuple[int, ...]  # ZCARD of waiting, active, delayed, completed, failed
    evicted: int
    head: int

    def decode(self, replies: Sequence[Any], oldest_wait_ms: int) -> Counts:
        waiting, active, delayed, completed, failed = (replies[i] for i in self.sets)
        evicted_completed, evicted_failed = replies[self.evicted]
        return Counts(
            waiting, active, delayed, completed, failed, _int(evicted_completed), _int(evicted_failed), oldest_wait_ms
        )


@dataclass(frozen=True)
class _WindowReplies:
    """Where one queue's window commands sit in a pipeline's replies."""

    head_ready_at: int | None  # HGET of the head job's ready_at, when a job waits
    minutes: tuple[int, ...]
    first_snapshot: int
    last_snapshot: int


class Reader:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.client = client
        self.service_keys = ServiceKeys(settings.key_prefix)

    def keys(self, queue: str) -> QueueKeys:
        return QueueKeys(self.settings.key_prefix, queue)

    @staticmethod
    def _queue_counts(pipe: Any, keys: QueueKeys) -> _CountReplies:
        sets = tuple(
            queued(pipe.zcard(key)) for key in (keys.waiting, keys.active, keys.delayed, keys.completed, keys.failed)
        )
        evicted = queued(pipe.hmget(keys.counters, C.EVICTED_COMPLETED, C.EVICTED_FAILED))
        return _CountReplies(sets, evicted, head=queued(pipe.zrange(keys.waiting, 0, 0)))

    async def read(self, queues: Sequence[str], window_s: float, histograms: bool) -> Reading:
        """Counts, the minutes of the `window_s` seconds ending now (with their histograms when
        `histograms`), backlog snapshots over that window, and the live workers."""
        service = self.service_keys
        async with self.client.pipeline(transaction=False) as pipe:
            clock = queued(pipe.time())
            counted = [self._queue_counts(pipe, self.keys(queue)) for queue in queues]
            registry_at = queued(pipe.zrange(service.workers, 0, -1, withscores=True))
            first = await pipe.execute()
        now_ms = time_ms(first[clock])
        registry: list[tuple[bytes, float]] = first[registry_at]
        dead_before = now_ms - int(self.settings.stall_interval * 1000)
        live = [(member.decode(errors="replace"), int(score)) for member, score in registry if score >= dead_before]
        minutes = window_minutes(now_ms, window_s)
        since_ms = now_ms - int(window_s * 1000)

        async with self.client.pipeline(transaction=False) as pipe:
            windows: list[_WindowReplies] = []
            for queue, where in zip(queues, counted, strict=True):
                keys = self.keys(queue)
                head: list[bytes] = first[where.head]
                windows.append(
                    _WindowReplies(
                        head_ready_at=queued(pipe.hget(keys.job(head[0].decode()), J.READY_AT)) if head else None,
                        minutes=tuple(
                            queued(
                                pipe.hgetall(keys.minute(minute))
                                if histograms
                                else pipe.hmget(keys.minute(minute), *SCALAR_FIELDS)
                            )
                            for minute in minutes
                        ),
                        first_snapshot=queued(pipe.xrange(keys.snapshots, min=str(since_ms), max="+", count=1)),
                        last_snapshot=queued(pipe.xrevrange(keys.snapshots, max="+", min=str(since_ms), count=1)),
                    )
                )
            worker_hashes = [queued(pipe.hgetall(service.worker(worker_id))) for worker_id, _ in live]
            if len(live) < len(registry):
                # Dead workers drop out of the registry (their hash expires on its own).
                pipe.zremrangebyscore(service.workers, "-inf", f"({dead_before}")
            second = await pipe.execute()

        readings: list[QueueReading] = []
        for queue, where, window in zip(queues, counted, windows, strict=True):
            if readings:
                # Decoding a queue's day of minutes takes ~0.2 s: other RPCs get the loop in between.
                await asyncio.sleep(0)
            ready_at = _int(second[window.head_ready_at]) if window.head_ready_at is not None else 0
            figures = [
                Figures.from_hash(second[i] if histograms else dict(zip(_SCALAR_KEYS, second[i], strict=True)))
                for i in window.minutes
            ]
            readings.append(
                QueueReading(
                    queue=queue,
                    counts=where.decode(first, max(0, now_ms - ready_at) if ready_at else 0),
                    window=Window(now_ms, list(zip(minutes, figures, strict=True))),
                    backlog_change=_backlog_change(second[window.first_snapshot], second[window.last_snapshot]),
                )
            )
        workers = [
            _decode_worker(worker_id, heartbeat, second[at])
            for (worker_id, heartbeat), at in zip(live, worker_hashes, strict=True)
            if second[at]
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
                if fields.get(_OUTCOME) in _FAILURES:
                    # Stored text is read tolerantly: an entry cut mid-character (by an older
                    # version) or written by hand must not break every report.
                    task = fields.get(T.TASK.encode(), b"").decode(errors="replace")
                    counts[task] += 1
                    errors.setdefault(task, fields.get(T.ERROR.encode(), b"").decode(errors="replace"))
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
            asked = [
                (
                    self._queue_counts(pipe, self.keys(queue)),
                    queued(pipe.hmget(self.keys(queue).counters, C.TOTAL_COMPLETED, C.TOTAL_FAILED, C.TOTAL_RETRIED)),
                    queued(pipe.hgetall(self.keys(queue).histograms)),
                )
                for queue in queues
            ]
            replies = await pipe.execute()
        found: list[Totals] = []
        for queue, (where, outcomes, folded) in zip(queues, asked, strict=True):
            completed, failed, retried = (_int(value) for value in replies[outcomes])
            found.append(
                Totals(queue, where.decode(replies, 0), completed, failed, retried, Figures.from_hash(replies[folded]))
            )
        return found


def _backlog_change(
    first: list[tuple[bytes, dict[bytes, bytes]]], last: list[tuple[bytes, dict[bytes, bytes]]]
) -> tuple[int, int, float] | None:
    if not first or not last or first[0][0] == last[0][0]:
        return None
    start_ms = int(first[0][0].split(b"-")[0])
    end_ms = int(last[0][0].split(b"-")[0])
    waiting = S.WAITING.encode()
    before, after = _int(first[0][1].get(waiting)), _int(last[0][1].get(waiting))
    return before, after, (end_ms - start_ms) / MINUTE_MS
