"""What the lifecycle tests (test_lua, test_storage, test_supervisor) share: fixtures over the
`settings` Redis, jobs made through `Producer`, takes through `QueueOps` that keep the token
each attempt is fenced by, and readers of what Redis holds.

Test modules import the fixtures by name (`r`, `keys`) so pytest finds them.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pytest
import redis
import redis.asyncio

from queueservice_server.core.jobs import Token
from queueservice_server.core.keys import QueueKeys, ServiceKeys
from queueservice_server.core.producer import Enqueued, JobSpec, Producer
from queueservice_server.core.redis import time_ms
from queueservice_server.core.scripts import TakeReply
from queueservice_server.core.timings import Attempt, Outcome
from queueservice_server.settings import Settings
from queueservice_server.tasks import Policy
from queueservice_server.worker.queue_ops import QueueOps
from queueservice_server.worker.slots import Slot

T = TypeVar("T")

# Worker process ids are `consumer:pid`; the reaper spares the recent expiries of a consumer
# that stamps the queue's consumers set (RENEW does).
CONSUMER = "host-a:100"
WORKER = f"{CONSUMER}:101"
OTHER_CONSUMER = "host-b:200"
OTHER = f"{OTHER_CONSUMER}:201"
# A local id no job has.
GHOST = "f" * 32


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
def r(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def keys(settings: Settings) -> QueueKeys:
    return QueueKeys(settings.key_prefix, "default")


# -- making jobs -----------------------------------------------------------------


def with_producer(settings: Settings, use: Callable[[Producer], Awaitable[T]]) -> T:
    """Runs `use` on a Producer over a fresh redis.asyncio client, in its own event loop."""

    async def run() -> T:
        client = redis.asyncio.Redis.from_url(settings.redis_url)
        try:
            return await use(Producer(settings, client))
        finally:
            await client.aclose()

    return asyncio.run(run())


def spec(
    queue: str = "default",
    task: str = "t.work",
    *,
    max_attempts: int = 3,
    timeout: float = 300.0,
    retry_delay: float = 2.0,
    retry_backoff: float = 2.0,
    **fields: Any,
) -> JobSpec:
    policy = Policy(max_attempts=max_attempts, timeout=timeout, retry_delay=retry_delay, retry_backoff=retry_backoff)
    return JobSpec(queue=queue, task=task, payload=fields.pop("payload", {}), policy=policy, **fields)


def enqueue(settings: Settings, *specs: JobSpec) -> list[Enqueued]:
    return with_producer(settings, lambda producer: producer.enqueue(list(specs)))


def job_ids(settings: Settings, count: int, queue: str = "default", **fields: Any) -> list[str]:
    """`count` jobs of task t.work with payloads {"n": 0}, {"n": 1}, ...; `fields` go to `spec`."""
    specs = [spec(queue, payload={"n": n}, **fields) for n in range(count)]
    return [job.job_id for job in enqueue(settings, *specs)]


# -- taking and finishing, as a worker process does ------------------------------


@dataclass(frozen=True)
class Held:
    """One job of a TAKE reply, with the holder that took it."""

    queue: str
    local: str
    msg: bytes
    ready_at: int
    attempt: int
    task: str
    holder: str

    @property
    def job_id(self) -> str:
        return f"{self.queue}:{self.local}"

    @property
    def token(self) -> Token:
        return Token(self.job_id, self.attempt, self.holder)


@dataclass(frozen=True)
class Took:
    now: int
    wait_ms: int
    jobs: list[Held]


def take(ops: QueueOps, keys: QueueKeys, count: int, token: str = "") -> Took:
    """TAKE through QueueOps, under `token` (a fresh one by default)."""
    reply = TakeReply.decode(ops.take(keys, count, token or uuid.uuid4().hex))
    jobs = [
        Held(keys.queue, job.local_id, job.msg, job.ready_ms, job.attempt, job.task, ops.worker_id)
        for job in reply.jobs
    ]
    return Took(reply.now_ms, reply.wait_ms, jobs)


def outcome(
    job: Held,
    result: Outcome,
    start: int,
    finish: int,
    error: str = "",
    *,
    retry_msg: bytes = b"",
    retry_due_ms: int = 0,
) -> Attempt:
    """The attempt `job` stands for, finished with `result`: fenced by its token."""
    return Attempt(
        local_id=job.local,
        task=job.task,
        outcome=result,
        attempt=job.attempt,
        ready_ms=job.ready_at,
        start_ms=start,
        finish_ms=finish,
        holder=job.holder,
        error=error,
        retry_msg=retry_msg,
        retry_due_ms=retry_due_ms,
    )


def expire(r: redis.Redis, keys: QueueKeys, job: str | Held | Enqueued, ago_ms: int = 1) -> int:
    """Moves the lease deadline of an active job `ago_ms` into the past; returns the deadline."""
    deadline = redis_now(r) - ago_ms
    assert r.zadd(keys.active, {local(job): deadline}, xx=True, ch=True) == 1
    return deadline


def new_slot(capacity: int = 8) -> Slot:
    return Slot(multiprocessing.get_context("fork"), capacity=capacity)


def hold(worker: QueueOps, slot: Slot, queue: str, count: int) -> list[Held]:
    """Takes `count` jobs as a worker process does and publishes their tokens in its slot."""
    took = take(worker, worker.keys[queue], count)
    assert len(took.jobs) == count
    slot.set_held(worker.worker_id, [*slot.held(), *(job.token for job in took.jobs)])
    return took.jobs


# -- reading Redis ---------------------------------------------------------------


def local(job: str | Held | Enqueued) -> str:
    """The local id of a job id (`queue:local`), of a local id itself, or of a taken or enqueued job."""
    if isinstance(job, Held):
        return job.local
    job_id = job.job_id if isinstance(job, Enqueued) else job
    return job_id.rpartition(":")[2]


def record(r: redis.Redis, keys: QueueKeys, job: str | Held | Enqueued) -> dict[str, bytes]:
    raw = cast(dict[bytes, bytes], r.hgetall(keys.job(local(job))))
    return {name.decode(): value for name, value in raw.items()}


def state(r: redis.Redis, keys: QueueKeys, job: str | Held | Enqueued) -> str:
    return record(r, keys, job).get("state", b"GONE").decode()


def number(fields: dict[str, bytes], name: str) -> int:
    return int(fields[name])


def members(r: redis.Redis, key: str) -> list[str]:
    return [member.decode() for member in cast(list[bytes], r.zrange(key, 0, -1))]


def scores(r: redis.Redis, key: str) -> dict[str, int]:
    pairs = cast(list[tuple[bytes, float]], r.zrange(key, 0, -1, withscores=True))
    return {member.decode(): int(score) for member, score in pairs}


def counters(r: redis.Redis, keys: QueueKeys) -> dict[str, int]:
    raw = cast(dict[bytes, bytes], r.hgetall(keys.counters))
    return {name.decode(): int(value) for name, value in raw.items()}


def stream(r: redis.Redis, keys: QueueKeys) -> list[dict[str, str]]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(keys.timings))
    return [{name.decode(): value.decode() for name, value in fields.items()} for _, fields in entries]


def minute_hashes(r: redis.Redis, keys: QueueKeys) -> dict[str, dict[bytes, bytes]]:
    """Every per-minute figures hash of the queue, raw (as `tests.figures_model.minute_hash` builds them)."""
    found: dict[str, dict[bytes, bytes]] = {}
    for key in cast(Iterator[bytes], r.scan_iter(match=keys.minute_prefix + "*")):
        found[key.decode()] = cast(dict[bytes, bytes], r.hgetall(key))
    return found


def figures(r: redis.Redis, keys: QueueKeys) -> list[dict[bytes, bytes]]:
    """The minute hashes, oldest first (compare with `tests.figures_model.minute_hash`)."""
    return list(minute_hashes(r, keys).values())


def summed(r: redis.Redis, keys: QueueKeys, field: str) -> int:
    """A count summed over the minute hashes (a test's attempts may straddle a minute)."""
    return sum(int(fields.get(field.encode(), b"0")) for fields in figures(r, keys))


def redis_now(r: redis.Redis) -> int:
    return time_ms(cast(tuple[Any, Any], r.time()))


def registry(r: redis.Redis, settings: Settings, worker_id: str) -> dict[str, str]:
    raw = cast(dict[bytes, bytes], r.hgetall(ServiceKeys(settings.key_prefix).worker(worker_id)))
    return {name.decode(): value.decode() for name, value in raw.items()}


@dataclass(frozen=True)
class QueueState:
    """Everything of one queue a stale call must leave as it was (but the consumers set, which
    RENEW stamps whatever it renews)."""

    jobs: dict[str, dict[str, bytes]]
    sets: dict[str, dict[str, int]]
    counters: dict[str, int]
    stream: list[dict[str, str]]
    figures: dict[str, dict[bytes, bytes]]


def queue_state(r: redis.Redis, keys: QueueKeys, jobs: list[str]) -> QueueState:
    sets = {name: scores(r, getattr(keys, name)) for name in ("waiting", "delayed", "active", "completed", "failed")}
    return QueueState(
        jobs={job: record(r, keys, job) for job in jobs},
        sets=sets,
        counters=counters(r, keys),
        stream=stream(r, keys),
        figures=minute_hashes(r, keys),
    )


def lost_ids(slot: Slot) -> set[str]:
    """The job ids of the tokens the supervisor marked lost in `slot`."""
    return {token.job_id for token in slot.lost()}
