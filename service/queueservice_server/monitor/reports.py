"""GetStats and GetPerformance answers, assembled from one Redis reading.

Alerts, the health level and recommendations always look at the alert window
(QUEUE_ALERT_WINDOW, the last 5 minutes by default), so GetStats and
GetPerformance agree on them whatever window a report asks for; the report's
own figures (percentiles, history, failure rate) cover its window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from queueservice_server.monitor.alerts import (
    Alert,
    Kind,
    Level,
    Observed,
    Situation,
    Thresholds,
    evaluate,
    level,
    recommendations,
)
from queueservice_server.monitor.figures import Distribution, Trend, Window
from queueservice_server.monitor.reader import Counts, Reader, Reading, RedisFacts, WorkerEntry
from queueservice_server.settings import Settings


@dataclass(frozen=True)
class Health:
    level: Level
    alerts: list[Alert]
    observed: Observed
    recommendations: list[str]


@dataclass(frozen=True)
class QueueStats:
    queue: str
    counts: Counts
    health: Health
    backlog_ratio: float
    active_workers: int


@dataclass(frozen=True)
class HistoryPoint:
    minute: int
    completed: int
    failed: int


@dataclass(frozen=True)
class Performance:
    subject: str
    window_ms: int
    wait: Distribution
    processing: Distribution
    total: Distribution
    current_per_minute: float
    history: list[HistoryPoint]
    trend: Trend
    failure_rate: float
    health: Health
    workers: list[WorkerEntry]
    redis: RedisFacts


def observe(window: Window, waiting: int, oldest_wait_ms: int) -> Observed:
    figures = window.figures
    return Observed(
        waiting=waiting,
        oldest_wait_s=oldest_wait_ms / 1000,
        attempts=figures.attempts,
        avg_wait_s=figures.wait.avg_ms / 1000,
        avg_processing_s=figures.processing.avg_ms / 1000,
        throughput_per_minute=window.throughput_per_minute,
        failure_rate=figures.failure_rate,
        window_minutes=window.span_minutes,
    )


def subject_of(queues: Sequence[str]) -> str:
    return f"queue {queues[0]!r}" if len(queues) == 1 else "the queues"


class Reports:
    def __init__(self, settings: Settings, reader: Reader) -> None:
        self.settings = settings
        self.reader = reader
        self.limits = Thresholds.from_settings(settings)

    @property
    def rate_limit_per_minute(self) -> float:
        if not self.settings.rate_limit_max:
            return 0.0
        return self.settings.rate_limit_max * 60 / self.settings.rate_limit_window

    async def _health(
        self,
        queues: Sequence[str],
        seen: Observed,
        reading: Reading,
        backlog_change: tuple[int, int, float] | None,
        redis_memory: tuple[int, int] | None = None,
    ) -> Health:
        alerts = evaluate(seen, self.limits)
        failing = await self.reader.failing(queues) if any(a.kind is Kind.HIGH_FAILURE_RATE for a in alerts) else []
        context = Situation(
            subject=subject_of(queues),
            capacity=reading.capacity(queues),
            rate_limit_per_minute=self.rate_limit_per_minute,
            backlog_change=backlog_change,
            failing=failing,
            redis_memory=redis_memory,
        )
        return Health(level(alerts, seen, self.limits), alerts, seen, recommendations(alerts, seen, context))

    async def stats(self, queues: Sequence[str]) -> list[QueueStats]:
        reading = await self.reader.read(queues, self.settings.alert_window, histograms=False)
        answers: list[QueueStats] = []
        for queue in reading.queues:
            counts = queue.counts
            seen = observe(queue.window, counts.waiting, counts.oldest_wait_ms)
            health = await self._health([queue.queue], seen, reading, queue.backlog_change)
            answers.append(
                QueueStats(
                    queue=queue.queue,
                    counts=counts,
                    health=health,
                    backlog_ratio=counts.waiting / self.limits.backlog,
                    active_workers=reading.capacity([queue.queue]).workers,
                )
            )
        return answers

    async def performance(self, queues: Sequence[str], window_s: float) -> Performance:
        alert_window_s = self.settings.alert_window
        reading = await self.reader.read(queues, max(window_s, alert_window_s), histograms=True)
        merged = Window.merge([queue.window for queue in reading.queues])
        window = merged.tail(window_s)
        recent = merged.tail(alert_window_s)
        waiting = sum(queue.counts.waiting for queue in reading.queues)
        oldest = max(queue.counts.oldest_wait_ms for queue in reading.queues)
        changes = [queue.backlog_change for queue in reading.queues]
        backlog_change = None
        if all(change is not None for change in changes):
            known = [change for change in changes if change is not None]
            backlog_change = (sum(c[0] for c in known), sum(c[1] for c in known), max(c[2] for c in known))
        facts = await self.reader.redis_facts()
        health = await self._health(
            queues,
            observe(recent, waiting, oldest),
            reading,
            backlog_change,
            (facts.used_memory, facts.max_memory),
        )
        figures = window.figures
        served = set(queues)
        return Performance(
            subject=queues[0] if len(queues) == 1 else "",
            window_ms=window.now_ms - window.start_ms,
            wait=figures.wait,
            processing=figures.processing,
            total=figures.total,
            current_per_minute=window.current_per_minute,
            history=[HistoryPoint(minute, f.completed, f.failed) for minute, f in window.minutes],
            trend=window.trend,
            failure_rate=figures.failure_rate,
            health=health,
            workers=[worker for worker in reading.workers if served & set(worker.queues)],
            redis=facts,
        )
