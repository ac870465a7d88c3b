"""StreamTimings: each queue's timings STREAM, fanned out to subscribers.

One reader task per queue per server (XREAD BLOCK on redis.asyncio, started by
the queue's first subscriber, stopped with its last) offers every entry to the
subscribers of that queue. Each subscriber has a bounded buffer: when it is
full the oldest event goes and is counted, so a slow subscriber costs the
reader one append, never a wait, and the workers never see it at all (they
only XADD).

A subscription starts from a position per queue: the end of the stream (live
only), before the last N matching entries, or a cursor. It first reads the
stream itself from there (XRANGE, exactly as far as it goes) while the reader
already buffers new entries; then it switches to the buffer, skipping what it
already read (stream ids only grow). If the buffer overflowed while it was
catching up, it reads the stream again, since what was dropped is still
there. Entries carry `seq` (1, 2, ... per queue): a jump in it while reading
is what retention took, reported as missed_count.

A cursor is the last position consumed on every subscribed queue, so any
replica resumes it exactly where the message left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import cast

import redis.asyncio
import redis.exceptions

from queueservice_server.core.cancellation import stop_task
from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.redis import trouble
from queueservice_server.monitor.events import (
    ORIGIN,
    Event,
    Filter,
    Position,
    encode_cursor,
    id_text,
    parse_event,
    parse_id,
)
from queueservice_server.settings import Settings

log = logging.getLogger(__name__)

PAGE = 500
BLOCK_MS = 1000
RETRY_S = 1.0
CLOSE_WAIT_S = 1.0
# An idle subscriber looks this often whether its RPC has ended.
GONE_CHECK_S = 1.0
Entries = list[tuple[bytes, dict[bytes, bytes]]]


class TooManySubscribers(Exception):
    """This server already serves QUEUE_STREAM_MAX_SUBSCRIBERS streams (counted per process: the
    cap bounds this process's memory, so it needs no agreement with other replicas)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this server already has {limit} StreamTimings subscribers")
        self.limit = limit


@dataclass(frozen=True)
class Delivery:
    event: Event
    cursor: str
    missed: int
    dropped: int


class Subscriber:
    def __init__(self, wanted: Filter, capacity: int, on_drop: Callable[[int], None]) -> None:
        self.filter = wanted
        self.capacity = capacity
        self.on_drop = on_drop
        self.buffer: deque[Event] = deque()
        self.wake = asyncio.Event()
        self.catching_up = True
        # While catching up, overflow is not loss: those events are read again from the stream.
        self.overflows = 0
        self.dropped = 0
        self.missed = 0

    def offer(self, event: Event) -> None:
        if not self.filter.matches(event):
            return
        if len(self.buffer) >= self.capacity:
            self.buffer.popleft()
            if self.catching_up:
                self.overflows += 1
            else:
                self.dropped += 1
                self.on_drop(1)
        self.buffer.append(event)
        self.wake.set()

    def deliver(self, event: Event, positions: dict[str, Position]) -> Delivery:
        """The message for `event`, advancing `positions`, with what was missed or dropped before it."""
        positions[event.queue] = event.position
        delivery = Delivery(event, encode_cursor(positions), self.missed, self.dropped)
        self.missed = self.dropped = 0
        return delivery

    def lost(self, count: int) -> None:
        """The reader found entries trimmed before it read them (a catching-up subscriber sees the gap itself)."""
        if not self.catching_up:
            self.missed += count
            self.wake.set()


class TimingsHub:
    def __init__(
        self,
        settings: Settings,
        client: redis.asyncio.Redis,
        on_subscribers: Callable[[int], None] = lambda delta: None,
        on_drop: Callable[[int], None] = lambda count: None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.on_subscribers = on_subscribers
        self.on_drop = on_drop
        self.closed = False
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._started: dict[str, asyncio.Future[None]] = {}
        self._open = 0
        self._none_open = asyncio.Event()
        self._none_open.set()

    def _key(self, queue: str) -> str:
        return QueueKeys(self.settings.key_prefix, queue).timings

    async def _xrange(self, queue: str, low: str, high: str, count: int) -> Entries:
        return cast(Entries, await self.client.xrange(self._key(queue), min=low, max=high, count=count))

    async def _xrevrange(self, queue: str, high: str, low: str, count: int) -> Entries:
        return cast(Entries, await self.client.xrevrange(self._key(queue), max=high, min=low, count=count))

    async def end_position(self, queue: str) -> Position:
        entries = await self._xrevrange(queue, "+", "-", 1)
        if not entries:
            return ORIGIN
        raw_id, fields = entries[0]
        return parse_event(queue, raw_id, fields).position

    async def ahead(self, cursor: Mapping[str, Position]) -> list[tuple[str, Position, Position]]:
        """(queue, cursor position, newest entry) for each queue where `cursor` is past the newest
        entry of the queue's stream in Redis: no entry would reach such a subscriber until the
        stream caught up with it, so it would hear nothing. The newest entry only moves on, so
        a cursor that passes this check stays good."""
        found = []
        for queue, given in sorted(cursor.items()):
            end = await self.end_position(queue)
            if given.id > end.id:
                found.append((queue, given, end))
        return found

    async def _range(self, queue: str, after: Position) -> AsyncGenerator[Event, None]:
        """Every entry after `after`, to the end of the stream as it is when the last page is read."""
        start = after
        while True:
            entries = await self._xrange(queue, "(" + id_text(start.id), "+", PAGE)
            for raw_id, fields in entries:
                event = parse_event(queue, raw_id, fields)
                start = event.position
                yield event
            if len(entries) < PAGE or self.closed:
                return

    async def _newest_first(self, queue: str) -> AsyncGenerator[Event, None]:
        """Every entry of the stream, newest first, a page at a time."""
        top = "+"
        while True:
            entries = await self._xrevrange(queue, top, "-", PAGE)
            for raw_id, fields in entries:
                yield parse_event(queue, raw_id, fields)
            if len(entries) < PAGE or self.closed:
                return
            top = "(" + id_text(parse_id(entries[-1][0]))

    async def _starts(self, wanted: Filter, count: int) -> dict[str, Position]:
        """Per subscribed queue, where reading on finds the newest `count` matching entries over
        all of them first: just before its oldest one among them, else its stream's end.

        The streams are walked newest first in step (one page per queue held at a time) rather
        than collected: a subscriber at the largest last_n then costs no more memory than one
        at last_n=1 once it has started; holding those events held ~5 MB per subscriber."""
        starts: dict[str, Position] = {}
        heads: dict[str, tuple[Event, AsyncGenerator[Event, None]]] = {}
        try:
            for queue in wanted.queues:
                walk = self._newest_first(queue)
                first = await anext(walk, None)
                if first is None:
                    starts[queue] = ORIGIN
                    await walk.aclose()
                else:
                    starts[queue] = first.position
                    heads[queue] = (first, walk)
            chosen = 0
            while chosen < count and heads:
                queue = max(heads, key=lambda q: heads[q][0].id)
                event, walk = heads[queue]
                if wanted.matches(event):
                    chosen += 1
                    starts[queue] = event.position.before()
                following = await anext(walk, None)
                if following is None:
                    del heads[queue]
                    await walk.aclose()
                else:
                    heads[queue] = (following, walk)
        finally:
            for _, walk in heads.values():
                await walk.aclose()
        return starts

    async def _attach(self, subscriber: Subscriber) -> None:
        loop = asyncio.get_running_loop()
        for queue in subscriber.filter.queues:
            self._subscribers.setdefault(queue, set()).add(subscriber)
            if queue not in self._readers:
                started: asyncio.Future[None] = loop.create_future()
                self._started[queue] = started
                self._readers[queue] = asyncio.create_task(self._read(queue, started), name=f"timings-{queue}")
        # Each reader's start is fixed before the subscriber reads the stream, so together they miss nothing.
        await asyncio.gather(*(asyncio.shield(self._started[queue]) for queue in subscriber.filter.queues))

    def _detach(self, subscriber: Subscriber) -> None:
        for queue in subscriber.filter.queues:
            subscribers = self._subscribers.get(queue)
            if subscribers is None:
                continue
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[queue]
                self._started.pop(queue, None)
                reader = self._readers.pop(queue, None)
                if reader is not None:
                    reader.cancel()

    async def _read(self, queue: str, started: asyncio.Future[None]) -> None:
        try:
            last = await self.end_position(queue)
        except asyncio.CancelledError:
            started.cancel()
            raise
        except Exception as exc:
            # The subscribers waiting for this start fail with it (UNAVAILABLE when Redis is down).
            started.set_exception(exc)
            if self._readers.get(queue) is asyncio.current_task():
                del self._readers[queue]
                self._started.pop(queue, None)
            return
        started.set_result(None)
        key = self._key(queue)
        # A page never outgrows a subscriber's buffer, so one read alone cannot overflow a fast subscriber.
        page = min(PAGE, self.settings.stream_buffer)
        failing = False
        # A reader whose cancellation redis.asyncio swallowed (see cancellation.py) still ends,
        # within one BLOCK_MS, once it is no longer its queue's reader.
        while self._readers.get(queue) is asyncio.current_task():
            try:
                reply = cast(
                    list[tuple[bytes, Entries]],
                    await self.client.xread({key: id_text(last.id)}, count=page, block=BLOCK_MS),
                )
            except redis.exceptions.RedisError as exc:
                # Unreachable, or answering "not now" (BUSY, LOADING, ...): the reader waits it out.
                if trouble(exc) is None:
                    raise
                if not failing:
                    log.warning("timings reader lost Redis; retrying", extra={"queue": queue, "error": str(exc)})
                failing = True
                await asyncio.sleep(RETRY_S)
                continue
            failing = False
            for _, entries in reply:
                for raw_id, fields in entries:
                    event = parse_event(queue, raw_id, fields)
                    gap = event.seq - last.seq - 1 if event.seq and last.seq else 0
                    last = event.position
                    for subscriber in self._subscribers.get(queue, ()):
                        if gap > 0:
                            subscriber.lost(gap)
                        subscriber.offer(event)

    async def subscribe(
        self,
        wanted: Filter,
        last_n: int = 0,
        cursor: Mapping[str, Position] | None = None,
        gone: Callable[[], bool] = lambda: False,
    ) -> AsyncIterator[Delivery]:
        """Deliveries for one subscriber until the hub closes, the caller stops iterating, or
        `gone()` (its RPC ended: checked too because redis.asyncio may swallow the cancellation
        meant to stop it, see cancellation.py). Raises TooManySubscribers at the cap."""
        if self.closed:
            return
        if self._open >= self.settings.stream_max_subscribers:
            raise TooManySubscribers(self.settings.stream_max_subscribers)
        subscriber = Subscriber(wanted, self.settings.stream_buffer, self.on_drop)
        self.on_subscribers(1)
        self._open += 1
        self._none_open.clear()
        try:
            await self._attach(subscriber)
            if cursor is None and last_n:
                # The newest last_n come from reading on from their start, like any catch-up.
                positions = await self._starts(wanted, last_n)
            else:
                # A queue the cursor does not name (or no cursor: live only) starts at its stream's end.
                given = cursor or {}
                positions = {q: given[q] if q in given else await self.end_position(q) for q in wanted.queues}
            async with contextlib.aclosing(self._catch_up(subscriber, positions, gone)) as caught_up:
                async for delivery in caught_up:
                    yield delivery
            subscriber.catching_up = False
            while not self.closed and not gone():
                if not subscriber.buffer:
                    subscriber.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(subscriber.wake.wait(), GONE_CHECK_S)
                    continue
                event = subscriber.buffer.popleft()
                if event.id > positions[event.queue].id:
                    yield subscriber.deliver(event, positions)
        finally:
            self._detach(subscriber)
            self.on_subscribers(-1)
            self._open -= 1
            if not self._open:
                self._none_open.set()

    async def _catch_up(
        self, subscriber: Subscriber, positions: dict[str, Position], gone: Callable[[], bool]
    ) -> AsyncGenerator[Delivery, None]:
        """Reads each stream from `positions` to its end, again while the buffer overflowed meanwhile."""
        while not self.closed and not gone():
            overflows = subscriber.overflows
            for queue in subscriber.filter.queues:
                async with contextlib.aclosing(self._range(queue, positions[queue])) as events:
                    async for event in events:
                        # A jump in seq is what retention took before this subscriber read it.
                        subscriber.missed += max(0, event.seq - positions[queue].seq - 1)
                        positions[queue] = event.position
                        if subscriber.filter.matches(event):
                            yield subscriber.deliver(event, positions)
            if subscriber.overflows == overflows:
                return

    async def close(self) -> None:
        """Ends every subscription and stops the readers. Waits up to CLOSE_WAIT_S for the streams
        to end, so that they finish with OK rather than being cut off by the server's stop; one
        stuck writing to a client that does not read is left to the server's grace."""
        self.closed = True
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_open.wait(), CLOSE_WAIT_S)
        readers = list(self._readers.values())
        self._readers.clear()
        await asyncio.gather(*(stop_task(reader) for reader in readers))
