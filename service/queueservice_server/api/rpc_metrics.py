"""Per-RPC Prometheus metrics of this server, on the monitoring registry:
  queueservice_rpc_requests_total{method,code}   RPCs by final status code
  queueservice_rpc_duration_seconds{method}      unary RPC latency
Applied to each method once, at registration (see wrappers.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from queueservice_server.api.wrappers import MethodHandler

# A method handler's behavior: grpc-stubs types it for the sync server, grpc.aio calls it with its own context.
Behavior = Callable[..., Any]


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "queueservice_rpc_requests",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "queueservice_rpc_duration_seconds", "Unary RPC latency", ["method"], registry=registry
        )

    def instrument(self, method: str, handler: MethodHandler) -> MethodHandler:
        """Wraps one RPC method so that it is counted by final status code (and timed, if unary)."""
        name = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(name, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(name, handler.unary_stream))
        return handler

    def _record(self, name: str, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> None:
        if error is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, asyncio.CancelledError | GeneratorExit):
            code = grpc.StatusCode.CANCELLED
        else:
            code = context.code() or grpc.StatusCode.UNKNOWN
        self.requests.labels(name, code.name).inc()

    def _unary(self, name: str, behavior: Behavior) -> Behavior:
        async def timed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self.seconds.labels(name).observe(time.perf_counter() - started)
                self._record(name, context, error)

        return timed

    def _stream(self, name: str, behavior: Behavior) -> Behavior:
        async def counted(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            error: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._record(name, context, error)

        return counted
