"""The Huey storage class: where Huey's worker loop meets our Redis layout.

Huey keeps its worker loop, task execution and retry policy. This class
replaces its destructive BRPOP with a take of up to `prefetch` jobs into the
queue's active set under a lease (Huey asks for one job at a time; the rest
wait in a local buffer), and collects outcomes instead of writing each at
once: they ride the pipeline of the next take, or are flushed after
FLUSH_AFTER seconds, whichever comes first. A crashed worker process can
therefore re-run up to `prefetch` jobs it took or ran but had not acked:
delivery is at-least-once. The producer side never goes through here.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis
from huey.constants import EmptyData
from huey.storage import BaseStorage

from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.redis import sync_client
from queueservice_server.core.scripts import TakeReply
from queueservice_server.core.timings import Attempt, Outcome
from queueservice_server.settings import Settings
from queueservice_server.worker.queue_ops import QueueOps, consumer_id
from queueservice_server.worker.serializer import to_timestamp
from queueservice_server.worker.slots import Slot

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
# Acks wait at most this long for the next take to carry them.
FLUSH_AFTER = 0.05
# Takes size themselves so a buffer holds about this much work: many jobs when
# they are quick, one when they are slow (a buffered job waits on the running one).
BATCH_WINDOW = 0.005


def format_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


@dataclass
class Taken:
    """A job this process holds, with the clocks that turn its local times into Redis time."""

    job_id: str
    keys: QueueKeys
    local_id: str
    task: str
    ready_ms: int
    attempt: int
    take_ms: int
    take_mono: float
    start_mono: float = 0.0

    def redis_ms(self, mono: float) -> int:
        return self.take_ms + int((mono - self.take_mono) * 1000)


class QueueStorage(BaseStorage):  # type: ignore[misc]
    """Huey storage over the service's queues (taken in configured order)."""

    blocking = False
    priority = True

    def __init__(self, name: str = "queueservice", *, settings: Settings, redis_url: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.settings = settings
        self.redis_url = redis_url
        self._core: QueueOps | None = None
        self._pid = 0
        self.slot: Slot | None = None
        self._buffer: deque[tuple[Taken, bytes]] = deque()
        self._held: dict[str, Taken] = {}
        self._pending: list[tuple[Taken, Attempt]] = []
        self._pending_since = 0.0
        self._not_before = 0.0
        self._avg_run = BATCH_WINDOW
        self.popped: Taken | None = None
        # Errors of attempts that Huey is about to retry, by job id: recorded with the retry move
        # with how the attempt ended (RETRY, or TIMED_OUT).
        self.pending_errors: dict[str, tuple[str, Outcome]] = {}

    # Connections are per process: Huey forks its workers after building the storage.
    @property
    def core(self) -> QueueOps:
        if self._core is None or self._pid != os.getpid():
            self._pid = os.getpid()
            # Its consumer's registry id, then this process's pid.
            worker_id = f"{consumer_id(os.getppid())}:{self._pid}"
            self._core = QueueOps(self.settings, sync_client(self.settings, self.redis_url), worker_id)
        return self._core

    @property
    def conn(self) -> redis.Redis:
        return self.core.client

    def close(self) -> None:
        if self._core is not None:
            self._core.client.close()
        self._core = None

    def _publish_held(self) -> None:
        if self.slot is not None:
            self.slot.set_held(list(self._held))

    # -- taking work -----------------------------------------------------
    def dequeue(self) -> bytes | None:
        now = time.monotonic()
        if not self._buffer:
            if now >= self._not_before:
                self._exchange()
            elif self._pending:
                self._flush()
        elif self._pending and now - self._pending_since > FLUSH_AFTER:
            self._flush()
        if not self._buffer:
            return None
        self.popped, msg = self._buffer.popleft()
        return msg

    def _batch_size(self) -> int:
        if self.settings.rate_limit_max:
            return 1
        return max(1, min(self.settings.prefetch, int(BATCH_WINDOW / self._avg_run)))

    def _exchange(self) -> None:
        """Flushes pending outcomes and takes more work, in one round trip per queue tried."""
        core = self.core
        count = self._batch_size()
        # Pending outcomes are dropped only once Redis has them: an outage loses none.
        settled = self._pending
        for index, keys in enumerate(core.keys.values()):

            def build(pipe: Any, first: bool = index == 0, keys: QueueKeys = keys) -> None:
                if first:
                    self._queue_settles(pipe, settled)
                core.take(keys, count, pipe)

            replies = core.execute(build)
            mono = time.monotonic()
            if index == 0:
                self._settled(settled)
            reply = TakeReply.decode(replies[-1])
            if reply.wait_ms:
                self._not_before = mono + reply.wait_ms / 1000
                break
            for job in reply.jobs:
                taken = Taken(
                    f"{keys.queue}:{job.local_id}",
                    keys,
                    job.local_id,
                    job.task,
                    job.ready_ms,
                    job.attempt,
                    reply.now_ms,
                    mono,
                )
                self._held[taken.job_id] = taken
                self._buffer.append((taken, job.msg))
            if self._buffer:
                break
        if not settled and not self._buffer:
            return
        self._publish_held()

    def _queue_settles(self, pipe: Any, settled: list[tuple[Taken, Attempt]]) -> None:
        grouped: dict[QueueKeys, list[Attempt]] = {}
        for taken, attempt in settled:
            grouped.setdefault(taken.keys, []).append(attempt)
        for keys, attempts in grouped.items():
            self.core.settle(keys, attempts, pipe)

    def _settled(self, settled: list[tuple[Taken, Attempt]]) -> None:
        """Redis has these outcomes: they are pending no more, and their jobs no longer held."""
        self._pending = []
        for taken, _ in settled:
            self._held.pop(taken.job_id, None)

    def _flush(self) -> None:
        settled = self._pending
        self.core.execute(lambda pipe: self._queue_settles(pipe, settled))
        self._settled(settled)
        self._publish_held()

    def read_schedule(self, ts: datetime.datetime) -> list[bytes]:
        """Moves due jobs to waiting inside Redis; nothing comes back for Huey to enqueue."""
        self.core.promote()
        return []

    # -- one attempt -------------------------------------------------------
    def started(self, job_id: str, timeout: float | None) -> None:
        taken = self._held[job_id]
        taken.start_mono = time.monotonic()
        if self.slot is not None:
            limit = timeout or self.settings.default_timeout
            self.slot.start(job_id, limit + self.settings.timeout_grace)

    def _finished(
        self, job_id: str, outcome: Outcome, error: str = "", retry: tuple[bytes, float] | None = None
    ) -> None:
        """Records an attempt's outcome; `retry` is the next attempt's message and its delay (s)."""
        taken = self._held.get(job_id)
        if taken is None:
            log.warning("outcome of a job this worker does not hold was dropped", extra={"job_id": job_id})
            return
        mono = time.monotonic()
        if self.slot is not None:
            self.slot.stop()
        start = taken.start_mono or mono
        self._avg_run = 0.8 * self._avg_run + 0.2 * max(mono - start, 1e-6)
        finish_ms = taken.redis_ms(mono)
        msg, delay = retry or (b"", 0.0)
        attempt = Attempt(
            local_id=taken.local_id,
            task=taken.task,
            outcome=outcome,
            attempt=taken.attempt,
            ready_ms=taken.ready_ms,
            start_ms=taken.redis_ms(start),
            finish_ms=finish_ms,
            error=error,
            retry_msg=msg,
            retry_due_ms=finish_ms + int(delay * 1000) if retry else 0,
        )
        if not self._pending:
            self._pending_since = mono
        self._pending.append((taken, attempt))

    def completed(self, job_id: str) -> None:
        self._finished(job_id, Outcome.COMPLETED)

    def failed(self, job_id: str, error: str, outcome: Outcome = Outcome.FAILED) -> None:
        """The attempt failed (FAILED or TIMED_OUT) with no attempt left."""
        self._finished(job_id, outcome, error)

    def reject(self, error: str) -> None:
        """The job just taken cannot run (undecodable message, unknown task): it fails at once."""
        taken = self.popped
        if taken is None:
            return
        log.error("job cannot run", extra={"job_id": taken.job_id, "error": error})
        self._finished(taken.job_id, Outcome.FAILED, error)

    def hand_back(self, job_id: str) -> None:
        """An attempt interrupted by shutdown goes back at once, not counted."""
        if self.slot is not None:
            self.slot.stop()
        self._give_back([job_id])

    def shut_down(self) -> None:
        """Graceful stop: acks what finished, gives back what never started."""
        try:
            if self._pending:
                self._flush()
            unstarted = [taken.job_id for taken, _ in self._buffer]
            self._buffer.clear()
            if unstarted:
                self._give_back(unstarted)
        finally:
            self._publish_held()

    def _give_back(self, job_ids: list[str]) -> None:
        self.core.hand_back(job_ids)
        for job_id in job_ids:
            self._held.pop(job_id, None)
        self._publish_held()

    def _retry(self, data: bytes, delay: float) -> None:
        if self.popped is None:
            raise RuntimeError("a retry with no job taken")
        job_id = self.popped.job_id
        error, outcome = self.pending_errors.pop(job_id, ("", Outcome.RETRY))
        self._finished(job_id, outcome, error, (data, delay))

    def enqueue(self, data: bytes, priority: int | None = None) -> None:
        """Huey re-enqueues a retry with no delay through here."""
        self._retry(data, 0)

    def add_to_schedule(self, data: bytes, ts: datetime.datetime) -> None:
        """Huey schedules a retry with backoff through here (`ts` on this host's clock)."""
        self._retry(data, max(0.0, (to_timestamp(ts) or 0) - time.time()))

    # -- sizes and listings (Huey's introspection API) -------------------
    def queue_size(self) -> int:
        return sum(int(self.conn.zcard(keys.waiting)) for keys in self.core.keys.values())

    def schedule_size(self) -> int:
        return sum(int(self.conn.zcard(keys.delayed)) for keys in self.core.keys.values())

    def enqueued_items(self, limit: int | None = None) -> list[bytes]:
        raise NotImplementedError("list jobs through the gRPC API")

    def scheduled_items(self, limit: int | None = None) -> list[bytes]:
        raise NotImplementedError("list jobs through the gRPC API")

    def flush_queue(self) -> None:
        raise NotImplementedError("jobs are never dropped in bulk")

    def flush_schedule(self) -> None:
        raise NotImplementedError("jobs are never dropped in bulk")

    # -- Huey's key/value store: results are off and tasks are never revoked through Huey,
    # so revoke checks and result writes must not cost round trips.
    def put_data(self, key: str, value: bytes, is_result: bool = False) -> None:
        return None

    def peek_data(self, key: str) -> Any:
        return EmptyData

    def pop_data(self, key: str) -> Any:
        return EmptyData

    def delete_data(self, key: str) -> bool:
        return False

    def has_data_for_key(self, key: str) -> bool:
        return False

    def put_if_empty(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        raise NotImplementedError("Huey locks and rate limits are not supported by the queue storage")

    def result_store_size(self) -> int:
        return 0

    def result_items(self) -> dict[str, Any]:
        return {}

    def flush_results(self) -> None:
        return None
