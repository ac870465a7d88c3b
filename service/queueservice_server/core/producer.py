"""The queue core on the API side: writes jobs and reads them back, on redis.asyncio.

Each job is one ENQUEUE script call (record, order in its queue, idempotency
key, the QUEUE_MAX_WAITING check: one atomic step); a batch is one pipelined
round trip, with one call per queue it names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio

from queueservice_server.core.codec import MessageDecodeError, decode_message, encode_message, fresh_message
from queueservice_server.core.jobs import JobRecord, State, new_local_ids, split_job_id
from queueservice_server.core.keys import QueueKeys
from queueservice_server.core.scripts import Scripts, call, decode_enqueue, execute_async
from queueservice_server.settings import Settings
from queueservice_server.tasks import Policy

# ENQUEUE's answer when QUEUE_MAX_WAITING refused the call (see lua.ENQUEUE).
FULL = b"FULL"


@dataclass(frozen=True)
class JobSpec:
    """A validated request for one job, with its effective policy."""

    queue: str
    task: str
    payload: dict[str, Any]
    policy: Policy
    priority: int = 0
    delay_ms: int = 0
    due_at_ms: int = 0
    idempotency_key: str = ""


class QueueFull(Exception):
    """ENQUEUE refused the jobs of `full` (queue -> its waiting + delayed jobs): they would have
    taken it past QUEUE_MAX_WAITING. Each queue's part of a batch is one atomic step, so the
    jobs of a batch's other queues (`enqueued`: queue -> count) were written."""

    def __init__(self, limit: int, full: dict[str, int], new: dict[str, int], enqueued: dict[str, int]) -> None:
        parts = [
            f"queue {queue!r} has {present} waiting or delayed jobs and its limit is {limit} (QUEUE_MAX_WAITING): "
            f"its {new[queue]} new jobs were not enqueued"
            for queue, present in full.items()
        ]
        if enqueued:
            done = ", ".join(f"{count} for queue {queue!r}" for queue, count in enqueued.items())
            parts.append(f"this batch's jobs {done} were enqueued (idempotency keys make a retry of it safe)")
        super().__init__("; ".join(parts) + "; retry once workers have drained it")
        self.subject = ",".join(f"queue:{queue}" for queue in full)


@dataclass(frozen=True)
class Retried:
    job_ids: list[str]
    not_found: list[str]
    not_failed: list[str]


@dataclass(frozen=True)
class Enqueued:
    job_id: str
    enqueued_at_ms: int
    deduplicated: bool


