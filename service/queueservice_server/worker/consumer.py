"""Worker processes: Huey's consumer on our storage, serializer and outcome hooks.

`queue-service worker` runs one consumer: a parent process that supervises
`concurrency` forked worker processes (and Huey's scheduler process, which
promotes due delayed jobs). One process per slot is what lets a time limit be
enforced on any task: the parent kills a process whose task runs past its
timeout plus QUEUE_TIMEOUT_GRACE.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from huey import Huey
from huey import signals as huey_signals
from huey.consumer import Consumer, ProcessEnvironment, Worker
from huey.exceptions import TaskTimeout
from huey.registry import Registry

from queueservice_server.core.redis import REDIS_DOWN
from queueservice_server.core.timings import Outcome
from queueservice_server.settings import Settings
from queueservice_server.tasks import TaskDef, load_tasks
from queueservice_server.worker.serializer import MsgpackSerializer, huey_message
from queueservice_server.worker.slots import Slot
from queueservice_server.worker.storage import QueueStorage, format_error
from queueservice_server.worker.supervisor import Supervisor

log = logging.getLogger(__name__)

# How often a worker process checks its running task against the task's timeout.
ALARM_PERIOD = 0.25


class PublicNameRegistry(Registry):  # type: ignore[misc]
    """Messages name tasks by their public name ("diag.noop"), not by Python module path."""

    def task_to_string(self, task_class: type) -> str:
        return task_class.__name__


class QueueHuey(Huey):  # type: ignore[misc]
    def __init__(self, settings: Settings, redis_url: str, tasks: dict[str, TaskDef]) -> None:
        super().__init__(
            "queueservice",
            results=False,
            utc=True,
            serializer=MsgpackSerializer(),
            storage_class=QueueStorage,
            settings=settings,
            redis_url=redis_url,
        )
        self._registry = PublicNameRegistry()
        for definition in tasks.values():
            self.task(name=definition.name)(definition.func)
        self.pre_execute("record-start")(self._record_start)
        self.post_execute("record-outcome")(self._record_outcome)
        self.signal(huey_signals.SIGNAL_INTERRUPTED)(self._hand_back)

    @property
    def queue_storage(self) -> QueueStorage:
        storage: QueueStorage = self.storage
        return storage

    def dequeue(self) -> Any:
        """Huey's dequeue, except that a job that cannot run fails with the reason and the loop goes on."""
        storage = self.queue_storage
        while True:
            try:
                data = storage.dequeue()
            except REDIS_DOWN as exc:
                storage.outage(exc)
                return None
            if data is None:
                return None
            popped = storage.popped
            assert popped is not None
            try:
                return self._registry.create_task(huey_message(popped.job_id, popped.task, data))
            except Exception as exc:
                storage.reject(f"cannot run this job: {format_error(exc)}")

    def is_revoked(self, task: Any, timestamp: Any = None, peek: bool = True) -> bool:
        """Jobs are not revoked through Huey: skip its two key lookups per job."""
        return False

    def _record_start(self, task: Any) -> None:
        self.queue_storage.started(task.id, task.timeout)

    def _record_outcome(self, task: Any, value: Any, exc: BaseException | None) -> None:
        storage = self.queue_storage
        if exc is None:
            storage.completed(task.id)
            return
        timed_out = isinstance(exc, TaskTimeout)
        if task.retries:
            # Huey moves the job for its next attempt right after this hook.
            storage.pending_errors[task.id] = (format_error(exc), Outcome.TIMED_OUT if timed_out else Outcome.RETRY)
        else:
            storage.failed(task.id, format_error(exc), Outcome.TIMED_OUT if timed_out else Outcome.FAILED)

    def _hand_back(self, signal_name: str, task: Any) -> None:
        """An interrupted attempt goes back to waiting at once, for another worker."""
        self.queue_storage.hand_back(task.id)


class QueueWorker(Worker):  # type: ignore[misc]
    """Huey's worker loop, bound to its shared slot; on the way out it acks what
    finished and gives back what it took but never started."""

    def __init__(self, slot: Slot, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slot = slot

    def initialize(self) -> None:
        self.huey.queue_storage.slot = self.slot
        super().initialize()

    def shutdown(self) -> None:
        self.huey.queue_storage.shut_down()
        super().shutdown()


class _Environment(ProcessEnvironment):  # type: ignore[misc]
    """Worker processes ignore SIGINT and SIGTERM (the parent drains them) and are
    interrupted only by the parent, with SIGUSR1, once the shutdown grace is spent.

    The soft timeout is Huey's TaskTimeout, raised by a SIGALRM handler that a
    periodic timer calls every ALARM_PERIOD: arming a timer around each task
    (Huey's way) cost two system calls and two handler swaps per job, about a
    tenth of a no-op job's time."""

    def __init__(self) -> None:
        super().__init__(signal.SIGTERM, signal.SIGUSR1)
        self._deadline = 0.0
        self._limit = 0.0

    def init_child(self, process: Any) -> None:
        super().init_child(process)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, ALARM_PERIOD, ALARM_PERIOD)

    def _alarm(self, signum: int, frame: Any) -> None:
        if self._deadline and time.monotonic() >= self._deadline:
            self._deadline = 0.0
            raise TaskTimeout(f"timeout ({self._limit:g}s)")

    @contextlib.contextmanager
    def timeout(self, seconds: float) -> Iterator[None]:
        self._limit = seconds
        self._deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self._deadline = 0.0


