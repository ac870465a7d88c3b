"""The fault-injection proxy (tests/proxy.py) in front of real Redis: bytes pass through
unchanged, and each fault does what it says, seen from a plain redis-py client."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from queueservice_server.settings import Settings
from tests.proxy import FaultProxy, frame_end
from tests.support import wait_for

Connect = Callable[..., redis.Redis]


@pytest.fixture
def proxy(settings: Settings) -> Iterator[FaultProxy]:
    with FaultProxy.from_url(settings.redis_url) as proxy:
        yield proxy


@pytest.fixture
def connect() -> Iterator[Connect]:
    """Clients that do not retry: redis-py 8 retries ConnectionError and TimeoutError ten
    times by default, which would hide a lost reply (and run the command again)."""
    clients: list[redis.Redis] = []

    def make(url: str, timeout: float = 2.0, retries: int = 0, **options: object) -> redis.Redis:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), retries), **options
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def key(settings: Settings) -> str:
    return f"{settings.key_prefix}:proxy"


def resp(*args: bytes | str) -> bytes:
    """One command as a client puts it on the wire."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return f"*{len(parts)}\r\n".encode() + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def read_until_eof(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(65536):
        received += chunk
    return bytes(received)


def sockets_on_port(port: int) -> set[str]:
    """The inodes of this process's TCP sockets with `port` at either end (from /proc; a
    socket can be listed twice when the table changes while it is read, hence a set)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        ends = {int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)}
        if fields[9] in inodes and port in ends:
            found.add(fields[9])
    return found


def responsive(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.TimeoutError:
        return False


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("FaultProxy")]


def test_commands_pass_through_unchanged(proxy: FaultProxy, settings: Settings, connect: Connect, key: str) -> None:
    via, direct = connect(proxy.url), connect(settings.redis_url)
    awkward = b"v\r\n$3\r\n*1\x00\xff"  # RESP-looking bytes inside a value are just data
    assert via.set(key, awkward) is True
    assert via.get(key) == awkward
    assert direct.get(key) == awkward

    with via.pipeline(transaction=False) as pipe:
        for i in range(100):
            pipe.rpush(f"{key}:list", i)
        assert pipe.execute() == list(range(1, 101))
    assert direct.lrange(f"{key}:list", 0, -1) == [str(i).encode() for i in range(100)]
    with via.pipeline(transaction=True) as pipe:
        pipe.incr(f"{key}:n")
        pipe.incr(f"{key}:n")
        pipe.get(f"{key}:n")
        assert pipe.execute() == [1, 2, b"2"]

    big = os.urandom(1 << 20)
    assert via.set(f"{key}:big", big) is True
    assert via.get(f"{key}:big") == big
    assert direct.get(f"{key}:big") == big
    direct.delete(f"{key}:big")
    assert (proxy.dropped, proxy.active) == (0, 1)
    assert proxy.connections == 1


def test_a_lost_reply_is_a_connection_error_though_redis_ran_the_command(
    proxy: FaultProxy, settings: Settings, connect: Connect, key: str
) -> None:
    via, direct = connect(proxy.url, timeout=5), connect(settings.redis_url)
    assert via.ping()
    target = key.encode()
    proxy.drop_reply_matching(lambda request: b"INCR" in request and target in request)
    assert via.get(key) is None  # other commands are not matched
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        via.incr(key)
    assert time.monotonic() - started < 2.5  # the connection closed: no waiting for socket_timeout
    assert proxy.wait_dropped(timeout=2) == 1
    assert direct.get(key) == b"1"  # Redis ran it; only the reply was lost
    # The drop fired once: the client reconnects and the next INCR gets its reply.
    assert via.incr(key) == 2
    assert (proxy.dropped, proxy.pending_drops, proxy.connections) == (1, 0, 2)


def test_a_retrying_client_runs_a_command_twice_when_its_reply_is_lost(
    proxy: FaultProxy, settings: Settings, connect: Connect, key: str
) -> None:
    """The hazard the proxy exists to show: redis-py's retry re-sends a command Redis already ran."""
    via = connect(proxy.url, retries=1)
    proxy.drop_reply_matching(lambda request: b"INCR" in request)
    assert via.incr(key) == 2
    assert connect(settings.redis_url).get(key) == b"2"
    assert proxy.dropped == 1


