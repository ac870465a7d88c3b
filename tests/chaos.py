"""The parts of the chaos run that are not pytest: the settings its processes run with, the
enqueuer, the seeded fault driver and its tally. tests/reliability/test_chaos.py drives them
under pytest's fixtures; bench/rows_chaos.py (row 7) drives them from the bench.

The driver needs only small things from its caller: a Redis it can stop and start again
(`RedisControl`, e.g. queueservice_server.embedded.RedisServer), something that loses the
next reply matching a request (`ReplyDropper`, e.g. tests/proxy.py's FaultProxy) and the pids
of the consumer processes now running (`consumer_pids`, e.g. `running_pids(workers)`).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from subprocess import Popen
from typing import Protocol

import grpc
import redis

from queueservice.v1 import queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.core import lua
from queueservice_server.core.keys import QueueKeys
from queueservice_server.settings import Settings
from tests import chaos_tasks
from tests.support import request

QUEUE = "default"
BATCH = 100
CONSUMERS = 3
FAIL_ONCE_SHARE = 0.05
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# The faults, and how often the driver picks each.
FAULTS = ("kill", "redis", "TAKE", "SETTLE")
FAULT_WEIGHTS = (4, 2, 2, 2)


class RedisControl(Protocol):
    """The Redis server the chaos restarts (SIGTERM, so the AOF is flushed)."""

    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...

    def start(self) -> None: ...


class ReplyDropper(Protocol):
    """Loses the reply of the next request for which `predicate(request bytes)` holds."""

    def drop_reply_matching(self, predicate: Callable[[bytes], bool]) -> None: ...


class Spawned(Protocol):
    """A child process handle: tests.support.WorkerProcess, bench.infra.Child."""

    @property
    def process(self) -> Popen[bytes] | None: ...


def running_pids(children: Iterable[Spawned]) -> Callable[[], set[int]]:
    """The pids of `children` that have been started (for `Driver(consumer_pids=...)`)."""
    listed = list(children)

    def pids() -> set[int]:
        return {child.process.pid for child in listed if child.process is not None}

    return pids


def chaos_settings(base: Settings, redis_url: str) -> Settings:
    """`base` as the chaos run's processes run it: one queue, the chaos task, 2 worker processes per
    consumer, a 2 s stall interval, no rate limit, and retention that keeps everything the
    invariants count."""
    return replace(
        base,
        redis_url=redis_url,
        queues=(QUEUE,),
        task_modules=("tests.chaos_tasks",),
        worker_concurrency=2,
        stall_interval=2.0,
        rate_limit_max=0,
        keep_completed=1_000_000,
        keep_failed=1_000_000,
        timings_retained=1_000_000,
    )


def executions_key(settings: Settings) -> str:
    """Where chaos.work records the executions of this run's jobs."""
    return f"{settings.key_prefix}:chaos:executions"


def sha(script: str) -> bytes:
    return hashlib.sha1(script.encode()).hexdigest().encode()


@dataclass
class Tally:
    kills: int = 0
    kills_skipped: int = 0  # no worker process was running a job at that moment
    redis_restarts: int = 0
    drops_armed: dict[str, int] = field(default_factory=lambda: {"TAKE": 0, "SETTLE": 0})
    batches_refused: int = 0
    log: list[str] = field(default_factory=list)


