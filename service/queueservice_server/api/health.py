"""grpc.health.v1 status that follows Redis: NOT_SERVING while Redis does not answer PING
(unreachable, refusing the password, busy, loading, a replica without its primary...)."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio
import redis.exceptions
from grpc_health.v1 import health, health_pb2

from queueservice.v1 import admin_service_pb2, queue_service_pb2
from queueservice_server.core.redis import Kind, trouble

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    "",
    queue_service_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["QueueAdminService"].full_name,
)
CHECK_INTERVAL_S = 1.0


class RedisHealth:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        # grpc-stubs predates the aio health servicer.
        self.servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.serving: bool | None = None

    async def _set(self, serving: bool, why: str = "") -> None:
        if serving == self.serving:
            return
        if self.serving is not None or not serving:
            log.warning("redis %s", "answers again: SERVING" if serving else f"{why}: NOT_SERVING")
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in SERVICE_NAMES:
            await self.servicer.set(name, status)

    async def check(self) -> None:
        try:
            await self.client.ping()
        except redis.exceptions.RedisError as exc:
            # Any error reply to PING means Redis cannot serve now; the loop must outlive it.
            found = trouble(exc)
            if found is not None and found.kind is Kind.AUTH:
                why = f"refused the password ({exc})"
            elif found is not None and found.code:
                why = f"cannot serve ({found.code}: {exc})"
            else:
                why = f"unreachable ({exc})"
            await self._set(False, why)
        else:
            await self._set(True)

    async def run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(CHECK_INTERVAL_S)

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()
