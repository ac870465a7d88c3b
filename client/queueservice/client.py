"""QueueClient: the blocking client, over a grpc.Channel."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

import grpc

from queueservice import options as opts
from queueservice.errors import from_rpc_error
from queueservice.options import DEFAULT_TIMEOUT, CallSettings, ChannelOption, JobOptions, Seconds
from queueservice.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    job_pb2,
    queue_service_pb2,
    queue_service_pb2_grpc,
)

__all__ = ["QueueClient"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class QueueClient:
    """Enqueues jobs and reads them back; thread-safe, one channel per client.

    `timeout` is the default deadline of every call in seconds (None: no
    deadline); each method's `deadline` overrides it for one call.
    `token` is sent with every call as `authorization: Bearer <token>`; `credentials`
    (e.g. `queueservice.tls_credentials(ca="ca.pem")`) makes the channel TLS.
    `metadata` goes with every call too.
    Failed calls raise `queueservice.errors.QueueError` subclasses.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Sequence[tuple[str, str]] = (),
        options: Iterable[ChannelOption] = (),
    ) -> None:
        call = CallSettings.create(timeout, metadata, token)
        merged = opts.channel_options(options)
        if credentials is None:
            channel = grpc.insecure_channel(target, options=merged)
        else:
            channel = grpc.secure_channel(target, credentials, options=merged)
        self._setup(channel, call, owns_channel=True)

    @classmethod
    def from_channel(
        cls, channel: grpc.Channel, *, timeout: float | None = DEFAULT_TIMEOUT, metadata: Sequence[tuple[str, str]] = ()
    ) -> Self:
        """A client over a channel the caller made (and closes: `close()` leaves it open)."""
        client = cls.__new__(cls)
        client._setup(channel, CallSettings.create(timeout, metadata), owns_channel=False)
        return client

    def _setup(self, channel: grpc.Channel, call: CallSettings, *, owns_channel: bool) -> None:
        self.channel = channel
        self._call_settings = call
        self._owns_channel = owns_channel
        self._queue = queue_service_pb2_grpc.QueueServiceStub(channel)
        self._admin = admin_service_pb2_grpc.QueueAdminServiceStub(channel)

    def close(self) -> None:
        """Closes the channel if this client opened it; calls in flight are cancelled."""
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _unary(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req, deadline: float | None) -> Resp:
        try:
            return method(
                request, timeout=self._call_settings.deadline(deadline), metadata=self._call_settings.metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # The producers' API.

    def enqueue(
        self,
        task: str,
        payload: Mapping[str, Any] | None = None,
        *,
        deadline: float | None = None,
        **options: Unpack[JobOptions],
    ) -> str:
        """Enqueues one job and returns its id; `options` as in `job_request`."""
        return self.enqueue_job(task, payload, deadline=deadline, **options).job_id

    def enqueue_job(
        self,
        task: str,
        payload: Mapping[str, Any] | None = None,
        *,
        deadline: float | None = None,
        **options: Unpack[JobOptions],
    ) -> queue_service_pb2.EnqueueResponse:
        """Enqueues one job; the response also tells whether the idempotency key matched an earlier job."""
        return self._unary(self._queue.Enqueue, opts.job_request(task, payload, **options), deadline)

    def enqueue_batch(
        self, jobs: Sequence[queue_service_pb2.EnqueueRequest | Mapping[str, Any]], *, deadline: float | None = None
    ) -> list[queue_service_pb2.EnqueueResponse]:
        """Enqueues all `jobs` or none (see `job_request`); results in request order."""
        response = self._unary(self._queue.EnqueueBatch, opts.batch_request(jobs), deadline)
        return list(response.results)

    def get_job(self, job_id: str, *, deadline: float | None = None) -> job_pb2.Job:
        return self._unary(self._queue.GetJob, opts.get_job_request(job_id), deadline).job

    # The operators' API.

    def get_stats(self, queue: str = "", *, deadline: float | None = None) -> admin_service_pb2.GetStatsResponse:
        return self._unary(self._admin.GetStats, opts.stats_request(queue), deadline)

    def get_performance(
        self, queue: str = "", window: Seconds | None = None, *, deadline: float | None = None
    ) -> admin_service_pb2.GetPerformanceResponse:
        return self._unary(self._admin.GetPerformance, opts.performance_request(queue, window), deadline)

    def retry_failed(
        self,
        queue: str = "",
        job_ids: Iterable[str] = (),
        task: str = "",
        limit: int = 0,
        *,
        deadline: float | None = None,
    ) -> admin_service_pb2.RetryFailedResponse:
        return self._unary(self._admin.RetryFailed, opts.retry_failed_request(queue, job_ids, task, limit), deadline)

    def stream_timings(
        self,
        queue: str = "",
        task: str = "",
        outcome: admin_service_pb2.JobOutcome.ValueType = admin_service_pb2.JOB_OUTCOME_UNSPECIFIED,
        last_n: int = 0,
        cursor: str = "",
        *,
        deadline: float | None = None,
    ) -> Iterator[admin_service_pb2.StreamTimingsResponse]:
        """Timings as they happen. The stream has no deadline unless `deadline` gives one
        (the client's default would end it); `close()` the iterator to cancel it."""
        call = self._admin.StreamTimings(
            opts.stream_timings_request(queue, task, outcome, last_n, cursor),
            timeout=deadline,
            metadata=self._call_settings.metadata,
        )
        return _stream(call)


def _stream(call: grpc.CallIterator[Resp]) -> Iterator[Resp]:
    try:
        yield from call
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from exc
    finally:
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves RpcContext.cancel untyped
