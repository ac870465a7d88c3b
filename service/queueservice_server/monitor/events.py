"""Entries of a queue's timings stream as subscribers see them: events, their positions
(stream id + seq), filters, and the cursors that let a client resume on any replica."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from queueservice_server.core.keys import TimingFields as T
from queueservice_server.core.timings import Outcome
from queueservice_server.settings import QUEUE_NAME_RE

MAX_CURSOR_CHARS = 4096
_MAX_SEQ = 2**64 - 1
# A stream id is two unsigned 64-bit numbers; a timings seq is a Redis counter (signed 64-bit).
_MAX_COUNTER = 2**63 - 1
_CURSOR_PART = re.compile(r"([0-9]+)-([0-9]+)/([0-9]+)")

StreamId = tuple[int, int]


def parse_id(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def id_text(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


@dataclass(frozen=True)
class Position:
    """The last entry consumed from one queue's stream: its stream id and its seq."""

    id: StreamId
    seq: int

    def before(self) -> Position:
        """The position just before this entry (reading from it includes the entry)."""
        ms, seq = self.id
        previous = (ms, seq - 1) if seq else (ms - 1, _MAX_SEQ)
        return Position(previous, max(0, self.seq - 1))


ORIGIN = Position((0, 0), 0)


# Slots: a subscriber's buffer holds up to QUEUE_STREAM_BUFFER of these.
@dataclass(frozen=True, slots=True)
class Event:
    """One finished attempt from a queue's timings stream."""

    queue: str
    id: StreamId
    seq: int
    job: str
    task: str
    outcome: Outcome
    attempt: int
    wait_ms: int
    proc_ms: int
    start_ms: int
    finish_ms: int

    @property
    def position(self) -> Position:
        return Position(self.id, self.seq)


def parse_event(queue: str, raw_id: bytes | str, fields: Mapping[bytes, bytes]) -> Event:
    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode(errors="replace")

    def number(name: str) -> int:
        try:
            return int(text(name) or 0)
        except ValueError:
            return 0

    try:
        outcome = Outcome(text(T.OUTCOME))
    except ValueError:
        # Written by something other than SETTLE: shown as a failure rather than dropped.
        outcome = Outcome.FAILED
    return Event(
        queue=queue,
        id=parse_id(raw_id),
        seq=number(T.SEQ),
        job=text(T.JOB),
        task=text(T.TASK),
        outcome=outcome,
        attempt=number(T.ATTEMPT),
        wait_ms=number(T.WAIT),
        proc_ms=number(T.PROC),
        start_ms=number(T.START),
        finish_ms=number(T.FINISH),
    )


@dataclass(frozen=True)
class Filter:
    queues: tuple[str, ...]
    task: str = ""
    outcome: Outcome | None = None

    def matches(self, event: Event) -> bool:
        return (not self.task or event.task == self.task) and (self.outcome is None or event.outcome is self.outcome)


class CursorError(ValueError):
    """A cursor that this service did not write."""


def encode_cursor(positions: Mapping[str, Position]) -> str:
    """`queue/stream-id/seq` per subscribed queue, joined by `|` (neither is legal in a queue name)."""
    return "|".join(f"{queue}/{id_text(p.id)}/{p.seq}" for queue, p in sorted(positions.items()))


def decode_cursor(text: str, queues: Sequence[str]) -> dict[str, Position]:
    if len(text) > MAX_CURSOR_CHARS:
        raise CursorError(f"longer than {MAX_CURSOR_CHARS} characters")
    positions: dict[str, Position] = {}
    # Parts are named by number, never echoed: a long one would not fit in an error's metadata.
    for number, part in enumerate(text.split("|"), 1):
        queue, _, rest = part.partition("/")
        if not QUEUE_NAME_RE.match(queue):
            raise CursorError(f"part {number} is not `queue/id/seq`")
        if queue not in queues:
            raise CursorError(f"it names queue {queue!r}, which is not configured")
        # Digits only: int() alone would take signs, spaces and underscores.
        digits = _CURSOR_PART.fullmatch(rest)
        if digits is None:
            raise CursorError(
                f"part {number} ({queue}) is not `queue/id/seq` (a stream id `ms-n` and a seq, unsigned numbers)"
            )
        ms, n, seq = (int(value) for value in digits.groups())
        if max(ms, n) > _MAX_SEQ or seq > _MAX_COUNTER:
            raise CursorError(f"part {number} ({queue}) has a number past 64 bits, which no stream id or seq reaches")
        positions[queue] = Position((ms, n), seq)
    return positions
