"""Alert rules, the health level, and recommendations: pure functions of the
figures, so every replica that reads the same Redis says the same thing.

Rules (thresholds from settings, QUEUE_ALERT_*):
  HIGH_WAIT_TIME        average wait of the window's attempts > QUEUE_ALERT_AVG_WAIT
  SLOW_PROCESSING       average processing > QUEUE_ALERT_AVG_PROCESSING
  LOW_THROUGHPUT        jobs finished per minute < QUEUE_ALERT_MIN_THROUGHPUT while jobs wait
                        and the oldest has waited at least QUEUE_ALERT_THROUGHPUT_GRACE
  HIGH_FAILURE_RATE     failed share of the window's attempts > QUEUE_ALERT_FAILURE_RATE
  BACKLOG               waiting jobs > QUEUE_ALERT_BACKLOG
An alert is CRITICAL when the observed value is CRITICAL_FACTOR times past its
threshold (for throughput: at or below threshold / CRITICAL_FACTOR), else WARNING.

Level: CRITICAL with any critical alert; WARNING with any other alert; GOOD with
no alert but a figure past half its threshold (average wait, average processing,
failure rate, waiting jobs); EXCELLENT otherwise.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from queueservice_server.settings import Settings

CRITICAL_FACTOR = 2.0
WATCH_SHARE = 0.5
# Recommendations: memory share of Redis maxmemory worth a word; how much a backlog must grow.
REDIS_MEMORY_SHARE = 0.8
BACKLOG_GROWTH = 1.5
BACKLOG_GROWTH_MIN = 10
# Throughput this close to the rate limit means the limit is what holds jobs back.
RATE_LIMIT_SHARE = 0.9


class Kind(enum.StrEnum):
    HIGH_WAIT_TIME = "HIGH_WAIT_TIME"
    SLOW_PROCESSING = "SLOW_PROCESSING"
    LOW_THROUGHPUT = "LOW_THROUGHPUT"
    HIGH_FAILURE_RATE = "HIGH_FAILURE_RATE"
    BACKLOG = "BACKLOG"


class Severity(enum.StrEnum):
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"


class Level(enum.StrEnum):
    EXCELLENT = "EXCELLENT"
    GOOD = "GOOD"
    WARNING = "WARNING"
    CRITICAL = "CRITICAL"


@dataclass(frozen=True)
class Thresholds:
    """The alert thresholds in force (QUEUE_ALERT_*; their defaults live in settings.py)."""

    avg_wait_s: float
    avg_processing_s: float
    min_throughput: float
    throughput_grace_s: float
    failure_rate: float
    backlog: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            avg_wait_s=settings.alert_avg_wait,
            avg_processing_s=settings.alert_avg_processing,
            min_throughput=settings.alert_min_throughput,
            throughput_grace_s=settings.alert_throughput_grace,
            failure_rate=settings.alert_failure_rate,
            backlog=settings.alert_backlog,
        )


@dataclass(frozen=True)
class Observed:
    """What the rules look at: one queue (or several together) over the alert window."""

    waiting: int
    oldest_wait_s: float
    attempts: int
    avg_wait_s: float
    avg_processing_s: float
    throughput_per_minute: float
    failure_rate: float
    window_minutes: float


@dataclass(frozen=True)
class Alert:
    kind: Kind
    severity: Severity
    observed: float
    threshold: float
    message: str


def _above(kind: Kind, observed: float, threshold: float, message: str) -> Alert | None:
    if observed <= threshold:
        return None
    severity = Severity.CRITICAL if observed >= threshold * CRITICAL_FACTOR else Severity.WARNING
    return Alert(kind, severity, observed, threshold, message)


def evaluate(seen: Observed, limits: Thresholds) -> list[Alert]:
    window = f"the last {seen.window_minutes:.0f} min"
    found: list[Alert | None] = []
    if seen.attempts:
        found += [
            _above(
                Kind.HIGH_WAIT_TIME,
                seen.avg_wait_s,
                limits.avg_wait_s,
                f"jobs waited {seen.avg_wait_s:.1f} s on average over {window} (threshold {limits.avg_wait_s:g} s)",
            ),
            _above(
                Kind.SLOW_PROCESSING,
                seen.avg_processing_s,
                limits.avg_processing_s,
                f"jobs ran {seen.avg_processing_s:.1f} s on average over {window} "
                f"(threshold {limits.avg_processing_s:g} s)",
            ),
            _above(
                Kind.HIGH_FAILURE_RATE,
                seen.failure_rate,
                limits.failure_rate,
                f"{seen.failure_rate:.0%} of attempts failed over {window} (threshold {limits.failure_rate:.0%})",
            ),
        ]
    stuck = seen.waiting > 0 and seen.oldest_wait_s >= limits.throughput_grace_s
    if stuck and seen.throughput_per_minute < limits.min_throughput:
        critical = seen.throughput_per_minute <= limits.min_throughput / CRITICAL_FACTOR
        found.append(
            Alert(
                Kind.LOW_THROUGHPUT,
                Severity.CRITICAL if critical else Severity.WARNING,
                seen.throughput_per_minute,
                limits.min_throughput,
                f"{seen.throughput_per_minute:.2f} jobs/min finished over {window} while {seen.waiting} jobs wait, "
                f"the oldest for {seen.oldest_wait_s:.0f} s (threshold {limits.min_throughput:g}/min)",
            )
        )
    found.append(
        _above(
            Kind.BACKLOG,
            float(seen.waiting),
            float(limits.backlog),
            f"{seen.waiting} jobs waiting (threshold {limits.backlog})",
        )
    )
    return [alert for alert in found if alert is not None]


def level(alerts: Sequence[Alert], seen: Observed, limits: Thresholds) -> Level:
    if any(alert.severity is Severity.CRITICAL for alert in alerts):
        return Level.CRITICAL
    if alerts:
        return Level.WARNING
    watch = [
        seen.attempts > 0 and seen.avg_wait_s > limits.avg_wait_s * WATCH_SHARE,
        seen.attempts > 0 and seen.avg_processing_s > limits.avg_processing_s * WATCH_SHARE,
        seen.attempts > 0 and seen.failure_rate > limits.failure_rate * WATCH_SHARE,
        seen.waiting > limits.backlog * WATCH_SHARE,
    ]
    return Level.GOOD if any(watch) else Level.EXCELLENT


@dataclass(frozen=True)
class Capacity:
    """Live workers that serve the queue(s), their worker slots, and how many are busy."""

    workers: int
    slots: int
    busy: int


@dataclass(frozen=True)
class Failing:
    """A task among the most recent failed attempts."""

    task: str
    count: int
    sample: int
    last_error: str


@dataclass(frozen=True)
class Situation:
    """What recommendations need besides the alerts."""

    subject: str
    capacity: Capacity
    rate_limit_per_minute: float = 0.0
    # Waiting jobs at the start and end of the window (collector snapshots), and its minutes.
    backlog_change: tuple[int, int, float] | None = None
    failing: Sequence[Failing] = field(default_factory=tuple)
    # Redis used and max memory (bytes; max 0 = no limit), when known.
    redis_memory: tuple[int, int] | None = None


def recommendations(alerts: Sequence[Alert], seen: Observed, ctx: Situation) -> list[str]:
    kinds = {alert.kind for alert in alerts}
    advice: list[str] = []
    cap = ctx.capacity
    held_back = kinds & {Kind.HIGH_WAIT_TIME, Kind.BACKLOG, Kind.LOW_THROUGHPUT}
    if seen.waiting and not cap.workers:
        advice.append(
            f"No live worker serves {ctx.subject} while {seen.waiting} jobs wait: start `queue-service worker` "
            "with QUEUE_QUEUES including it."
        )
    elif held_back and cap.slots and cap.busy >= cap.slots:
        advice.append(
            f"All {cap.slots} worker slots serving {ctx.subject} are busy while {seen.waiting} jobs wait: "
            "add workers (more `queue-service worker` processes or a higher QUEUE_WORKER_CONCURRENCY)."
        )
    elif (
        held_back
        and ctx.rate_limit_per_minute
        and (seen.throughput_per_minute >= ctx.rate_limit_per_minute * RATE_LIMIT_SHARE)
    ):
        advice.append(
            f"Throughput ({seen.throughput_per_minute:.0f}/min) is at the rate limit "
            f"({ctx.rate_limit_per_minute:g}/min, QUEUE_RATE_LIMIT_MAX): raise it if what the tasks call allows."
        )
    elif held_back and cap.slots:
        advice.append(
            f"{cap.slots - cap.busy} of {cap.slots} worker slots are idle while jobs wait: "
            "check the workers' logs (stuck tasks, or Redis unreachable from the workers)."
        )
    if Kind.HIGH_FAILURE_RATE in kinds:
        if ctx.failing:
            top = ctx.failing[0]
            advice.append(
                f"{seen.failure_rate:.0%} of attempts fail; task {top.task!r} failed {top.count} of the last "
                f"{top.sample} attempts (last error: {top.last_error!r}): fix it or its input, then RetryFailed."
            )
        else:
            advice.append(f"{seen.failure_rate:.0%} of attempts fail: look at the failed jobs' errors (GetJob).")
    if Kind.SLOW_PROCESSING in kinds:
        advice.append(
            f"Jobs run {seen.avg_processing_s:.0f} s on average: look at the slowest tasks (GetPerformance p95/p99), "
            "split long jobs, or raise QUEUE_ALERT_AVG_PROCESSING if this is expected."
        )
    if ctx.backlog_change is not None:
        before, after, minutes = ctx.backlog_change
        if after - before >= BACKLOG_GROWTH_MIN and after >= before * BACKLOG_GROWTH:
            advice.append(
                f"The backlog grew from {before} to {after} jobs over {minutes:.0f} min: jobs arrive faster "
                "than they finish."
            )
    if ctx.redis_memory is not None:
        used, limit = ctx.redis_memory
        if limit and used >= limit * REDIS_MEMORY_SHARE:
            advice.append(
                f"Redis uses {used / limit:.0%} of its maxmemory: lower QUEUE_KEEP_COMPLETED, QUEUE_KEEP_FAILED or "
                "QUEUE_TIMINGS_RETAINED, or give Redis more memory."
            )
    return advice