class QueueConsumer(Consumer):  # type: ignore[misc]
    """SIGTERM and SIGINT both stop gracefully: take nothing new, finish what runs
    (up to the shutdown grace), then interrupt and hand back the rest. The parent
    also runs the supervisor: leases, reaper, hard timeouts, registry."""

    scheduler: Any

    def __init__(self, huey: QueueHuey, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.slots: list[Slot] = []
        super().__init__(
            huey,
            workers=settings.concurrency,
            worker_type="process",
            periodic=False,
            initial_delay=settings.poll_interval,
            backoff=1.0,
            max_delay=settings.poll_interval,
            scheduler_interval=1,
            health_check_interval=1,
            shutdown_timeout=settings.shutdown_grace,
            graceful_signal="TERM",
        )
        self._signal_actions = {signal.SIGTERM: (False, True), signal.SIGINT: (False, True)}
        self.supervisor = Supervisor(settings, redis_url, self.slots)
        self._last_error = ""

    def get_environment(self, worker_type: str) -> ProcessEnvironment:
        return _Environment()

    def _worker_on(self, slot: Slot) -> QueueWorker:
        return QueueWorker(
            slot,
            huey=self.huey,
            stop_flag=self.stop_flag,
            default_delay=self.default_delay,
            max_delay=self.max_delay,
            backoff=self.backoff,
            max_tasks=self.max_tasks,
        )

    def _create_worker(self) -> QueueWorker:
        # Huey calls this once per worker while constructing; each gets a slot of its own.
        slot = Slot(self.environment.mp, capacity=2 * self.settings.prefetch + 2)
        self.slots.append(slot)
        return self._worker_on(slot)

    def _pids(self) -> list[int]:
        return [process.pid for _, process in self.worker_threads if process.pid]

    def loop(self, health_check_ts: float | None = None) -> float | None:
        health_check_ts = super().loop(health_check_ts)
        try:
            for worker, process in self.worker_threads:
                running = self.supervisor.overdue(worker.slot)
                if running is not None and process.is_alive():
                    log.error("killing a worker process past its hard timeout", extra={"job_id": running.token.job_id})
                    self._kill(process)
                    self.supervisor.timed_out(worker.slot, running)
            for slot in self.supervisor.tick(self._pids()):
                # Its lease is gone, so another worker may run the job: this run must not go on.
                # The process is restarted by the next health check.
                self._kill(next(process for worker, process in self.worker_threads if worker.slot is slot))
        except Exception as exc:
            # A bug, not an outage (the supervisor rides those out): said once, and the loop goes on.
            if repr(exc) != self._last_error:
                log.exception("consumer round failed; retrying every round")
                self._last_error = repr(exc)
        return health_check_ts

    @staticmethod
    def _kill(process: Any) -> None:
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
        process.join(5)

    def check_worker_health(self) -> bool:
        """Huey's check, except that a dead process's jobs are handed back first and its
        replacement takes over its slot."""
        for index, (worker, process) in enumerate(self.worker_threads):
            if self.environment.is_alive(process):
                continue
            log.warning("worker process died, restarting", extra={"exitcode": process.exitcode})
            self.supervisor.process_died(worker.slot)
            replacement = self._worker_on(worker.slot)
            new_process = self._create_process(replacement, f"Worker-{index + 1}")
            new_process.start()
            self.worker_threads[index] = (replacement, new_process)
        if not self.environment.is_alive(self.scheduler):
            self.scheduler = self._create_process(self._create_scheduler(), "Scheduler")
            self.scheduler.start()
        return True

    def run(self) -> None:
        try:
            super().run()
        finally:
            # Huey interrupted what still ran after the grace; a task stuck in C ignores that, so it
            # is killed before its job goes back: a job is never waiting while its process runs it.
            for _, process in self.worker_threads:
                if process.is_alive():
                    log.error("killing a worker process that did not stop within the shutdown grace")
                    self._kill(process)
            self.supervisor.stopped()


def run_worker(settings: Settings, redis_url: str) -> None:
    tasks = load_tasks(settings.task_modules, diag=settings.diag_enabled)
    huey = QueueHuey(settings, redis_url, tasks)
    log.info(
        "worker starting",
        extra={"queues": list(settings.queues), "concurrency": settings.concurrency, "tasks": sorted(tasks)},
    )
    QueueConsumer(huey, settings, redis_url).run()
