"""A loopback TCP fault-injection proxy: it sits between the service's Redis clients and
a redis-server the suite started, and loses replies, stalls, cuts and refuses on demand.

    with FaultProxy.from_url(settings.redis_url) as proxy:
        client = redis.Redis.from_url(proxy.url)
        proxy.drop_reply_matching(lambda request: b"EVALSHA" in request and sha in request)
        ...  # the script runs in Redis, its reply never arrives, the connection closes
        proxy.wait_dropped()

One thread runs a `selectors` loop over every socket the proxy owns (the listener, a
wake-up socketpair, and per accepted client the client socket plus its upstream socket).
Control methods hand their work to that thread and wait for it, so when one returns the
fault is in place: after `stall()` no byte moves, after `cut()` every connection is closed.
`close()` (or leaving the `with` block) closes every socket and joins the thread.

Replies are matched to requests by framing the RESP traffic in both directions: each
complete request a client sends is request n on its connection, and the n-th complete
reply frame coming back (RESP3 push frames and attributes aside) is its answer. That holds
for ordinary commands, pipelines and MULTI (where the reply to a queued command is
+QUEUED: to lose a transaction's results, match its EXEC). It does not hold for a
connection in pub/sub or MONITOR mode, or after CLIENT REPLY OFF/SKIP; do not drop
replies there. Bytes that are not RESP make the proxy fall back to the coarse rule: the
next chunk from upstream on that connection is dropped whole.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")
Predicate = Callable[[bytes], bool]

_CHUNK = 65536
# Stop reading from one side while this much waits to be written to the other.
_HIGH_WATER = 4 << 20
# A RESP header line (or inline command) longer than this means the bytes are not RESP.
_MAX_LINE = 1 << 20
_CALL_TIMEOUT = 10.0
_JOIN_TIMEOUT = 10.0

_LINE_TYPES = frozenset(b"+-:_,#(")
_BULK_TYPES = frozenset(b"$!=")
_ARRAY_TYPES = frozenset(b"*~>")
_MAP_TYPES = frozenset(b"%|")
# Frames that do not answer a request: RESP3 out-of-band pushes, and attributes (which
# prefix the reply they describe).
_UNCOUNTED_REPLIES = frozenset(b">|")


class ProtocolError(ValueError):
    """Bytes on a connection that are not RESP."""


def frame_end(buf: bytearray, pos: int) -> int:
    """Where the RESP frame starting at `buf[pos]` ends, or -1 if it has not all arrived."""
    size = len(buf)
    pending = 1
    while pending:
        if pos >= size:
            return -1
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if size - pos > _MAX_LINE:
                raise ProtocolError("RESP header line too long")
            return -1
        kind = buf[pos]
        pending -= 1
        if kind in _LINE_TYPES:
            pos = eol + 2
            continue
        try:
            length = int(buf[pos + 1 : eol])
        except ValueError:
            raise ProtocolError(f"bad RESP header {bytes(buf[pos : min(eol, pos + 32)])!r}") from None
        pos = eol + 2
        if kind in _BULK_TYPES:
            if length >= 0:
                pos += length + 2
                if pos > size:
                    return -1
                if buf[pos - 2 : pos] != b"\r\n":
                    raise ProtocolError("RESP bulk string not terminated by CRLF")
        elif kind in _ARRAY_TYPES:
            pending += max(length, 0)
        elif kind in _MAP_TYPES:
            pending += 2 * max(length, 0)
        else:
            raise ProtocolError(f"unknown RESP type byte {bytes([kind])!r}")
    return pos


def _request_end(buf: bytearray, pos: int) -> tuple[int, bool]:
    """(end, gets a reply) of the request at `buf[pos]`; end is -1 if it is incomplete.

    Redis executes neither `*0`/`*-1` nor a blank inline line, and does not answer them."""
    if buf[pos] == ord("*"):
        end = frame_end(buf, pos)
        if end < 0:
            return -1, False
        header = buf[pos + 1 : buf.find(b"\r\n", pos)]
        return end, int(header) > 0
    eol = buf.find(b"\n", pos)
    if eol < 0:
        if len(buf) - pos > _MAX_LINE:
            raise ProtocolError("inline command too long")
        return -1, False
    return eol + 1, bool(buf[pos:eol].strip())


def _loopback(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"upstream host must be a loopback IP address, not {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"upstream host must be a loopback address, not {host!r}")
    return str(address)


@dataclass(frozen=True)
class _Rule:
    predicate: Predicate
    then: Callable[[], object] | None


@dataclass(eq=False)
class _Conn:
    """One accepted client connection and its connection to the upstream."""

    number: int
    client: socket.socket
    upstream: socket.socket | None
    connecting: bool
    to_client: bytearray = field(default_factory=bytearray)
    to_upstream: bytearray = field(default_factory=bytearray)
    client_eof: bool = False
    upstream_shut: bool = False
    closed: bool = False
    # Set once a reply has been dropped: only the replies before it are still written.
    draining: bool = False
    # RESP framing: the unconsumed tail of each direction (an incomplete frame).
    requests: bytearray = field(default_factory=bytearray)
    replies: bytearray = field(default_factory=bytearray)
    # How many bytes at the head of `replies` were already passed to the client.
    replies_forwarded: int = 0
    requests_opaque: bool = False
    replies_opaque: bool = False
    sent: int = 0  # complete requests that get a reply
    received: int = 0  # complete reply frames
    drop_at: int | None = None  # the request whose reply is to be dropped
    drop_chunk: bool = False  # coarse fallback: drop the next upstream chunk whole
    rule: _Rule | None = None  # the rule that armed the pending drop


Side = Literal["client", "upstream"]


class FaultProxy:
    """A TCP proxy on 127.0.0.1:<free port> to a loopback `upstream`, with faults on demand.

    Thread-safe: control methods may be called from any thread (including from a predicate,
    which runs in the proxy's own thread)."""

    def __init__(self, upstream: tuple[str, int], *, db: int = 0) -> None:
        host, port = upstream
        self._upstream = (_loopback(host), int(port))
        self._family = socket.AF_INET6 if ":" in self._upstream[0] else socket.AF_INET
        self._db = db
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._accepting_calls = False
        self._stopping = False
        self._started = False
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._sel: selectors.BaseSelector | None = None
        self._registered: dict[socket.socket, int] = {}
        self._conns: dict[_Conn, None] = {}  # insertion-ordered set
        self._rules: list[_Rule] = []
        self._armed = 0
        self._connections = 0
        self._dropped = 0
        self._refuse = False
        self._stall_until: float | None = None
        self._errors: list[BaseException] = []
        self._port = 0

    @classmethod
    def from_url(cls, redis_url: str) -> FaultProxy:
        """A proxy to the Redis at `redis_url` (redis://127.0.0.1:<port>/<db>); `url` keeps the db."""
        parts = urlsplit(redis_url)
        if parts.scheme != "redis" or parts.hostname is None or parts.port is None:
            raise ValueError(f"expected redis://<loopback host>:<port>/<db>, got {redis_url!r}")
        db = int(parts.path.strip("/") or 0)
        return cls((parts.hostname, parts.port), db=db)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._started:
            raise RuntimeError("a FaultProxy starts once")
        self._started = True
        sel = selectors.DefaultSelector()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        wake_r, wake_w = socket.socketpair()
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            for sock in (listener, wake_r, wake_w):
                sock.setblocking(False)
            sel.register(listener, selectors.EVENT_READ, "listener")
            sel.register(wake_r, selectors.EVENT_READ, "wake")
        except BaseException:
            for sock in (listener, wake_r, wake_w):
                sock.close()
            sel.close()
            raise
        self._sel, self._listener, self._wake_r, self._wake_w = sel, listener, wake_r, wake_w
        self._port = listener.getsockname()[1]
        self._accepting_calls = True
        self._thread = threading.Thread(target=self._run, name=f"FaultProxy-{self._port}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Closes every connection and socket and joins the thread; re-raises what failed in it."""
        if self._thread is None:
            return
        with self._lock:
            self._stopping = True
            self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(_JOIN_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError(f"{self._thread.name} did not stop within {_JOIN_TIMEOUT}s")
        errors, self._errors = self._errors, []
        if errors:
            raise RuntimeError(f"FaultProxy failed: {errors[0]!r}") from errors[0]

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        except Exception as error:
            if exc is None:
                raise
            # Do not hide the test's own failure behind the proxy's.
            exc.add_note(f"and the FaultProxy failed too: {error!r} ({error.__cause__!r})")

    # -- what tests read -------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("FaultProxy is not started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self._db}"

    @property
    def upstream(self) -> tuple[str, int]:
        return self._upstream

    @property
    def connections(self) -> int:
        """Client connections accepted so far (refused ones included)."""
        return self._connections

    @property
    def dropped(self) -> int:
        """Replies dropped so far."""
        return self._dropped

    @property
    def active(self) -> int:
        """Client connections open now."""
        return self._call(lambda: len(self._conns))

    @property
    def stalled(self) -> bool:
        return self._call(lambda: self._stall_until is not None)

    @property
    def pending_drops(self) -> int:
        """Drops armed that have not happened yet (rules waiting for a request, or matched
        requests waiting for their reply)."""
        return self._call(lambda: len(self._rules) + sum(c.drop_at is not None or c.drop_chunk for c in self._conns))

    # -- faults ----------------------------------------------------------------------

    def drop_next_reply(self) -> None:
        """Loses the reply to the next request any client sends: the request reaches Redis,
        its reply is discarded and that connection closed (both sides)."""
        self.drop_reply_matching(lambda _request: True)

    def drop_reply_matching(self, predicate: Predicate, *, then: Callable[[], object] | None = None) -> None:
        """Loses the reply to the first request (one whole RESP command, as raw bytes) for
        which `predicate` is true. The request IS forwarded; replies before it on the
        connection are delivered, its own and any after it are discarded, and the
        connection is closed. Each call arms one drop; the predicate runs in the proxy
        thread, must be quick, and is not consulted again once it has matched.

        `then`, if given, runs in the proxy thread right after the drop (the client side
        already closed, no other byte moved yet): `then=lambda: proxy.stall(2.0)` holds
        the client's retry. Control methods called there take effect at once."""

        def arm() -> None:
            self._rules.append(_Rule(predicate, then))
            with self._cond:
                self._armed += 1

        self._call(arm)

    def wait_dropped(self, timeout: float = 5.0, count: int | None = None) -> int:
        """Waits until `count` replies (default: as many as were armed) have been dropped;
        returns the number dropped. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._armed if count is None else count
            while self._dropped < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{self._dropped} of {target} replies dropped after {timeout}s")
                self._cond.wait(remaining)
            return self._dropped

    def stall(self, seconds: float | None = None) -> None:
        """Holds every byte in both directions (none forwarded, none lost) until `resume()`,
        or for `seconds`. Connections are still accepted meanwhile."""

        def hold() -> None:
            self._stall_until = float("inf") if seconds is None else time.monotonic() + seconds

        self._call(hold)

    def resume(self) -> None:
        """Releases what `stall` held."""

        def release() -> None:
            self._stall_until = None

        self._call(release)

    def cut(self, *, reset: bool = False) -> int:
        """Closes every open connection now, both sides (with `reset`, by RST rather than FIN);
        returns how many. New connections are still accepted."""

        def cut_all() -> int:
            conns = list(self._conns)
            for conn in conns:
                self._close(conn, reset=reset)
            return len(conns)

        return self._call(cut_all)

    def refuse(self, on: bool = True) -> None:
        """While on, each new connection is accepted and closed at once."""

        def set_refuse() -> None:
            self._refuse = on

        self._call(set_refuse)

    # -- the proxy thread ------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()
        with self._lock:
            if not self._accepting_calls:
                raise RuntimeError("FaultProxy is not running")
            self._calls.put((fn, future))
            self._wake()
        return future.result(_CALL_TIMEOUT)

    def _wake(self) -> None:
        if self._wake_w is not None and self._accepting_calls:
            # A full buffer means wake-ups are pending anyway.
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def _run(self) -> None:
        sel = self._sel
        assert sel is not None
        try:
            while True:
                if self._stall_until is not None and time.monotonic() >= self._stall_until:
                    self._stall_until = None
                self._run_calls()
                if self._stopping:
                    break
                for conn in list(self._conns):
                    self._settle(conn)
                    if not conn.closed:
                        self._update_interest(conn)
                timeout = None
                if self._stall_until is not None and self._stall_until != float("inf"):
                    timeout = max(0.0, self._stall_until - time.monotonic())
                for key, mask in sel.select(timeout):
                    self._dispatch(key.data, mask)
        except BaseException as error:
            self._errors.append(error)
        finally:
            self._teardown()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as error:
                    future.set_exception(error)

    def _teardown(self) -> None:
        with self._lock:
            self._accepting_calls = False
        while True:
            try:
                _fn, future = self._calls.get_nowait()
            except queue.Empty:
                break
            future.set_exception(RuntimeError("FaultProxy is closed"))
        for conn in list(self._conns):
            self._close(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._sel is not None:
            self._sel.close()
        with self._cond:
            self._cond.notify_all()

    def _dispatch(self, data: Any, mask: int) -> None:
        if data == "listener":
            self._accept()
        elif data == "wake":
            assert self._wake_r is not None
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        else:
            conn, side = data
            if conn.closed:
                return
            if side == "upstream" and conn.connecting:
                self._finish_connect(conn)
                return
            if mask & selectors.EVENT_WRITE:
                self._flush(conn, side)
            if mask & selectors.EVENT_READ and not conn.closed:
                self._read(conn, side)

    def _set_interest(self, sock: socket.socket, events: int, data: tuple[_Conn, Side]) -> None:
        assert self._sel is not None
        current = self._registered.get(sock, 0)
        if events == current:
            return
        if not events:
            self._sel.unregister(sock)
            del self._registered[sock]
        elif not current:
            self._sel.register(sock, events, data)
            self._registered[sock] = events
        else:
            self._sel.modify(sock, events, data)
            self._registered[sock] = events

    def _update_interest(self, conn: _Conn) -> None:
        stalled = self._stall_until is not None
        events = 0
        if not stalled:
            if not (conn.client_eof or conn.draining) and len(conn.to_upstream) < _HIGH_WATER:
                events |= selectors.EVENT_READ
            if conn.to_client:
                events |= selectors.EVENT_WRITE
        self._set_interest(conn.client, events, (conn, "client"))
        if conn.upstream is None:
            return
        events = 0
        if conn.connecting:
            events = selectors.EVENT_WRITE
        elif not stalled:
            if len(conn.to_client) < _HIGH_WATER:
                events |= selectors.EVENT_READ
            if conn.to_upstream:
                events |= selectors.EVENT_WRITE
        self._set_interest(conn.upstream, events, (conn, "upstream"))

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                client, _address = self._listener.accept()
            except (BlockingIOError, ConnectionAbortedError):
                return
            self._connections += 1
            if self._refuse:
                client.close()
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = socket.socket(self._family, socket.SOCK_STREAM)
            upstream.setblocking(False)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self._connections, client, upstream, connecting=True)
            self._conns[conn] = None
            status = upstream.connect_ex(self._upstream)
            if status == 0:
                conn.connecting = False
            elif status != errno.EINPROGRESS:
                self._close(conn)  # the upstream refused: so does the proxy

    def _finish_connect(self, conn: _Conn) -> None:
        assert conn.upstream is not None
        if conn.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._close(conn)
            return
        conn.connecting = False
        if self._stall_until is None:
            self._flush(conn, "upstream")

    def _read(self, conn: _Conn, side: Side) -> None:
        sock = conn.client if side == "client" else conn.upstream
        assert sock is not None
        try:
            data = sock.recv(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if side == "client":
            if not data:
                conn.client_eof = True
                self._settle(conn)
                return
            self._on_request_bytes(conn, data)
            conn.to_upstream += data
            if not conn.connecting:
                self._flush(conn, "upstream")
        else:
            if not data:
                # Redis closed: deliver what it sent, then close the client too.
                self._drop_upstream(conn)
                self._settle(conn)
                return
            self._on_reply_bytes(conn, data)
            if not conn.closed:
                self._flush(conn, "client")

    def _flush(self, conn: _Conn, side: Side) -> None:
        sock, buf = (conn.client, conn.to_client) if side == "client" else (conn.upstream, conn.to_upstream)
        if sock is None or conn.closed or self._stall_until is not None:
            return
        while buf:
            try:
                sent = sock.send(buf)
            except BlockingIOError:
                break
            except OSError:
                self._close(conn)
                return
            del buf[:sent]
        self._settle(conn)

    def _settle(self, conn: _Conn) -> None:
        """Half-closes and closes once the buffers allow it (not while stalled: a FIN is held too)."""
        if conn.closed or self._stall_until is not None:
            return
        if conn.upstream is None:
            # Redis is gone (it closed, or its reply was dropped): flush what is owed, then close.
            if not conn.to_client:
                self._close(conn)
            return
        if conn.client_eof and not conn.to_upstream and not conn.connecting and not conn.upstream_shut:
            conn.upstream_shut = True
            try:
                conn.upstream.shutdown(socket.SHUT_WR)
            except OSError:
                self._close(conn)

    # -- RESP framing and drops --------------------------------------------------------

    def _matches(self, request: bytes) -> _Rule | None:
        for index, rule in enumerate(self._rules):
            try:
                hit = rule.predicate(request)
            except Exception as error:
                self._errors.append(error)
                continue
            if hit:
                del self._rules[index]
                return rule
        return None

    def _on_request_bytes(self, conn: _Conn, data: bytes) -> None:
        if conn.requests_opaque:
            if conn.drop_at is None and not conn.drop_chunk and self._rules:
                conn.rule = self._matches(data)
                conn.drop_chunk = conn.rule is not None
            return
        buf = conn.requests
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                end, answered = _request_end(buf, pos)
                if end < 0:
                    break
                if answered:
                    conn.sent += 1
                    if conn.drop_at is None and not conn.drop_chunk and self._rules:
                        conn.rule = self._matches(bytes(buf[pos:end]))
                        if conn.rule is not None:
                            conn.drop_at = conn.sent
                pos = end
        except ProtocolError:
            conn.requests_opaque = True
            conn.requests.clear()
            return
        del buf[:pos]

    def _on_reply_bytes(self, conn: _Conn, data: bytes) -> None:
        if conn.drop_chunk or (conn.replies_opaque and conn.drop_at is not None):
            self._drop(conn, b"")
            return
        if conn.replies_opaque:
            conn.to_client += data
            return
        buf = conn.replies
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                end = frame_end(buf, pos)
                if end < 0:
                    break
                if buf[pos] not in _UNCOUNTED_REPLIES:
                    conn.received += 1
                    if conn.received == conn.drop_at:
                        self._drop(conn, bytes(buf[conn.replies_forwarded : max(pos, conn.replies_forwarded)]))
                        return
                pos = end
        except ProtocolError:
            conn.replies_opaque = True
            conn.to_client += buf[conn.replies_forwarded :]
            buf.clear()
            conn.replies_forwarded = 0
            if conn.drop_at is not None:
                self._drop(conn, b"")
            return
        # Pass everything on, except an incomplete frame that would be the reply to drop.
        holding = (
            conn.drop_at is not None
            and conn.received + 1 == conn.drop_at
            and pos < len(buf)
            and buf[pos] not in _UNCOUNTED_REPLIES
        )
        limit = max(pos if holding else len(buf), conn.replies_forwarded)
        conn.to_client += buf[conn.replies_forwarded : limit]
        conn.replies_forwarded = limit - pos
        del buf[:pos]

    def _drop(self, conn: _Conn, before: bytes) -> None:
        """Discards the reply being received (and all after it): the replies `before` it
        are still delivered, then the client connection closes."""
        conn.to_client += before
        conn.draining = True
        conn.drop_at = None
        conn.drop_chunk = False
        conn.to_upstream.clear()
        self._drop_upstream(conn)
        with self._cond:
            self._dropped += 1
            self._cond.notify_all()
        self._flush(conn, "client")  # the replies before it, then the close
        rule, conn.rule = conn.rule, None
        if rule is not None and rule.then is not None:
            try:
                rule.then()
            except Exception as error:
                self._errors.append(error)

    def _drop_upstream(self, conn: _Conn) -> None:
        if conn.upstream is not None:
            self._forget(conn.upstream)
            conn.upstream.close()
            conn.upstream = None
            conn.draining = True

    def _forget(self, sock: socket.socket) -> None:
        if self._registered.pop(sock, 0) and self._sel is not None:
            self._sel.unregister(sock)

    def _close(self, conn: _Conn, *, reset: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn, None)
        for sock in (conn.client, conn.upstream):
            if sock is None:
                continue
            self._forget(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        conn.upstream = None
