"""What wraps each of the queue service's own RPC methods, applied once at
registration rather than by grpc.aio interceptors, which look every call's
handler up again (see bench/profile.md).

`tolerant_decoding`: grpc.aio answers UNKNOWN when a request body does not
parse; wrapping our deserializers turns such a body into a
`MalformedRequest`, which the `rpc` wrapper answers with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

MethodHandler = Any  # grpc.RpcMethodHandler: a namedtuple in grpcio, untyped in its stubs
MethodWrapper = Callable[[str, MethodHandler], MethodHandler]


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


def tolerant_decoding(method: str, handler: MethodHandler) -> MethodHandler:
    if handler.request_deserializer is None:
        return handler
    return handler._replace(request_deserializer=_tolerant(handler.request_deserializer))


class _Registrar:
    """Stands in for the server in a generated `add_*Servicer_to_server` call and
    registers each method handler on the real server, wrapped."""

    def __init__(self, server: grpc.aio.Server, wrappers: Sequence[MethodWrapper]) -> None:
        self.server = server
        self.wrappers = wrappers

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        # Generated code registers the same handlers both ways; they are wrapped and
        # registered both ways in add_registered_method_handlers.
        return None

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, MethodHandler]) -> None:
        wrapped = {}
        for name, handler in method_handlers.items():
            result = handler
            for wrap in self.wrappers:
                result = wrap(f"/{service}/{name}", result)
            wrapped[name] = result
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        # Missing from grpc-stubs; present on grpc.aio servers since grpcio 1.62.
        self.server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]


def add_service(
    server: grpc.aio.Server,
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    wrappers: Sequence[MethodWrapper],
) -> None:
    """`add_to_server(servicer, server)` (a generated function), with every method wrapped by `wrappers`."""
    add_to_server(servicer, _Registrar(server, wrappers))
