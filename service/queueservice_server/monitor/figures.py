"""Figures over a window of the per-minute hashes that workers write (see
`timings.py`): attempt counts, averages, percentiles read from the bucket
histograms, throughput and its trend.

Pure functions over decoded hashes, so they are tested without Redis. A window
has minute resolution: it covers every epoch minute it touches, from the start
of its first minute to now, and its rates divide by exactly that span.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from queueservice_server.core.timings import bucket_upper_ms

MINUTE_MS = 60_000
# The trend compares the newer half of a window's full minutes with the older
# half: it is rising (falling) when the newer mean is at least TREND_RATIO times
# the older one (or the reverse) and differs by at least TREND_MIN_DELTA jobs/min,
# so that a quiet queue's noise reads as stable.
TREND_RATIO = 1.25
TREND_MIN_DELTA = 1.0
TREND_MIN_MINUTES = 4

_MEASURES = {b"w": "wait", b"p": "processing", b"t": "total"}


class Trend(enum.StrEnum):
    STABLE = "STABLE"
    RISING = "RISING"
    FALLING = "FALLING"


def window_minutes(now_ms: int, window_s: float) -> range:
    """The epoch minutes that the `window_s` seconds ending at `now_ms` touch, oldest first."""
    last = now_ms // MINUTE_MS
    first = (now_ms - int(window_s * 1000)) // MINUTE_MS
    return range(first, last + 1)


@dataclass
class Distribution:
    """One measure (wait, processing or total time) over some attempts, in milliseconds."""

    count: int = 0
    sum_ms: int = 0
    max_ms: int = 0
    buckets: Counter[int] = field(default_factory=Counter)

    def add(self, other: Distribution) -> None:
        self.count += other.count
        self.sum_ms += other.sum_ms
        self.max_ms = max(self.max_ms, other.max_ms)
        self.buckets.update(other.buckets)

    @property
    def avg_ms(self) -> float:
        return self.sum_ms / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        """The upper bound of the bucket holding the q-quantile (0 < q <= 1), never above the
        maximum: within timings.BUCKET_RATIO of the true value."""
        total = sum(self.buckets.values())
        if not total:
            return 0.0
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                upper = bucket_upper_ms(index)
                return min(upper, float(self.max_ms)) if self.max_ms else upper
        return float(self.max_ms)


@dataclass
class Figures:
    """Attempts finished over some minutes, and their timings."""

    attempts: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    wait: Distribution = field(default_factory=Distribution)
    processing: Distribution = field(default_factory=Distribution)
    total: Distribution = field(default_factory=Distribution)

    @classmethod
    def from_hash(cls, fields: Mapping[bytes, bytes]) -> Figures:
        """From a minute hash (HGETALL, or HMGET of its scalar fields), or the folded all-time hash."""

        def number(name: str) -> int:
            return int(fields.get(name.encode()) or 0)

        n = number("n")
        figures = cls(attempts=n, completed=number("completed"), failed=number("failed"), retried=number("retried"))
        for name, measure in (("wait", figures.wait), ("proc", figures.processing), ("total", figures.total)):
            measure.count = n
            measure.sum_ms = number(f"{name}_sum")
            measure.max_ms = max(0, number(f"{name}_max"))
        for key, value in fields.items():
            prefix, sep, index = key.partition(b":")
            if sep and prefix in _MEASURES:
                getattr(figures, _MEASURES[prefix]).buckets[int(index)] += int(value)
        return figures

    def add(self, other: Figures) -> None:
        self.attempts += other.attempts
        self.completed += other.completed
        self.failed += other.failed
        self.retried += other.retried
        self.wait.add(other.wait)
        self.processing.add(other.processing)
        self.total.add(other.total)

    @property
    def finished(self) -> int:
        """Jobs that left the queue (completed, or failed with no attempt left)."""
        return self.completed + self.failed

    @property
    def failure_rate(self) -> float:
        """Failed share of finished attempts: a retried attempt failed too."""
        return (self.failed + self.retried) / self.attempts if self.attempts else 0.0


# The scalar fields of a minute hash: enough for averages, counts and rates.
SCALAR_FIELDS = ("n", "completed", "failed", "retried", "wait_sum", "proc_sum", "total_sum")


@dataclass
class Window:
    """Per-minute figures, one entry per epoch minute oldest first, the last one
    being the current (partial) minute at `now_ms`."""

    now_ms: int
    minutes: list[tuple[int, Figures]]

    @classmethod
    def merge(cls, windows: Sequence[Window]) -> Window:
        """Several queues' windows over the same minutes, as one."""
        merged: dict[int, Figures] = {}
        for window in windows:
            for minute, figures in window.minutes:
                merged.setdefault(minute, Figures()).add(figures)
        return cls(max(w.now_ms for w in windows), sorted(merged.items()))

    def tail(self, window_s: float) -> Window:
        """The part of this window that a shorter window ending at the same time covers."""
        wanted = window_minutes(self.now_ms, window_s)
        return Window(self.now_ms, [(m, f) for m, f in self.minutes if m >= wanted.start])

    @property
    def start_ms(self) -> int:
        return self.minutes[0][0] * MINUTE_MS if self.minutes else self.now_ms

    @property
    def span_minutes(self) -> float:
        """From the start of the first minute to now: what the counts were collected over."""
        return max(self.now_ms - self.start_ms, 1) / MINUTE_MS

    @property
    def figures(self) -> Figures:
        merged = Figures()
        for _, figures in self.minutes:
            merged.add(figures)
        return merged

    @property
    def throughput_per_minute(self) -> float:
        return self.figures.finished / self.span_minutes

    @property
    def current_per_minute(self) -> float:
        """Jobs finished in the last full minute."""
        return float(self.minutes[-2][1].finished) if len(self.minutes) >= 2 else 0.0

    @property
    def trend(self) -> Trend:
        return trend([float(figures.finished) for _, figures in self.minutes[:-1]])


def trend(per_minute: Sequence[float]) -> Trend:
    """Newer half against older half of full minutes (see TREND_RATIO)."""
    if len(per_minute) < TREND_MIN_MINUTES:
        return Trend.STABLE
    half = len(per_minute) // 2
    older = sum(per_minute[:half]) / half
    newer = sum(per_minute[-half:]) / half
    if newer - older >= TREND_MIN_DELTA and newer >= older * TREND_RATIO:
        return Trend.RISING
    if older - newer >= TREND_MIN_DELTA and older >= newer * TREND_RATIO:
        return Trend.FALLING
    return Trend.STABLE
