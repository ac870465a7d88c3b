"""Turns Enqueue requests into JobSpecs, or into errors that name the field to fix."""

from __future__ import annotations

import time
from collections.abc import Mapping

from google.protobuf import duration_pb2, timestamp_pb2

from queueservice.v1 import queue_service_pb2
from queueservice_server.api.convert import struct_to_dict
from queueservice_server.api.errors import invalid_argument, not_found, quoted, resource_exhausted
from queueservice_server.core.jobs import split_job_id
from queueservice_server.core.producer import JobSpec
from queueservice_server.settings import QUEUE_NAME_RE, Settings
from queueservice_server.tasks import TaskDef

MAX_PRIORITY = 1000
MAX_ATTEMPTS = 100
MAX_IDEMPOTENCY_KEY = 256
MAX_DELAY_S = 366 * 24 * 3600
MAX_TIMEOUT_S = 24 * 3600
DEFAULT_QUEUE = "default"
JOB_ID_FORM = (
    "a job id is `queue:` and 32 lowercase hex digits, as Enqueue returns it "
    "(e.g. default:5063dc4db395f41a1d5e68becd84dcd5)"
)

# The ranges google.protobuf defines (timestamp.proto, duration.proto): a Timestamp from
# 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z with nanos in [0, 1e9); a Duration
# within +-10,000 years, nanos in (-1e9, 1e9) with the sign of the seconds. Out of range,
# the protobuf runtime raises on conversion.
MIN_TIMESTAMP_S = -62_135_596_800
MAX_TIMESTAMP_S = 253_402_300_799
MAX_DURATION_S = 315_576_000_000
NANOS = 1_000_000_000


def timestamp_problem(stamp: timestamp_pb2.Timestamp) -> str:
    """Why `stamp` is not a valid Timestamp, or ''."""
    if not 0 <= stamp.nanos < NANOS:
        return f"nanos must be between 0 and 999999999, got {stamp.nanos}"
    if not MIN_TIMESTAMP_S <= stamp.seconds <= MAX_TIMESTAMP_S:
        return (
            f"seconds must be within 0001-01-01 and 9999-12-31 ({MIN_TIMESTAMP_S} to {MAX_TIMESTAMP_S}), "
            f"got {stamp.seconds}"
        )
    return ""


def duration_problem(duration: duration_pb2.Duration) -> str:
    """Why `duration` is not a valid Duration, or ''."""
    if not -NANOS < duration.nanos < NANOS:
        return f"nanos must be between -999999999 and 999999999, got {duration.nanos}"
    if not -MAX_DURATION_S <= duration.seconds <= MAX_DURATION_S:
        return f"seconds must be within +-{MAX_DURATION_S} (10,000 years), got {duration.seconds}"
    if (duration.seconds > 0 and duration.nanos < 0) or (duration.seconds < 0 and duration.nanos > 0):
        return f"seconds ({duration.seconds}) and nanos ({duration.nanos}) must have the same sign"
    return ""


def _seconds(duration: duration_pb2.Duration) -> float:
    return float(duration.seconds) + duration.nanos / 1e9


def job_id_problem(job_id: str, explain: bool = True) -> str:
    """Why `job_id` cannot be one of ours, or ''; with `explain`, what a job id looks like."""
    if split_job_id(job_id):
        return ""
    return f"{quoted(job_id)} is not a job id" + (f": {JOB_ID_FORM}" if explain else "")


