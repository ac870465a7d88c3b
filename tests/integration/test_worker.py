"""Jobs run by real worker processes: WAITING -> ACTIVE -> COMPLETED / FAILED."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import duration_pb2, struct_pb2

from queueservice.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.settings import Settings
from tests.support import WorkerProcess, wait_for

Stub = queue_service_pb2_grpc.QueueServiceStub
StartWorker = Callable[..., WorkerProcess]


def enqueue(stub: Stub, task: str, payload: dict[str, Any] | None = None, **fields: Any) -> str:
    struct = struct_pb2.Struct()
    struct.update(payload or {})
    job_id: str = stub.Enqueue(queue_service_pb2.EnqueueRequest(task=task, payload=struct, **fields)).job_id
    return job_id


def get(stub: Stub, job_id: str) -> job_pb2.Job:
    job: job_pb2.Job = stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)).job
    return job


def wait_state(stub: Stub, job_id: str, state: int, timeout: float = 15) -> job_pb2.Job:
    name = job_pb2.JobState.Name(state)  # type: ignore[arg-type]

    def reached() -> job_pb2.Job | None:
        job = get(stub, job_id)
        return job if job.state == state else None

    return wait_for(reached, timeout, what=f"{job_id} {name}")


def test_noop_completes(queue_stub: Stub, settings: Settings, worker_factory: StartWorker) -> None:
    worker_factory(settings)
    job_id = enqueue(queue_stub, "diag.noop")
    job = wait_state(queue_stub, job_id, job_pb2.JOB_STATE_COMPLETED)
    assert job.attempts == 1
    assert job.error == ""
    assert job.worker_id
    assert job.start_time.ToMilliseconds() >= job.enqueue_time.ToMilliseconds()
    assert job.finish_time.ToMilliseconds() >= job.start_time.ToMilliseconds()
    assert job.wait_time.ToMilliseconds() == job.start_time.ToMilliseconds() - job.enqueue_time.ToMilliseconds()


def test_running_job_reads_active(queue_stub: Stub, settings: Settings, worker_factory: StartWorker) -> None:
    worker_factory(settings)
    job_id = enqueue(queue_stub, "diag.sleep", {"seconds": 1})
    active = wait_state(queue_stub, job_id, job_pb2.JOB_STATE_ACTIVE)
    assert active.attempts == 1
    assert active.worker_id
    done = wait_state(queue_stub, job_id, job_pb2.JOB_STATE_COMPLETED)
    assert done.processing_time.ToMilliseconds() >= 1000


def test_failing_job_is_retried_then_failed_with_its_error(
    queue_stub: Stub, settings: Settings, worker_factory: StartWorker
) -> None:
    worker_factory(settings)
    job_id = enqueue(queue_stub, "diag.fail", {"message": "disk on fire"})
    job = wait_state(queue_stub, job_id, job_pb2.JOB_STATE_FAILED)
    assert job.attempts == 3
    assert job.max_attempts == 3
    assert job.error == "RuntimeError: disk on fire"


def test_max_attempts_override(queue_stub: Stub, settings: Settings, worker_factory: StartWorker) -> None:
    worker_factory(settings)
    job_id = enqueue(queue_stub, "diag.fail", max_attempts=1)
    job = wait_state(queue_stub, job_id, job_pb2.JOB_STATE_FAILED)
    assert job.attempts == 1
    assert job.error == "RuntimeError: diag.fail always fails"


def test_timeout_fails_the_attempt(queue_stub: Stub, settings: Settings, worker_factory: StartWorker) -> None:
    worker_factory(settings)
    job_id = enqueue(
        queue_stub, "diag.sleep", {"seconds": 30}, max_attempts=1, timeout=duration_pb2.Duration(nanos=300_000_000)
    )
    job = wait_state(queue_stub, job_id, job_pb2.JOB_STATE_FAILED)
    assert job.error.startswith("TaskTimeout")
    after = enqueue(queue_stub, "diag.noop")
    wait_state(queue_stub, after, job_pb2.JOB_STATE_COMPLETED)


def test_delayed_job_runs_when_due(queue_stub: Stub, settings: Settings, worker_factory: StartWorker) -> None:
    worker_factory(settings)
    job_id = enqueue(queue_stub, "diag.noop", delay=duration_pb2.Duration(seconds=1))
    assert get(queue_stub, job_id).state == job_pb2.JOB_STATE_DELAYED
    job = wait_state(queue_stub, job_id, job_pb2.JOB_STATE_COMPLETED)
    assert job.start_time.ToMilliseconds() >= job.schedule_time.ToMilliseconds()


def test_higher_priority_runs_first(queue_stub: Stub, settings: Settings, worker_factory: StartWorker) -> None:
    low = [enqueue(queue_stub, "diag.noop") for _ in range(5)]
    high = enqueue(queue_stub, "diag.noop", priority=10)
    worker_factory(settings, worker_concurrency=1)
    jobs = [wait_state(queue_stub, job_id, job_pb2.JOB_STATE_COMPLETED) for job_id in [high, *low]]
    starts = [job.start_time.ToNanoseconds() for job in jobs]
    assert starts[0] == min(starts)
    assert starts[1:] == sorted(starts[1:]), "equal priorities run first in, first out"


def test_every_configured_queue_is_served(queue_stub: Stub, settings: Settings, worker_factory: StartWorker) -> None:
    worker_factory(settings)
    job_id = enqueue(queue_stub, "diag.noop", queue="emails")
    assert wait_state(queue_stub, job_id, job_pb2.JOB_STATE_COMPLETED).queue == "emails"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_lets_the_running_job_finish(
    queue_stub: Stub, settings: Settings, worker_factory: StartWorker, signum: int
) -> None:
    worker = worker_factory(settings)
    job_id = enqueue(queue_stub, "diag.sleep", {"seconds": 1.5})
    wait_state(queue_stub, job_id, job_pb2.JOB_STATE_ACTIVE)
    worker.signal(signum)
    assert worker.wait(settings.shutdown_grace + 5) == 0
    job = get(queue_stub, job_id)
    assert job.state == job_pb2.JOB_STATE_COMPLETED, worker.log_text()
    # The stopped worker takes nothing new.
    later = enqueue(queue_stub, "diag.noop")
    assert get(queue_stub, later).state == job_pb2.JOB_STATE_WAITING


def test_job_past_the_grace_is_handed_back(queue_stub: Stub, settings: Settings, worker_factory: StartWorker) -> None:
    worker = worker_factory(settings, shutdown_grace=0.5)
    job_id = enqueue(queue_stub, "diag.sleep", {"seconds": 30})
    wait_state(queue_stub, job_id, job_pb2.JOB_STATE_ACTIVE)
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert get(queue_stub, job_id).state == job_pb2.JOB_STATE_WAITING, worker.log_text()
    worker_factory(settings)
    wait_state(queue_stub, job_id, job_pb2.JOB_STATE_ACTIVE)
