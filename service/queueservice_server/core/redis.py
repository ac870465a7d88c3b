"""Redis clients tuned for a queue, for the sync and async sides.

hiredis parses replies when installed (the `server` extra brings it); commands
time out after 5 s, connections after 10 s; TCP keep-alive at 30 s; idle
connections are health-checked before reuse; the pool is bounded; a dead
Redis fails the call at once instead of queueing it (no offline buffer). A
connection that broke (say, Redis restarted) is retried once, at once, on a
fresh connection; timeouts are never retried. A retried command or pipeline
may already have run: that is safe for reads, and for every Lua script
(each is safe to re-run, see lua.py); WATCHed transactions are never retried
(redis-py raises WatchError instead). redis-py counts a refused password
(AuthenticationError) and LOADING (BusyLoadingError) as connection errors, so
they get that one retry too: a fresh connection, the same answer, no harm.
The other "try again" replies (READONLY, BUSY, MASTERDOWN, ...) and OOM are
reply errors, never retried here: the caller is told to back off (`trouble`).
`rediss://` verifies the certificate and the host name unless
QUEUE_REDIS_TLS_INSECURE is set, which is logged.
"""

from __future__ import annotations

import enum
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from queueservice_server.settings import Settings

log = logging.getLogger(__name__)


# What a Redis that is down, restarting or still loading its data raises: callers answer
# UNAVAILABLE (API) or try again later (monitoring, workers).
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)


class Kind(enum.Enum):
    """What a Redis error means for the caller."""

    DOWN = "down"  # unreachable, timed out, or no connection free in the pool
    RETRY = "retry"  # Redis answered "not now" (RETRY_CODES): the same call may succeed later
    OUT_OF_MEMORY = "oom"  # maxmemory reached under noeviction: writes fail until memory frees
    AUTH = "auth"  # Redis refused the password this process connects with
    NO_PERMISSION = "noperm"  # the ACL user this process connects as may not run a command or key


# Error replies that mean "this server cannot do it now; try again".
RETRY_CODES = frozenset({"READONLY", "MASTERDOWN", "BUSY", "LOADING", "TRYAGAIN", "CLUSTERDOWN"})

# redis-py's classes for those replies (subclasses first: MasterDownError is a ClusterDownError).
_CLASS_CODES: tuple[tuple[type[Exception], str], ...] = (
    (redis.exceptions.AuthenticationError, "AUTH"),
    (redis.exceptions.BusyLoadingError, "LOADING"),
    (redis.exceptions.ReadOnlyError, "READONLY"),
    (redis.exceptions.MasterDownError, "MASTERDOWN"),
    (redis.exceptions.ClusterDownError, "CLUSTERDOWN"),
    (redis.exceptions.TryAgainError, "TRYAGAIN"),
    (redis.exceptions.OutOfMemoryError, "OOM"),
    (redis.exceptions.NoPermissionError, "NOPERM"),
)
# redis-py prefixes an error inside a pipeline with the command that caused it; greedy, so
# that the text after the last prefix (Redis's own) is what is read.
_PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ", re.DOTALL)
# Redis 6.2 wraps an error raised by a command inside a script, losing its class in redis-py:
# "Error running script (call to f_<sha>): @user_script:1: @user_script: 1: -READONLY You can't ..."
_SCRIPT_WRAPPED = re.compile(r"^Error running script .*?: -([A-Z]+)\b", re.DOTALL)


def error_code(exc: BaseException) -> str:
    """The Redis error code behind `exc` (READONLY, BUSY, OOM, ..., or AUTH for a refused
    password), from redis-py's class or else the reply's first word; '' for none."""
    for cls, code in _CLASS_CODES:
        if isinstance(exc, cls):
            return code
    if not isinstance(exc, redis.exceptions.ResponseError):
        return ""
    text = _PIPELINE_PREFIX.sub("", str(exc), count=1)
    wrapped = _SCRIPT_WRAPPED.match(text)
    word = wrapped.group(1) if wrapped else text.split(" ", 1)[0]
    return word if word.isalpha() and word.isupper() else ""


@dataclass(frozen=True)
class Trouble:
    kind: Kind
    code: str  # error_code(), '' when Redis did not answer


def trouble(exc: BaseException) -> Trouble | None:
    """What a Redis error means for the caller, or None for an error that is not Redis's state
    (a bug, a bad command): the API answers UNAVAILABLE / RESOURCE_EXHAUSTED for these, loops retry."""
    code = error_code(exc)
    if code == "AUTH":
        return Trouble(Kind.AUTH, code)
    if code in RETRY_CODES:
        return Trouble(Kind.RETRY, code)
    if code == "OOM":
        return Trouble(Kind.OUT_OF_MEMORY, code)
    if code == "NOPERM":
        return Trouble(Kind.NO_PERMISSION, code)
    if isinstance(exc, REDIS_DOWN):
        return Trouble(Kind.DOWN, "")
    return None


def queued(pipe: Any) -> int:
    """Where the reply of the command just queued on `pipe` will be in its execute() list, so
    readers find replies by the name they kept rather than by counting offsets."""
    return len(pipe.command_stack) - 1


def time_ms(reply: tuple[Any, Any]) -> int:
    """A Redis `TIME` reply (seconds, microseconds) in milliseconds: the one clock every host shares."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def redacted_url(url: str) -> str:
    """`url` fit for a log or a terminal: the password (in the user part or a `password=` query
    parameter) replaced by `***`. Every Redis URL that is printed or logged goes through this."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, host = netloc.rpartition("@")
            netloc = f"{userinfo.partition(':')[0]}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*/")
        # Not urlunsplit: it turns unix:///path into unix:/path.
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        # Unparsable: show nothing of it rather than risk showing a secret.
        return "<unparsable Redis URL>"


def _keepalive_options(seconds: int) -> dict[int, int]:
    options: dict[int, int] = {}
    for name, value in (("TCP_KEEPIDLE", seconds), ("TCP_KEEPINTVL", max(1, seconds // 3)), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            options[getattr(socket, name)] = value
    return options


def client_options(settings: Settings, url: str) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_command_timeout,
        "socket_connect_timeout": settings.redis_connect_timeout,
        "health_check_interval": settings.redis_keepalive,
        "max_connections": settings.redis_pool_size,
        "client_name": "queueservice",
    }
    if not url.startswith("unix://"):
        options["socket_keepalive"] = True
        options["socket_keepalive_options"] = _keepalive_options(settings.redis_keepalive)
    if url.startswith("rediss://"):
        if settings.redis_tls_insecure:
            log.warning("redis TLS certificate and host-name checks are OFF (QUEUE_REDIS_TLS_INSECURE)")
            options.update(ssl_cert_reqs="none", ssl_check_hostname=False)
        else:
            options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
    return options


# One immediate retry, on a broken connection only.
_RETRY_ON = (redis.ConnectionError,)


def sync_client(settings: Settings, url: str) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        timeout=settings.redis_command_timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=_RETRY_ON),
        **client_options(settings, url),
    )
    return redis.Redis(connection_pool=pool)


def async_client(settings: Settings, url: str) -> redis.asyncio.Redis:
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        timeout=settings.redis_command_timeout,
        retry=redis.asyncio.retry.Retry(NoBackoff(), 1, supported_errors=_RETRY_ON),
        **client_options(settings, url),
    )
    return redis.asyncio.Redis(connection_pool=pool)
