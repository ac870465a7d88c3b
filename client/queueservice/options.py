"""What the sync and the async client share: defaults, channel options, call
settings, and the building of every request message."""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from queueservice.v1 import admin_service_pb2, queue_service_pb2

__all__ = [
    "DEFAULT_CHANNEL_OPTIONS",
    "DEFAULT_TIMEOUT",
    "CallSettings",
    "ChannelOption",
    "JobOptions",
    "batch_request",
    "channel_options",
    "get_job_request",
    "job_request",
    "performance_request",
    "retry_failed_request",
    "stats_request",
    "stream_timings_request",
    "tls_credentials",
    "to_duration",
    "to_timestamp",
]

#: Per-call deadline in seconds, unless the client or the call says otherwise.
DEFAULT_TIMEOUT = 10.0

ChannelOption = tuple[str, Any]

#: Matched to the server's settings: its keepalive policy allows a ping every 10 s
#: at most, and it sends messages up to its QUEUE_GRPC_MAX_MESSAGE_BYTES (8 MiB by
#: default; grpc's own client default of 4 MiB would refuse a large GetJob answer).
DEFAULT_CHANNEL_OPTIONS: tuple[ChannelOption, ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
)

Seconds = float | datetime.timedelta


class JobOptions(TypedDict, total=False):
    """The optional fields of one job, as keyword arguments of `job_request`, `enqueue` and `enqueue_job`."""

    #: Target queue; "" means the server's "default".
    queue: str
    #: Run after this many seconds (or this timedelta). Excludes `schedule_time`.
    delay: Seconds | None
    #: Run at this time; must be timezone-aware. Excludes `delay`.
    schedule_time: datetime.datetime | None
    #: 0 to 1000; higher runs first among a queue's waiting jobs.
    priority: int
    #: A repeat within the server's idempotency window returns the first job's id.
    idempotency_key: str
    #: Overrides the task's attempt limit (1 to 100).
    max_attempts: int | None
    #: Overrides the task's per-attempt time limit, in seconds or as a timedelta.
    timeout: Seconds | None


def channel_options(extra: Iterable[ChannelOption] = ()) -> list[ChannelOption]:
    """The default channel options, overridden (by key) and extended by `extra`."""
    merged = dict(DEFAULT_CHANNEL_OPTIONS)
    merged.update(extra)
    return list(merged.items())


@dataclass(frozen=True)
class CallSettings:
    """The deadline and metadata every call of one client carries."""

    timeout: float | None
    metadata: tuple[tuple[str, str], ...]

    @classmethod
    def create(
        cls, timeout: float | None, metadata: Iterable[tuple[str, str]], token: str | None = None
    ) -> CallSettings:
        if token is not None:
            if not token or token != token.strip() or "\n" in token:
                raise ValueError("token must be the bearer token itself: non-empty, no spaces around it")
            metadata = [*metadata, ("authorization", f"Bearer {token}")]
        if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        pairs = tuple((str(key), str(value)) for key, value in metadata)
        for key, _ in pairs:
            # gRPC rejects these on the first call; say so where the mistake is made.
            if not key or key != key.lower() or key.startswith("grpc-") or key.endswith("-bin"):
                raise ValueError(f"metadata key {key!r}: use a lowercase key not starting 'grpc-' nor ending '-bin'")
        return cls(timeout=timeout, metadata=pairs)

    def deadline(self, override: float | None) -> float | None:
        """The timeout for one call: `override` when given, else the client's."""
        return self.timeout if override is None else override


