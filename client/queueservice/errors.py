"""Errors the queue clients raise: one class per status code a caller handles
differently, each carrying the code, the server's message and its google.rpc
details.

Every `grpc.RpcError` from a call is turned into one of these by
`from_rpc_error` and raised `from` the original, for the sync and the async
client alike. Details travel in the `grpc-status-details-bin` trailer; they are
decoded on first access, and only if `google.rpc` (googleapis-common-protos) is
importable: the client itself depends on grpcio and protobuf alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

__all__ = [
    "AuthError",
    "DeadlineExceeded",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "QueueError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class QueueError(Exception):
    """A call to the queue service failed. Also the class for codes without a subclass of their own.

    `code` is the gRPC status code, `message` the server's text, `details` the
    decoded google.rpc detail messages (BadRequest, ResourceInfo, QuotaFailure,
    ErrorInfo, ...; an `Any` for types not known locally; empty when
    googleapis-common-protos is not installed).
    """

    def __init__(self, code: grpc.StatusCode, message: str, raw_details: bytes = b"") -> None:
        super().__init__(code, message, raw_details)
        self.code = code
        self.message = message
        self.raw_details = raw_details
        self._details: tuple[Message, ...] | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @property
    def details(self) -> tuple[Message, ...]:
        if self._details is None:
            self._details = decode_details(self.raw_details)
        return self._details

    @property
    def reason(self) -> str:
        """The ErrorInfo reason (for example "REDIS_UNAVAILABLE"), or "" when there is none."""
        for detail in self.details:
            if detail.DESCRIPTOR.full_name == "google.rpc.ErrorInfo":
                return str(getattr(detail, "reason", ""))
        return ""


class InvalidArgument(QueueError):
    """The request is malformed; `field_violations` names each field to fix."""

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) pairs from the BadRequest detail, for example ("task", "unknown task ...")."""
        try:
            from google.rpc import error_details_pb2  # noqa: PLC0415 - optional dependency
        except ImportError:
            return []
        return [
            (violation.field, violation.description)
            for detail in self.details
            if isinstance(detail, error_details_pb2.BadRequest)
            for violation in detail.field_violations
        ]


class NotFound(QueueError):
    """A named job or queue does not exist; `resource_type`/`resource_name` say which."""

    @property
    def resource_type(self) -> str:
        return self._resource_info()[0]

    @property
    def resource_name(self) -> str:
        return self._resource_info()[1]

    def _resource_info(self) -> tuple[str, str]:
        try:
            from google.rpc import error_details_pb2  # noqa: PLC0415 - optional dependency
        except ImportError:
            return ("", "")
        for detail in self.details:
            if isinstance(detail, error_details_pb2.ResourceInfo):
                return (detail.resource_type, detail.resource_name)
        return ("", "")


class ResourceExhausted(QueueError):
    """A limit was hit (payload size, batch size, ...); `quota_violations` says which."""

    @property
    def quota_violations(self) -> list[tuple[str, str]]:
        """(subject, description) pairs from the QuotaFailure detail, for example ("payload", "...")."""
        try:
            from google.rpc import error_details_pb2  # noqa: PLC0415 - optional dependency
        except ImportError:
            return []
        return [
            (violation.subject, violation.description)
            for detail in self.details
            if isinstance(detail, error_details_pb2.QuotaFailure)
            for violation in detail.violations
        ]


class Unavailable(QueueError):
    """The service (or its Redis) cannot be reached; safe to retry with backoff."""


class DeadlineExceeded(QueueError):
    """The call did not finish within its deadline; it may or may not have taken effect."""


class Unimplemented(QueueError):
    """The server does not implement this call (yet)."""


class AuthError(QueueError):
    """The caller is not authenticated, or not allowed to make this call."""


class PermissionDenied(AuthError):
    pass


class Unauthenticated(AuthError):
    pass


class InternalError(QueueError):
    """The server failed (INTERNAL, UNKNOWN or DATA_LOSS); `reason`/`details` carry its reference."""


_BY_CODE: dict[grpc.StatusCode, type[QueueError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def from_rpc_error(error: grpc.RpcError) -> QueueError:
    """The QueueError for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`); raise it `from` `error`."""
    # A bare grpc.RpcError (from an interceptor, say) need not implement the Call methods.
    code = _call(error, "code") or grpc.StatusCode.UNKNOWN
    message = _call(error, "details") or ""
    raw = status_details_bytes(_call(error, "trailing_metadata") or ())
    return _BY_CODE.get(code, QueueError)(code, str(message), raw)


def _call(error: grpc.RpcError, name: str) -> Any:
    method = getattr(error, name, None)
    return method() if callable(method) else None


def status_details_bytes(metadata: Iterable[Any]) -> bytes:
    """The serialized google.rpc.Status in trailing metadata, or b""."""
    for key, value in metadata:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return value
    return b""


def decode_details(raw: bytes) -> tuple[Message, ...]:
    """The detail messages of a serialized google.rpc.Status; () without google.rpc or on garbage."""
    if not raw:
        return ()
    try:
        # error_details_pb2 registers the standard detail types in the default pool.
        from google.rpc import error_details_pb2, status_pb2  # noqa: F401, PLC0415 - optional dependency
    except ImportError:
        return ()
    try:
        status = status_pb2.Status.FromString(raw)
    except DecodeError:
        return ()
    pool = descriptor_pool.Default()
    decoded: list[Message] = []
    for packed in status.details:
        try:
            message = message_factory.GetMessageClass(pool.FindMessageTypeByName(packed.TypeName()))()
        except KeyError:
            decoded.append(packed)
            continue
        if packed.Unpack(message):
            decoded.append(message)
        else:
            decoded.append(packed)
    return tuple(decoded)
