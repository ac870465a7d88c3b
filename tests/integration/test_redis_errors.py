"""Redis answers that mean "not now" or "not like this", each made real on a Redis of the
test's own: a demoted primary (READONLY), a replica without its primary (MASTERDOWN), a
long script (BUSY), maxmemory reached (OOM), a refused password. Calls get UNAVAILABLE (or
RESOURCE_EXHAUSTED for OOM) with a message saying what happened, never INTERNAL, and the
server answers again once Redis does."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from queueservice.v1 import queue_service_pb2
from queueservice_server.embedded import RedisServer
from queueservice_server.settings import Settings
from tests.integration.test_queue_api import Stub, rpc_error
from tests.support import request, wait_for

StartRedis = Callable[[str], RedisServer]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN_JOB = queue_service_pb2.GetJobRequest(job_id="default:" + "0" * 32)
# One job per queue: EnqueueBatch runs its two ENQUEUE calls in one pipeline, where redis-py
# and Redis 6.2 wrap the error reply differently from a lone script call.
TWO_QUEUES = queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.noop"), request("diag.noop", queue="emails")])


@pytest.fixture
def start_redis(tmp_path: Path, redis_binary: str) -> Iterator[StartRedis]:
    """Redis servers of this test's own (of the version under test), stopped at its end."""
    servers: list[RedisServer] = []

    def start(name: str) -> RedisServer:
        server = RedisServer(tmp_path / name, binary=redis_binary, appendonly=False)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop(kill=True)


class Served:
    """A real gRPC server on a Redis of the test's own, its stubs, and a direct client to that Redis."""

    def __init__(self, settings: Settings, server_factory: Callable[[Settings], str], url: str, port: int) -> None:
        self.channel = grpc.insecure_channel(server_factory(replace(settings, redis_url=url)))
        self.stub = Stub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.direct = redis.Redis(port=port)

    def status(self) -> int:
        status: int = self.health.Check(health_pb2.HealthCheckRequest(service="")).status
        return status

    def close(self) -> None:
        self.channel.close()
        self.direct.close()


@pytest.fixture
def serve(settings: Settings, server_factory: Callable[[Settings], str]) -> Iterator[Callable[[RedisServer], Served]]:
    made: list[Served] = []

    def make(server: RedisServer, url: str = "") -> Served:
        served = Served(settings, server_factory, url or server.url, server.port)
        made.append(served)
        return served

    yield make
    for served in made:
        served.close()


