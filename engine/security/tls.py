"""Server-side TLS: grpc credentials from the PEM files named in the settings."""
from __future__ import annotations

import grpc

from engine.config import Settings


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials, requiring and verifying client certificates when a client CA is set;
    None for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None)


def transport(settings: Settings) -> str:
    if settings.tls_cert is None:
        return "plaintext"
    return "mutual-tls" if settings.tls_client_ca is not None else "tls"
