"""TLS and mTLS over real handshakes, with a CA and certificates the test makes:
server TLS, plaintext refused, client certificates mapped to roles through the
auth file, certificates replaced on disk served without a restart."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from queueservice import PermissionDenied, QueueClient, Unauthenticated, Unavailable, tls_credentials
from queueservice_server.settings import Settings
from tests.certs import CertificateAuthority, Issued
from tests.integration.test_auth import write_auth_file


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "pki")


def tls_settings(settings: Settings, ca: CertificateAuthority, *, mtls: bool = False) -> Settings:
    server = ca.issue("queue.test", server=True)
    return dataclasses.replace(
        settings, tls_cert=str(server.cert), tls_key=str(server.key), tls_client_ca=str(ca.path) if mtls else ""
    )


def stats_fails_with(client: QueueClient, error: type[Exception]) -> None:
    with pytest.raises(error):
        client.get_stats()


def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(
    settings: Settings, ca: CertificateAuthority, server_factory: Callable[[Settings], str]
) -> None:
    address = server_factory(tls_settings(settings, ca))
    with QueueClient(address, credentials=tls_credentials(ca=ca.path)) as client:
        job_id = client.enqueue("diag.noop", {"n": 1})
        assert client.get_job(job_id).id == job_id
    with QueueClient(address, timeout=3) as plaintext:
        stats_fails_with(plaintext, Unavailable)
    stranger = CertificateAuthority(ca.folder / "other", "another CA")
    with QueueClient(address, credentials=tls_credentials(ca=stranger.path), timeout=3) as untrusting:
        stats_fails_with(untrusting, Unavailable)


def test_mtls_maps_client_certificates_to_roles(
    settings: Settings, ca: CertificateAuthority, server_factory: Callable[[Settings], str], tmp_path: Path
) -> None:
    auth_file = tmp_path / "auth"
    tokens = write_auth_file(
        auth_file, {"oncall": "operator"}, extra="billing producer cn:billing.test\ngrafana viewer san:grafana.test\n"
    )
    secured = dataclasses.replace(tls_settings(settings, ca, mtls=True), auth=True, auth_file=str(auth_file))
    address = server_factory(secured)
    billing, grafana, nobody = (
        ca.issue("billing.test"),
        ca.issue("dashboards", dns=("grafana.test",)),
        ca.issue("unlisted.test"),
    )

    def client(issued: Issued | None = None, token: str | None = None) -> QueueClient:
        if issued is None:
            return QueueClient(address, credentials=tls_credentials(ca=ca.path), token=token, timeout=3)
        credentials = tls_credentials(ca=ca.path, cert=issued.cert, key=issued.key)
        return QueueClient(address, credentials=credentials, token=token)

    with client(billing) as producer:
        job_id = producer.enqueue("diag.noop", {"secret": 1}, delay=3600)
        stats_fails_with(producer, PermissionDenied)
    with client(grafana) as viewer:
        viewer.get_stats()
        assert not viewer.get_job(job_id).HasField("payload")
    # A certificate the CA signed but the auth file does not list: no identity.
    with client(nobody) as unlisted:
        stats_fails_with(unlisted, Unauthenticated)
    # A bearer token on top of a certificate selects the token's identity.
    with client(billing, token=tokens["oncall"]) as operator:
        operator.get_stats()
    # No client certificate at all: the handshake fails.
    with client() as anonymous:
        stats_fails_with(anonymous, Unavailable)


def test_certificates_replaced_on_disk_are_served_to_new_connections(
    settings: Settings, ca: CertificateAuthority, server_factory: Callable[[Settings], str]
) -> None:
    secured = tls_settings(settings, ca)
    address = server_factory(secured)
    with QueueClient(address, credentials=tls_credentials(ca=ca.path)) as before:
        before.get_stats()
    renewed_ca = CertificateAuthority(ca.folder / "renewed", "renewed CA")
    renewed = renewed_ca.issue("queue.test", server=True)
    # Written as a renewal tool does: the new files moved into place.
    for source, target in ((renewed.cert, secured.tls_cert), (renewed.key, secured.tls_key)):
        os.replace(source, target)
    with QueueClient(address, credentials=tls_credentials(ca=renewed_ca.path)) as after:
        after.get_stats()
    with QueueClient(address, credentials=tls_credentials(ca=ca.path), timeout=3) as stale:
        stats_fails_with(stale, Unavailable)
