"""Worker processes: Huey's consumer on our storage, serializer and outcome hooks.

`queue-service worker` runs one consumer: a parent process that supervises
`concurrency` forked worker processes and Huey's scheduler process (which
promotes due delayed jobs). One process per slot is what lets a time limit
be enforced on any task.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from huey import Huey
from huey import signals as huey_signals
from huey.consumer import Consumer, ProcessEnvironment
from huey.registry import Registry

from queueservice_server.codec import MsgpackSerializer
from queueservice_server.jobs import State
from queueservice_server.settings import Settings
from queueservice_server.storage import QueueStorage, format_error
from queueservice_server.tasks import TaskDef, load_tasks

log = logging.getLogger(__name__)


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
        self.post_execute("record-outcome")(self._record_outcome)
        self.signal(huey_signals.SIGNAL_INTERRUPTED)(self._hand_back)

    @property
    def queue_storage(self) -> QueueStorage:
        storage: QueueStorage = self.storage
        return storage

    def _record_outcome(self, task: Any, value: Any, exc: BaseException | None) -> None:
        storage = self.queue_storage
        if exc is None:
            held = storage.finish(task.id, State.COMPLETED)
        elif task.retries:
            # Huey moves the job for its next attempt right after this hook.
            storage.pending_errors[task.id] = format_error(exc)
            return
        else:
            held = storage.finish(task.id, State.FAILED, format_error(exc))
        if not held:
            log.warning("outcome of a job no longer held by this worker was dropped", extra={"job_id": task.id})

    def _hand_back(self, signal_name: str, task: Any) -> None:
        """An interrupted attempt goes back to waiting at once, for another worker."""
        self.queue_storage.enqueue(self.serialize_task(task))


class _Environment(ProcessEnvironment):  # type: ignore[misc]
    """Worker processes ignore SIGINT and SIGTERM (the parent drains them) and are
    interrupted only by the parent, with SIGUSR1, once the shutdown grace is spent."""

    def __init__(self) -> None:
        super().__init__(signal.SIGTERM, signal.SIGUSR1)

    def init_child(self, process: Any) -> None:
        super().init_child(process)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class QueueConsumer(Consumer):  # type: ignore[misc]
    """SIGTERM and SIGINT both stop gracefully: take nothing new, finish what runs
    (up to the shutdown grace), then interrupt and hand back the rest."""

    def __init__(self, huey: QueueHuey, settings: Settings) -> None:
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

    def get_environment(self, worker_type: str) -> ProcessEnvironment:
        return _Environment()


def run_worker(settings: Settings, redis_url: str) -> None:
    tasks = load_tasks(settings.task_modules, diag=settings.diag_tasks)
    huey = QueueHuey(settings, redis_url, tasks)
    log.info(
        "worker starting",
        extra={"queues": list(settings.queues), "concurrency": settings.concurrency, "tasks": sorted(tasks)},
    )
    QueueConsumer(huey, settings).run()
