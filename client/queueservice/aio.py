"""AsyncQueueClient: the asyncio client, over a grpc.aio.Channel.

Create it inside the event loop that uses it (grpc.aio channels belong to one loop).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar, Unpack

import grpc
import grpc.aio

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

if TYPE_CHECKING:
    from queueservice.v1.admin_service_pb2_grpc import QueueAdminServiceAsyncStub
    from queueservice.v1.queue_service_pb2_grpc import QueueServiceAsyncStub

__all__ = ["AsyncQueueClient"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class AsyncQueueClient:
    """The asyncio twin of `queueservice.QueueClient`: the same methods, awaited.

    `stream_timings` returns an async iterator; `await client.close()` or
    `async with` releases the channel.
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
            channel = grpc.aio.insecure_channel(target, options=merged)
        else:
            channel = grpc.aio.secure_channel(target, credentials, options=merged)
        self._setup(channel, call, owns_channel=True)

    @classmethod
    def from_channel(
        cls,
        channel: grpc.aio.Channel,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Self:
        """A client over a channel the caller made (and closes: `close()` leaves it open)."""
        client = cls.__new__(cls)
        client._setup(channel, CallSettings.create(timeout, metadata), owns_channel=False)
        return client

    def _setup(self, channel: grpc.aio.Channel, call: CallSettings, *, owns_channel: bool) -> None:
        self.channel = channel
        self._call_settings = call
        self._owns_channel = owns_channel
        self._queue: QueueServiceAsyncStub = queue_service_pb2_grpc.QueueServiceStub(channel)
        self._admin: QueueAdminServiceAsyncStub = admin_service_pb2_grpc.QueueAdminServiceStub(channel)

    async def close(self, grace: float | None = None) -> None:
        """Closes the channel if this client opened it, after `grace` seconds for calls in flight."""
        if self._owns_channel:
            await self.channel.close(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, deadline: float | None
    ) -> Resp:
        try:
            return await method(
                request, timeout=self._call_settings.deadline(deadline), metadata=self._call_settings.metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # The producers' API.

    async def enqueue(
        self,
        task: str,
        payload: Mapping[str, Any] | None = None,
        *,
        deadline: float | None = None,
        **options: Unpack[JobOptions],
    ) -> str:
        """Enqueues one job and returns its id; `options` as in `job_request`."""
        return (await self.enqueue_job(task, payload, deadline=deadline, **options)).job_id

    async def enqueue_job(
        self,
        task: str,
        payload: Mapping[str, Any] | None = None,
        *,
        deadline: float | None = None,
        **options: Unpack[JobOptions],
    ) -> queue_service_pb2.EnqueueResponse:
        """Enqueues one job; the response also tells whether the idempotency key matched an earlier job."""
        return await self._unary(self._queue.Enqueue, opts.job_request(task, payload, **options), deadline)

    async def enqueue_batch(
        self, jobs: Sequence[queue_service_pb2.EnqueueRequest | Mapping[str, Any]], *, deadline: float | None = None
    ) -> list[queue_service_pb2.EnqueueResponse]:
        """Enqueues all `jobs` or none (see `job_request`); results in request order."""
        response = await self._unary(self._queue.EnqueueBatch, opts.batch_request(jobs), deadline)
        return list(response.results)

    async def get_job(self, job_id: str, *, deadline: float | None = None) -> job_pb2.Job:
        return (await self._unary(self._queue.GetJob, opts.get_job_request(job_id), deadline)).job

    # The operators' API.

    async def get_stats(self, queue: str = "", *, deadline: float | None = None) -> admin_service_pb2.GetStatsResponse:
        return await self._unary(self._admin.GetStats, opts.stats_request(queue), deadline)

    async def get_performance(
        self, queue: str = "", window: Seconds | None = None, *, deadline: float | None = None
    ) -> admin_service_pb2.GetPerformanceResponse:
        return await self._unary(self._admin.GetPerformance, opts.performance_request(queue, window), deadline)

    async def retry_failed(
        self,
        queue: str = "",
        job_ids: Iterable[str] = (),
        task: str = "",
        limit: int = 0,
        *,
        deadline: float | None = None,
    ) -> admin_service_pb2.RetryFailedResponse:
        request = opts.retry_failed_request(queue, job_ids, task, limit)
        return await self._unary(self._admin.RetryFailed, request, deadline)

    async def stream_timings(
        self,
        queue: str = "",
        task: str = "",
        outcome: admin_service_pb2.JobOutcome.ValueType = admin_service_pb2.JOB_OUTCOME_UNSPECIFIED,
        last_n: int = 0,
        cursor: str = "",
        *,
        deadline: float | None = None,
    ) -> AsyncIterator[admin_service_pb2.StreamTimingsResponse]:
        """Timings as they happen (`async for`). No deadline unless `deadline` gives one;
        `aclose()` the iterator to cancel the stream (breaking out of the loop leaves that to
        the garbage collector)."""
        call = self._admin.StreamTimings(
            opts.stream_timings_request(queue, task, outcome, last_n, cursor),
            timeout=deadline,
            metadata=self._call_settings.metadata,
        )
        try:
            async for response in call:
                yield response
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            call.cancel()
