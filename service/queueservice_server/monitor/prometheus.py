"""Prometheus metrics, served over HTTP by prometheus-client on QUEUE_METRICS_ADDRESS.

Queue figures are read from Redis when scraped, so every replica reports the
same values (aggregate them across replicas with max(), not sum()):
  queueservice_jobs{queue,state}                  jobs per state (completed/failed: retained records)
  queueservice_jobs_evicted_total{queue,state}    finished records evicted by retention
  queueservice_attempts_total{queue,outcome}      finished attempts by outcome (completed, failed, retried)
  queueservice_job_wait_seconds{queue}            histogram of waits, and of processing times in
  queueservice_job_processing_seconds{queue}      ..._processing_seconds; both cover finished minutes
                                                  (the collector folds them in, so they lag by up to
                                                  a minute plus QUEUE_METRICS_INTERVAL)
  queueservice_redis_up                           whether the scrape could read Redis
This process's own:
  queueservice_stream_subscribers, queueservice_stream_dropped_events_total
  queueservice_rpc_requests_total{method,code}, queueservice_rpc_duration_seconds{method}
    (registered on the same registry by api/rpc_metrics.py)

Each server has a registry of its own, so several servers can live in one
process (tests) without clashing.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from queueservice_server.core.timings import bucket_upper_ms
from queueservice_server.monitor.figures import Distribution
from queueservice_server.monitor.reader import Reader
from queueservice_server.settings import Settings

log = logging.getLogger(__name__)

# Histogram bounds (seconds) for job times: from a fast task's wait to the default hour-long window.
JOB_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def histogram_buckets(distribution: Distribution) -> list[tuple[str, float]]:
    """Our log buckets regrouped under JOB_BUCKETS: a bucket counts under the first bound at or
    above its upper end, so every count under `le` truly is <= le."""
    counts = [0] * (len(JOB_BUCKETS) + 1)
    for index, count in distribution.buckets.items():
        upper_s = bucket_upper_ms(index) / 1000
        counts[bisect.bisect_left(JOB_BUCKETS, upper_s)] += count
    cumulative = 0
    rows: list[tuple[str, float]] = []
    for bound, count in zip([*map(str, JOB_BUCKETS), "+Inf"], counts, strict=True):
        cumulative += count
        rows.append((bound, float(cumulative)))
    return rows


class QueueFigures:
    """A prometheus-client collector that reads Redis at scrape time, on the server's event loop
    (the scrape runs in prometheus-client's HTTP thread, which waits for it)."""

    def __init__(self, settings: Settings, reader: Reader) -> None:
        self.settings = settings
        self.reader = reader
        self.loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("queueservice_redis_up", "1 when this scrape could read the queues from Redis")
        if self.loop is None:
            up.add_metric([], 0)
            yield up
            return
        future = asyncio.run_coroutine_threadsafe(self.reader.totals(self.settings.queues), self.loop)
        try:
            totals = future.result(self.settings.redis_command_timeout + 1)
        except Exception as exc:
            future.cancel()
            log.warning("metrics scrape could not read Redis", extra={"error": str(exc)})
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("queueservice_jobs", "Jobs per queue and state", labels=["queue", "state"])
        evicted = CounterMetricFamily(
            "queueservice_jobs_evicted", "Finished job records evicted by retention", labels=["queue", "state"]
        )
        attempts = CounterMetricFamily(
            "queueservice_attempts", "Finished attempts by outcome", labels=["queue", "outcome"]
        )
        wait = HistogramMetricFamily("queueservice_job_wait_seconds", "Time jobs waited", labels=["queue"])
        processing = HistogramMetricFamily("queueservice_job_processing_seconds", "Time attempts ran", labels=["queue"])
        for queue in totals:
            counts = queue.counts
            for state, value in (
                ("waiting", counts.waiting),
                ("active", counts.active),
                ("delayed", counts.delayed),
                ("completed", counts.completed),
                ("failed", counts.failed),
            ):
                jobs.add_metric([queue.queue, state], value)
            evicted.add_metric([queue.queue, "completed"], counts.evicted_completed)
            evicted.add_metric([queue.queue, "failed"], counts.evicted_failed)
            attempts.add_metric([queue.queue, "completed"], queue.completed)
            attempts.add_metric([queue.queue, "failed"], queue.failed)
            attempts.add_metric([queue.queue, "retried"], queue.retried)
            for family, distribution in ((wait, queue.folded.wait), (processing, queue.folded.processing)):
                family.add_metric([queue.queue], histogram_buckets(distribution), sum_value=distribution.sum_ms / 1000)
        yield from (jobs, evicted, attempts, wait, processing)


class Metrics:
    def __init__(self, settings: Settings, reader: Reader) -> None:
        self.registry = CollectorRegistry()
        self.stream_subscribers = Gauge(
            "queueservice_stream_subscribers", "Open StreamTimings subscriptions", registry=self.registry
        )
        self.stream_dropped = Counter(
            "queueservice_stream_dropped_events",
            "Timings dropped because a subscriber's buffer was full",
            registry=self.registry,
        )
        self.queue_figures = QueueFigures(settings, reader)
        self.registry.register(self.queue_figures)
        self._httpd: WSGIServer | None = None

    def serve(self, address: str, loop: asyncio.AbstractEventLoop) -> int:
        """Starts /metrics on `address` (host:port, port 0 = any free one); returns the bound port."""
        host, _, port = address.rpartition(":")
        self.queue_figures.loop = loop
        self._httpd, _ = start_http_server(int(port), host.strip("[]") or "0.0.0.0", registry=self.registry)
        bound: int = self._httpd.server_address[1]
        return bound

    def shutdown(self) -> None:
        """Blocking (up to prometheus-client's poll interval): call it off the event loop."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
