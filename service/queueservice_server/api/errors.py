"""Errors as callers see them: a standard code, a message that says what to fix,
and google.rpc details (BadRequest, ResourceInfo, QuotaFailure, ErrorInfo).

Every servicer method goes through `rpc`, so nothing reaches a caller as
UNKNOWN or with a traceback.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from queueservice_server.api.wrappers import MalformedRequest
from queueservice_server.core.redis import Kind, Trouble, trouble

log = logging.getLogger(__name__)

DOMAIN = "queueservice"


class ApiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = tuple(details)

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details:
            status.details.add().Pack(detail)
        return rpc_status.to_status(status)


# Status messages and details travel in trailers that clients cap at 8 KiB (a soft limit that
# starts refusing there, a hard one at 16 KiB), and grpc-message percent-encodes every non-ASCII
# byte: what an error echoes is ASCII and short, and one error lists violations up to a budget.
MAX_DESCRIPTION = 400
MAX_MESSAGE = 2000


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def quoted(text: str, limit: int = 48) -> str:
    """`text` as an error message shows what a caller sent: quoted in ASCII, and cut when long."""
    shown = ascii(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} characters)"


def invalid_argument(violations: Sequence[tuple[str, str]]) -> ApiError:
    shown: list[tuple[str, str]] = []
    budget = MAX_MESSAGE
    for field, description in violations:
        item = (_clip(field, 64), _clip(description, MAX_DESCRIPTION))
        budget -= len(item[0]) + len(item[1]) + 4
        if budget < 0:
            break
        shown.append(item)
    if len(shown) < len(violations):
        shown.append(("request", f"and {len(violations) - len(shown)} more violations (fix these first)"))
    request = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in shown]
    )
    message = "; ".join(f"{field}: {description}" for field, description in shown)
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, [request])


def not_found(resource_type: str, name: str, message: str) -> ApiError:
    info = error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name, description=message)
    return ApiError(grpc.StatusCode.NOT_FOUND, message, [info])


def resource_exhausted(subject: str, message: str) -> ApiError:
    quota = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=message)]
    )
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, [quota])


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)


R = TypeVar("R")
Context = grpc.aio.ServicerContext[Any, Any]
ServicerMethod = Callable[[Any, Any, Context], Awaitable[R]]


async def abort(context: Context, error: ApiError) -> None:
    # grpc-stubs predates ServicerContext.abort_with_status.
    await context.abort_with_status(error.to_status())  # type: ignore[attr-defined]


# What each "try again" reply means, as the caller's message says it.
_RETRY_REASONS = {
    "READONLY": "is a read-only replica (READONLY: a failover demoted it, or QUEUE_REDIS_URL names a replica)",
    "MASTERDOWN": "is a replica that lost its primary (MASTERDOWN)",
    "BUSY": "is busy running a long script (BUSY)",
    "LOADING": "is loading its data into memory (LOADING)",
    "TRYAGAIN": "is moving keys between cluster nodes (TRYAGAIN)",
    "CLUSTERDOWN": "is a cluster that cannot serve every slot (CLUSTERDOWN)",
}


def redis_error(found: Trouble, exc: Exception) -> ApiError:
    """The status a caller gets for a Redis error that `trouble` recognised."""
    if found.kind is Kind.AUTH:
        # UNAVAILABLE, not FAILED_PRECONDITION: the request is fine and nothing the caller can
        # change makes it work; this server cannot serve (health says NOT_SERVING) until its
        # operator fixes the password, and another replica may serve it meanwhile.
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            f"Redis refused the password this server connects with, or asked for one it was not given ({exc}); "
            "the operator must put the right password in QUEUE_REDIS_URL (redis://:PASSWORD@host:port/db) and "
            "restart the server; retry later or on another replica",
            [_error_info("REDIS_AUTH_FAILED")],
        )
    if found.kind is Kind.NO_PERMISSION:
        # Like a refused password: the operator's to fix, not the caller's.
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            "the Redis user this server connects as lacks a permission (NOPERM): the operator must grant "
            "its ACL user every command and key the service uses (e.g. ACL SETUSER <user> +@all ~<prefix>*), "
            "then retry",
            [_error_info("REDIS_NO_PERMISSION")],
        )
    if found.kind is Kind.OUT_OF_MEMORY:
        message = (
            "the queue's Redis is out of memory (maxmemory reached; it refuses writes rather than evict "
            "keys): retry later, once jobs drain, or raise Redis's maxmemory"
        )
        quota = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject="redis maxmemory", description=message)]
        )
        return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, [quota, _error_info("REDIS_OUT_OF_MEMORY")])
    if found.kind is Kind.RETRY:
        return ApiError(
            grpc.StatusCode.UNAVAILABLE,
            f"the queue's Redis {_RETRY_REASONS[found.code]}; retry with backoff",
            [_error_info("REDIS_UNAVAILABLE", redis_error=found.code)],
        )
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        "the queue's Redis is unreachable; retry with backoff",
        [_error_info("REDIS_UNAVAILABLE")],
    )


async def _abort_for(context: Context, name: str, exc: Exception) -> None:
    """Ends the call with the status `exc` maps to; called from the `except` that caught it."""
    if isinstance(exc, ApiError):
        await abort(context, exc)
        return
    found = trouble(exc)
    if found is not None:
        log.warning("redis cannot serve %s: %s", name, exc, extra={"redis_error": found.code or found.kind.value})
        await abort(context, redis_error(found, exc))
    else:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error in %s", name, extra={"error_ref": ref})
        error = ApiError(
            grpc.StatusCode.INTERNAL,
            f"internal error (reference {ref} in the server log)",
            [_error_info("INTERNAL", reference=ref)],
        )
        await abort(context, error)


def _check_body(request: Any) -> None:
    if isinstance(request, MalformedRequest):
        raise invalid_argument([("request", f"the request body does not parse: {request.error}")])


def rpc(method: ServicerMethod[R]) -> ServicerMethod[R]:
    """Maps ApiError to its status, Redis troubles to UNAVAILABLE or RESOURCE_EXHAUSTED, anything else to INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            _check_body(request)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(context, method.__name__, exc)
        raise AssertionError("abort_with_status returned")

    return wrapper


StreamingServicerMethod = Callable[[Any, Any, Context], AsyncIterator[R]]


def rpc_stream(method: StreamingServicerMethod[R]) -> StreamingServicerMethod[R]:
    """`rpc` for server-streaming methods: the same mapping, before or after messages were sent."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[R]:
        try:
            _check_body(request)
            async for response in method(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(context, method.__name__, exc)

    return wrapper
