"""The consumer parent's duties towards Redis: leases, the reaper, hard
timeouts, dead worker processes, and the worker registry.

It runs in the parent, not in the worker processes, so that a task that holds
the GIL in C code (or a worker that died) cannot stop leases from being
renewed or a timeout from being enforced. Every consumer on a Redis runs the
reaper; the Lua step is atomic, so they never return a job twice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence

from queueservice_server.core.codec import MessageDecodeError, decode_message, next_attempt
from queueservice_server.core.jobs import JobRecord, Token
from queueservice_server.core.keys import WorkerFields as W
from queueservice_server.core.redis import REDIS_DOWN, sync_client
from queueservice_server.core.timings import Attempt, Outcome
from queueservice_server.settings import Settings
from queueservice_server.worker.queue_ops import QueueOps, consumer_id
from queueservice_server.worker.slots import Running, Slot

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


class Supervisor:
    """Every Redis call here survives an outage: the first failure is logged once, the work is
    kept and retried on a later round, and a slot is cleared whatever Redis says."""

    def __init__(self, settings: Settings, redis_url: str, slots: Sequence[Slot]) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.slots = slots
        self.worker_id = consumer_id(os.getpid())
        self.started_at = int(time.time() * 1000)
        self.period = settings.stall_interval / 4
        self._next_beat = 0.0
        self._core: QueueOps | None = None
        # Since when Redis has answered every round (None: not now). The reaper waits one lease
        # after start and after every outage, so that live consumers renew before anyone reaps.
        self._connected_since: float | None = None
        self._outage_logged = False
        # Work that Redis could not take when it came up: retried every round until it does.
        self._dead: list[Token] = []
        self._unstarted: list[Token] = []
        self._timed_out: list[Token] = []

    @property
    def core(self) -> QueueOps:
        # Created on first use, after the worker processes were forked.
        if self._core is None:
            self._core = QueueOps(self.settings, sync_client(self.settings, self.redis_url), self.worker_id)
        return self._core

    def tick(self, pids: Sequence[int]) -> list[Slot]:
        """Called often by the consumer loop; does Redis work once per period. Returns the slots
        whose running job's lease was lost (someone reaped it): their process must not go on."""
        now = time.monotonic()
        if now < self._next_beat:
            return []
        self._next_beat = now + self.period
        try:
            lost = self.core.renew(token for slot in self.slots for token in slot.held())
            self._retry_pending()
            if self._connected_since is None:
                self._connected_since = now
            if now - self._connected_since >= self.core.lease_ms / 1000:
                for keys in self.core.keys.values():
                    requeued, failed = self.core.reap_expired(keys, "its worker stopped renewing the lease")
                    if requeued or failed:
                        log.warning(
                            "reaped stalled jobs", extra={"queue": keys.queue, "requeued": requeued, "failed": failed}
                        )
            self._heartbeat(pids)
        except REDIS_DOWN as exc:
            self._down(exc)
            return []
        if self._outage_logged:
            log.warning("redis reachable again; the reaper waits one lease before reaping")
            self._outage_logged = False
        return self._mark_lost(lost)

    def _down(self, exc: Exception) -> None:
        self._connected_since = None
        if not self._outage_logged:
            log.warning("redis unreachable; the supervisor retries every round", extra={"error": str(exc)})
            self._outage_logged = True

    def _mark_lost(self, lost: set[str]) -> list[Slot]:
        stopped = []
        for slot in self.slots:
            mine = [token for token in slot.held() if token.job_id in lost]
            if not mine:
                continue
            slot.mark_lost(mine)
            running = slot.running()
            if running is not None and running.token.job_id in lost:
                log.error(
                    "lease lost while the job ran (another worker may have it): stopping its process",
                    extra={"job_id": running.token.job_id},
                )
                stopped.append(slot)
        return stopped

    def _retry_pending(self) -> None:
        if self._dead:
            self.core.reap_held(self._dead, "its worker process died")
            self._dead = []
        if self._unstarted:
            self.core.hand_back(self._unstarted)
            self._unstarted = []
        while self._timed_out:
            self._record_timeout(self._timed_out[0])
            self._timed_out.pop(0)

    def overdue(self, slot: Slot) -> Running | None:
        running = slot.running()
        if running is not None and time.monotonic() > running.hard_deadline:
            return running
        return None

    def timed_out(self, slot: Slot, running: Running) -> None:
        """Its process was killed at the hard deadline: the attempt is recorded as timed out
        and retried by the job's policy; the process's other jobs go back."""
        self._timed_out.append(running.token)
        self._release(slot, exclude=running.token)

    def process_died(self, slot: Slot) -> None:
        """A worker process exited unexpectedly: its running job counts a stall, the rest go back."""
        running = slot.running()
        if running is not None:
            self._dead.append(running.token)
        self._release(slot, exclude=running.token if running else None)

    def _release(self, slot: Slot, exclude: Token | None) -> None:
        """The slot's jobs (but `exclude`) go back, now or on a later round; the slot is cleared."""
        self._unstarted += [token for token in slot.held() if token != exclude]
        slot.clear()
        try:
            self._retry_pending()
        except REDIS_DOWN as exc:
            self._down(exc)

    def _record_timeout(self, token: Token) -> None:
        keys, local = self.core.locate(token.job_id)
        fields: dict[bytes, bytes] = self.core.client.hgetall(keys.job(local))  # type: ignore[assignment]
        if not fields:
            return
        record = JobRecord.from_hash(keys.queue, local, fields)
        limit = record.timeout_ms / 1000 or self.settings.default_timeout
        grace = self.settings.timeout_grace
        error = f"TaskTimeout: killed after running past its timeout of {limit:g}s plus {grace:g}s grace"
        now_ms = self.core.now_ms()
        try:
            following = next_attempt(decode_message(record.msg))
        except MessageDecodeError:
            following = None
        msg, delay = following or (b"", 0.0)
        attempt = Attempt(
            local_id=local,
            task=record.task,
            outcome=Outcome.TIMED_OUT,
            attempt=token.attempt,
            ready_ms=record.ready_at or 0,
            start_ms=record.started_at or now_ms,
            finish_ms=now_ms,
            holder=token.holder,
            error=error,
            retry_msg=msg,
            retry_due_ms=now_ms + int(delay * 1000) if following else 0,
        )
        if not self.core.settle(keys, [attempt]):
            log.error("job killed at its hard timeout", extra={"job_id": token.job_id, "error": error})

    def _heartbeat(self, pids: Sequence[int]) -> None:
        self.core.heartbeat(
            {
                W.HOST: socket.gethostname(),
                W.PID: os.getpid(),
                W.CONCURRENCY: len(self.slots),
                W.BUSY: sum(1 for slot in self.slots if slot.running() is not None),
                W.RSS_BYTES: resident_bytes([os.getpid(), *pids]),
                W.QUEUES: ",".join(self.settings.queues),
                W.STARTED_AT: self.started_at,
            }
        )

    def stopped(self) -> None:
        """After the worker processes are gone (killed if they would not stop): everything still
        held goes back; the registry forgets us."""
        for slot in self.slots:
            running = slot.running()
            self._release(slot, exclude=None)
            if running is not None:
                log.warning("job interrupted by shutdown, handed back", extra={"job_id": running.token.job_id})
        try:
            self._retry_pending()
            self.core.leave_registry()
        except REDIS_DOWN:
            log.warning("could not hand back held jobs at shutdown; the reaper will return them")
