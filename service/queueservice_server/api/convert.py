"""Job records to protobuf messages."""

from __future__ import annotations

from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from queueservice.v1 import job_pb2
from queueservice_server.core.codec import MessageDecodeError, decode_message
from queueservice_server.core.jobs import JobRecord, State

_STATES = {
    State.WAITING: job_pb2.JOB_STATE_WAITING,
    State.DELAYED: job_pb2.JOB_STATE_DELAYED,
    State.ACTIVE: job_pb2.JOB_STATE_ACTIVE,
    State.COMPLETED: job_pb2.JOB_STATE_COMPLETED,
    State.FAILED: job_pb2.JOB_STATE_FAILED,
    State.CANCELLED: job_pb2.JOB_STATE_CANCELLED,
}


def timestamp_ms(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def duration_ms(ms: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(ms)
    return duration


def job_to_proto(record: JobRecord) -> job_pb2.Job:
    job = job_pb2.Job(
        id=record.id,
        queue=record.queue,
        task=record.task,
        state=_STATES[record.state],
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        error=record.error,
        priority=record.priority,
        worker_id=record.worker,
        idempotency_key=record.idempotency_key,
        enqueue_time=timestamp_ms(record.enqueued_at),
        timeout=duration_ms(record.timeout_ms),
    )
    try:
        job.payload.CopyFrom(_struct(decode_message(record.msg)["payload"]))
    except MessageDecodeError:
        job.error = job.error or "the job's stored message cannot be decoded"
    if record.due_at is not None:
        job.schedule_time.CopyFrom(timestamp_ms(record.due_at))
    if record.started_at is not None:
        job.start_time.CopyFrom(timestamp_ms(record.started_at))
        job.wait_time.CopyFrom(duration_ms(max(0, record.started_at - (record.due_at or record.enqueued_at))))
    if record.finished_at is not None:
        job.finish_time.CopyFrom(timestamp_ms(record.finished_at))
        if record.started_at is not None:
            job.processing_time.CopyFrom(duration_ms(max(0, record.finished_at - record.started_at)))
    return job


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain data, as json_format would give it (numbers are floats), at a
    fraction of its cost: json_format's generic walk was a tenth of EnqueueBatch's time."""
    return {key: _value(value) for key, value in struct.fields.items()}


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value(item) for item in value.list_value.values]
    return None


def _struct(payload: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(payload)
    return struct
