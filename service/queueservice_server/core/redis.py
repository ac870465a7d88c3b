"""Redis clients tuned for a queue, for the sync and async sides.

hiredis parses replies when installed (the `server` extra brings it); commands
time out after 5 s, connections after 10 s; TCP keep-alive at 30 s; idle
connections are health-checked before reuse; the pool is bounded; a dead
Redis fails the call at once instead of queueing it (no offline buffer). A
connection that broke (say, Redis restarted) is retried once, at once, on a
fresh connection; timeouts are never retried. A retried command or pipeline
may already have run: that is safe for reads, and for every Lua script
(each is safe to re-run, see lua.py); WATCHed transactions are never retried
(redis-py raises WatchError instead). `rediss://` verifies the certificate and the host name unless
QUEUE_REDIS_TLS_INSECURE is set, which is logged.
"""

from __future__ import annotations

import logging
import socket
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