class Producer:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.client = client
        self.scripts = Scripts.bind(client)

    def keys(self, queue: str) -> QueueKeys:
        return QueueKeys(self.settings.key_prefix, queue)

    async def enqueue(self, specs: Sequence[JobSpec]) -> list[Enqueued]:
        """One ENQUEUE call per queue in the batch, in one round trip; results in request order."""
        by_queue: dict[str, list[int]] = {}
        for index, spec in enumerate(specs):
            by_queue.setdefault(spec.queue, []).append(index)
        calls = [(queue, self._enqueue_call(queue, [specs[i] for i in indexes])) for queue, indexes in by_queue.items()]
        if len(calls) == 1:
            _, (keys, args) = calls[0]
            replies = [await self.scripts.enqueue(keys=keys, args=args)]
        else:

            def build(pipe: Any) -> None:
                for _, (keys, args) in calls:
                    call(self.scripts.enqueue, keys, args, pipe)

            replies = await execute_async(self.client, self.scripts, build)
        full = {queue: int(reply[1]) for (queue, _), reply in zip(calls, replies, strict=True) if reply[:1] == [FULL]}
        if full:
            new = {queue: len(by_queue[queue]) for queue in full}
            enqueued = {queue: len(indexes) for queue, indexes in by_queue.items() if queue not in full}
            raise QueueFull(self.settings.max_waiting, full, new, enqueued)
        results: list[Enqueued | None] = [None] * len(specs)
        for (queue, _), reply, indexes in zip(calls, replies, by_queue.values(), strict=True):
            for index, (local, dedup, at) in zip(indexes, decode_enqueue(reply), strict=True):
                results[index] = Enqueued(job_id=f"{queue}:{local}", enqueued_at_ms=at, deduplicated=dedup)
        return [result for result in results if result is not None]

    def _enqueue_call(self, queue: str, specs: Sequence[JobSpec]) -> tuple[list[str], list[Any]]:
        """The ENQUEUE script's keys and arguments for new jobs of one queue."""
        keys = self.keys(queue)
        jobs = [
            [
                local,
                encode_message(
                    payload=spec.payload,
                    retries=spec.policy.max_attempts - 1,
                    retry_delay=spec.policy.retry_delay,
                    retry_backoff=spec.policy.retry_backoff,
                    timeout=spec.policy.timeout,
                ),
                spec.task,
                spec.priority,
                spec.delay_ms,
                spec.due_at_ms,
                spec.policy.max_attempts,
                int(spec.policy.timeout * 1000),
                spec.idempotency_key,
            ]
            for local, spec in zip(new_local_ids(len(specs)), specs, strict=True)
        ]
        # Redis's Lua msgpack predates the bin and str8 types: the old raw format only.
        blob = msgpack.packb(jobs, use_bin_type=False)
        args = [
            keys.job_prefix,
            keys.idempotency(""),
            int(self.settings.idempotency_window * 1000),
            blob,
            self.settings.max_waiting,
        ]
        return [keys.waiting, keys.delayed, keys.counters], args

    async def get_job(self, job_id: str) -> JobRecord | None:
        parts = split_job_id(job_id)
        if parts is None or parts[0] not in self.settings.queues:
            return None
        queue, local = parts
        fields: dict[bytes, bytes] = await self.client.hgetall(self.keys(queue).job(local))  # type: ignore[assignment]
        if not fields:
            return None
        return JobRecord.from_hash(queue, local, fields)

    async def retry_failed(self, queue: str, job_ids: Sequence[str], task: str, limit: int) -> Retried:
        """Failed jobs of `queue` (those named, or all), of `task` if given, at most `limit` (0: all),
        back to waiting with a fresh attempt count. The move is guarded in Lua, so a job that two
        calls both chose moves once."""
        keys = self.keys(queue)
        not_found: list[str] = []
        if job_ids:
            locals_: list[str] = []
            for job_id in job_ids:
                parts = split_job_id(job_id)
                if parts is None or parts[0] != queue:
                    not_found.append(job_id)
                else:
                    locals_.append(parts[1])
        else:
            # The failed set is capped by retention (QUEUE_KEEP_FAILED), so listing it is cheap.
            members: list[bytes] = await self.client.zrange(keys.failed, 0, -1)  # type: ignore[assignment]
            locals_ = [member.decode(errors="replace") for member in members]
        async with self.client.pipeline(transaction=False) as pipe:
            for local in locals_:
                pipe.hgetall(keys.job(local))
            hashes: list[dict[bytes, bytes]] = await pipe.execute()
        chosen: list[str] = []
        pairs: list[str | bytes] = []
        not_failed: list[str] = []
        for local, fields in zip(locals_, hashes, strict=True):
            if not fields:
                not_found.append(f"{queue}:{local}")
                continue
            record = JobRecord.from_hash(queue, local, fields)
            if record.state is not State.FAILED:
                not_failed.append(record.id)
            elif (not task or record.task == task) and (not limit or len(chosen) < limit):
                chosen.append(local)
                pairs += [local, self._fresh(record.msg, record.max_attempts or 1)]
        moved: set[bytes] = set()
        if pairs:
            moved = set(
                await self.scripts.retry_failed(
                    keys=[keys.failed, keys.waiting, keys.counters], args=[keys.job_prefix, *pairs]
                )
            )
        retried = [f"{queue}:{local}" for local in chosen if local.encode() in moved]
        if job_ids:
            # A job chosen here but moved meanwhile by a concurrent call is no longer failed.
            not_failed += [f"{queue}:{local}" for local in chosen if local.encode() not in moved]
        return Retried(job_ids=retried, not_found=not_found, not_failed=not_failed if job_ids else [])

    @staticmethod
    def _fresh(msg: bytes, max_attempts: int) -> bytes:
        try:
            return fresh_message(decode_message(msg), max_attempts)
        except MessageDecodeError:
            # Retried as it is: it fails again, with the same clear error.
            return msg
