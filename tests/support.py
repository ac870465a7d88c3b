"""Real parts for tests: gRPC servers on port 0 in a background event loop, and
worker processes started the way operators start them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
import redis
from google.protobuf import struct_pb2

from queueservice.v1 import queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.api.server import App, create_server
from queueservice_server.core.keys import QueueKeys
from queueservice_server.settings import Settings

T = TypeVar("T")
QueueStub = queue_service_pb2_grpc.QueueServiceStub
ROOT = Path(__file__).resolve().parent.parent


def stub_for(address: str) -> queue_service_pb2_grpc.QueueServiceStub:
    return queue_service_pb2_grpc.QueueServiceStub(grpc.insecure_channel(address))


def request(task: str, payload: dict[str, Any] | None = None, **fields: Any) -> queue_service_pb2.EnqueueRequest:
    struct = struct_pb2.Struct()
    struct.update(payload or {})
    return queue_service_pb2.EnqueueRequest(task=task, payload=struct, **fields)


def enqueue_counted(
    stub: queue_service_pb2_grpc.QueueServiceStub, counter: str, jobs: int, seconds: float
) -> list[str]:
    """`jobs` test.count jobs (tests/lifecycle_tasks.py) that sleep `seconds` and count each run in `counter`."""
    batch = [request("test.count", {"n": n, "seconds": seconds, "counter": counter}) for n in range(jobs)]
    response = stub.EnqueueBatch(queue_service_pb2.EnqueueBatchRequest(jobs=batch))
    return [result.job_id for result in response.results]


def cli_env(queue: Mapping[str, str]) -> dict[str, str]:
    """The environment of a `queue-service` process: ours without any QUEUE_* variable, the
    source roots (and the repository, for task modules under tests/) on PYTHONPATH, then `queue`."""
    paths = [str(ROOT / "client"), str(ROOT / "service"), str(ROOT)]
    base = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_")}
    return {**base, "PYTHONPATH": os.pathsep.join(paths), **queue}


def process_env(settings: Settings) -> dict[str, str]:
    return cli_env(settings.to_env())


def run_cli(command: str, queue: Mapping[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m queueservice_server <command>` to its end, with only `queue`'s QUEUE_* variables."""
    return subprocess.run(
        [sys.executable, "-m", "queueservice_server", command],
        env=cli_env(queue),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Serve:
    """`queue-service serve` as an operator starts it, in its own session: QUEUE_* from `env` only
    (embedded Redis unless it names QUEUE_REDIS_URL). `banner` is its first stdout line ('' when it
    exited instead), stderr goes to `log`."""

    def __init__(self, data_dir: Path, port: int, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.address = f"127.0.0.1:{port}"
        self.log = log
        queue = {
            "QUEUE_DATA_DIR": str(data_dir),
            "QUEUE_GRPC_ADDRESS": self.address,
            "QUEUE_POLL_INTERVAL": "0.02",
            **(env or {}),
        }
        with open(log, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "queueservice_server", "serve"],
                env=cli_env(queue),
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        assert self.process.stdout is not None
        self.banner = self.process.stdout.readline().decode()

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)

    def stderr_text(self) -> str:
        return self.log.read_text(errors="replace")


class ServerThread:
    """A real grpc.aio server on 127.0.0.1:0, running in its own thread's event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: App | None = None

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> str:
        self.thread.start()

        async def build() -> App:
            app = create_server(self.settings, self.settings.redis_url, "127.0.0.1:0")
            await app.start()
            return app

        self.app = self.run(build())
        return f"127.0.0.1:{self.app.port}"

    def stop(self) -> None:
        if self.app is not None:
            self.run(self.app.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class WorkerProcess:
    """`python -m queueservice_server worker` with the given settings."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "queueservice_server", "worker"],
                env=process_env(self.settings),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        return self

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the consumer and every worker process it forked."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(self.settings.shutdown_grace + 10)
        except subprocess.TimeoutExpired:
            self.kill_group()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(check: Callable[[], T | None], timeout: float, interval: float = 0.02, what: str = "condition") -> T:
    """Polls `check` until it returns something truthy; fails with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def job_hashes(settings: Settings, job_ids: list[str]) -> dict[str, dict[bytes, bytes]]:
    """Every job's record, read straight from Redis in one round trip (ids are `queue:local`)."""
    client = redis.Redis.from_url(settings.redis_url)
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            queue, _, local = job_id.rpartition(":")
            pipe.hgetall(QueueKeys(settings.key_prefix, queue).job(local))
        records: list[dict[bytes, bytes]] = pipe.execute()
    client.close()
    return dict(zip(job_ids, records, strict=True))


def states(settings: Settings, job_ids: list[str]) -> Counter[str]:
    return Counter(record.get(b"state", b"GONE").decode() for record in job_hashes(settings, job_ids).values())


def wait_all(settings: Settings, job_ids: list[str], state: str, timeout: float) -> None:
    def done() -> bool:
        return states(settings, job_ids)[state] == len(job_ids)

    try:
        wait_for(done, timeout, interval=0.2, what=f"{len(job_ids)} jobs {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {dict(states(settings, job_ids))}") from None


class ServeProcess:
    """`Serve` on `settings` (its Redis, its address, everything else), started by `start()`,
    with what /proc tells of the process: its memory and descriptors."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.address = settings.grpc_address
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        port = int(self.address.rpartition(":")[2])
        serve = Serve(self.settings.data_dir, port, self.log_path, self.settings.to_env())
        self.process = serve.process
        # The banner is printed once the server listens; a server that fails to start exits instead.
        if f"gRPC on {self.address}" not in serve.banner:
            self.stop()
            raise AssertionError(f"serve did not start: {serve.banner!r}\n{self.log_text()}")
        return self.address

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def status(self, field: str) -> int:
        """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM, ...), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
        raise KeyError(field)

    def rss(self) -> int:
        return self.status("VmRSS")

    def open_fds(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/fd").iterdir()))

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(self.settings.grpc_grace + 20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")