class Validator:
    def __init__(self, settings: Settings, tasks: Mapping[str, TaskDef]) -> None:
        self.settings = settings
        self.tasks = tasks

    def queue(self, name: str, field: str = "queue") -> str:
        """The queue a request names ("" means default), or INVALID_ARGUMENT / NOT_FOUND."""
        queue = name or DEFAULT_QUEUE
        if queue in self.settings.queues:
            return queue
        if not QUEUE_NAME_RE.match(queue):
            raise invalid_argument(
                [(field, f"{quoted(queue)} is not a queue name (letters, digits, '_', '.', '-'; 1-64)")]
            )
        raise not_found(
            "queue", queue, f"{field}: no queue named {queue!r}; configured: {', '.join(self.settings.queues)}"
        )

    def unknown_task(self, name: str) -> str:
        """What a request naming a task that is not registered is told."""
        known = ", ".join(sorted(self.tasks)) or "none"
        return f"unknown task {quoted(name)}; registered tasks: {known}"

    def job(self, request: queue_service_pb2.EnqueueRequest, path: str = "") -> JobSpec:
        violations: list[tuple[str, str]] = []
        definition = self.tasks.get(request.task)
        if not request.task:
            violations.append((path + "task", "required: the name of a registered task, e.g. 'diag.noop'"))
        elif definition is None:
            violations.append((path + "task", self.unknown_task(request.task)))
        if not 0 <= request.priority <= MAX_PRIORITY:
            violations.append((path + "priority", f"must be between 0 and {MAX_PRIORITY}, got {request.priority}"))
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            violations.append((path + "idempotency_key", f"must be at most {MAX_IDEMPOTENCY_KEY} characters"))
        if request.HasField("max_attempts") and not 1 <= request.max_attempts <= MAX_ATTEMPTS:
            violations.append(
                (path + "max_attempts", f"must be between 1 and {MAX_ATTEMPTS}, got {request.max_attempts}")
            )
        timeout = None
        if request.HasField("timeout"):
            timeout = _seconds(request.timeout)
            if problem := duration_problem(request.timeout):
                violations.append((path + "timeout", f"not a valid Duration: {problem}"))
            elif not 0 < timeout <= MAX_TIMEOUT_S:
                violations.append((path + "timeout", f"must be positive and at most {MAX_TIMEOUT_S} s"))
        delay_ms = due_at_ms = 0
        if request.HasField("delay"):
            delay = _seconds(request.delay)
            if problem := duration_problem(request.delay):
                violations.append((path + "delay", f"not a valid Duration: {problem}"))
            elif not 0 <= delay <= MAX_DELAY_S:
                violations.append((path + "delay", f"must be between 0 and {MAX_DELAY_S} s, got {delay:g} s"))
            delay_ms = int(delay * 1000)
        elif request.HasField("schedule_time"):
            if problem := timestamp_problem(request.schedule_time):
                violations.append((path + "schedule_time", f"not a valid Timestamp: {problem}"))
            else:
                due_at_ms = request.schedule_time.ToMilliseconds()
                # A time in the past runs now; one beyond the delay limit is a mistake.
                if due_at_ms - time.time() * 1000 > MAX_DELAY_S * 1000:
                    violations.append((path + "schedule_time", f"must be at most {MAX_DELAY_S} s from now"))
        if violations:
            raise invalid_argument(violations)
        assert definition is not None
        queue = self.queue(request.queue, path + "queue")
        size = request.payload.ByteSize()
        if size > self.settings.max_payload_bytes:
            raise resource_exhausted(
                path + "payload",
                f"{path}payload is {size} bytes; the limit is {self.settings.max_payload_bytes} bytes "
                "(store large data elsewhere and enqueue a reference)",
            )
        max_attempts = request.max_attempts if request.HasField("max_attempts") else None
        return JobSpec(
            queue=queue,
            task=definition.name,
            payload=struct_to_dict(request.payload),
            policy=definition.policy.resolve(self.settings, max_attempts=max_attempts, timeout=timeout),
            priority=request.priority,
            delay_ms=delay_ms,
            due_at_ms=due_at_ms,
            idempotency_key=request.idempotency_key,
        )

    def batch(self, request: queue_service_pb2.EnqueueBatchRequest) -> list[JobSpec]:
        count = len(request.jobs)
        if count == 0:
            raise invalid_argument([("jobs", "required: at least one job")])
        if count > self.settings.max_batch_size:
            raise resource_exhausted(
                "jobs",
                f"jobs: {count} jobs in one batch; the limit is {self.settings.max_batch_size} (split the batch)",
            )
        return [self.job(job, f"jobs[{i}].") for i, job in enumerate(request.jobs)]
