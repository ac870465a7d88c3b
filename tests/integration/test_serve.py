"""`queue-service serve` as a newcomer runs it: embedded Redis, in-process workers,
reflection, health, graceful stop, and jobs that survive a restart."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from queueservice.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from tests.support import Serve, run_cli, wait_for


@pytest.fixture
def serve(serve_factory: Callable[..., Serve]) -> Serve:
    return serve_factory()


def test_serve_on_embedded_redis_end_to_end(serve: Serve, serve_factory: Callable[..., Serve], tmp_path: Path) -> None:
    assert f"gRPC on {serve.address}" in serve.banner, serve.log.read_text()
    assert "embedded Redis at redis://127.0.0.1:" in serve.banner
    with grpc.insecure_channel(serve.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {
            "queueservice.v1.QueueService",
            "queueservice.v1.QueueAdminService",
            "grpc.health.v1.Health",
        } <= services

        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "queueservice.v1.QueueService"]:
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING

        stub = queue_service_pb2_grpc.QueueServiceStub(channel)
        done = stub.Enqueue(queue_service_pb2.EnqueueRequest(task="diag.noop")).job_id
        failed = stub.Enqueue(queue_service_pb2.EnqueueRequest(task="diag.fail", max_attempts=1)).job_id

        def state(job_id: str) -> int:
            return stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id)).job.state

        wait_for(lambda: state(done) == job_pb2.JOB_STATE_COMPLETED, 10, what="noop COMPLETED")
        wait_for(lambda: state(failed) == job_pb2.JOB_STATE_FAILED, 10, what="fail FAILED")

    assert serve.stop(signal.SIGTERM) == 0
    assert (tmp_path / "data" / "redis" / "appendonly.aof").exists()

    # The embedded Redis persisted the jobs: a new `serve` on the same data dir still knows them.
    again = serve_factory()
    try:
        with grpc.insecure_channel(again.address) as channel:
            stub = queue_service_pb2_grpc.QueueServiceStub(channel)
            job = stub.GetJob(queue_service_pb2.GetJobRequest(job_id=done)).job
            assert job.state == job_pb2.JOB_STATE_COMPLETED
    finally:
        assert again.stop(signal.SIGINT) == 0


@pytest.mark.parametrize(
    ("command", "env", "named"),
    [("worker", {}, "QUEUE_REDIS_URL"), ("serve", {"QUEUE_ENV": "staging"}, "QUEUE_ENV")],
)
def test_cli_refuses_bad_configuration_naming_the_variable(command: str, env: dict[str, str], named: str) -> None:
    result = run_cli(command, env)
    assert result.returncode == 2
    assert named in result.stderr
