"""Authentication and roles over the wire: every RPC against every role (from the
one permission table), the codes and messages of refusals, payloads hidden from
viewers, audit lines, token reload on SIGHUP, health and reflection open."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from queueservice import AsyncQueueClient, PermissionDenied, QueueClient, Unauthenticated
from queueservice.v1 import admin_service_pb2, queue_service_pb2
from queueservice_server.api.auth import PERMISSIONS, Role, new_token
from queueservice_server.embedded import free_port
from queueservice_server.settings import Settings
from tests.support import ServeProcess, request, wait_for

# One request per RPC that passes validation; the table below must name every RPC in PERMISSIONS.
SAMPLES: dict[str, tuple[Message, Callable[[Any], bytes], Callable[[bytes], Any], bool]] = {}


def _sample(method: str, message: Message, response: type[Message], stream: bool = False) -> None:
    SAMPLES[method] = (message, type(message).SerializeToString, response.FromString, stream)


_sample("/queueservice.v1.QueueService/Enqueue", request("diag.noop"), queue_service_pb2.EnqueueResponse)
_sample(
    "/queueservice.v1.QueueService/EnqueueBatch",
    queue_service_pb2.EnqueueBatchRequest(jobs=[request("diag.noop")]),
    queue_service_pb2.EnqueueBatchResponse,
)
_sample(
    "/queueservice.v1.QueueService/GetJob",
    queue_service_pb2.GetJobRequest(job_id="default:0123456789abcdef0123456789abcdef"),
    queue_service_pb2.GetJobResponse,
)
_sample(
    "/queueservice.v1.QueueAdminService/GetStats",
    admin_service_pb2.GetStatsRequest(),
    admin_service_pb2.GetStatsResponse,
)
_sample(
    "/queueservice.v1.QueueAdminService/GetPerformance",
    admin_service_pb2.GetPerformanceRequest(),
    admin_service_pb2.GetPerformanceResponse,
)
_sample(
    "/queueservice.v1.QueueAdminService/StreamTimings",
    admin_service_pb2.StreamTimingsRequest(),
    admin_service_pb2.StreamTimingsResponse,
    stream=True,
)
_sample(
    "/queueservice.v1.QueueAdminService/RetryFailed",
    admin_service_pb2.RetryFailedRequest(limit=1),
    admin_service_pb2.RetryFailedResponse,
)

AUTH_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


@dataclasses.dataclass
class Tokens:
    by_name: dict[str, str]
    file: Path

    def metadata(self, name: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.by_name[name]}"),)


def write_auth_file(path: Path, identities: dict[str, str], extra: str = "") -> dict[str, str]:
    """Writes `name -> roles` identities with fresh tokens; returns name -> token."""
    tokens, lines = {}, ["# name roles credential"]
    for name, roles in identities.items():
        token, credential = new_token()
        tokens[name] = token
        lines.append(f"{name} {roles} {credential}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return tokens


IDENTITIES = {role.value: role.value for role in Role} | {"both": "producer,viewer"}


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    path = tmp_path / "auth"
    return Tokens(write_auth_file(path, IDENTITIES), path)


@pytest.fixture
def auth_settings(settings: Settings, tokens: Tokens) -> Settings:
    return dataclasses.replace(settings, auth=True, auth_file=str(tokens.file))


@pytest.fixture
def auth_channel(auth_settings: Settings, server_factory: Callable[[Settings], str]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_factory(auth_settings)) as channel:
        yield channel


def call(channel: grpc.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> tuple[grpc.StatusCode, str]:
    message, serialize, deserialize, stream = SAMPLES[method]
    try:
        if stream:
            responses = channel.unary_stream(method, serialize, deserialize)(message, metadata=metadata, timeout=0.5)
            for _ in responses:
                break
        else:
            channel.unary_unary(method, serialize, deserialize)(message, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_the_samples_cover_every_rpc_in_the_permission_table() -> None:
    assert set(SAMPLES) == set(PERMISSIONS)


def test_every_role_against_every_rpc(auth_channel: grpc.Channel, tokens: Tokens) -> None:
    for method, rule in PERMISSIONS.items():
        for name in IDENTITIES:
            roles = {Role(role) for role in IDENTITIES[name].split(",")}
            code, details = call(auth_channel, method, tokens.metadata(name))
            if roles & rule.roles:
                assert code not in AUTH_CODES, (method, name, code, details)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method, name, code)
                needed = " or ".join(role.value for role in Role if role in rule.roles)
                assert f"needs the {needed} role" in details, details
                assert repr(name) in details


def test_missing_unknown_and_malformed_credentials_are_unauthenticated(auth_channel: grpc.Channel) -> None:
    unknown = (("authorization", "Bearer qs_not-a-token"),)
    for method in PERMISSIONS:
        for metadata in [(), unknown, (("authorization", "Basic dXNlcjpwYXNz"),), (("authorization", "Bearer "),)]:
            code, details = call(auth_channel, method, metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, metadata, code)
            assert "Bearer" in details
    # The same words for a missing and an unknown token: the answer says nothing about which tokens exist.
    assert (
        call(auth_channel, "/queueservice.v1.QueueService/GetJob", unknown)[1]
        == (call(auth_channel, "/queueservice.v1.QueueService/GetJob")[1])
    )


def test_a_viewer_sees_a_job_without_its_payload_and_error(
    auth_settings: Settings, server_factory: Callable[[Settings], str], tokens: Tokens
) -> None:
    address = server_factory(auth_settings)
    with QueueClient(address, token=tokens.by_name["producer"]) as producer:
        job_id = producer.enqueue("diag.noop", {"secret": "s3cr3t"}, delay=3600)
        assert producer.get_job(job_id).payload["secret"] == "s3cr3t"
    with QueueClient(address, token=tokens.by_name["viewer"]) as viewer:
        job = viewer.get_job(job_id)
        assert job.id == job_id and not job.HasField("payload") and not job.error
    with QueueClient(address, token=tokens.by_name["both"]) as both:
        assert both.get_job(job_id).payload["secret"] == "s3cr3t"
    with QueueClient(address, token="qs_wrong") as stranger, pytest.raises(Unauthenticated):
        stranger.get_job(job_id)


class AuditLines:
    """The audit trail's JSON lines on stderr (the server runs in the test's process)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.lines: list[dict[str, Any]] = []

    def wait(self, count: int) -> list[dict[str, Any]]:
        def read() -> bool | None:
            err = self.capsys.readouterr().err
            self.lines += [
                json.loads(line) for line in err.splitlines() if '"logger": "queueservice_server.audit"' in line
            ]
            return len(self.lines) >= count or None

        wait_for(read, timeout=10, what=f"{count} audit lines")
        return self.lines


