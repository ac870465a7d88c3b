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
        """HASH of running totals (`CounterFields`): seq (waiting order), timings (stream entries
        ever written), total_n / total_completed / total_failed / total_retried (finished
        attempts), evicted_completed, evicted_failed (retention), stalled (reaped)."""
        return f"{self.base}:counters"

    @property
    def consumers(self) -> str:
        """ZSET consumer id -> its last lease renewal on this queue (ms): the reaper leaves alone
        the unexpired jobs of a consumer that renews."""
        return f"{self.base}:consumers"

    def take(self, holder: str) -> str:
        """STRING `token id,id,...`: a worker process's last take, kept one lease so that a re-sent
        TAKE returns the same jobs (see lua.TAKE)."""
        return f"{self.base}:take:{holder}"

    @property
    def limiter(self) -> str:
        """ZSET of recent takes (member `local:attempt` -> take time, ms): the rate limit's sliding window."""
        return f"{self.base}:limiter"

    @property
    def timings(self) -> str:
        """STREAM of finished attempts (see `timings.py` for the fields), capped near QUEUE_TIMINGS_RETAINED."""
        return f"{self.base}:timings"

    @property
    def minute_prefix(self) -> str:
        """Prefix of the per-minute HASHes of attempt counts and timing histograms; the epoch minute follows."""
        return f"{self.base}:minute:"

    def minute(self, epoch_minute: int) -> str:
        return f"{self.minute_prefix}{epoch_minute}"

    @property
    def job_prefix(self) -> str:
        """Prefix of the per-job HASH keys; the job's local id follows."""
        return f"{self.base}:job:"

    def job(self, local_id: str) -> str:
        return self.job_prefix + local_id

    def idempotency(self, key: str) -> str:
        """STRING idempotency key -> job id, expiring with its window."""
        return f"{self.base}:idem:{key}"

    @property
    def snapshots(self) -> str:
        """STREAM of collector snapshots (waiting, active, delayed, completed, failed, oldest_wait_ms),
        one per QUEUE_METRICS_INTERVAL, capped to QUEUE_METRICS_HISTORY."""
        return f"{self.base}:snapshots"

    @property
    def histograms(self) -> str:
        """HASH of all-time totals folded from finished minutes by the collector (the per-minute
        fields except the maxima, plus `folded`: the last epoch minute added); Prometheus reads it."""
        return f"{self.base}:histograms"

    @property
    def collector_lock(self) -> str:
        """STRING held (SET NX PX) by the one server replica that collects this queue this interval."""
        return f"{self.base}:collector"


@dataclass(frozen=True)
class ServiceKeys:
    """Keys shared by every queue on one Redis (under one prefix)."""

    prefix: str

    @property
    def workers(self) -> str:
        """ZSET worker id -> last heartbeat (ms); an entry older than the stall interval is a dead worker."""
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        """HASH of one worker: host, pid, concurrency, busy, rss_bytes, queues, started_at, heartbeat_at."""
        return f"{self.prefix}:worker:{worker_id}"


# Field names, in one place with the keys they live in. The Lua scripts (lua.py) use
# the same names as literals; tests/unit/test_schema.py checks they use no others.


class JobFields:
    """The fields of a job's HASH (`QueueKeys.job`); `jobs.JobRecord` is their one decoder."""

    TASK = "task"
    MSG = "msg"  # the task message (codec.py)
    STATE = "state"
    PRIORITY = "priority"
    SEQ = "seq"  # its place in the waiting order, kept when it goes back
    ATTEMPTS = "attempts"
    MAX_ATTEMPTS = "max_attempts"
    TIMEOUT_MS = "timeout_ms"
    STALLS = "stalls"
    ERROR = "error"
    WORKER = "worker"  # the holder of the current attempt
    IDEMPOTENCY_KEY = "idempotency_key"
    ENQUEUED_AT = "enqueued_at"
    READY_AT = "ready_at"  # when the current attempt became ready to run
    DUE_AT = "due_at"
    STARTED_AT = "started_at"
    FINISHED_AT = "finished_at"


class CounterFields:
    """The fields of a queue's counters HASH (`QueueKeys.counters`)."""

    SEQ = "seq"
    TIMINGS = "timings"
    TOTAL_N = "total_n"
    TOTAL_COMPLETED = "total_completed"
    TOTAL_FAILED = "total_failed"
    TOTAL_RETRIED = "total_retried"
    EVICTED_COMPLETED = "evicted_completed"
    EVICTED_FAILED = "evicted_failed"
    STALLED = "stalled"


class TimingFields:
    """The fields of an entry of a queue's timings STREAM (`QueueKeys.timings`): one finished attempt."""

    SEQ = "seq"
    JOB = "job"  # local id
    TASK = "task"
    OUTCOME = "outcome"  # a timings.Outcome
    ATTEMPT = "attempt"
    WAIT = "wait"
    PROC = "proc"
    START = "start"
    FINISH = "finish"
    WORKER = "worker"
    ERROR = "error"


class SnapshotFields:
    """The fields of an entry of a queue's snapshots STREAM (`QueueKeys.snapshots`)."""

    WAITING = "waiting"
    ACTIVE = "active"
    DELAYED = "delayed"
    COMPLETED = "completed"
    FAILED = "failed"
    OLDEST_WAIT_MS = "oldest_wait_ms"


class WorkerFields:
    """The fields of a worker's registry HASH (`ServiceKeys.worker`)."""

    HOST = "host"
    PID = "pid"
    CONCURRENCY = "concurrency"
    BUSY = "busy"
    RSS_BYTES = "rss_bytes"
    QUEUES = "queues"
    STARTED_AT = "started_at"
    HEARTBEAT_AT = "heartbeat_at"
