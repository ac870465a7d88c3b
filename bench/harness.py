"""What every row shares: interleaved repeats, summaries as median and
min-max, the table, and the machine line.

The machines are shared and noisy, so no absolute figure means much on its
own: every row measures its subject next to a baseline in the same run,
alternating the two, and reports the per-repeat ratio."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import TypeVar

T = TypeVar("T")


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Summary:
    """Median and range of one figure over the repeats of a run."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("a summary needs at least one value")
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, unit: str = "") -> str:
        """`1,234 unit (1,200-1,250)`: the median, then the range over repeats."""
        sep = "" if unit in {"", "x"} else " "
        low, high = min(self.values), max(self.values)
        return f"{number(self.median)}{sep}{unit} ({number(low)}-{number(high)})"


def number(value: float) -> str:
    """Thousands separators for big numbers, three significant figures for small ones."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratios(subject: Sequence[float], baseline: Sequence[float]) -> Summary:
    """Repeat i of the subject over repeat i of its baseline, which ran right next to it."""
    return Summary.of([s / b for s, b in zip(subject, baseline, strict=True)])


def interleaved(repeats: int, runs: Sequence[Callable[[], T]]) -> list[list[T]]:
    """Runs every measurement `repeats` times, reversing the order every other
    repeat (A B C, C B A, ...) so drift and noise hit subject and baseline alike.
    Returns one list of results per measurement, in repeat order."""
    results: list[list[T]] = [[] for _ in runs]
    for repeat in range(repeats):
        order = list(range(len(runs)))
        if repeat % 2:
            order.reverse()
        for index in order:
            results[index].append(runs[index]())
    return results


@dataclass
class Row:
    """One line of the table."""

    number: str
    name: str
    subject: str
    baseline: str
    ratio: str
    target: str = ""
    verdict: str = ""

    @classmethod
    def unavailable(cls, number: str, name: str, why: str) -> Row:
        """A row that could not be measured in this run, saying why."""
        return cls(number, name, why, "", "", "", "")


def verdict(ratio: Summary, target: float, *, at_most: bool = False) -> str:
    """Judged on the median ratio; `at_most` for figures where lower is better."""
    met = ratio.median <= target if at_most else ratio.median >= target
    return "met" if met else "NOT met"


HEADER = ("#", "benchmark", "ours", "baseline", "ratio: median (min-max)", "target", "")


def table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for row in rows:
        cells = (row.number, row.name, row.subject, row.baseline, row.ratio, row.target, row.verdict)
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def redis_server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    # "Redis server v=6.2.14 sha=... malloc=libc bits=64 ..."
    parts = dict(part.split("=", 1) for part in out.split() if "=" in part)
    return f"{parts.get('v', '?')} (malloc={parts.get('malloc', '?')})"


@dataclass
class Machine:
    """What the numbers were measured on; the load average is read at start and at end."""

    redis_binary: str
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))
    load_start: str = field(default_factory=load_average)
    load_end: str = ""

    def finish(self) -> None:
        self.load_end = load_average()

    def line(self) -> str:
        return (
            f"{os.cpu_count()} cores ({platform.machine()}), load average {self.load_start} at start, "
            f"{self.load_end or '?'} at end; Python {platform.python_version()}, grpcio {version_of('grpcio')}, "
            f"redis-py {version_of('redis')}, hiredis {version_of('hiredis')}, huey {version_of('huey')}, "
            f"redis-server {redis_server_version(self.redis_binary)}; {self.started:%Y-%m-%d %H:%M} UTC"
        )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("no values")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]
