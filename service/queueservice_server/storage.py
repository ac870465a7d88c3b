"""The Huey storage class: where Huey's consumer meets our Redis layout.

Huey keeps its consumer, worker pool, task execution and retry policy; this
class replaces its destructive BRPOP with a take into the queue's active set
(under a lease), and turns Huey's "schedule" and "enqueue" calls for retries
into moves of the same job record. The producer side never goes through here:
the API writes jobs with the ENQUEUE script (see `producer.py`).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import redis
from huey.constants import EmptyData
from huey.storage import BaseStorage

from queueservice_server.codec import decode_message, to_timestamp
from queueservice_server.jobs import State, split_job_id
from queueservice_server.keys import QueueKeys
from queueservice_server.redis_client import sync_client
from queueservice_server.scripts import Scripts
from queueservice_server.settings import Settings

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
PROMOTE_BATCH = 1000


def format_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


class QueueStorage(BaseStorage):  # type: ignore[misc]
    """Huey storage over the service's queues (several queues, taken in configured order)."""

    blocking = False
    priority = True

    def __init__(self, name: str = "queueservice", *, settings: Settings, redis_url: str, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.settings = settings
        self.redis_url = redis_url
        self.keys = {queue: QueueKeys(settings.key_prefix, queue) for queue in settings.queues}
        self._client: redis.Redis | None = None
        self._scripts: Scripts | None = None
        self._pid = 0
        self._worker_id = ""
        # Errors of attempts that Huey is about to retry, by job id: recorded with the retry move.
        self.pending_errors: dict[str, str] = {}

    # Connections are per process: Huey forks its workers after building the storage.
    def _ensure(self) -> tuple[redis.Redis, Scripts]:
        if self._client is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._client = sync_client(self.settings, self.redis_url)
            self._scripts = Scripts.bind(self._client)
            self._worker_id = f"{socket.gethostname()}:{self._pid}:{uuid.uuid4().hex[:6]}"
        assert self._scripts is not None
        return self._client, self._scripts

    @property
    def conn(self) -> redis.Redis:
        return self._ensure()[0]

    @property
    def worker_id(self) -> str:
        self._ensure()
        return self._worker_id

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = None

    def _queue_of(self, job_id: str) -> tuple[QueueKeys, str]:
        parts = split_job_id(job_id)
        if parts is None or parts[0] not in self.keys:
            raise ValueError(f"job id {job_id!r} names no configured queue")
        return self.keys[parts[0]], parts[1]

    # -- taking work -----------------------------------------------------
    def dequeue(self) -> bytes | None:
        _, scripts = self._ensure()
        lease_ms = int(self.settings.stall_interval * 1000)
        for keys in self.keys.values():
            taken = scripts.take(keys=[keys.waiting, keys.active], args=[1, lease_ms, self._worker_id, keys.job_prefix])
            if taken:
                msg: bytes = taken[0]
                return msg
        return None

    def read_schedule(self, ts: datetime.datetime) -> list[bytes]:
        """Moves due jobs to waiting inside Redis; nothing comes back for Huey to enqueue."""
        client, scripts = self._ensure()
        with client.pipeline(transaction=False) as pipe:
            for keys in self.keys.values():
                scripts.promote(
                    keys=[keys.delayed, keys.waiting, keys.counters], args=[keys.job_prefix, PROMOTE_BATCH], client=pipe
                )
            pipe.execute()
        return []

    # -- outcomes --------------------------------------------------------
    def finish(self, job_id: str, state: State, error: str = "") -> bool:
        """Records a final outcome; False when the job was no longer held by us."""
        _, scripts = self._ensure()
        keys, local = self._queue_of(job_id)
        if state is State.COMPLETED:
            done, keep, counter = keys.completed, self.settings.keep_completed, "evicted_completed"
        else:
            done, keep, counter = keys.failed, self.settings.keep_failed, "evicted_failed"
        held = scripts.finish(
            keys=[keys.job(local), keys.active, done, keys.counters],
            args=[local, state.value, error, keep, counter, keys.job_prefix],
        )
        return bool(held)

    def _retry(self, data: bytes, due_ms: int) -> None:
        _, scripts = self._ensure()
        job_id = decode_message(data)["id"]
        keys, local = self._queue_of(job_id)
        error = self.pending_errors.pop(job_id, "")
        held = scripts.retry(
            keys=[keys.job(local), keys.active, keys.delayed, keys.waiting, keys.counters],
            args=[local, data, due_ms, error],
        )
        if not held:
            log.warning("retry of a job no longer held by this worker", extra={"job_id": job_id})

    def enqueue(self, data: bytes, priority: int | None = None) -> None:
        """Huey re-enqueues a retry with no delay through here."""
        self._retry(data, 0)

    def add_to_schedule(self, data: bytes, ts: datetime.datetime) -> None:
        """Huey schedules a retry with backoff through here."""
        due = to_timestamp(ts)
        self._retry(data, int((due or 0) * 1000))

    # -- sizes and listings (Huey's introspection API) -------------------
    def queue_size(self) -> int:
        return sum(int(self.conn.zcard(keys.waiting)) for keys in self.keys.values())

    def schedule_size(self) -> int:
        return sum(int(self.conn.zcard(keys.delayed)) for keys in self.keys.values())

    def _messages(self, zset: str, keys: QueueKeys, limit: int | None) -> Iterator[bytes]:
        locals_: list[bytes] = self.conn.zrange(zset, 0, (limit or 0) - 1)  # type: ignore[assignment]
        for local in locals_:
            msg: bytes | None = self.conn.hget(keys.job(local.decode()), "msg")  # type: ignore[assignment]
            if msg is not None:
                yield msg

    def enqueued_items(self, limit: int | None = None) -> list[bytes]:
        return [m for keys in self.keys.values() for m in self._messages(keys.waiting, keys, limit)]

    def scheduled_items(self, limit: int | None = None) -> list[bytes]:
        return [m for keys in self.keys.values() for m in self._messages(keys.delayed, keys, limit)]

    def flush_queue(self) -> None:
        self.conn.delete(*(keys.waiting for keys in self.keys.values()))

    def flush_schedule(self) -> None:
        self.conn.delete(*(keys.delayed for keys in self.keys.values()))

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
