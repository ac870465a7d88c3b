"""Every Redis key the service uses, in one place.

Per-queue keys carry the queue name as a hash tag (`{queue}`) so that all of a
queue's keys share one Redis Cluster slot and its Lua scripts stay legal there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one queue."""

    prefix: str
    queue: str

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.queue}}}"

    @property
    def waiting(self) -> str:
        """ZSET job id -> order score (priority band, then FIFO)."""
        return f"{self.base}:waiting"

    @property
    def delayed(self) -> str:
        """ZSET job id -> due time (ms): delayed enqueues and retries in backoff."""
        return f"{self.base}:delayed"

    @property
    def active(self) -> str:
        """ZSET job id -> lease deadline (ms) of the worker running it."""
        return f"{self.base}:active"

    @property
    def completed(self) -> str:
        """ZSET job id -> finish time (ms), capped by retention."""
        return f"{self.base}:completed"

    @property
    def failed(self) -> str:
        """ZSET job id -> finish time (ms), capped by retention."""
        return f"{self.base}:failed"

    @property
    def counters(self) -> str:
        """HASH of running totals: sequence, evictions."""
        return f"{self.base}:counters"

    @property
    def job_prefix(self) -> str:
        """Prefix of the per-job HASH keys; the job's local id follows."""
        return f"{self.base}:job:"

    def job(self, local_id: str) -> str:
        return self.job_prefix + local_id

    def idempotency(self, key: str) -> str:
        """STRING idempotency key -> job id, expiring with its window."""
        return f"{self.base}:idem:{key}"
