"""Real parts for the rows: a fresh redis-server (the embedded binary) on a free
loopback port per row, our gRPC server, the echo server, our workers and
plain Huey's consumer as child processes, and Redis bookkeeping (counts,
memory, filling queues through the service's own producer).

Servers and workers run in processes of their own, started the way operators
start them, so the load generator (this process) shares no GIL with what it
measures; subject and baseline processes are started the same way.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import redis

from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.producer import JobSpec, Producer
from queueservice_server.core.redis import async_client
from queueservice_server.embedded import RedisServer, free_port
from queueservice_server.settings import Settings
from queueservice_server.tasks import TaskPolicy

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
PREFIX = "bench"
QUEUE = "default"
LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without QUEUE_* (the bench decides them), plus `extra`, with the repo importable."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_")}
    paths = [str(ROOT / "client"), str(ROOT / "service"), str(ROOT)]
    return {**base, **extra, "PYTHONPATH": os.pathsep.join(paths)}


def service_env(settings: Settings) -> dict[str, str]:
    return child_env(settings.to_env())


class Child:
    """A child process in its own session (so its whole group can be killed), logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, stop_signal: int, grace: float) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.grace = grace
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, stdout: int | None = None) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file if stdout is None else stdout,
                stderr=log_file,
                start_new_session=True,
            )
        return self.process

    def stop(self) -> None:
        """The graceful signal, then SIGKILL to the whole group after the grace."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(self.grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (Linux /proc; its children not included)."""
        assert self.process is not None
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        # Fields after the parenthesized command name; utime and stime are the 14th and 15th of the line.
        after_name = stat.rsplit(")", 1)[1].split()
        return (int(after_name[11]) + int(after_name[12])) / CLOCK_TICKS

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(self.args)} exited with {self.process.returncode}:\n{tail}")

    def __enter__(self) -> Child:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GrpcServer(Child):
    """A gRPC server child on a free loopback port, ready once it prints its ready line."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, ready: str, port: int) -> None:
        super().__init__(args, env, log_path, signal.SIGTERM, 15.0)
        self.ready = ready
        self.port = port

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def __enter__(self) -> GrpcServer:
        process = self.start(stdout=subprocess.PIPE)
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if self.ready not in line:
            self.stop()
            self.check_alive()
            raise RuntimeError(f"{' '.join(self.args)}: expected {self.ready!r}, got {line!r}")
        return self


def serve_process(settings: Settings, log_dir: Path) -> GrpcServer:
    """`queue-service serve` on the bench's Redis, with no in-process workers (they run apart)."""
    port = free_port()
    settings = replace(settings, grpc_address=f"{LOOPBACK}:{port}", serve_workers=False)
    return GrpcServer(
        [sys.executable, "-m", "queueservice_server", "serve"],
        service_env(settings),
        log_dir / "serve.log",
        "queue-service: gRPC on",
        port,
    )


def echo_process(settings: Settings, log_dir: Path) -> GrpcServer:
    """The bare baseline server (`python -m bench.echo_server`), with the same server options."""
    port = free_port()
    return GrpcServer(
        [sys.executable, "-m", "bench.echo_server", f"{LOOPBACK}:{port}"],
        service_env(settings),
        log_dir / "echo.log",
        "echo: gRPC on",
        port,
    )


def worker_process(settings: Settings, log_dir: Path) -> Child:
    """`queue-service worker`, as operators start it; SIGTERM lets it hand back what it holds."""
    return Child(
        [sys.executable, "-m", "queueservice_server", "worker"],
        service_env(settings),
        log_dir / f"worker-c{settings.concurrency}.log",
        signal.SIGTERM,
        settings.shutdown_grace + 10,
    )


def huey_process(redis_url: str, workers: int, worker_type: str, log_dir: Path) -> Child:
    """Plain Huey's consumer (`python -m bench.huey_consumer`); SIGINT is its graceful stop."""
    return Child(
        [sys.executable, "-m", "bench.huey_consumer", redis_url, str(workers), worker_type],
        child_env({}),
        log_dir / f"huey-{worker_type}-{workers}.log",
        signal.SIGINT,
        15.0,
    )


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


async def _open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target)


class ClientLoop:
    """The load generator's event loop and the grpc.aio channels on it: a channel
    belongs to the loop it was created in, so channels are made inside it."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.channels: list[grpc.aio.Channel] = []

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.runner.run(_awaited(awaitable))

    def channel(self, target: str) -> grpc.aio.Channel:
        channel = self.run(_open_channel(target))
        self.channels.append(channel)
        return channel

    def __enter__(self) -> ClientLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        for channel in self.channels:
            self.run(channel.close(None))
        self.runner.close()


@dataclass(frozen=True)
class Drain:
    """A drain from the first job taken to the last one done, with where the CPU went meanwhile."""

    jobs: int
    seconds: float
    # CPU seconds: Redis's, and every process's on the machine (Redis, workers, this bench, neighbours).
    redis_cpu: float
    machine_cpu: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    @property
    def redis_us_per_job(self) -> float:
        return self.redis_cpu / self.jobs * 1e6

    @property
    def others_us_per_job(self) -> float:
        """CPU per job outside Redis: mostly the workers (the bench only polls a few counts)."""
        return (self.machine_cpu - self.redis_cpu) / self.jobs * 1e6

    @property
    def machine_busy(self) -> float:
        """The fraction of all cores busy during the drain."""
        return self.machine_cpu / (self.seconds * (os.cpu_count() or 1))


def machine_cpu() -> float:
    """Busy CPU seconds over all cores since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLOCK_TICKS


