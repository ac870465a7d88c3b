"""What a finished attempt records: its outcome, its timings, and the per-minute
figures that monitoring reads back.

Every time is a Redis-clock millisecond. A worker learns the Redis clock from
the take that handed it the job and adds its own monotonic offsets, so hosts
agree without sharing a clock.

Per queue and epoch minute, one HASH (`QueueKeys.minute`) holds:
  n, completed, failed, retried        attempts finished in that minute
  wait_sum, proc_sum, total_sum        sums in ms (means = sum / n)
  wait_max, proc_max, total_max        maxima in ms
  w:<b>, p:<b>, t:<b>                  histogram counts of wait / processing / total by bucket b
so a window of any length costs one HASH per minute, however many jobs pass.
Buckets grow by BUCKET_RATIO, so a percentile read from them is within
(BUCKET_RATIO - 1) of the true value. The scripts that record attempts count
them (lua.py `tally`, with the same buckets as `bucket` here), over exactly
the attempts they recorded; completed / failed / retried count the job's
move (a timed-out attempt that is retried counts as retried).

The timings STREAM (`QueueKeys.timings`) holds one entry per finished attempt
(`keys.TimingFields`): seq (1, 2, ... per queue: a gap before the oldest
retained entry is what a reader missed), job (local id), task, outcome,
attempt, wait, proc, start, finish (ms), worker, error (its first 500 bytes, cut at a UTF-8 character boundary).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

BUCKET_RATIO = 1.25
_LOG_RATIO = math.log(BUCKET_RATIO)


class Outcome(enum.StrEnum):
    """How an attempt ended: what the timings stream records and subscribers filter on."""

    COMPLETED = "COMPLETED"
    # Failed with no attempt left: the job is FAILED.
    FAILED = "FAILED"
    # Failed, and the job goes back for another attempt.
    RETRY = "RETRY"
    # Ran past its time limit (interrupted by the soft timeout, or killed past the grace):
    # retried when the attempt carries the next one's message, else the job is FAILED.
    TIMED_OUT = "TIMED_OUT"


def bucket(ms: float) -> int:
    """Bucket 0 holds [0, 1) ms; bucket b >= 1 holds [RATIO^(b-1), RATIO^b)."""
    if ms < 1:
        return 0
    return int(math.log(ms) / _LOG_RATIO) + 1


def bucket_upper_ms(index: int) -> float:
    """The upper bound of a bucket: what a percentile that falls in it reports."""
    return float(BUCKET_RATIO**index)


@dataclass(frozen=True)
class Attempt:
    """One finished attempt, as the worker reports it."""

    local_id: str
    task: str
    outcome: Outcome
    attempt: int
    ready_ms: int
    start_ms: int
    finish_ms: int
    # The worker process the attempt ran on: with `attempt`, the token SETTLE fences it by.
    holder: str
    error: str = ""
    # When another attempt follows: its message and when it is due (ms, Redis clock).
    retry_msg: bytes = b""
    retry_due_ms: int = 0

    @property
    def wait_ms(self) -> int:
        return max(0, self.start_ms - self.ready_ms)

    @property
    def proc_ms(self) -> int:
        return max(0, self.finish_ms - self.start_ms)


def attempt_args(attempt: Attempt) -> list[str | int | bytes]:
    """One attempt as the SETTLE script reads it."""
    return [
        attempt.local_id,
        attempt.outcome.value,
        attempt.start_ms,
        attempt.finish_ms,
        attempt.error,
        attempt.retry_msg,
        attempt.retry_due_ms,
        attempt.task,
        attempt.wait_ms,
        attempt.attempt,
        attempt.holder,
    ]
