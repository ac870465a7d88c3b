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

from queueservice_server.core.jobs import Token, split_job_id
from queueservice_server.core.keys import QueueKeys, ServiceKeys
from queueservice_server.core.redis import time_ms
from queueservice_server.core.scripts import Scripts, call, execute
from queueservice_server.core.timings import Attempt, attempt_args
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

    @property
    def lease_ms(self) -> int:
        """Leases are renewed every quarter stall interval and reaped as often, so a
        dead worker's job is back within 3/4 + 1/4 of the interval."""
        return int(self.settings.stall_interval * 750)

    @property
    def minute_ttl_s(self) -> int:
        """How long a per-minute figures hash lives: the history kept, and two minutes more."""
        return int(self.settings.metrics_history) + 120

    def take(self, keys: QueueKeys, count: int, token: str, pipe: Any = None) -> Any:
        """Queues TAKE on `pipe` (or runs it): see lua.TAKE and scripts.TakeReply. A take that
        may not have reached Redis is sent again with the same `token`, which returns its jobs."""
        return call(
            self.scripts.take,
            [
                keys.waiting,
                keys.active,
                keys.limiter,
                keys.counters,
                keys.failed,
                keys.take(self.worker_id),
                keys.timings,
            ],
            [
                count,
                self.lease_ms,
                self.worker_id,
                keys.job_prefix,
                self.settings.rate_limit_max,
                int(self.settings.rate_limit_window * 1000),
                LIMIT_SLACK_MS,
                self.settings.keep_failed,
                token,
                self.settings.timings_retained,
                keys.minute_prefix,
                self.minute_ttl_s,
            ],
            pipe,
        )

    def settle(self, keys: QueueKeys, attempts: list[Attempt], pipe: Any = None) -> Any:
        """Queues SETTLE for attempts of one queue on `pipe` (or runs it); its reply lists the
        local ids whose tokens were stale (not recorded)."""
        # Redis's Lua msgpack predates the bin and str8 types: the old raw format only.
        args: list[Any] = [
            keys.job_prefix,
            keys.minute_prefix,
            self.settings.keep_completed,
            self.settings.keep_failed,
            self.settings.timings_retained,
            self.minute_ttl_s,
            msgpack.packb([attempt_args(attempt) for attempt in attempts], use_bin_type=False),
        ]
        return call(
            self.scripts.settle,
            [keys.active, keys.completed, keys.failed, keys.delayed, keys.waiting, keys.counters, keys.timings],
            args,
            pipe,
        )

    def _by_queue(self, tokens: Iterable[Token]) -> dict[QueueKeys, list[str | int]]:
        """Tokens grouped by queue, as the (local id, attempt, holder) triples scripts take."""
        grouped: dict[QueueKeys, list[str | int]] = {}
        for token in tokens:
            keys, local = self.locate(token.job_id)
            grouped.setdefault(keys, []).extend((local, token.attempt, token.holder))
        return grouped

    def hand_back(self, tokens: Iterable[Token]) -> int:
        """Jobs taken but never started (or whose process is dead) go back to where they stood."""
        back = 0
        for keys, triples in self._by_queue(tokens).items():
            back += int(
                self.scripts.hand_back(
                    keys=[keys.active, keys.waiting, keys.counters], args=[keys.job_prefix, *triples]
                )
            )
        return back

    def _reap(self, keys: QueueKeys, reason: str, triples: list[str | int]) -> tuple[int, int]:
        requeued, failed = self.scripts.reap(
            keys=[keys.active, keys.waiting, keys.failed, keys.counters, keys.consumers, keys.timings],
            args=[
                keys.job_prefix,
                self.settings.max_stalls,
                self.settings.keep_failed,
                reason,
                REAP_BATCH,
                self.lease_ms,
                self.settings.timings_retained,
                keys.minute_prefix,
                self.minute_ttl_s,
                *triples,
            ],
        )
        return int(requeued), int(failed)

    def reap_expired(self, keys: QueueKeys, reason: str) -> tuple[int, int]:
        """(requeued, failed) of the jobs whose lease expired and whose holder looks gone."""
        return self._reap(keys, reason, [])

    def reap_held(self, tokens: Iterable[Token], reason: str) -> tuple[int, int]:
        """(requeued, failed) of these attempts (their process died), where the tokens still hold."""
        requeued = failed = 0
        for keys, triples in self._by_queue(tokens).items():
            back, gone = self._reap(keys, reason, triples)
            requeued, failed = requeued + back, failed + gone
        return requeued, failed

    def renew(self, tokens: Iterable[Token]) -> set[str]:
        """Extends the leases of these attempts and stamps this consumer on every queue; returns the
        job ids it could not renew (their tokens no longer hold: someone reaped them)."""
        grouped = self._by_queue(tokens)
        queues = list(self.keys.values())

        def build(pipe: Any) -> None:
            for keys in queues:
                args = [self.lease_ms, self.worker_id, keys.job_prefix, int(self.settings.stall_interval * 1000)]
                call(self.scripts.renew, [keys.active, keys.consumers], [*args, *grouped.get(keys, [])], pipe)

        replies = self.execute(build)
        return {f"{keys.queue}:{local.decode()}" for keys, lost in zip(queues, replies, strict=True) for local in lost}

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
