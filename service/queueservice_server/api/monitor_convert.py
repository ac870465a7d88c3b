"""Monitoring answers (monitor.reports, monitor.streaming) to protobuf messages."""

from __future__ import annotations

from google.protobuf import duration_pb2

from queueservice.v1 import admin_service_pb2 as pb
from queueservice_server.api.convert import duration_ms, timestamp_ms
from queueservice_server.core.timings import Outcome
from queueservice_server.monitor.alerts import Alert, Kind, Level, Severity
from queueservice_server.monitor.events import Event
from queueservice_server.monitor.figures import MINUTE_MS, Distribution, Trend
from queueservice_server.monitor.reader import RedisFacts, WorkerEntry
from queueservice_server.monitor.reports import Performance, QueueStats
from queueservice_server.monitor.streaming import Delivery

LEVELS = {
    Level.EXCELLENT: pb.HEALTH_LEVEL_EXCELLENT,
    Level.GOOD: pb.HEALTH_LEVEL_GOOD,
    Level.WARNING: pb.HEALTH_LEVEL_WARNING,
    Level.CRITICAL: pb.HEALTH_LEVEL_CRITICAL,
}
KINDS = {
    Kind.HIGH_WAIT_TIME: pb.ALERT_KIND_HIGH_WAIT_TIME,
    Kind.SLOW_PROCESSING: pb.ALERT_KIND_SLOW_PROCESSING,
    Kind.LOW_THROUGHPUT: pb.ALERT_KIND_LOW_THROUGHPUT,
    Kind.HIGH_FAILURE_RATE: pb.ALERT_KIND_HIGH_FAILURE_RATE,
    Kind.BACKLOG: pb.ALERT_KIND_BACKLOG,
}
SEVERITIES = {Severity.WARNING: pb.ALERT_SEVERITY_WARNING, Severity.CRITICAL: pb.ALERT_SEVERITY_CRITICAL}
TRENDS = {Trend.STABLE: pb.TREND_STABLE, Trend.RISING: pb.TREND_RISING, Trend.FALLING: pb.TREND_FALLING}
OUTCOMES = {
    Outcome.COMPLETED: pb.JOB_OUTCOME_COMPLETED,
    Outcome.FAILED: pb.JOB_OUTCOME_FAILED,
    Outcome.RETRY: pb.JOB_OUTCOME_RETRYING,
    Outcome.TIMED_OUT: pb.JOB_OUTCOME_TIMED_OUT,
}
OUTCOME_FILTERS = {value: key for key, value in OUTCOMES.items()}


def _ms(value: float) -> int:
    return round(value)


def _micros(ms: float) -> duration_pb2.Duration:
    # A PING on loopback takes well under a millisecond: keep its microseconds.
    duration = duration_pb2.Duration()
    duration.FromMicroseconds(round(ms * 1000))
    return duration


def stats_to_proto(stats: QueueStats) -> pb.QueueStats:
    counts, seen = stats.counts, stats.health.observed
    return pb.QueueStats(
        queue=stats.queue,
        counts=pb.JobCounts(
            waiting=counts.waiting,
            active=counts.active,
            delayed=counts.delayed,
            completed=counts.completed,
            failed=counts.failed,
            evicted_completed=counts.evicted_completed,
            evicted_failed=counts.evicted_failed,
        ),
        oldest_waiting_age=duration_ms(counts.oldest_wait_ms),
        performance=pb.PerformanceSummary(
            avg_wait_time=duration_ms(_ms(seen.avg_wait_s * 1000)),
            avg_processing_time=duration_ms(_ms(seen.avg_processing_s * 1000)),
            throughput_per_minute=seen.throughput_per_minute,
        ),
        health=pb.HealthIndicators(
            level=LEVELS[stats.health.level],
            backlog_ratio=stats.backlog_ratio,
            failure_rate=seen.failure_rate,
            active_workers=stats.active_workers,
        ),
        recommendations=stats.health.recommendations,
    )


def _summary(distribution: Distribution) -> pb.TimingSummary:
    return pb.TimingSummary(
        count=distribution.count,
        avg=duration_ms(_ms(distribution.avg_ms)),
        p50=duration_ms(_ms(distribution.percentile(0.50))),
        p95=duration_ms(_ms(distribution.percentile(0.95))),
        p99=duration_ms(_ms(distribution.percentile(0.99))),
        max=duration_ms(distribution.max_ms),
    )


def alert_to_proto(alert: Alert) -> pb.Alert:
    return pb.Alert(
        kind=KINDS[alert.kind],
        severity=SEVERITIES[alert.severity],
        observed=alert.observed,
        threshold=alert.threshold,
        message=alert.message,
    )


def _worker(worker: WorkerEntry) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        id=worker.id,
        host=worker.host,
        pid=worker.pid,
        concurrency=worker.concurrency,
        busy=worker.busy,
        last_heartbeat_time=timestamp_ms(worker.heartbeat_ms),
        memory_bytes=worker.rss_bytes,
        queues=worker.queues,
    )


def _redis(facts: RedisFacts) -> pb.RedisInfo:
    return pb.RedisInfo(
        used_memory_bytes=facts.used_memory,
        max_memory_bytes=facts.max_memory,
        fragmentation_ratio=facts.fragmentation,
        connected_clients=facts.clients,
        ping_latency=_micros(facts.ping_ms),
    )


def performance_to_proto(report: Performance) -> pb.GetPerformanceResponse:
    return pb.GetPerformanceResponse(
        queue=report.subject,
        window=duration_ms(report.window_ms),
        wait_time=_summary(report.wait),
        processing_time=_summary(report.processing),
        total_time=_summary(report.total),
        throughput=pb.Throughput(
            current_per_minute=report.current_per_minute,
            history=[
                pb.ThroughputPoint(
                    minute_start_time=timestamp_ms(point.minute * MINUTE_MS),
                    completed=point.completed,
                    failed=point.failed,
                )
                for point in report.history
            ],
            trend=TRENDS[report.trend],
        ),
        failure_rate=report.failure_rate,
        health_level=LEVELS[report.health.level],
        alerts=[alert_to_proto(alert) for alert in report.health.alerts],
        workers=[_worker(worker) for worker in report.workers],
        redis=_redis(report.redis),
        recommendations=report.health.recommendations,
    )


def timing_to_proto(event: Event) -> pb.JobTiming:
    ready_ms = event.start_ms - event.wait_ms
    return pb.JobTiming(
        job_id=f"{event.queue}:{event.job}",
        task=event.task,
        queue=event.queue,
        outcome=OUTCOMES[event.outcome],
        attempt=event.attempt,
        # When the attempt became ready to run: its enqueue time, or the end of its delay or backoff.
        enqueue_time=timestamp_ms(ready_ms),
        start_time=timestamp_ms(event.start_ms),
        finish_time=timestamp_ms(event.finish_ms),
        wait_time=duration_ms(event.wait_ms),
        processing_time=duration_ms(event.proc_ms),
        total_time=duration_ms(event.wait_ms + event.proc_ms),
    )


def delivery_to_proto(delivery: Delivery) -> pb.StreamTimingsResponse:
    return pb.StreamTimingsResponse(
        timing=timing_to_proto(delivery.event),
        cursor=delivery.cursor,
        missed_count=delivery.missed,
        dropped_count=delivery.dropped,
    )