class Bench:
    """One row's fresh Redis (no persistence: the comparison is of round trips,
    not of disks), its log directory and a plain sync client on it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.redis_server = RedisServer(directory / "redis", appendonly=False)
        self.redis = redis.Redis(port=self.redis_server.port)

    @property
    def url(self) -> str:
        return self.redis_server.url

    def settings(self, **overrides: Any) -> Settings:
        """The service's defaults, but quiet logs, a short shutdown, the bench's key prefix, and
        no rate limit: 100 jobs/min by default would cap every drain, and the bench measures the machinery."""
        base = Settings(
            redis_url=self.url,
            key_prefix=PREFIX,
            shutdown_grace=5.0,
            grpc_grace=1.0,
            log_level="WARNING",
            rate_limit_max=0,
        )
        return replace(base, **overrides)

    def redis_cpu(self) -> float:
        """CPU seconds the Redis server has used (INFO cpu)."""
        info: dict[str, Any] = self.redis.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def measure_drain(
        self, taken: Callable[[], int], done: Callable[[], int], total: int, alive: Callable[[], None]
    ) -> Drain:
        """The clock starts when the first job is taken (process start-up is not
        timed) and stops when `done` reaches `total`; `alive` raises if a process died."""
        deadline = time.monotonic() + 60 + total / 100
        while taken() == 0:
            alive()
            if time.monotonic() > deadline:
                raise TimeoutError("no job was taken")
            time.sleep(0.002)
        start, redis_start, machine_start = time.perf_counter(), self.redis_cpu(), machine_cpu()
        while (finished := done()) < total:
            alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{total - finished} of {total} jobs still not done")
            time.sleep(0.002)
        seconds = time.perf_counter() - start
        return Drain(total, seconds, self.redis_cpu() - redis_start, machine_cpu() - machine_start)

    def flush(self) -> None:
        self.redis.flushall()

    def used_memory(self) -> int:
        info: dict[str, Any] = self.redis.info("memory")
        return int(info["used_memory"])

    def script_usec(self) -> float:
        """Redis's own time in EVALSHA since the last CONFIG RESETSTAT (INFO commandstats)."""
        stats: dict[str, Any] = self.redis.info("commandstats")
        return float(stats.get("cmdstat_evalsha", {}).get("usec", float("nan")))

    def keys(self, queue: str = QUEUE) -> QueueKeys:
        return QueueKeys(PREFIX, queue)

    def waiting(self, queue: str = QUEUE) -> int:
        return int(self.redis.zcard(self.keys(queue).waiting))

    def finished(self, queue: str = QUEUE) -> tuple[int, int]:
        """(completed, failed) so far, counting records that retention evicted."""
        keys = self.keys(queue)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.completed)
            pipe.zcard(keys.failed)
            pipe.hmget(keys.counters, "evicted_completed", "evicted_failed")
            completed, failed, (evicted_completed, evicted_failed) = pipe.execute()
        return int(completed) + int(evicted_completed or 0), int(failed) + int(evicted_failed or 0)

    def fill(self, count: int, queue: str = QUEUE, chunk: int = 2000) -> None:
        """Writes `count` waiting diag.noop jobs with payload {"n": i} through the
        service's Producer (the ENQUEUE script the API runs), `chunk` per pipelined round trip."""
        asyncio.run(self.fill_async(count, queue, chunk))

    async def fill_async(self, count: int, queue: str = QUEUE, chunk: int = 2000) -> None:
        settings = self.settings()
        client = async_client(settings, self.url)
        try:
            producer = Producer(settings, client)
            for start in range(0, count, chunk):
                end = min(count, start + chunk)
                await producer.enqueue([noop_spec(settings, i, queue) for i in range(start, end)])
        finally:
            await client.aclose()


def noop_spec(settings: Settings, n: int, queue: str = QUEUE) -> JobSpec:
    """A diag.noop job with payload {"n": n} and the settings' default policy."""
    return JobSpec(queue=queue, task="diag.noop", payload={"n": n}, policy=TaskPolicy().resolve(settings))


@contextmanager
def fresh_redis(directory: Path) -> Iterator[Bench]:
    directory.mkdir(parents=True, exist_ok=True)
    bench = Bench(directory)
    bench.redis_server.start()
    try:
        yield bench
    finally:
        bench.redis.close()
        bench.redis_server.stop()
