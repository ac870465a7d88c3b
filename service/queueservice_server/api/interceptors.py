"""Server interceptors for the queue service's own RPCs.

grpc.aio answers UNKNOWN when a request body does not parse. `DecodeGuard`
wraps our methods' deserializers so such a body reaches the `rpc` wrapper as
a `MalformedRequest`, which answers INVALID_ARGUMENT instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

SERVICE_PREFIX = "/queueservice.v1."


class MalformedRequest:
    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return MalformedRequest(exc)

    return deserialize


class DecodeGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX) or handler.request_deserializer is None:
            return handler
        # RpcMethodHandler is a namedtuple in grpcio.
        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))  # type: ignore[attr-defined,no-any-return]