def unavailable(call: Callable[[], object], *fragments: str) -> None:
    # The deadline is far above what failing fast takes: a hang shows as DEADLINE_EXCEEDED.
    error = rpc_error(call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    for fragment in fragments:
        assert fragment in (error.details() or ""), error.details()


def _link(direct: redis.Redis, status: str) -> bool:
    return bool(direct.info("replication").get("master_link_status") == status)


def test_a_demoted_primary_is_unavailable_saying_it_is_read_only(
    start_redis: StartRedis, serve: Callable[[RedisServer], Served]
) -> None:
    served, new_primary = start_redis("served"), start_redis("new-primary")
    app = serve(served)
    assert app.stub.Enqueue(request("diag.noop"), timeout=8).job_id

    app.direct.replicaof("127.0.0.1", new_primary.port)
    wait_for(lambda: _link(app.direct, "up"), 10, what="the demoted primary to sync from the new one")
    for call in (lambda: app.stub.Enqueue(request("diag.noop"), timeout=8), lambda: app.stub.EnqueueBatch(TWO_QUEUES)):
        unavailable(call, "read-only replica (READONLY", "retry with backoff")
    # Reads still answer from the replica.
    assert rpc_error(lambda: app.stub.GetJob(UNKNOWN_JOB, timeout=8)).code() == grpc.StatusCode.NOT_FOUND

    app.direct.replicaof("NO", "ONE")
    assert app.stub.Enqueue(request("diag.noop"), timeout=8).job_id


def test_a_replica_without_its_primary_is_unavailable_saying_so(
    start_redis: StartRedis, serve: Callable[[RedisServer], Served]
) -> None:
    primary, replica = start_redis("primary"), start_redis("replica")
    app = serve(replica)
    app.direct.config_set("replica-serve-stale-data", "no")
    app.direct.replicaof("127.0.0.1", primary.port)
    wait_for(lambda: _link(app.direct, "up"), 10, what="the replica to sync")
    assert rpc_error(lambda: app.stub.GetJob(UNKNOWN_JOB, timeout=8)).code() == grpc.StatusCode.NOT_FOUND

    primary.stop(kill=True)
    wait_for(lambda: _link(app.direct, "down"), 10, what="the replica to lose its primary")
    unavailable(lambda: app.stub.GetJob(UNKNOWN_JOB, timeout=8), "lost its primary (MASTERDOWN)", "retry")
    unavailable(lambda: app.stub.Enqueue(request("diag.noop"), timeout=8), "MASTERDOWN")
    unavailable(lambda: app.stub.EnqueueBatch(TWO_QUEUES, timeout=8), "MASTERDOWN")

    app.direct.replicaof("NO", "ONE")
    assert app.stub.Enqueue(request("diag.noop"), timeout=8).job_id


def _kill_script(direct: redis.Redis) -> bool:
    try:
        return bool(direct.script_kill())
    except redis.ResponseError as exc:
        return str(exc).startswith("NOTBUSY")  # none running (any more)


def test_a_long_script_makes_calls_unavailable_and_health_not_serving_until_it_is_killed(
    start_redis: StartRedis, serve: Callable[[RedisServer], Served]
) -> None:
    busy = start_redis("busy")
    app = serve(busy)
    assert app.stub.Enqueue(request("diag.noop"), timeout=8).job_id
    # Redis 7 calls it busy-reply-threshold; lua-time-limit is the name both versions take.
    app.direct.config_set("lua-time-limit", 50)

    def loop() -> None:
        looping = redis.Redis(port=busy.port)
        with contextlib.suppress(redis.ResponseError):  # "script killed"
            looping.eval("while true do end", 0)
        looping.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:

        def answers_busy() -> bool:
            try:
                app.direct.ping()
            except redis.ResponseError as exc:
                return str(exc).startswith("BUSY")
            return False

        wait_for(answers_busy, 10, what="Redis to answer BUSY")
        unavailable(lambda: app.stub.GetJob(UNKNOWN_JOB, timeout=8), "busy running a long script (BUSY)", "retry")
        unavailable(lambda: app.stub.Enqueue(request("diag.noop"), timeout=8), "BUSY")
        unavailable(lambda: app.stub.EnqueueBatch(TWO_QUEUES, timeout=8), "BUSY")
        wait_for(lambda: app.status() == NOT_SERVING, 10, what="NOT_SERVING while Redis is busy")
    finally:
        wait_for(lambda: _kill_script(app.direct), 10, what="SCRIPT KILL")
        thread.join(10)
    wait_for(lambda: app.status() == SERVING, 10, what="SERVING again")
    assert app.stub.Enqueue(request("diag.noop"), timeout=8).job_id


def test_maxmemory_reached_is_resource_exhausted_about_redis_memory(
    start_redis: StartRedis, serve: Callable[[RedisServer], Served]
) -> None:
    full = start_redis("full")
    app = serve(full)
    job_id = app.stub.Enqueue(request("diag.noop"), timeout=8).job_id
    # RedisServer runs with noeviction, as a queue's Redis must.
    app.direct.config_set("maxmemory", 1)
    for call in (lambda: app.stub.Enqueue(request("diag.noop"), timeout=8), lambda: app.stub.EnqueueBatch(TWO_QUEUES)):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "Redis is out of memory (maxmemory reached" in (error.details() or "")
    # Reads go on.
    assert app.stub.GetJob(queue_service_pb2.GetJobRequest(job_id=job_id), timeout=8).job.id == job_id

    app.direct.config_set("maxmemory", 0)
    assert app.stub.Enqueue(request("diag.noop"), timeout=8).job_id


def test_a_refused_password_says_so_and_health_is_not_serving(
    start_redis: StartRedis, serve: Callable[..., Served]
) -> None:
    protected = start_redis("protected")
    with redis.Redis(port=protected.port) as direct:
        direct.config_set("requirepass", "the-right-one")
    host = f"127.0.0.1:{protected.port}/0"
    for url in (f"redis://:not-the-password@{host}", f"redis://{host}"):
        app = serve(protected, url)
        for call in (
            lambda s=app.stub: s.Enqueue(request("diag.noop"), timeout=8),
            lambda s=app.stub: s.GetJob(UNKNOWN_JOB),
        ):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            details = error.details() or ""
            assert "Redis refused the password" in details and "QUEUE_REDIS_URL" in details
            assert "unreachable" not in details and "not-the-password" not in details
        assert app.status() == NOT_SERVING

    right = serve(protected, f"redis://:the-right-one@{host}")
    assert right.status() == SERVING
    assert right.stub.Enqueue(request("diag.noop"), timeout=8).job_id


def test_an_acl_user_without_a_permission_is_told_to_the_operator(
    start_redis: StartRedis, serve: Callable[..., Served]
) -> None:
    limited = start_redis("acl")
    with redis.Redis(port=limited.port) as direct:
        # Everything but scripts: every state change of the service is a script.
        direct.acl_setuser("queue", enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-@scripting"])
    app = serve(limited, f"redis://queue:secret@127.0.0.1:{limited.port}/0")
    error = rpc_error(lambda: app.stub.Enqueue(request("diag.noop"), timeout=8))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert "lacks a permission (NOPERM)" in (error.details() or "")
    assert "secret" not in (error.details() or "")