def test_mutating_calls_leave_one_audit_line_each(
    auth_channel: grpc.Channel, tokens: Tokens, capsys: pytest.CaptureFixture[str]
) -> None:
    call(auth_channel, "/queueservice.v1.QueueService/Enqueue", tokens.metadata("producer"))
    call(auth_channel, "/queueservice.v1.QueueAdminService/RetryFailed", tokens.metadata("producer"))
    call(auth_channel, "/queueservice.v1.QueueAdminService/RetryFailed", tokens.metadata("operator"))
    call(auth_channel, "/queueservice.v1.QueueAdminService/GetStats", tokens.metadata("viewer"))
    lines = AuditLines(capsys).wait(3)
    seen = [(line["rpc"], line["who"], line["code"], line.get("jobs")) for line in lines]
    assert seen == [
        ("Enqueue", "producer", "OK", 1),
        ("RetryFailed", "producer", "PERMISSION_DENIED", None),
        ("RetryFailed", "operator", "OK", 0),
    ]
    assert lines[0]["queue"] == "default" and lines[0]["job_id"]
    # The payload and the token never reach the audit line.
    assert all(tokens.by_name["producer"] not in json.dumps(line, default=str) for line in lines)


def test_health_and_reflection_answer_without_a_token(auth_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(auth_channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    assert "queueservice.v1.QueueService" in set(ProtoReflectionDescriptorDatabase(auth_channel).get_services())


def test_health_and_reflection_can_be_closed(
    auth_settings: Settings, server_factory: Callable[[Settings], str], tokens: Tokens
) -> None:
    closed = dataclasses.replace(auth_settings, health_open=False, reflection_open=False)
    with grpc.insecure_channel(server_factory(closed)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            health.Check(health_pb2.HealthCheckRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as refused:
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = health.Check(health_pb2.HealthCheckRequest(), metadata=tokens.metadata("viewer"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_sighup_reloads_the_tokens_without_a_restart(auth_settings: Settings, tokens: Tokens, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    serve = ServeProcess(
        dataclasses.replace(auth_settings, grpc_address=address, serve_workers=False), tmp_path / "serve.log"
    )
    serve.start()
    try:
        with grpc.insecure_channel(serve.address) as channel:
            stats = "/queueservice.v1.QueueAdminService/GetStats"
            assert call(channel, stats, tokens.metadata("viewer"))[0] == grpc.StatusCode.OK
            fresh = write_auth_file(tokens.file, {"newcomer": "viewer"})
            serve.signal(signal.SIGHUP)
            wait_for(
                lambda: (
                    call(channel, stats, (("authorization", f"Bearer {fresh['newcomer']}"),))[0] == grpc.StatusCode.OK
                    or None
                ),
                timeout=10,
                what="the new token accepted",
            )
            assert call(channel, stats, tokens.metadata("viewer"))[0] == grpc.StatusCode.UNAUTHENTICATED
            # A file that does not parse is refused; the identities stay as they were.
            tokens.file.write_text("newcomer viewer sha256:not-hex\n")
            serve.signal(signal.SIGHUP)
            wait_for(
                lambda: "auth file not reloaded" in (tmp_path / "serve.log").read_text() or None,
                timeout=10,
                what="the refusal logged",
            )
            metadata = (("authorization", f"Bearer {fresh['newcomer']}"),)
            assert call(channel, stats, metadata)[0] == grpc.StatusCode.OK
        assert serve.alive()
    finally:
        serve.stop()
    log = (tmp_path / "serve.log").read_text()
    assert fresh["newcomer"] not in log and tokens.by_name["viewer"] not in log


def test_the_async_client_sends_its_token(
    auth_settings: Settings, server_factory: Callable[[Settings], str], tokens: Tokens
) -> None:
    address = server_factory(auth_settings)

    async def round_trip() -> None:
        async with AsyncQueueClient(address, token=tokens.by_name["producer"]) as client:
            job_id = await client.enqueue("diag.noop")
            assert (await client.get_job(job_id)).id == job_id
        async with AsyncQueueClient(address, token=tokens.by_name["viewer"]) as viewer:
            with pytest.raises(PermissionDenied, match="needs the producer or operator role"):
                await viewer.enqueue("diag.noop")

    asyncio.run(round_trip())
    for bad in ["", " padded ", "two\nlines"]:
        with pytest.raises(ValueError, match="token"):
            QueueClient(address, token=bad)


def test_an_unparsable_body_is_invalid_argument_and_audited_with_auth_on(
    auth_channel: grpc.Channel, tokens: Tokens, capsys: pytest.CaptureFixture[str]
) -> None:
    for metadata in [tokens.metadata("producer"), ()]:
        with pytest.raises(grpc.RpcError) as refused:
            enqueue = auth_channel.unary_unary("/queueservice.v1.QueueService/Enqueue", None, None)
            enqueue(b"\xff\xff\xff", metadata=metadata)
        expected = grpc.StatusCode.INVALID_ARGUMENT if metadata else grpc.StatusCode.UNAUTHENTICATED
        assert refused.value.code() == expected
    lines = AuditLines(capsys).wait(2)
    assert [(line["who"], line["code"]) for line in lines] == [
        ("producer", "INVALID_ARGUMENT"),
        ("-", "UNAUTHENTICATED"),
    ]
