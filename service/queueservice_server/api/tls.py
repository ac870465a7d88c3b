"""Server TLS from PEM files, re-read when they change: gRPC asks
`CertificateFiles.fetch` before every new connection's handshake, so a renewed
certificate (cert-manager, certbot) is served from the next connection on,
without a restart. Open connections keep the certificate they started with."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import grpc

from queueservice_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

Stamp = tuple[tuple[int, int], ...]


class CertificateFiles:
    def __init__(self, cert: str, key: str, client_ca: str) -> None:
        self.paths = [Path(p) for p in (cert, key, client_ca) if p]
        self.client_ca = bool(client_ca)
        self.stamp = self._stamp()
        self.failing = False

    def _stamp(self) -> Stamp:
        stats = [os.stat(path) for path in self.paths]
        return tuple((stat.st_mtime_ns, stat.st_size) for stat in stats)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        # gRPC would only fail at the next handshake; ssl says now whether the files parse and the key fits.
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        check.load_cert_chain(self.paths[0], self.paths[1])
        if self.client_ca:
            check.load_verify_locations(self.paths[2])
        cert, key, *ca = (path.read_bytes() for path in self.paths)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca[0] if ca else None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when a file changed since the last reading; None keeps the current one."""
        try:
            stamp = self._stamp()
            if stamp == self.stamp:
                return None
            configuration = self.configuration()
        except (OSError, ValueError, ssl.SSLError) as exc:
            # A renewal half-written or a file gone: keep serving the old certificate, say so once.
            if not self.failing:
                log.error("cannot read the TLS files; serving the previous certificate: %s", exc)
                self.failing = True
            return None
        self.stamp, self.failing = stamp, False
        log.info("TLS certificate files changed: serving them to new connections")
        return configuration


def server_credentials(settings: Settings) -> tuple[grpc.ServerCredentials, CertificateFiles] | None:
    """TLS credentials from QUEUE_TLS_* (None: plaintext); with QUEUE_TLS_CLIENT_CA every client needs a certificate."""
    if not settings.tls_cert:
        return None
    try:
        files = CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        initial = files.configuration()
    except ssl.SSLError as exc:
        raise SettingsError(f"QUEUE_TLS_CERT/KEY/CLIENT_CA: not a usable PEM certificate, key or CA: {exc}") from exc
    except OSError as exc:
        raise SettingsError(f"QUEUE_TLS_CERT/KEY/CLIENT_CA: cannot read {exc.filename}: {exc.strerror}") from exc
    credentials = grpc.dynamic_ssl_server_credentials(
        # grpc-stubs say the fetcher returns a configuration; gRPC documents None as "no change".
        initial,
        files.fetch,  # type: ignore[arg-type]
        require_client_authentication=files.client_ca,
    )
    return credentials, files