def parent_pid(pid: int) -> int:
    """The parent of live process `pid`, or 0 (gone, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0
    return 0 if fields[0] == "Z" else int(fields[1])


class Enqueuer(threading.Thread):
    """Enqueues `jobs` chaos.work jobs in batches of BATCH spread evenly over `spread` seconds (0:
    as fast as the API accepts them); a refused batch is sent again as new jobs (new ids, new `n`):
    only the ids of accepted batches are kept."""

    def __init__(
        self, address: str, executions_key: str, rng: random.Random, tally: Tally, *, jobs: int, spread: float
    ) -> None:
        super().__init__(name="chaos-enqueuer", daemon=True)
        self.channel = grpc.insecure_channel(address)
        self.stub = queue_service_pb2_grpc.QueueServiceStub(self.channel)
        self.executions_key = executions_key
        self.rng = rng
        self.tally = tally
        self.jobs = jobs
        self.spread = spread
        self.accepted: list[str] = []
        self.fail_once = 0
        # time.time() just before the first batch was sent.
        self.first_sent: float | None = None
        self.error: BaseException | None = None
        self._next_n = 0

    def _batch(self) -> tuple[queue_service_pb2.EnqueueBatchRequest, int]:
        jobs, failing = [], 0
        for _ in range(BATCH):
            fail_once = self.rng.random() < FAIL_ONCE_SHARE
            failing += fail_once
            seconds = round(self.rng.uniform(0.01, 0.05), 3)
            payload = chaos_tasks.payload(self.executions_key, self._next_n, seconds, fail_once=fail_once)
            jobs.append(request(chaos_tasks.TASK, payload))
            self._next_n += 1
        return queue_service_pb2.EnqueueBatchRequest(jobs=jobs), failing

    def run(self) -> None:
        began = time.monotonic()
        batches = self.jobs // BATCH
        try:
            for index in range(batches):
                time.sleep(max(0.0, began + index * self.spread / batches - time.monotonic()))
                while True:
                    batch, failing = self._batch()
                    if self.first_sent is None:
                        self.first_sent = time.time()
                    try:
                        response = self.stub.EnqueueBatch(batch, timeout=10)
                    except grpc.RpcError as exc:
                        if exc.code() not in RETRYABLE:
                            raise
                        self.tally.batches_refused += 1
                        time.sleep(0.2)
                        continue
                    self.accepted += [result.job_id for result in response.results]
                    self.fail_once += failing
                    break
        except BaseException as exc:
            self.error = exc
        finally:
            self.channel.close()


class Driver(threading.Thread):
    """Every 0.2-1.5 s (seeded), one fault: SIGKILL a worker process that is running a job,
    restart Redis (SIGTERM, ~1 s down), or lose the reply of the next TAKE or SETTLE.
    Runs until `stop` is set; each fault is told to `say` and kept in `tally.log`."""

    def __init__(
        self,
        *,
        rng: random.Random,
        server: RedisControl,
        proxy: ReplyDropper,
        key_prefix: str,
        consumer_pids: Callable[[], Iterable[int]],
        tally: Tally,
        say: Callable[[str], object] = print,
    ) -> None:
        super().__init__(name="chaos-driver", daemon=True)
        self.rng = rng
        self.server = server
        self.proxy = proxy
        self.keys = QueueKeys(key_prefix, QUEUE)
        self.consumer_pids = consumer_pids
        self.tally = tally
        self.say = say
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.began = time.monotonic()

    def note(self, text: str) -> None:
        line = f"chaos t={time.monotonic() - self.began:5.1f}s {text}"
        self.tally.log.append(line)
        self.say(line)

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.2, 1.5)):
                action = self.rng.choices(FAULTS, weights=FAULT_WEIGHTS)[0]
                if action == "kill":
                    self.kill_a_worker_process()
                elif action == "redis":
                    self.restart_redis(self.rng.uniform(0.8, 1.2))
                else:
                    self.drop(action)
        except BaseException as exc:
            self.error = exc

    def kill_a_worker_process(self) -> None:
        """A worker process (not a consumer, not its scheduler) that holds an active job."""
        consumer_pids = set(self.consumer_pids())
        client = redis.Redis.from_url(self.server.url, socket_timeout=2)
        try:
            keys = self.keys
            active: list[bytes] = client.zrange(keys.active, 0, -1)  # type: ignore[assignment]
            with client.pipeline(transaction=False) as pipe:
                for local in active:
                    pipe.hget(keys.job(local.decode()), "worker")
                holders: list[bytes | None] = pipe.execute()
        except redis.RedisError as exc:
            self.note(f"kill skipped: {exc!r}")
            self.tally.kills_skipped += 1
            return
        finally:
            client.close()
        pids = {int(holder.rsplit(b":", 1)[1]) for holder in holders if holder}
        candidates = sorted(pid for pid in pids if parent_pid(pid) in consumer_pids)
        if not candidates:
            self.note("kill skipped: no worker process is running a job")
            self.tally.kills_skipped += 1
            return
        victim = self.rng.choice(candidates)
        parent = parent_pid(victim)
        try:
            os.kill(victim, 9)
        except ProcessLookupError:
            self.tally.kills_skipped += 1
            return
        self.tally.kills += 1
        self.note(f"SIGKILL worker process {victim} (of consumer {parent})")

    def restart_redis(self, down: float) -> None:
        self.server.stop()
        self.note(f"redis stopped (SIGTERM) for {down:.2f}s")
        time.sleep(down)
        self.server.start()
        self.tally.redis_restarts += 1
        self.note("redis started")

    def drop(self, script: str) -> None:
        digest = sha(lua.TAKE if script == "TAKE" else lua.SETTLE)

        def matches(command: bytes) -> bool:
            return digest in command

        self.proxy.drop_reply_matching(matches)
        self.tally.drops_armed[script] += 1
        self.note(f"drop the next {script} reply")


def unfinished(settings: Settings) -> int:
    """Jobs of the queue still waiting, delayed or active (raises redis errors while Redis is down)."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        keys = QueueKeys(settings.key_prefix, QUEUE)
        with client.pipeline(transaction=False) as pipe:
            for key in (keys.waiting, keys.delayed, keys.active):
                pipe.zcard(key)
            sizes: list[int] = pipe.execute()
        return sum(sizes)
    finally:
        client.close()