def tls_credentials(
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: `ca` to trust (None: the system's roots), and
    `cert` + `key` for a client certificate (mTLS)."""
    if (cert is None) != (key is None):
        raise ValueError("give cert and key together (a client certificate needs its key)")

    def read(path: str | os.PathLike[str] | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as file:
            return file.read()

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def to_duration(value: Seconds) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    if isinstance(value, datetime.timedelta):
        duration.FromTimedelta(value)
    else:
        if not math.isfinite(value):
            raise ValueError(f"a duration must be a finite number of seconds, got {value!r}")
        duration.FromNanoseconds(round(value * 1e9))
    return duration


def to_timestamp(value: datetime.datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"schedule_time must be timezone-aware (e.g. datetime.now(UTC)), got naive {value!r}")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def job_request(
    task: str, payload: Mapping[str, Any] | None = None, **options: Unpack[JobOptions]
) -> queue_service_pb2.EnqueueRequest:
    """One EnqueueRequest, for `enqueue_batch` or to inspect what `enqueue` sends.

    `payload` must be JSON-like (str keys; str, number, bool, None, lists and
    mappings of those): it travels as a google.protobuf.Struct, so integers
    arrive as floats and above 2**53 lose precision.
    """
    unknown = set(options) - set(JobOptions.__annotations__)
    if unknown:
        raise TypeError(f"unknown job options: {', '.join(sorted(unknown))}")
    delay = options.get("delay")
    schedule_time = options.get("schedule_time")
    if delay is not None and schedule_time is not None:
        raise ValueError("give delay or schedule_time, not both")
    request = queue_service_pb2.EnqueueRequest(
        task=task,
        queue=options.get("queue", ""),
        priority=options.get("priority", 0),
        idempotency_key=options.get("idempotency_key", ""),
    )
    if payload:
        request.payload.CopyFrom(_struct(payload))
    if delay is not None:
        request.delay.CopyFrom(to_duration(delay))
    elif schedule_time is not None:
        request.schedule_time.CopyFrom(to_timestamp(schedule_time))
    max_attempts = options.get("max_attempts")
    if max_attempts is not None:
        request.max_attempts = max_attempts
    timeout = options.get("timeout")
    if timeout is not None:
        request.timeout.CopyFrom(to_duration(timeout))
    return request


def batch_request(
    jobs: Sequence[queue_service_pb2.EnqueueRequest | Mapping[str, Any]],
) -> queue_service_pb2.EnqueueBatchRequest:
    """Jobs given as EnqueueRequests or as mappings of `job_request` arguments ({"task": ..., "payload": ...})."""
    if isinstance(jobs, Mapping | str):
        raise TypeError("jobs must be a sequence of EnqueueRequests or mappings")
    return queue_service_pb2.EnqueueBatchRequest(
        jobs=[job if isinstance(job, queue_service_pb2.EnqueueRequest) else job_request(**job) for job in jobs]
    )


def get_job_request(job_id: str) -> queue_service_pb2.GetJobRequest:
    return queue_service_pb2.GetJobRequest(job_id=job_id)


def stats_request(queue: str = "") -> admin_service_pb2.GetStatsRequest:
    return admin_service_pb2.GetStatsRequest(queue=queue)


def performance_request(queue: str = "", window: Seconds | None = None) -> admin_service_pb2.GetPerformanceRequest:
    request = admin_service_pb2.GetPerformanceRequest(queue=queue)
    if window is not None:
        request.window.CopyFrom(to_duration(window))
    return request


def retry_failed_request(
    queue: str = "", job_ids: Iterable[str] = (), task: str = "", limit: int = 0
) -> admin_service_pb2.RetryFailedRequest:
    if isinstance(job_ids, str):
        raise TypeError("job_ids must be a collection of ids, not one string")
    return admin_service_pb2.RetryFailedRequest(queue=queue, job_ids=list(job_ids), task=task, limit=limit)


def stream_timings_request(
    queue: str = "",
    task: str = "",
    outcome: admin_service_pb2.JobOutcome.ValueType = admin_service_pb2.JOB_OUTCOME_UNSPECIFIED,
    last_n: int = 0,
    cursor: str = "",
) -> admin_service_pb2.StreamTimingsRequest:
    return admin_service_pb2.StreamTimingsRequest(queue=queue, task=task, outcome=outcome, last_n=last_n, cursor=cursor)


def _struct(payload: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(payload))
    return struct