def test_drop_next_reply_loses_the_reply_to_the_next_request(
    proxy: FaultProxy, settings: Settings, connect: Connect, key: str
) -> None:
    via = connect(proxy.url)
    assert via.ping()
    proxy.drop_next_reply()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        via.set(key, "lost")
    assert proxy.wait_dropped(timeout=2) == 1
    assert connect(settings.redis_url).get(key) == b"lost"
    assert via.get(key) == b"lost"


def test_only_the_matched_reply_of_a_pipeline_is_lost(
    proxy: FaultProxy, settings: Settings, connect: Connect, key: str
) -> None:
    """Replies before the matched request arrive whole (even a 1 MiB one); nothing from
    its reply on does; then the connection closes."""
    direct = connect(settings.redis_url)
    big = os.urandom(1 << 20)
    direct.set(f"{key}:big", big)
    proxy.drop_reply_matching(lambda request: b"INCR" in request)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        sock.sendall(resp("PING") + resp("GET", f"{key}:big") + resp("INCR", key) + resp("PING"))
        assert read_until_eof(sock) == b"+PONG\r\n" + b"$%d\r\n%s\r\n" % (len(big), big)
    assert proxy.wait_dropped(timeout=2) == 1
    assert direct.get(key) == b"1"
    direct.delete(f"{key}:big")


def test_resp3_replies_are_framed_too(proxy: FaultProxy, settings: Settings, connect: Connect, key: str) -> None:
    direct = connect(settings.redis_url)
    direct.hset(f"{key}:h", "f", "v")
    direct.zadd(f"{key}:z", {"m": 1.5})
    proxy.drop_reply_matching(lambda request: b"INCR" in request)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        sock.sendall(resp("HELLO", "3"))
        hello = bytearray()
        while frame_end(hello, 0) < 0:
            hello += sock.recv(4096)
        assert hello.startswith(b"%")
        sock.sendall(
            resp("HGETALL", f"{key}:h")
            + resp("ZSCORE", f"{key}:z", "m")
            + resp("GET", f"{key}:none")
            + resp("INCR", key)
        )
        assert read_until_eof(sock) == b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n" + b",1.5\r\n" + b"_\r\n"
    assert proxy.wait_dropped(timeout=2) == 1
    assert direct.get(key) == b"1"


def test_a_request_split_across_reads_is_still_matched(
    proxy: FaultProxy, settings: Settings, connect: Connect, key: str
) -> None:
    proxy.drop_reply_matching(lambda request: b"INCR" in request)
    incr = resp("INCR", key)
    split = incr.index(b"INCR") + 2  # no single read holds the word
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(resp("PING") + incr[:split])
        assert sock.recv(64) == b"+PONG\r\n"
        sock.sendall(incr[split:])
        assert read_until_eof(sock) == b""
    assert proxy.wait_dropped(timeout=2) == 1
    assert connect(settings.redis_url).get(key) == b"1"


def test_then_runs_right_after_the_drop(proxy: FaultProxy, settings: Settings, connect: Connect, key: str) -> None:
    """`then=stall` holds the client's retry: it reaches Redis only when the stall ends."""
    via, direct = connect(proxy.url, retries=1), connect(settings.redis_url)
    assert via.ping()
    proxy.drop_reply_matching(lambda request: b"INCR" in request, then=lambda: proxy.stall(0.3))
    started = time.monotonic()
    assert via.incr(key) == 2  # the retry, after the stall
    assert time.monotonic() - started >= 0.25
    assert direct.get(key) == b"2"
    assert proxy.dropped == 1


def test_a_stall_holds_bytes_both_ways_and_loses_none(
    proxy: FaultProxy, settings: Settings, connect: Connect, key: str
) -> None:
    direct = connect(settings.redis_url)
    impatient = connect(proxy.url, timeout=0.3)
    wait_for(lambda: responsive(impatient), timeout=5, what="a connection before the stall")
    proxy.stall()
    assert proxy.stalled
    with pytest.raises(redis.TimeoutError):
        impatient.set(key, "held")
    assert direct.get(key) is None  # not forwarded while stalled
    proxy.resume()
    assert not proxy.stalled
    wait_for(lambda: direct.get(key) == b"held", timeout=2, what="the held SET to reach Redis")
    assert connect(proxy.url, timeout=0.3).get(key) == b"held"

    # A timed stall releases by itself, and what was held arrives intact.
    patient = connect(proxy.url, timeout=2)
    assert patient.ping()
    proxy.stall(0.3)
    started = time.monotonic()
    assert patient.get(key) == b"held"
    assert time.monotonic() - started >= 0.25
    assert proxy.dropped == 0


