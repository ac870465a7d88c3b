"""The job model: ids, states and the record kept in each job's Redis hash."""

from __future__ import annotations

import enum
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from queueservice_server.core.keys import JobFields as F
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


_LOCAL_ID = re.compile(r"[0-9a-f]{32}")


def split_job_id(job_id: str) -> tuple[str, str] | None:
    """(queue, local id), or None when `job_id` is not one of ours (new_local_ids makes lowercase hex)."""
    queue, sep, local = job_id.rpartition(":")
    if not sep or not QUEUE_NAME_RE.match(queue) or not _LOCAL_ID.fullmatch(local):
        return None
    return queue, local


@dataclass(frozen=True)
class JobRecord:
    """One job's hash (`keys.JobFields`), decoded: the only place that reads one. Times are
    Redis-clock milliseconds; a time the job has not reached yet is None."""

    id: str
    queue: str
    local_id: str
    task: str
    state: State
    msg: bytes
    priority: int
    seq: int
    attempts: int
    max_attempts: int
    timeout_ms: int
    stalls: int
    error: str
    worker: str
    idempotency_key: str
    enqueued_at: int
    ready_at: int | None
    due_at: int | None
    started_at: int | None
    finished_at: int | None

    @classmethod
    def from_hash(cls, queue: str, local_id: str, fields: Mapping[bytes, bytes]) -> JobRecord:
        def text(name: str) -> str:
            return fields.get(name.encode(), b"").decode(errors="replace")

        def number(name: str) -> int:
            return int(text(name) or 0)

        def ms(name: str) -> int | None:
            raw = text(name)
            return int(float(raw)) if raw else None

        return cls(
            id=f"{queue}:{local_id}",
            queue=queue,
            local_id=local_id,
            task=text(F.TASK),
            state=State(text(F.STATE)),
            msg=fields.get(F.MSG.encode(), b""),
            priority=number(F.PRIORITY),
            seq=number(F.SEQ),
            attempts=number(F.ATTEMPTS),
            max_attempts=number(F.MAX_ATTEMPTS),
            timeout_ms=number(F.TIMEOUT_MS),
            stalls=number(F.STALLS),
            error=text(F.ERROR),
            worker=text(F.WORKER),
            idempotency_key=text(F.IDEMPOTENCY_KEY),
            enqueued_at=ms(F.ENQUEUED_AT) or 0,
            ready_at=ms(F.READY_AT),
            due_at=ms(F.DUE_AT),
            started_at=ms(F.STARTED_AT),
            finished_at=ms(F.FINISHED_AT),
        )


@dataclass(frozen=True)
class Token:
    """What fences one attempt of a job: the attempt number and the holder (a worker process's
    id) that TAKE wrote into its record. A script given a stale token changes nothing."""

    job_id: str
    attempt: int
    holder: str

    @functools.cached_property
    def text(self) -> str:
        """`job_id@attempt`, as a worker's shared slot stores it (built once: it is on the hot path)."""
        return f"{self.job_id}@{self.attempt}"
