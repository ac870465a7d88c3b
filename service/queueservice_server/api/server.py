"""The gRPC server: `create_server` builds it on any address (port 0 in tests),
`serve` runs it until SIGTERM or SIGINT and then drains it."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import redis.asyncio
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from queueservice.v1 import admin_service_pb2_grpc, queue_service_pb2_grpc
from queueservice_server.api.admin_servicer import AdminServicer
from queueservice_server.api.audit import AuditTrail
from queueservice_server.api.auth import ANY_IDENTITY, Authenticator, AuthFileError, load_identities
from queueservice_server.api.health import SERVICE_NAMES, RedisHealth
from queueservice_server.api.queue_servicer import QueueServicer
from queueservice_server.api.rpc_metrics import RpcMetrics
from queueservice_server.api.tls import server_credentials
from queueservice_server.api.validation import Validator
from queueservice_server.api.wrappers import MethodWrapper, add_service, tolerant_decoding
from queueservice_server.core.cancellation import stop_task
from queueservice_server.core.producer import Producer
from queueservice_server.core.redis import async_client
from queueservice_server.embedded import bind_problem
from queueservice_server.monitor.runner import Monitoring
from queueservice_server.settings import Settings, SettingsError
from queueservice_server.tasks import load_tasks

log = logging.getLogger(__name__)


class BindError(RuntimeError):
    """The gRPC address cannot be bound: in use, not a local address, or not host:port."""


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Recycle connections so clients rebalance across replicas.
        ("grpc.max_connection_age_ms", 30 * 60_000),
        ("grpc.max_connection_age_grace_ms", 60_000),
        # gRPC sets SO_REUSEPORT by default, so a second server on a port in use would share it
        # (each taking half the connections) instead of failing.
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class App:
    """A built server and what it owns."""

    server: grpc.aio.Server
    port: int
    redis: redis.asyncio.Redis
    health: RedisHealth
    monitoring: Monitoring
    settings: Settings
    auth: Authenticator | None = None
    _health_task: asyncio.Task[None] | None = None
    _audit_task: asyncio.Task[None] | None = None

    @property
    def metrics_port(self) -> int:
        """Where /metrics listens (0: off)."""
        return self.monitoring.metrics_port

    async def start(self) -> None:
        await self.server.start()
        await self.health.check()
        self._health_task = asyncio.create_task(self.health.run())
        if self.auth is not None:
            self._audit_task = asyncio.create_task(self.auth.audit.run())
        await self.monitoring.start()

    def reload(self) -> None:
        """Re-reads QUEUE_AUTH_FILE (on SIGHUP); a file that does not parse leaves the identities as they were."""
        if self.auth is None:
            return
        try:
            self.auth.identities = load_identities(Path(self.settings.auth_file))
        except AuthFileError as exc:
            log.error("auth file not reloaded, the previous identities stay: %s", exc)
            return
        log.info("auth file reloaded", extra={"identities": self.auth.identities.count})

    async def stop(self, grace: float) -> None:
        await self.health.shutdown()
        if self._health_task is not None:
            await stop_task(self._health_task)
        # Open StreamTimings calls end cleanly (their clients resume elsewhere with their cursor)
        # before the grace period starts counting down on the unary ones.
        await self.monitoring.end_streams()
        await self.server.stop(grace)
        if self._audit_task is not None:
            # Its last flush writes the lines of the calls that just drained.
            await stop_task(self._audit_task)
        await self.monitoring.stop()
        await self.redis.aclose()


def _authenticator(settings: Settings) -> Authenticator | None:
    if not settings.auth_enabled:
        return None
    try:
        identities = load_identities(Path(settings.auth_file))
    except AuthFileError as exc:
        raise SettingsError(str(exc)) from exc
    return Authenticator(identities, certificates=bool(settings.tls_client_ca), audit=AuditTrail())


def _add_open_services(
    server: grpc.aio.Server, settings: Settings, health: RedisHealth, auth: Authenticator | None
) -> None:
    """Health and reflection: open to all unless switched off, then they need any known identity."""
    names = [*filter(None, SERVICE_NAMES), reflection.SERVICE_NAME, "grpc.health.v1.Health"]
    closed: list[MethodWrapper] = [auth.wrapper({}, ANY_IDENTITY)] if auth is not None else []
    add_service(
        server, health_pb2_grpc.add_HealthServicer_to_server, health.servicer, [] if settings.health_open else closed
    )
    add_service(
        server,
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
        reflection.aio.ReflectionServicer(names),  # type: ignore[attr-defined]  # re-exported, not in __all__
        [] if settings.reflection_open else closed,
    )


def create_server(settings: Settings, redis_url: str, address: str | None = None) -> App:
    """Builds (does not start) the server on `address` (default: settings), returning it with its bound port."""
    tasks = load_tasks(settings.task_modules, diag=settings.diag_enabled)
    auth = _authenticator(settings)
    tls = server_credentials(settings)
    client = async_client(settings, redis_url)
    monitoring = Monitoring(settings, client)
    server = grpc.aio.server(
        options=server_options(settings), maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs
    )
    producer, validator = Producer(settings, client), Validator(settings, tasks)
    # Auth inside the metrics wrapper, so refused calls are counted by their code.
    wrappers = [
        tolerant_decoding,
        *([auth.wrapper()] if auth else []),
        RpcMetrics(monitoring.metrics.registry).instrument,
    ]
    add_service(
        server, queue_service_pb2_grpc.add_QueueServiceServicer_to_server, QueueServicer(producer, validator), wrappers
    )
    add_service(
        server,
        admin_service_pb2_grpc.add_QueueAdminServiceServicer_to_server,
        AdminServicer(producer, validator, monitoring),
        wrappers,
    )
    health = RedisHealth(client)
    _add_open_services(server, settings, health, auth)
    target = address or settings.grpc_address
    try:
        port = server.add_insecure_port(target) if tls is None else server.add_secure_port(target, tls[0])
    except RuntimeError:  # grpcio raises; older ones returned 0
        port = 0
    if port == 0:
        named = "QUEUE_GRPC_ADDRESS=" if address is None else "gRPC address "
        raise BindError(f"{named}{target}: cannot bind: {bind_problem(target) or 'not a local host:port'}")
    return App(
        server=server, port=port, redis=client, health=health, monitoring=monitoring, settings=settings, auth=auth
    )


async def serve(settings: Settings, redis_url: str, on_ready: str = "") -> None:
    app = create_server(settings, redis_url)
    await app.start()
    log.info(
        "serving gRPC",
        extra={
            "address": settings.grpc_address,
            "port": app.port,
            "tls": bool(settings.tls_cert),
            "mtls": bool(settings.tls_client_ca),
            "auth": app.auth is not None,
        },
    )
    if app.auth is None:
        log.warning(
            "authentication is off (QUEUE_AUTH=false, the default in dev): anyone who reaches %s may enqueue, "
            "read payloads and retry jobs",
            settings.grpc_address,
        )
    if on_ready:
        print(on_ready.format(port=app.port), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload)
    await stop.wait()
    log.info("stopping gRPC server", extra={"grace_s": settings.grpc_grace})
    await app.stop(settings.grpc_grace)