def test_cut_breaks_open_connections_and_new_ones_work(proxy: FaultProxy, connect: Connect) -> None:
    # One connection, used as it is: a pool would check it on checkout and quietly reconnect.
    pinned = connect(proxy.url, single_connection_client=True)
    assert pinned.ping()
    assert proxy.active == 1
    assert proxy.cut() == 1
    assert proxy.active == 0
    with pytest.raises(redis.ConnectionError):
        pinned.ping()
    assert connect(proxy.url).ping()
    assert proxy.connections == 2

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=2) as sock:
        sock.sendall(resp("PING"))
        assert sock.recv(64) == b"+PONG\r\n"
        assert proxy.cut(reset=True) == 2  # the redis-py client's pooled connection too
        with pytest.raises(ConnectionResetError):
            sock.recv(64)


def test_refuse_closes_new_connections_until_turned_off(proxy: FaultProxy, connect: Connect) -> None:
    proxy.refuse(True)
    with pytest.raises(redis.ConnectionError):
        connect(proxy.url).ping()
    assert (proxy.connections, proxy.active) == (1, 0)
    proxy.refuse(False)
    assert connect(proxy.url).ping()
    assert (proxy.connections, proxy.active) == (2, 1)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc")
def test_close_leaves_no_thread_or_socket(settings: Settings, connect: Connect) -> None:
    assert not proxy_threads()
    proxy = FaultProxy.from_url(settings.redis_url).start()
    port, name = proxy.port, f"proxy-{uuid.uuid4().hex[:8]}"
    direct = connect(settings.redis_url)
    try:
        assert connect(proxy.url, client_name=name).ping()
        raw = socket.create_connection(("127.0.0.1", port), timeout=2)
        raw.sendall(resp("PING"))
        assert raw.recv(64) == b"+PONG\r\n"
        assert [t.name for t in proxy_threads()] == [f"FaultProxy-{port}"]
        assert len(sockets_on_port(port)) == 5  # listener, two accepted, two client ends
        assert [c["name"] for c in direct.client_list() if c["name"] == name] == [name]
    finally:
        proxy.close()
    assert not proxy_threads()
    with raw:
        assert raw.recv(64) == b""  # the proxy's side is closed, with a connection still open
    assert len(sockets_on_port(port)) == 1  # only the redis-py client's end, which it owns
    wait_for(
        lambda: not [c for c in direct.client_list() if c["name"] == name],
        timeout=2,
        what="Redis to see the proxy's upstream connection close",
    )
    with pytest.raises(RuntimeError):
        proxy.stall()
    proxy.close()  # idempotent


def test_a_failing_predicate_surfaces_when_the_proxy_closes(settings: Settings, connect: Connect) -> None:
    def broken(request: bytes) -> bool:
        raise KeyError("bug in a predicate")

    with pytest.raises(RuntimeError, match="bug in a predicate"), FaultProxy.from_url(settings.redis_url) as proxy:
        proxy.drop_reply_matching(broken)
        assert connect(proxy.url).ping()  # treated as no match


def test_a_dead_upstream_means_a_dead_proxy() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead: int = probe.getsockname()[1]
    with FaultProxy(("127.0.0.1", dead)) as proxy:
        client = redis.Redis.from_url(proxy.url, socket_timeout=2, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()
        assert (proxy.connections, proxy.active) == (1, 0)


def test_only_loopback_upstreams() -> None:
    for upstream in ("192.0.2.1", "example.invalid", "0.0.0.0"):
        with pytest.raises(ValueError, match="loopback"):
            FaultProxy((upstream, 1))
    with pytest.raises(ValueError):
        FaultProxy.from_url("unix:///tmp/redis.sock")
    assert FaultProxy.from_url("redis://localhost:1/3").upstream == ("127.0.0.1", 1)
