"""The queue core on the worker side: every move of a job between sets, as sync
calls of the Lua scripts, shared by worker processes and their supervisor.

Calls take an optional pipeline so a worker can ride its acks and its next
take on one round trip.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import redis

from queueservice_server.core.jobs import split_job_id
from queueservice_server.core.keys import QueueKeys, ServiceKeys
from queueservice_server.core.redis import time_ms
from queueservice_server.core.scripts import Scripts, call, execute
from queueservice_server.core.timings import Attempt, attempt_args, minute_figures
from queueservice_server.settings import Settings

PROMOTE_BATCH = 1000
REAP_BATCH = 1000
# A rate-limit token frees this long after its window (see lua.TAKE).
LIMIT_SLACK_MS = 250


def consumer_id(pid: int) -> str:
    """A consumer's id in the worker registry; its worker processes' ids extend it with their pid."""
    return f"{socket.gethostname()}:{pid}"


class QueueOps:
    def __init__(self, settings: Settings, client: redis.Redis, worker_id: str) -> None:
        self.settings = settings
        self.client = client
        self.worker_id = worker_id
        self.scripts = Scripts.bind(client)
        self.keys = {queue: QueueKeys(settings.key_prefix, queue) for queue in settings.queues}
        self.service_keys = ServiceKeys(settings.key_prefix)

    def locate(self, job_id: str) -> tuple[QueueKeys, str]:
        parts = split_job_id(job_id)
        if parts is None or parts[0] not in self.keys:
            raise ValueError(f"job id {job_id!r} names no configured queue")
        return self.keys[parts[0]], parts[1]

    def by_queue(self, job_ids: Iterable[str]) -> dict[QueueKeys, list[str]]:
        grouped: dict[QueueKeys, list[str]] = {}
        for job_id in job_ids:
            keys, local = self.locate(job_id)
            grouped.setdefault(keys, []).append(local)
        return grouped

    @property
    def lease_ms(self) -> int:
        """Leases are renewed every quarter stall interval and reaped as often, so a
        dead worker's job is back within 3/4 + 1/4 of the interval."""
        return int(self.settings.stall_interval * 750)

    def take(self, keys: QueueKeys, count: int, pipe: Any = None) -> Any:
        """Queues TAKE on `pipe` (or runs it): see lua.TAKE for the reply."""
        return call(
            self.scripts.take,
            [keys.waiting, keys.active, keys.limiter, keys.counters, keys.failed],
            [
                count,
                self.lease_ms,
                self.worker_id,
                keys.job_prefix,
                self.settings.rate_limit_max,
                int(self.settings.rate_limit_window * 1000),
                LIMIT_SLACK_MS,
                self.settings.keep_failed,
            ],
            pipe,
        )

    def settle(self, keys: QueueKeys, attempts: list[Attempt], pipe: Any = None) -> Any:
        """Queues SETTLE for attempts of one queue on `pipe` (or runs it)."""
        # Redis's Lua msgpack predates the bin and str8 types: the old raw format only.
        args: list[Any] = [
            keys.job_prefix,
            keys.minute_prefix,
            self.settings.keep_completed,
            self.settings.keep_failed,
            self.settings.timings_retained,
            int(self.settings.metrics_history) + 120,
            self.worker_id,
            msgpack.packb([attempt_args(attempt) for attempt in attempts], use_bin_type=False),
            msgpack.packb(minute_figures(attempts), use_bin_type=False),
        ]
        return call(
            self.scripts.settle,
            [keys.active, keys.completed, keys.failed, keys.delayed, keys.waiting, keys.counters, keys.timings],
            args,
            pipe,
        )

    def hand_back(self, job_ids: Iterable[str]) -> int:
        """Jobs taken but never started go back to where they stood."""
        back = 0
        for keys, locals_ in self.by_queue(job_ids).items():
            back += int(
                self.scripts.hand_back(
                    keys=[keys.active, keys.waiting, keys.counters], args=[keys.job_prefix, *locals_]
                )
            )
        return back

    def reap(self, keys: QueueKeys, reason: str, locals_: Iterable[str] = ()) -> tuple[int, int]:
        """(requeued, failed) of the given jobs, or of every job whose lease expired."""
        requeued, failed = self.scripts.reap(
            keys=[keys.active, keys.waiting, keys.failed, keys.counters],
            args=[keys.job_prefix, self.settings.max_stalls, self.settings.keep_failed, reason, REAP_BATCH, *locals_],
        )
        return int(requeued), int(failed)

    def renew(self, job_ids: Iterable[str]) -> None:
        grouped = self.by_queue(job_ids)
        if not grouped:
            return

        def build(pipe: Any) -> None:
            for keys, locals_ in grouped.items():
                call(self.scripts.renew, [keys.active], [self.lease_ms, *locals_], pipe)

        self.execute(build)

    def promote(self) -> None:
        """Moves every due delayed job to waiting (atomically per queue)."""

        def build(pipe: Any) -> None:
            for keys in self.keys.values():
                promote_keys = [keys.delayed, keys.waiting, keys.counters]
                call(self.scripts.promote, promote_keys, [keys.job_prefix, PROMOTE_BATCH], pipe)

        self.execute(build)

    def heartbeat(self, fields: dict[str, str | int]) -> None:
        """This consumer's registry entry (`keys.WorkerFields`), stamped on the Redis clock; it expires
        on its own after three stall intervals if never removed."""
        keys = self.service_keys
        self.scripts.heartbeat(
            keys=[keys.workers, keys.worker(self.worker_id)],
            args=[
                self.worker_id,
                max(3, int(self.settings.stall_interval * 3)),
                *(item for pair in fields.items() for item in pair),
            ],
        )

    def leave_registry(self) -> None:
        keys = self.service_keys
        self.client.zrem(keys.workers, self.worker_id)
        self.client.delete(keys.worker(self.worker_id))

    def execute(self, build: Callable[[Any], None]) -> list[Any]:
        """Runs a pipeline of script calls in one round trip (see scripts.execute)."""
        return execute(self.client, self.scripts, build)

    def now_ms(self) -> int:
        return time_ms(self.client.time())
