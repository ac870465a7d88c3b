"""What a server runs for monitoring, started and stopped with it: the
collector loop, the /metrics endpoint, and the StreamTimings hub."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio

from queueservice_server.core.cancellation import stop_task
from queueservice_server.monitor.collector import Collector
from queueservice_server.monitor.prometheus import Metrics
from queueservice_server.monitor.reader import Reader
from queueservice_server.monitor.reports import Reports
from queueservice_server.monitor.streaming import TimingsHub
from queueservice_server.settings import Settings

log = logging.getLogger(__name__)


class Monitoring:
    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.reader = Reader(settings, client)
        self.reports = Reports(settings, self.reader)
        self.metrics = Metrics(settings, self.reader)
        self.hub = TimingsHub(
            settings,
            client,
            on_subscribers=self.metrics.stream_subscribers.inc,
            on_drop=self.metrics.stream_dropped.inc,
        )
        self.collector = Collector(settings, client, self.reader)
        self.metrics_port = 0
        self._collector_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._collector_task = asyncio.create_task(self.collector.run(), name="collector")
        address = self.settings.metrics_address
        if address:
            try:
                self.metrics_port = self.metrics.serve(address, asyncio.get_running_loop())
            except OSError as exc:
                raise RuntimeError(f"cannot serve /metrics on QUEUE_METRICS_ADDRESS={address}: {exc}") from exc
            log.info("serving /metrics", extra={"address": address, "port": self.metrics_port})

    async def end_streams(self) -> None:
        await self.hub.close()

    async def stop(self) -> None:
        await self.hub.close()
        if self._collector_task is not None:
            await stop_task(self._collector_task)
        await asyncio.to_thread(self.metrics.shutdown)
