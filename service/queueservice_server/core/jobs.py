"""The job model: ids, states and the record kept in each job's Redis hash."""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass

from queueservice_server.settings import QUEUE_NAME_RE


class State(enum.StrEnum):
    WAITING = "WAITING"
    DELAYED = "DELAYED"
    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


def new_local_ids(count: int) -> list[str]:
    """Ids of new jobs within their queue (128 random bits as 32 hex characters, like a
    uuid4's); a full id is `queue:local`, so GetJob needs no index. One system call for
    a whole batch: a uuid4 per job was the biggest cost of EnqueueBatch."""
    hexed = os.urandom(16 * count).hex()
    return [hexed[i : i + 32] for i in range(0, 32 * count, 32)]


def split_job_id(job_id: str) -> tuple[str, str] | None:
    """(queue, local id), or None when `job_id` is not one of ours."""
    queue, sep, local = job_id.rpartition(":")
    if not sep or not QUEUE_NAME_RE.match(queue) or len(local) != 32 or not local.isalnum():
        return None
    return queue, local


def _ms(fields: Mapping[bytes, bytes], name: str) -> int | None:
    raw = fields.get(name.encode())
    return int(float(raw)) if raw else None


@dataclass(frozen=True)
class JobRecord:
    """One job's hash, decoded. Times are Redis-clock milliseconds."""

    id: str
    queue: str
    task: str
    state: State
    msg: bytes
    priority: int
    attempts: int
    max_attempts: int
    timeout_ms: int
    error: str
    worker: str
    idempotency_key: str
    enqueued_at: int
    due_at: int | None
    started_at: int | None
    finished_at: int | None

    @classmethod
    def from_hash(cls, job_id: str, queue: str, fields: Mapping[bytes, bytes]) -> JobRecord:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode()

        return cls(
            id=job_id,
            queue=queue,
            task=text("task"),
            state=State(text("state")),
            msg=fields.get(b"msg", b""),
            priority=int(text("priority") or 0),
            attempts=int(text("attempts") or 0),
            max_attempts=int(text("max_attempts") or 0),
            timeout_ms=int(text("timeout_ms") or 0),
            error=text("error"),
            worker=text("worker"),
            idempotency_key=text("idempotency_key"),
            enqueued_at=_ms(fields, "enqueued_at") or 0,
            due_at=_ms(fields, "due_at"),
            started_at=_ms(fields, "started_at"),
            finished_at=_ms(fields, "finished_at"),
        )
