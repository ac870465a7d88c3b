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
from queueservice_server.core.jobs import JobRecord
from queueservice_server.core.keys import WorkerFields as W
from queueservice_server.core.redis import sync_client
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
    def __init__(self, settings: Settings, redis_url: str, slots: Sequence[Slot]) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.slots = slots
        self.worker_id = consumer_id(os.getpid())
        self.started_at = int(time.time() * 1000)
        self.period = settings.stall_interval / 4
        self._next_beat = 0.0
        self._core: QueueOps | None = None

    @property
    def core(self) -> QueueOps:
        # Created on first use, after the worker processes were forked.
        if self._core is None:
            self._core = QueueOps(self.settings, sync_client(self.settings, self.redis_url), self.worker_id)
        return self._core

    def tick(self, pids: Sequence[int]) -> None:
        """Called often by the consumer loop; does Redis work once per period."""
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + self.period
        try:
            self.core.renew(job_id for slot in self.slots for job_id in slot.held())
            for keys in self.core.keys.values():
                requeued, failed = self.core.reap(keys, "its worker stopped renewing the lease")
                if requeued or failed:
                    log.warning(
                        "reaped stalled jobs", extra={"queue": keys.queue, "requeued": requeued, "failed": failed}
                    )
            self._heartbeat(pids)
        except Exception:
            # Redis may be down for a while: the next period tries again.
            log.exception("supervisor round failed")

    def overdue(self, slot: Slot) -> Running | None:
        running = slot.running()
        if running is not None and time.monotonic() > running.hard_deadline:
            return running
        return None

    def timed_out(self, slot: Slot, running: Running) -> None:
        """Its process was killed at the hard deadline: the attempt is recorded as timed out
        and retried by the job's policy; the process's other jobs go back."""
        self._record_timeout(running.job_id)
        self._release(slot, exclude=running.job_id)

    def process_died(self, slot: Slot) -> None:
        """A worker process exited unexpectedly: its running job counts a stall, the rest go back."""
        running = slot.running()
        if running is not None:
            keys, local = self.core.locate(running.job_id)
            self.core.reap(keys, "its worker process died", [local])
        self._release(slot, exclude=running.job_id if running else "")

    def _release(self, slot: Slot, exclude: str) -> None:
        others = [job_id for job_id in slot.held() if job_id != exclude]
        if others:
            self.core.hand_back(others)
        slot.clear()

    def _record_timeout(self, job_id: str) -> None:
        keys, local = self.core.locate(job_id)
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
            attempt=record.attempts,
            ready_ms=record.ready_at or 0,
            start_ms=record.started_at or now_ms,
            finish_ms=now_ms,
            error=error,
            retry_msg=msg,
            retry_due_ms=now_ms + int(delay * 1000) if following else 0,
        )
        self.core.settle(keys, [attempt])
        log.error("job killed at its hard timeout", extra={"job_id": job_id, "error": error})

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
        """After the worker processes are gone: anything still held goes back; the registry forgets us."""
        try:
            for slot in self.slots:
                self._release(slot, exclude="")
            self.core.leave_registry()
        except Exception:
            log.exception("could not hand back held jobs at shutdown; the reaper will return them")
