"""Monitoring's pure parts: window figures, percentiles, trend, alert rules and the
health level, recommendations, cursors, subscriber buffers, Prometheus buckets."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from queueservice_server.core.timings import Attempt, Outcome, bucket, bucket_upper_ms
from queueservice_server.monitor.alerts import (
    Capacity,
    Failing,
    Kind,
    Level,
    Observed,
    Severity,
    Situation,
    Thresholds,
    evaluate,
    level,
    recommendations,
)
from queueservice_server.monitor.events import (
    ORIGIN,
    CursorError,
    Event,
    Filter,
    Position,
    decode_cursor,
    encode_cursor,
    parse_event,
)
from queueservice_server.monitor.figures import MINUTE_MS, Distribution, Figures, Trend, Window, trend, window_minutes
from queueservice_server.monitor.prometheus import JOB_BUCKETS, histogram_buckets
from queueservice_server.monitor.streaming import Subscriber
from queueservice_server.settings import Settings, SettingsError
from tests.figures_model import minute_hash

# Figures.


def attempt(wait: int, proc: int, outcome: Outcome = Outcome.COMPLETED, retried: bool = False) -> Attempt:
    return Attempt(
        local_id="x",
        task="t",
        outcome=outcome,
        attempt=1,
        ready_ms=0,
        start_ms=wait,
        finish_ms=wait + proc,
        holder="h",
        retry_msg=b"next" if retried else b"",
    )


@given(st.lists(st.integers(min_value=0, max_value=3_600_000), min_size=1, max_size=200), st.sampled_from([0.5, 0.95]))
def test_percentile_is_within_one_bucket_of_the_true_value(values: list[int], q: float) -> None:
    figures = Figures.from_hash(minute_hash([attempt(0, v) for v in values]))
    ordered = sorted(values)
    true = ordered[max(1, math.ceil(q * len(values))) - 1]
    got = figures.processing.percentile(q)
    # The reported value is the upper end of the true value's bucket, capped at the maximum.
    assert true <= got <= max(bucket_upper_ms(bucket(true)), 1)
    assert got <= max(values) or max(values) == 0


def test_figures_from_a_minute_hash() -> None:
    attempts = [attempt(100, 500), attempt(300, 1500, Outcome.FAILED), attempt(200, 1000, Outcome.RETRY, retried=True)]
    figures = Figures.from_hash(minute_hash(attempts))
    assert (figures.attempts, figures.completed, figures.failed, figures.retried) == (3, 1, 1, 1)
    # A timed-out attempt counts by the job's move: retried when another attempt follows, else failed.
    timed_out = [attempt(0, 10, Outcome.TIMED_OUT, retried=True), attempt(0, 10, Outcome.TIMED_OUT)]
    moves = Figures.from_hash(minute_hash(timed_out))
    assert (moves.attempts, moves.completed, moves.failed, moves.retried) == (2, 0, 1, 1)
    assert figures.finished == 2
    assert figures.failure_rate == pytest.approx(2 / 3)
    assert figures.wait.avg_ms == 200
    assert figures.processing.avg_ms == 1000
    assert figures.total.max_ms == 1800
    assert sum(figures.processing.buckets.values()) == 3


def test_window_rates_divide_by_the_span_they_cover() -> None:
    now = 100 * MINUTE_MS + 30_000
    minutes = window_minutes(now, 120)
    assert list(minutes) == [98, 99, 100]
    done = Figures(attempts=6, completed=6)
    window = Window(now, [(98, Figures()), (99, done), (100, Figures(attempts=3, completed=2, failed=1))])
    assert window.span_minutes == pytest.approx(2.5)
    assert window.throughput_per_minute == pytest.approx(9 / 2.5)
    assert window.current_per_minute == 6
    assert [m for m, _ in window.tail(60).minutes] == [99, 100]
    assert [m for m, _ in window.tail(30).minutes] == [100]
    merged = Window.merge([window, window])
    assert merged.figures.finished == 18


@pytest.mark.parametrize(
    ("per_minute", "expected"),
    [
        ([], Trend.STABLE),
        ([0, 0, 0, 0, 0, 0], Trend.STABLE),
        ([10, 10, 10, 10, 10, 10], Trend.STABLE),
        ([10, 10, 10, 20, 20, 20], Trend.RISING),
        ([20, 20, 20, 10, 10, 10], Trend.FALLING),
        # Under a job a minute apart: noise on a quiet queue.
        ([0, 0, 0, 0.5, 0.5, 0.5], Trend.STABLE),
        ([10, 11, 10, 11, 10, 11], Trend.STABLE),
        ([5, 5, 99, 9, 9], Trend.RISING),
    ],
)
def test_trend(per_minute: list[float], expected: Trend) -> None:
    assert trend(per_minute) is expected


# Alerts and level.

LIMITS = Thresholds.from_settings(Settings())
QUIET = Observed(
    waiting=0,
    oldest_wait_s=0,
    attempts=100,
    avg_wait_s=1,
    avg_processing_s=1,
    throughput_per_minute=20,
    failure_rate=0,
    window_minutes=5,
)


@pytest.mark.parametrize(
    ("changes", "kinds", "expected_level"),
    [
        ({}, [], Level.EXCELLENT),
        ({"avg_wait_s": 20}, [], Level.GOOD),
        ({"avg_wait_s": 31}, [(Kind.HIGH_WAIT_TIME, Severity.WARNING)], Level.WARNING),
        ({"avg_wait_s": 60}, [(Kind.HIGH_WAIT_TIME, Severity.CRITICAL)], Level.CRITICAL),
        ({"avg_processing_s": 121}, [(Kind.SLOW_PROCESSING, Severity.WARNING)], Level.WARNING),
        ({"failure_rate": 0.06}, [], Level.GOOD),
        ({"failure_rate": 0.15}, [(Kind.HIGH_FAILURE_RATE, Severity.WARNING)], Level.WARNING),
        ({"failure_rate": 1.0}, [(Kind.HIGH_FAILURE_RATE, Severity.CRITICAL)], Level.CRITICAL),
        ({"waiting": 30, "oldest_wait_s": 1}, [], Level.GOOD),
        ({"waiting": 51, "oldest_wait_s": 1}, [(Kind.BACKLOG, Severity.WARNING)], Level.WARNING),
        ({"waiting": 100, "oldest_wait_s": 1}, [(Kind.BACKLOG, Severity.CRITICAL)], Level.CRITICAL),
        # Low throughput needs jobs waiting past the grace.
        ({"throughput_per_minute": 0.0}, [], Level.EXCELLENT),
        ({"throughput_per_minute": 0.0, "waiting": 3, "oldest_wait_s": 10}, [], Level.EXCELLENT),
        (
            {"throughput_per_minute": 0.8, "waiting": 3, "oldest_wait_s": 61},
            [(Kind.LOW_THROUGHPUT, Severity.WARNING)],
            Level.WARNING,
        ),
        (
            {"throughput_per_minute": 0.0, "waiting": 3, "oldest_wait_s": 61, "attempts": 0},
            [(Kind.LOW_THROUGHPUT, Severity.CRITICAL)],
            Level.CRITICAL,
        ),
        # With no attempts in the window, averages and the failure rate say nothing.
        ({"attempts": 0, "avg_wait_s": 99, "failure_rate": 1.0}, [], Level.EXCELLENT),
    ],
)
def test_alert_rules_and_level(
    changes: dict[str, float], kinds: list[tuple[Kind, Severity]], expected_level: Level
) -> None:
    seen = replace(QUIET, **changes)  # type: ignore[arg-type]
    alerts = evaluate(seen, LIMITS)
    assert [(a.kind, a.severity) for a in alerts] == kinds
    assert level(alerts, seen, LIMITS) is expected_level
    for alert in alerts:
        assert alert.message and alert.threshold > 0


observations = st.builds(
    Observed,
    waiting=st.integers(0, 500),
    oldest_wait_s=st.floats(0, 1000),
    attempts=st.integers(0, 1000),
    avg_wait_s=st.floats(0, 1000),
    avg_processing_s=st.floats(0, 1000),
    throughput_per_minute=st.floats(0, 1000),
    failure_rate=st.floats(0, 1),
    window_minutes=st.just(5.0),
)


@given(observations)
def test_level_follows_the_worst_alert(seen: Observed) -> None:
    alerts = evaluate(seen, LIMITS)
    got = level(alerts, seen, LIMITS)
    if any(a.severity is Severity.CRITICAL for a in alerts):
        assert got is Level.CRITICAL
    elif alerts:
        assert got is Level.WARNING
    else:
        assert got in (Level.GOOD, Level.EXCELLENT)
    for alert in alerts:
        if alert.kind is Kind.LOW_THROUGHPUT:
            assert alert.observed < alert.threshold
        else:
            assert alert.observed > alert.threshold


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUEUE_METRICS_ADDRESS", "9464"),
        ("QUEUE_METRICS_INTERVAL", "0"),
        ("QUEUE_PERFORMANCE_WINDOW", "999999"),
        ("QUEUE_ALERT_WINDOW", "-1"),
        ("QUEUE_ALERT_FAILURE_RATE", "1.5"),
        ("QUEUE_ALERT_BACKLOG", "0"),
        ("QUEUE_ALERT_AVG_WAIT", "0"),
        ("QUEUE_STREAM_BUFFER", "0"),
        ("QUEUE_ALERT_BACKLOG", "many"),
    ],
)
def test_bad_monitoring_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_thresholds_come_from_settings() -> None:
    settings = Settings.from_env({"QUEUE_ALERT_BACKLOG": "5", "QUEUE_ALERT_FAILURE_RATE": "0.5"})
    limits = Thresholds.from_settings(settings)
    assert (limits.backlog, limits.failure_rate, limits.avg_wait_s) == (5, 0.5, 30)


def test_recommendations_follow_the_numbers() -> None:
    busy = Situation("queue 'default'", Capacity(workers=2, slots=4, busy=4))
    seen = replace(QUIET, waiting=80, oldest_wait_s=40, avg_wait_s=45)
    advice = recommendations(evaluate(seen, LIMITS), seen, busy)
    assert any("All 4 worker slots" in line and "add workers" in line for line in advice)

    nobody = Situation("queue 'default'", Capacity(0, 0, 0))
    assert any("No live worker" in line for line in recommendations([], replace(QUIET, waiting=1), nobody))

    limited = Situation("queue 'default'", Capacity(1, 4, 1), rate_limit_per_minute=100)
    seen = replace(QUIET, waiting=80, oldest_wait_s=40, throughput_per_minute=99)
    assert any("rate limit" in line for line in recommendations(evaluate(seen, LIMITS), seen, limited))

    failing = Situation("queue 'default'", Capacity(1, 4, 0), failing=[Failing("billing.charge", 9, 20, "KeyError: x")])
    seen = replace(QUIET, failure_rate=0.45)
    (line,) = recommendations(evaluate(seen, LIMITS), seen, failing)
    assert "'billing.charge'" in line and "KeyError" in line and "RetryFailed" in line

    growing = Situation("queue 'default'", Capacity(1, 4, 0), backlog_change=(10, 40, 5.0))
    assert any("grew from 10 to 40" in line for line in recommendations([], QUIET, growing))
    full = Situation("queue 'default'", Capacity(1, 4, 0), redis_memory=(90, 100))
    assert any("maxmemory" in line for line in recommendations([], QUIET, full))
    assert recommendations([], QUIET, Situation("queue 'default'", Capacity(1, 4, 0), redis_memory=(90, 0))) == []


# Streams: cursors, outcomes, buffers.


positions = st.dictionaries(
    st.sampled_from(["default", "emails", "a.b-c_d"]),
    st.builds(
        Position,
        st.tuples(st.integers(0, 2**48), st.integers(0, 2**64 - 1)),
        st.integers(0, 2**40),
    ),
    min_size=1,
)


@given(positions)
def test_cursor_round_trip(value: dict[str, Position]) -> None:
    assert decode_cursor(encode_cursor(value), ["default", "emails", "a.b-c_d"]) == value


@pytest.mark.parametrize(
    "text", ["", "default", "default/x/1", "default/1-0/-1", "nope/1-0/1", "default/1-0/1|", "bad name/1-0/1"]
)
def test_foreign_cursors_are_rejected(text: str) -> None:
    with pytest.raises(CursorError):
        decode_cursor(text, ["default", "emails"])


def test_position_before_includes_the_entry() -> None:
    assert Position((5, 3), 10).before() == Position((5, 2), 9)
    assert Position((5, 0), 10).before() == Position((4, 2**64 - 1), 9)
    assert ORIGIN.id == (0, 0)


@pytest.mark.parametrize(
    ("outcome", "error", "result"),
    [
        ("COMPLETED", "", Outcome.COMPLETED),
        ("FAILED", "RuntimeError: x", Outcome.FAILED),
        ("RETRY", "RuntimeError: x", Outcome.RETRY),
        ("TIMED_OUT", "TaskTimeout: killed after running past its timeout", Outcome.TIMED_OUT),
        ("NONSENSE", "written by hand", Outcome.FAILED),
    ],
)
def test_stream_entries_parse(outcome: str, error: str, result: Outcome) -> None:
    fields = {
        b"seq": b"7",
        b"job": b"abc",
        b"task": b"diag.noop",
        b"outcome": outcome.encode(),
        b"attempt": b"2",
        b"wait": b"15",
        b"proc": b"30",
        b"start": b"1000",
        b"finish": b"1030",
        b"worker": b"w",
        b"error": error.encode(),
    }
    event = parse_event("default", b"1030-4", fields)
    assert (event.id, event.seq, event.outcome, event.attempt) == ((1030, 4), 7, result, 2)
    assert (event.wait_ms, event.proc_ms, event.start_ms, event.finish_ms) == (15, 30, 1000, 1030)


def event(seq: int, task: str = "diag.noop", result: Outcome = Outcome.COMPLETED) -> Event:
    return Event("default", (seq, 0), seq, f"j{seq}", task, result, 1, 0, 0, 0, 0)


def test_subscriber_buffer_drops_oldest_and_counts_only_when_live() -> None:
    async def run() -> None:
        drops: list[int] = []
        subscriber = Subscriber(Filter(("default",), task="diag.noop"), capacity=3, on_drop=drops.append)
        for seq in range(1, 6):
            subscriber.offer(event(seq))
        # Catching up: overflow is read again from the stream, so it is not loss.
        assert (subscriber.overflows, subscriber.dropped) == (2, 0)
        subscriber.catching_up = False
        subscriber.offer(event(6))
        subscriber.offer(event(7, task="diag.fail"))
        assert [e.seq for e in subscriber.buffer] == [4, 5, 6]
        assert subscriber.dropped == 1 and drops == [1]

    asyncio.run(run())


# Prometheus buckets.


@given(st.lists(st.integers(0, 10_000_000), max_size=100))
def test_prometheus_buckets_are_cumulative_and_never_undercount_le(values: list[int]) -> None:
    distribution = Distribution(count=len(values), buckets=Counter(bucket(v) for v in values))
    rows = histogram_buckets(distribution)
    assert [bound for bound, _ in rows] == [*map(str, JOB_BUCKETS), "+Inf"]
    counts = [count for _, count in rows]
    assert counts == sorted(counts) and counts[-1] == len(values)
    for bound, count in rows[:-1]:
        # A count under `le` is only ever of values at or below it.
        assert count <= sum(1 for v in values if v / 1000 <= float(bound))
