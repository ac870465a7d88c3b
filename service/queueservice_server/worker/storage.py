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
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis
from huey.constants import EmptyData
from huey.storage import BaseStorage

from queueservice_server.core.jobs import Token
from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.redis import REDIS_DOWN, sync_client
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
    # Cut by characters (never inside one); a lone surrogate, which UTF-8 cannot encode, becomes "?".
    text = text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
    return text.encode("utf-8", "replace").decode()


@dataclass
class Taken:
    """A job this process holds, with the clocks that turn its local times into Redis time."""

    job_id: str
    keys: QueueKeys
    local_id: str
    task: str
    token: Token
    ready_ms: int
    take_ms: int
    take_mono: float
    start_mono: float = 0.0

    @property
    def attempt(self) -> int:
        return self.token.attempt

    @property
    def holder(self) -> str:
        return self.token.holder

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
        # Per queue: when its rate limit has a token again (time.monotonic()).
        self._not_before: dict[str, float] = {}
        self._take_tokens: dict[str, str] = {}
        self._take_count = itertools.count()
        self._lost_seen = 0
        self._down = False
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
            self.slot.set_held(self.core.worker_id, [taken.token for taken in self._held.values()])

    # -- taking work -----------------------------------------------------
    def dequeue(self) -> bytes | None:
        if self._buffer and self.slot is not None and self.slot.lost_version != self._lost_seen:
            self._drop_lost()
        if not self._buffer:
            self._exchange()
        elif self._pending and time.monotonic() - self._pending_since > FLUSH_AFTER:
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
        """Flushes pending outcomes and takes more work, in one round trip per queue tried, in
        configured order; a queue at its rate limit is skipped until a token frees up."""
        core = self.core
        count = self._batch_size()
        now = time.monotonic()
        queues = [keys for keys in core.keys.values() if self._not_before.get(keys.queue, 0.0) <= now]
        # Pending outcomes are dropped only once Redis has them: an outage loses none.
        settled = self._pending
        for index, keys in enumerate(queues):
            # A take whose reply never came is sent again with its token, which returns its jobs.
            token = self._take_tokens.setdefault(keys.queue, f"{core.worker_id}/{next(self._take_count)}")

            def build(pipe: Any, first: bool = index == 0, keys: QueueKeys = keys, token: str = token) -> None:
                if first:
                    self._queue_settles(pipe, settled)
                core.take(keys, count, token, pipe)

            replies = core.execute(build)
            self._up()
            mono = time.monotonic()
            del self._take_tokens[keys.queue]
            if index == 0:
                self._settled(settled, replies[:-1])
            reply = TakeReply.decode(replies[-1])
            if reply.wait_ms:
                self._not_before[keys.queue] = mono + reply.wait_ms / 1000
                continue
            for job in reply.jobs:
                job_id = f"{keys.queue}:{job.local_id}"
                taken = Taken(
                    job_id,
                    keys,
                    job.local_id,
                    job.task,
                    Token(job_id, job.attempt, core.worker_id),
                    job.ready_ms,
                    reply.now_ms,
                    mono,
                )
                self._held[taken.job_id] = taken
                self._buffer.append((taken, job.msg))
            if self._buffer:
                break
        if settled and not queues:
            self._flush()
        elif settled or self._buffer:
            self._publish_held()

    def _queue_settles(self, pipe: Any, settled: list[tuple[Taken, Attempt]]) -> None:
        for keys, attempts in self._settles_by_queue(settled).items():
            self.core.settle(keys, attempts, pipe)

    @staticmethod
    def _settles_by_queue(settled: list[tuple[Taken, Attempt]]) -> dict[QueueKeys, list[Attempt]]:
        grouped: dict[QueueKeys, list[Attempt]] = {}
        for taken, attempt in settled:
            grouped.setdefault(taken.keys, []).append(attempt)
        return grouped

    def _settled(self, settled: list[tuple[Taken, Attempt]], replies: list[Any]) -> None:
        """Redis has these outcomes: they are pending no more, and their jobs no longer held. Those
        whose lease was lost (reaped, taken by another worker) were not recorded: said once each."""
        self._pending = []
        for taken, _ in settled:
            self._held.pop(taken.job_id, None)
        if not any(replies):
            return
        for keys, stale in zip(self._settles_by_queue(settled), replies, strict=True):
            for local in stale:
                log.warning(
                    "outcome not recorded: this worker's lease on the job was lost (it was reaped)",
                    extra={"job_id": f"{keys.queue}:{local.decode()}"},
                )

    def _flush(self) -> None:
        settled = self._pending
        replies = self.core.execute(lambda pipe: self._queue_settles(pipe, settled))
        self._settled(settled, replies)
        self._publish_held()

    def _drop_lost(self) -> None:
        """Buffered jobs whose lease the supervisor could not renew belong to another worker now."""
        assert self.slot is not None
        self._lost_seen = self.slot.lost_version
        lost = self.slot.lost()
        kept: deque[tuple[Taken, bytes]] = deque()
        for taken, msg in self._buffer:
            if taken.token in lost:
                self._held.pop(taken.job_id, None)
                log.warning("lease lost before the job started; not running it", extra={"job_id": taken.job_id})
            else:
                kept.append((taken, msg))
        self._buffer = kept
        self._publish_held()

    def outage(self, exc: Exception) -> None:
        """Redis did not answer: said once per outage; what is pending is kept and sent again."""
        if not self._down:
            log.warning("redis unreachable; retrying", extra={"error": str(exc)})
            self._down = True

    def _up(self) -> None:
        if self._down:
            log.warning("redis reachable again")
            self._down = False

    def read_schedule(self, ts: datetime.datetime) -> list[bytes]:
        """Moves due jobs to waiting inside Redis; nothing comes back for Huey to enqueue."""
        try:
            self.core.promote()
        except REDIS_DOWN as exc:
            self.outage(exc)
        else:
            self._up()
        return []

    # -- one attempt -------------------------------------------------------
    def started(self, job_id: str, timeout: float | None) -> None:
        taken = self._held[job_id]
        taken.start_mono = time.monotonic()
        if self.slot is not None:
            limit = timeout or self.settings.default_timeout
            self.slot.start(taken.token, limit + self.settings.timeout_grace)

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
            holder=taken.holder,
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
        self.core.hand_back(self._held[job_id].token for job_id in job_ids if job_id in self._held)
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
