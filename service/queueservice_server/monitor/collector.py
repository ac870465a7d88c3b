"""The collector: every QUEUE_METRICS_INTERVAL, for each queue, the one server
replica that takes the queue's lock (SET NX PX, for one interval) writes a
snapshot of its counts, backlog and oldest waiting age to the queue's
snapshots stream (backlog trends, kept for QUEUE_METRICS_HISTORY), and folds
the minutes that have ended into the queue's all-time histograms (Prometheus).

A minute is final once the Redis clock has left it (the SETTLE script stamps
its minute from TIME, atomically), so folding it once is exact; the fold is
also guarded by WATCH, so even two replicas racing past an expired lock add a
minute once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import Counter

import redis.asyncio
import redis.exceptions

from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.keys import SnapshotFields as S
from queueservice_server.core.redis import trouble
from queueservice_server.monitor.figures import MINUTE_MS
from queueservice_server.monitor.reader import Counts, Reader
from queueservice_server.settings import Settings

log = logging.getLogger(__name__)


class Collector:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis, reader: Reader) -> None:
        self.settings = settings
        self.client = client
        self.reader = reader
        self.instance = uuid.uuid4().hex
        self.interval_ms = max(1, int(settings.metrics_interval * 1000))
        self.history_minutes = math.ceil(settings.metrics_history / 60)
        self.snapshots_kept = math.ceil(settings.metrics_history / settings.metrics_interval) + 1

    async def run(self) -> None:
        failing = False
        while True:
            try:
                await self.collect()
                failing = False
            except Exception as exc:
                # Unreachable, or answering "not now" (READONLY, BUSY, ...): said once, retried.
                if trouble(exc) is None:
                    log.exception("collector round failed")
                elif not failing:
                    log.warning("collector cannot use Redis; will retry", extra={"error": str(exc)})
                    failing = True
            await asyncio.sleep(self.settings.metrics_interval)

    async def collect(self) -> list[str]:
        """One round: the queues this replica collected."""
        queues = self.settings.queues
        async with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.set(self.reader.keys(queue).collector_lock, self.instance, nx=True, px=self.interval_ms)
            taken = await pipe.execute()
        mine = [queue for queue, got in zip(queues, taken, strict=True) if got]
        if not mine:
            return []
        reading = await self.reader.read(mine, 0, histograms=False)
        for collected in reading.queues:
            keys = self.reader.keys(collected.queue)
            await self._snapshot(keys, collected.counts)
            await self.fold(keys, reading.now_ms)
        return mine

    async def _snapshot(self, keys: QueueKeys, counts: Counts) -> None:
        await self.client.xadd(
            keys.snapshots,
            {
                S.WAITING: counts.waiting,
                S.ACTIVE: counts.active,
                S.DELAYED: counts.delayed,
                S.COMPLETED: counts.completed,
                S.FAILED: counts.failed,
                S.OLDEST_WAIT_MS: counts.oldest_wait_ms,
            },
            maxlen=self.snapshots_kept,
            approximate=True,
        )

    async def fold(self, keys: QueueKeys, now_ms: int) -> int:
        """Adds every minute that ended since the last fold to the all-time hash; returns how many."""
        current = now_ms // MINUTE_MS
        async with self.client.pipeline(transaction=True) as pipe:
            await pipe.watch(keys.histograms)
            folded = await pipe.hget(keys.histograms, "folded")
            first = max(int(folded) + 1 if folded else 0, current - self.history_minutes)
            minutes = range(first, current)
            if not minutes:
                return 0
            async with self.client.pipeline(transaction=False) as reads:
                for minute in minutes:
                    reads.hgetall(keys.minute(minute))
                hashes: list[dict[bytes, bytes]] = await reads.execute()
            totals: Counter[str] = Counter()
            for fields in hashes:
                for field, amount in fields.items():
                    # Maxima do not add up; everything else (counts, sums, histogram buckets) does.
                    if not field.endswith(b"_max"):
                        totals[field.decode(errors="replace")] += int(amount)
            pipe.multi()  # type: ignore[no-untyped-call]
            for name, total in totals.items():
                pipe.hincrby(keys.histograms, name, total)
            pipe.hset(keys.histograms, "folded", current - 1)
            try:
                await pipe.execute()
            except redis.exceptions.WatchError:
                return 0
        return len(minutes)
