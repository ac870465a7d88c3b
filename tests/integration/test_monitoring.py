"""Monitoring against real Redis, real gRPC servers and real worker processes:
GetStats, GetPerformance, StreamTimings, the collector and /metrics, with
several servers and workers sharing one Redis."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from queueservice.v1 import admin_service_pb2 as pb
from queueservice.v1 import admin_service_pb2_grpc, queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.core.keys import QueueKeys, ServiceKeys
from queueservice_server.core.redis import time_ms
from queueservice_server.monitor.figures import MINUTE_MS
from queueservice_server.settings import Settings
from tests.support import ServerThread, WorkerProcess, wait_for

StartWorker = Callable[..., WorkerProcess]
StartServer = Callable[[Settings], ServerThread]
Admin = admin_service_pb2_grpc.QueueAdminServiceStub
Queue = queue_service_pb2_grpc.QueueServiceStub


@pytest.fixture
def mon(settings: Settings) -> Settings:
    """No rate limit (workloads drain at full speed), a fast collector, a short low-throughput
    grace, and /metrics on a free port."""
    return replace(
        settings, rate_limit_max=0, metrics_interval=0.5, alert_throughput_grace=0.5, metrics_address="127.0.0.1:0"
    )


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    servers: list[ServerThread] = []

    def start(settings: Settings) -> ServerThread:
        server = ServerThread(settings)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


class Client:
    def __init__(self, server: ServerThread, options: Sequence[tuple[str, Any]] = ()) -> None:
        assert server.app is not None
        self.server = server
        self.address = f"127.0.0.1:{server.app.port}"
        self.channel = grpc.insecure_channel(self.address, options=options)
        self.queue = Queue(self.channel)
        self.admin = Admin(self.channel)

    def close(self) -> None:
        self.channel.close()

    def enqueue(self, count: int, task: str = "diag.noop", queue: str = "", **fields: Any) -> list[str]:
        ids: list[str] = []
        for start in range(0, count, 1000):
            jobs = [
                queue_service_pb2.EnqueueRequest(task=task, queue=queue, **fields)
                for _ in range(min(1000, count - start))
            ]
            reply = self.queue.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=jobs))
            ids += [result.job_id for result in reply.results]
        return ids

    def stats(self, queue: str = "default") -> pb.QueueStats:
        (stats,) = self.admin.GetStats(pb.GetStatsRequest(queue=queue)).queues
        return stats

    def drained(self, queue: str, finished: int) -> bool:
        counts = self.stats(queue).counts
        done = counts.completed + counts.evicted_completed + counts.failed + counts.evicted_failed
        return counts.waiting == counts.active == counts.delayed == 0 and done == finished

    def wait_drained(self, finished: int, queue: str = "default", timeout: float = 30) -> None:
        wait_for(lambda: self.drained(queue, finished), timeout, what=f"{finished} jobs finished on {queue}")


class Connect(Protocol):
    def __call__(self, server: ServerThread, options: Sequence[tuple[str, Any]] = ()) -> Client: ...


@pytest.fixture
def connect() -> Iterator[Connect]:
    clients: list[Client] = []

    def make(server: ServerThread, options: Sequence[tuple[str, Any]] = ()) -> Client:
        client = Client(server, options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


class Subscription:
    """A StreamTimings call, read by a background thread (or not read at all until `start`)."""

    def __init__(self, client: Client, request: pb.StreamTimingsRequest, read: bool = True) -> None:
        self.call = client.admin.StreamTimings(request)
        self.messages: list[pb.StreamTimingsResponse] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        if read:
            self.start()

    def start(self) -> None:
        self.thread.start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.append(message)
        except grpc.RpcError as exc:
            self.error = exc

    def wait_count(self, count: int, timeout: float = 20) -> list[pb.StreamTimingsResponse]:
        wait_for(lambda: len(self.messages) >= count, timeout, what=f"{count} timings")
        return self.messages[:count]

    def cancel(self) -> None:
        self.call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
        self.thread.join(5)

    def job_ids(self) -> list[str]:
        return [message.timing.job_id for message in self.messages]


def kinds(alerts: Any) -> set[int]:
    return {alert.kind for alert in alerts}


# Replicas agree.


def test_two_servers_and_two_workers_agree(
    mon: Settings, start_server: StartServer, connect: Connect, worker_factory: StartWorker
) -> None:
    a, b = connect(start_server(mon)), connect(start_server(mon))
    worker_factory(mon)
    worker_factory(mon)
    live = Subscription(a, pb.StreamTimingsRequest(last_n=1))
    probe = b.enqueue(1)
    assert live.wait_count(1)[0].timing.job_id == probe[0]
    # The subscriber is live now: everything that follows reaches it as it finishes.
    sleepers = b.enqueue(8, "diag.sleep", payload=_struct({"seconds": 0.2}))
    emails = b.enqueue(5, queue="emails")
    b.wait_drained(9)
    b.wait_drained(5, "emails")
    live.wait_count(14)
    time.sleep(0.3)
    assert sorted(live.job_ids()) == sorted(probe + sleepers + emails)
    assert {message.timing.queue for message in live.messages} == {"default", "emails"}
    # Both `worker` processes ran jobs that server B enqueued and server A streamed: a job's
    # worker id is `host:consumer pid:process pid`, and the process's parent is that consumer.
    runners = {b.queue.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)).job.worker_id for job_id in sleepers}
    consumers = {_parent_pid(int(runner.split(":")[2])) for runner in runners}
    assert consumers == {int(runner.split(":")[1]) for runner in runners}

    from_a, from_b = a.admin.GetStats(pb.GetStatsRequest()), b.admin.GetStats(pb.GetStatsRequest())
    assert [q.queue for q in from_a.queues] == ["default", "emails"]
    for qa, qb in zip(from_a.queues, from_b.queues, strict=True):
        assert qa.counts == qb.counts
        assert (qa.health.level, qa.health.active_workers) == (qb.health.level, qb.health.active_workers)
        assert qa.health.active_workers == 2
        assert qa.performance.avg_processing_time == qb.performance.avg_processing_time
    assert from_a.queues[0].counts.completed == 9 and from_a.queues[1].counts.completed == 5
    perf_a = a.admin.GetPerformance(pb.GetPerformanceRequest())
    perf_b = b.admin.GetPerformance(pb.GetPerformanceRequest())
    assert perf_a.processing_time == perf_b.processing_time
    assert [w.id for w in perf_a.workers] == [w.id for w in perf_b.workers]
    assert {w.pid for w in perf_a.workers} == consumers
    assert len(consumers) == 2
    live.cancel()


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


# Known workloads give the expected figures.


def _redis_ms(client: redis.Redis) -> int:
    return time_ms(client.time())


def _span_minutes(now_ms: int, window_s: float) -> float:
    first = (now_ms - int(window_s * 1000)) // MINUTE_MS
    return (now_ms - first * MINUTE_MS) / MINUTE_MS


SLEEP_S = 0.4
# Processing is measured by the worker around the task: the sleep, plus a few ms of its own work.
PROCESSING_TOLERANCE_S = 0.2


def test_sleep_workload_gives_its_processing_time_and_throughput(
    mon: Settings, start_server: StartServer, connect: Connect, worker_factory: StartWorker
) -> None:
    client = connect(start_server(mon))
    worker_factory(mon, worker_concurrency=3)
    jobs = 6
    client.enqueue(jobs, "diag.sleep", payload=_struct({"seconds": SLEEP_S}))
    client.wait_drained(jobs)

    report = client.admin.GetPerformance(pb.GetPerformanceRequest(queue="default"))
    processing = report.processing_time
    assert processing.count == jobs
    avg = processing.avg.ToMilliseconds() / 1000
    assert SLEEP_S <= avg <= SLEEP_S + PROCESSING_TOLERANCE_S
    # Percentiles come from buckets 25 % wide: the bucket holding the true value, capped at the maximum.
    for percentile in (processing.p50, processing.p95, processing.p99):
        assert SLEEP_S <= percentile.ToMilliseconds() / 1000 <= (SLEEP_S + PROCESSING_TOLERANCE_S) * 1.25
    assert processing.max.ToMilliseconds() >= processing.p99.ToMilliseconds()
    assert report.wait_time.count == report.total_time.count == jobs
    assert report.total_time.avg.ToMilliseconds() == pytest.approx(
        report.wait_time.avg.ToMilliseconds() + processing.avg.ToMilliseconds(), abs=1
    )
    assert sum(point.completed for point in report.throughput.history) == jobs
    assert report.throughput.current_per_minute == report.throughput.history[-2].completed
    assert report.failure_rate == 0
    assert report.health_level in (pb.HEALTH_LEVEL_EXCELLENT, pb.HEALTH_LEVEL_GOOD)
    assert report.window.seconds >= 3600

    # Throughput: the jobs finished over the alert window's span, which ends at the server's
    # Redis clock reading (between these two of ours).
    direct = redis.Redis.from_url(mon.redis_url)
    before = _redis_ms(direct)
    stats = client.stats()
    after = _redis_ms(direct)
    spans = [_span_minutes(now, mon.alert_window) for now in (before, after)]
    assert jobs / max(spans) - 1e-6 <= stats.performance.throughput_per_minute <= jobs / min(spans) + 1e-6
    assert stats.performance.avg_processing_time.ToMilliseconds() == processing.avg.ToMilliseconds()
    assert stats.counts.completed == jobs
    print(
        f"\n{jobs} x diag.sleep {SLEEP_S} s: avg processing {avg:.3f} s, p50 {processing.p50.ToMilliseconds()} ms, "
        f"throughput {stats.performance.throughput_per_minute:.2f}/min over {min(spans):.2f}-{max(spans):.2f} min"
    )


def test_failing_workload_trips_the_failure_rate_alert_and_the_level(
    mon: Settings, start_server: StartServer, connect: Connect, worker_factory: StartWorker
) -> None:
    client = connect(start_server(mon))
    worker_factory(mon)
    failing = client.enqueue(4, "diag.fail", max_attempts=1)
    client.enqueue(4)
    client.wait_drained(8)

    stats = client.stats()
    assert stats.health.failure_rate == pytest.approx(0.5)
    assert stats.health.level == pb.HEALTH_LEVEL_CRITICAL
    assert any("'diag.fail'" in line for line in stats.recommendations)
    report = client.admin.GetPerformance(pb.GetPerformanceRequest(queue="default"))
    (alert,) = report.alerts
    assert (alert.kind, alert.severity) == (pb.ALERT_KIND_HIGH_FAILURE_RATE, pb.ALERT_SEVERITY_CRITICAL)
    assert alert.observed == pytest.approx(0.5) and alert.threshold == pytest.approx(0.1)
    assert "50%" in alert.message
    assert report.health_level == pb.HEALTH_LEVEL_CRITICAL
    assert report.failure_rate == pytest.approx(0.5)

    # The newest N timings first, filtered by outcome and task.
    failed = Subscription(client, pb.StreamTimingsRequest(outcome=pb.JOB_OUTCOME_FAILED, last_n=10))
    assert sorted(m.timing.job_id for m in failed.wait_count(4)) == sorted(failing)
    assert all(m.timing.outcome == pb.JOB_OUTCOME_FAILED and m.timing.attempt == 1 for m in failed.messages)
    newest = Subscription(client, pb.StreamTimingsRequest(task="diag.noop", last_n=2))
    newest.wait_count(2)
    time.sleep(0.3)
    assert len(newest.messages) == 2
    assert all(m.timing.task == "diag.noop" for m in newest.messages)
    failed.cancel()
    newest.cancel()


def test_dead_workers_drop_out_and_live_ones_are_reported(
    mon: Settings, start_server: StartServer, connect: Connect, worker_factory: StartWorker
) -> None:
    client = connect(start_server(mon))
    worker_factory(mon)
    direct = redis.Redis.from_url(mon.redis_url)
    service = ServiceKeys(mon.key_prefix)
    ghost = "ghost-host:999"
    stale = _redis_ms(direct) - int(mon.stall_interval * 1000) - 1000
    direct.zadd(service.workers, {ghost: stale})
    fields = {"host": "ghost-host", "pid": 999, "concurrency": 9, "queues": "default"}
    direct.hset(service.worker(ghost), mapping=fields)  # type: ignore[arg-type]

    def workers() -> Any:
        return client.admin.GetPerformance(pb.GetPerformanceRequest()).workers

    (worker,) = wait_for(workers, 10, what="the live worker in the registry")
    assert worker.id != ghost
    assert (worker.concurrency, worker.busy) == (mon.concurrency, 0)
    assert worker.pid > 0 and worker.host and worker.memory_bytes > 0
    assert list(worker.queues) == ["default", "emails"]
    assert abs(worker.last_heartbeat_time.ToMilliseconds() - _redis_ms(direct)) < mon.stall_interval * 1000
    assert direct.zscore(service.workers, ghost) is None
    assert client.stats().health.active_workers == 1


def test_backlog_and_a_stopped_fleet_trip_their_alerts(
    mon: Settings, start_server: StartServer, connect: Connect, worker_factory: StartWorker
) -> None:
    client = connect(start_server(mon))
    worker = worker_factory(mon)
    client.enqueue(2)
    client.wait_drained(2)
    worker.stop()
    wait_for(lambda: client.stats().health.active_workers == 0, 10, what="the stopped worker leaving the registry")
    client.enqueue(60)

    def low_throughput() -> pb.QueueStats | None:
        stats = client.stats()
        return stats if stats.health.level == pb.HEALTH_LEVEL_CRITICAL else None

    # The grace (0.5 s here) keeps a queue that just got work from reading as stuck.
    stats = wait_for(low_throughput, 10, what="the stopped fleet to read as critical")
    assert stats.counts.waiting == 60
    assert stats.health.backlog_ratio == pytest.approx(60 / 50)
    assert stats.oldest_waiting_age.ToMilliseconds() >= 500
    assert any("No live worker" in line for line in stats.recommendations)
    report = client.admin.GetPerformance(pb.GetPerformanceRequest(queue="default"))
    alerts = {alert.kind: alert for alert in report.alerts}
    assert set(alerts) == {pb.ALERT_KIND_BACKLOG, pb.ALERT_KIND_LOW_THROUGHPUT}
    backlog, throughput = alerts[pb.ALERT_KIND_BACKLOG], alerts[pb.ALERT_KIND_LOW_THROUGHPUT]
    assert (backlog.observed, backlog.threshold, backlog.severity) == (60, 50, pb.ALERT_SEVERITY_WARNING)
    # Two jobs over a window of five-odd minutes: well under one a minute.
    assert throughput.observed < 0.5 and throughput.threshold == 1
    assert throughput.severity == pb.ALERT_SEVERITY_CRITICAL
    assert report.health_level == pb.HEALTH_LEVEL_CRITICAL
    assert report.workers == []


# StreamTimings: resume, retention, slow subscribers, shutdown.


def test_reconnecting_with_the_cursor_gets_every_event_exactly_once(
    mon: Settings, start_server: StartServer, connect: Connect, worker_factory: StartWorker
) -> None:
    a, b = connect(start_server(mon)), connect(start_server(mon))
    worker_factory(mon)
    first = Subscription(a, pb.StreamTimingsRequest(last_n=100))
    ids = a.enqueue(6) + a.enqueue(6, queue="emails")
    received = first.wait_count(5)
    first.cancel()
    cursor = received[-1].cursor
    seen = [message.timing.job_id for message in received]
    ids += b.enqueue(5) + b.enqueue(5, queue="emails")
    a.wait_drained(11)
    a.wait_drained(11, "emails")

    # Resume on the other server: the rest, each once, nothing before the cursor.
    resumed = Subscription(b, pb.StreamTimingsRequest(cursor=cursor))
    resumed.wait_count(len(ids) - len(seen))
    time.sleep(0.5)
    assert sorted(seen + resumed.job_ids()) == sorted(ids)
    assert all(message.missed_count == 0 and message.dropped_count == 0 for message in resumed.messages)
    # And it goes on live: a new job arrives once.
    late = a.enqueue(1)
    resumed.wait_count(len(ids) - len(seen) + 1)
    assert resumed.messages[-1].timing.job_id == late[0]
    resumed.cancel()


def test_a_cursor_behind_retention_is_told_how_many_it_missed(
    mon: Settings, start_server: StartServer, connect: Connect, worker_factory: StartWorker
) -> None:
    # The workers trim the timings stream (MAXLEN ~, so to a little over this, in whole nodes).
    short = replace(mon, timings_retained=10)
    client = connect(start_server(short))
    worker_factory(short)
    client.enqueue(1)
    first = Subscription(client, pb.StreamTimingsRequest(queue="default", last_n=1))
    cursor = first.wait_count(1)[0].cursor
    first.cancel()
    later = client.enqueue(400)
    client.wait_drained(401)
    retained = redis.Redis.from_url(short.redis_url).xlen(QueueKeys(short.key_prefix, "default").timings)
    assert retained < 400

    resumed = Subscription(client, pb.StreamTimingsRequest(queue="default", cursor=cursor))
    resumed.wait_count(retained)
    time.sleep(0.3)
    missed = sum(message.missed_count for message in resumed.messages)
    assert resumed.messages[0].missed_count == missed > 0
    assert len(resumed.messages) == retained
    assert missed + len(resumed.messages) == len(later)
    assert len(set(resumed.job_ids())) == len(resumed.messages)
    assert set(resumed.job_ids()) <= set(later)
    resumed.cancel()


def test_a_subscriber_that_never_reads_does_not_slow_the_workers_and_is_told_of_its_drops(
    mon: Settings,
    start_server: StartServer,
    connect: Connect,
    worker_factory: StartWorker,
    record_property: Callable[[str, object], None],
) -> None:
    server = start_server(mon)
    client = connect(server)
    worker_factory(mon)
    # More events than the silent subscriber's buffer (1000) and its HTTP/2 window hold.
    jobs = 5000
    client.enqueue(200)
    client.wait_drained(200)

    def drain(count: int) -> float:
        done = client.stats().counts
        already = done.completed + done.evicted_completed
        started = time.perf_counter()
        client.enqueue(count)
        client.wait_drained(already + count, timeout=60)
        return time.perf_counter() - started

    def stream_end() -> str:
        probe = Subscription(client, pb.StreamTimingsRequest(queue="default", last_n=1))
        cursor = probe.wait_count(1)[0].cursor
        probe.cancel()
        return cursor

    alone = drain(jobs)
    # From the stream's end as it is now, so it accounts for exactly what follows. Its channel keeps
    # HTTP/2's initial window (no BDP growth), so what the network holds for it is small and steady.
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
    silent = Subscription(connect(server, small_window), pb.StreamTimingsRequest(cursor=stream_end()), read=False)
    wait_for(lambda: _subscribers(server) == 1, 10, what="the silent subscriber attached")
    # Past its catch-up (nothing to read yet) it is live: what overflows from now on is dropped.
    time.sleep(0.3)
    with_silent = drain(jobs)
    alone_again = drain(jobs)
    finished = client.stats().counts
    # The workers finished every job of every round.
    assert finished.completed + finished.evicted_completed == 200 + 3 * jobs
    for name, seconds in (("alone", alone), ("with_silent", with_silent), ("alone_again", alone_again)):
        record_property(f"drain_s_{name}", round(seconds, 3))
    print(
        f"\n{jobs} noop jobs drained in {alone:.2f} s alone, {with_silent:.2f} s with a never-reading "
        f"subscriber, {alone_again:.2f} s alone again"
    )

    # While the silent one stays blocked, another subscriber gets every new event.
    reading = Subscription(client, pb.StreamTimingsRequest(cursor=stream_end()))
    wait_for(lambda: _subscribers(server) == 2, 10, what="the reading subscriber attached")
    drain(10)
    assert len(reading.wait_count(10)) == 10
    assert sum(message.dropped_count for message in reading.messages) == 0

    # The silent one, once it reads, is told what it lost: every event is delivered or counted.
    silent.start()
    total = 2 * jobs + 10
    wait_for(
        lambda: len(silent.messages) + sum(m.dropped_count for m in silent.messages) >= total,
        20,
        what="the silent subscriber's messages and drops to account for every event",
    )
    dropped = sum(message.dropped_count for message in silent.messages)
    assert dropped > 0
    assert len(silent.messages) + dropped == total
    assert _dropped(server) == dropped
    silent.cancel()
    reading.cancel()


def _sample(server: ServerThread, name: str) -> float:
    assert server.app is not None
    value = server.app.monitoring.metrics.registry.get_sample_value(name)
    return value or 0.0


def _subscribers(server: ServerThread) -> float:
    return _sample(server, "queueservice_stream_subscribers")


def _dropped(server: ServerThread) -> float:
    return _sample(server, "queueservice_stream_dropped_events_total")


def test_streams_end_cleanly_when_the_server_stops(mon: Settings) -> None:
    server = ServerThread(mon)
    server.start()
    assert server.app is not None
    metrics_port = server.app.metrics_port
    client = Client(server)
    try:
        subscriptions = [Subscription(client, pb.StreamTimingsRequest(queue=q)) for q in ("default", "emails", "")]
        wait_for(lambda: _subscribers(server) == 3, 10, what="three subscribers attached")
        server.stop()
        for subscription in subscriptions:
            subscription.thread.join(5)
            assert not subscription.thread.is_alive()
            assert subscription.error is None
            assert subscription.call.code() == grpc.StatusCode.OK
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
    finally:
        client.close()


# The collector and Prometheus.


def test_one_collector_per_queue_across_replicas(mon: Settings, start_server: StartServer) -> None:
    # A long interval: the test drives the rounds itself, after the servers' first ones.
    slow = replace(mon, metrics_interval=3600)
    a, b = start_server(slow), start_server(slow)
    direct = redis.Redis.from_url(slow.redis_url)
    keys = {queue: QueueKeys(slow.key_prefix, queue) for queue in slow.queues}

    def snapshots() -> int:
        return sum(direct.xlen(k.snapshots) for k in keys.values())

    # The servers' first rounds, at start: one snapshot per queue, whichever replica took it.
    wait_for(lambda: snapshots() == len(slow.queues), 10, what="the first round")
    time.sleep(0.2)
    assert snapshots() == len(slow.queues)
    for k in keys.values():
        direct.delete(k.collector_lock)
    client = Client(a)
    try:
        client.enqueue(3)
    finally:
        client.close()
    rounds = []
    for server in (a, b, a, b):
        assert server.app is not None
        rounds.append(server.run(server.app.monitoring.collector.collect()))
    # The locks were free once: the first round took both queues, the others none.
    assert rounds == [["default", "emails"], [], [], []]
    newest: list[tuple[bytes, dict[bytes, bytes]]] = direct.xrevrange(keys["default"].snapshots, count=1)  # type: ignore[assignment]
    ((_, snapshot),) = newest
    assert int(snapshot[b"waiting"]) == 3 and int(snapshot[b"oldest_wait_ms"]) >= 0
    assert direct.xlen(keys["default"].snapshots) == 2


def test_metrics_parse_and_match_get_stats(
    mon: Settings, start_server: StartServer, connect: Connect, worker_factory: StartWorker
) -> None:
    server = start_server(replace(mon, keep_completed=3))
    client = connect(server)
    worker_factory(replace(mon, keep_completed=3), queues=("default",))
    client.enqueue(5)
    client.enqueue(2, "diag.fail", max_attempts=1)
    client.enqueue(3, delay=_duration(60))
    client.enqueue(2, queue="emails")

    def settled() -> bool:
        counts = client.stats().counts
        return (counts.completed + counts.evicted_completed, counts.failed, counts.waiting, counts.active) == (
            5,
            2,
            0,
            0,
        )

    wait_for(settled, 20, what="the default queue's jobs to finish")
    stats = {q.queue: q for q in client.admin.GetStats(pb.GetStatsRequest()).queues}
    assert server.app is not None
    # Histograms cover finished minutes: fold this one as if it had ended.
    keys = QueueKeys(mon.key_prefix, "default")
    now = _redis_ms(redis.Redis.from_url(mon.redis_url))
    assert server.run(server.app.monitoring.collector.fold(keys, now + MINUTE_MS)) >= 1

    body = urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=5).read().decode()
    families = {family.name: family for family in text_string_to_metric_families(body)}
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    for queue, queue_stats in stats.items():
        counts = queue_stats.counts
        for state in ("waiting", "active", "delayed", "completed", "failed"):
            assert value("queueservice_jobs", queue=queue, state=state) == getattr(counts, state), (queue, state)
        assert value("queueservice_jobs_evicted_total", queue=queue, state="completed") == counts.evicted_completed
        assert value("queueservice_jobs_evicted_total", queue=queue, state="failed") == counts.evicted_failed
    assert stats["default"].counts.evicted_completed == 2
    assert stats["emails"].counts.waiting == 2
    assert stats["default"].counts.delayed == 3
    assert value("queueservice_attempts_total", queue="default", outcome="completed") == 5
    assert value("queueservice_attempts_total", queue="default", outcome="failed") == 2
    assert value("queueservice_job_processing_seconds_count", queue="default") == 7
    assert value("queueservice_job_wait_seconds_bucket", queue="default", le="+Inf") == 7
    assert value("queueservice_redis_up") == 1
    assert value("queueservice_rpc_requests_total", method="GetStats", code="OK") >= 2
    assert value("queueservice_rpc_requests_total", method="EnqueueBatch", code="OK") == 4
    assert families["queueservice_rpc_duration_seconds"].type == "histogram"
    assert value("queueservice_stream_subscribers") == 0

    # Another replica reports the same queue figures.
    other = start_server(replace(mon, keep_completed=3))
    assert other.app is not None
    again = urllib.request.urlopen(f"http://127.0.0.1:{other.app.metrics_port}/metrics", timeout=5).read().decode()
    same = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(again)
        if family.name.startswith(("queueservice_jobs", "queueservice_attempts", "queueservice_job_"))
        for sample in family.samples
    }
    assert same == {key: v for key, v in samples.items() if key in same}
    assert len(same) > 20


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(int(seconds * 1000))
    return duration


# Cost and errors.


# Only on the suite's own Redis: command counts on a shared one include other clients' commands.
@pytest.mark.parametrize("redis_url", ["embedded"], indirect=True)
def test_get_stats_work_does_not_grow_with_the_backlog(
    mon: Settings, redis_url: str, start_server: StartServer, connect: Connect
) -> None:
    client = connect(start_server(replace(mon, metrics_interval=3600)))
    direct = redis.Redis.from_url(mon.redis_url)
    # The collector's first round (at start, then hourly here) is not part of what is counted.
    folded = [QueueKeys(mon.key_prefix, queue).histograms for queue in mon.queues]
    wait_for(lambda: all(direct.hexists(key, "folded") for key in folded), 10, what="the collector's first round")

    def commands_per_call() -> int:
        def total() -> int:
            stats = direct.info("commandstats")
            return sum(int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_ping", "cmdstat_info"))

        before = total()
        client.stats()
        return total() - before

    client.enqueue(10)
    small = commands_per_call()
    client.enqueue(5000)
    assert client.stats().counts.waiting == 5010
    assert commands_per_call() == small


def test_monitoring_requests_are_validated(mon: Settings, start_server: StartServer, connect: Connect) -> None:
    client = connect(start_server(mon))

    def error(call: Callable[[], object]) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        return caught.value

    assert error(lambda: client.admin.GetStats(pb.GetStatsRequest(queue="nope"))).code() == grpc.StatusCode.NOT_FOUND
    bad_window = pb.GetPerformanceRequest(window=_duration(5))
    invalid = error(lambda: client.admin.GetPerformance(bad_window))
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT and "window" in (invalid.details() or "")
    for request, field in [
        (pb.StreamTimingsRequest(cursor="not-a-cursor"), "cursor"),
        (pb.StreamTimingsRequest(cursor="other/1-0/1"), "cursor"),
        (pb.StreamTimingsRequest(task="no.such.task"), "task"),
        (pb.StreamTimingsRequest(last_n=-1), "last_n"),
        (pb.StreamTimingsRequest(outcome=99), "outcome"),  # type: ignore[arg-type]
    ]:
        invalid = error(lambda r=request: list(client.admin.StreamTimings(r, timeout=5)))  # type: ignore[misc]
        assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (invalid.details() or "")
    missing = error(lambda: list(client.admin.StreamTimings(pb.StreamTimingsRequest(queue="nope"), timeout=5)))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    # Each call is counted under its final code.
    assert client.server.app is not None
    registry = client.server.app.monitoring.metrics.registry
    calls = [("GetStats", "NOT_FOUND"), ("GetPerformance", "INVALID_ARGUMENT"), ("StreamTimings", "NOT_FOUND")]

    def counted() -> bool:
        found = [registry.get_sample_value("queueservice_rpc_requests_total", dict(method=m, code=c)) for m, c in calls]
        return found == [1, 1, 1]

    # A call is counted as its handler ends, a moment after the caller has its status.
    wait_for(counted, 5, what="the failed calls counted by method and code")
