"""Redis stopped under a running server: health goes NOT_SERVING, calls fail fast
with UNAVAILABLE, and everything comes back when Redis does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from queueservice.v1 import queue_service_pb2, queue_service_pb2_grpc
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from tests.support import wait_for


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_redis_down_means_unavailable_and_not_serving(
    own_redis: RedisServer, settings: Settings, server_factory: Callable[[Settings], str]
) -> None:
    address = server_factory(replace(settings, redis_url=own_redis.url))
    with grpc.insecure_channel(address) as channel:
        stub = queue_service_pb2_grpc.QueueServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            status: int = health.Check(health_pb2.HealthCheckRequest(service="")).status
            return status

        request = queue_service_pb2.EnqueueRequest(task="diag.noop")
        job_id = stub.Enqueue(request).job_id
        assert status() == health_pb2.HealthCheckResponse.SERVING

        own_redis.stop(kill=True)
        with pytest.raises(grpc.RpcError) as info:
            # The deadline is far above what failing fast takes: a hang shows as DEADLINE_EXCEEDED.
            stub.Enqueue(request, timeout=8)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Redis is unreachable" in (info.value.details() or "")
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 10, what="NOT_SERVING")

        own_redis.start()
        wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, 10, what="SERVING again")
        assert stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)).job.id == job_id
        assert stub.Enqueue(request).job_id
