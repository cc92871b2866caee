"""How each listener of a server (single process or supervisor) is secured, from its settings, in one place.

- public port: TLS with `tls_cert_file`/`tls_key_file` (mutual TLS with `tls_client_ca_file`), else plaintext;
- control port: plaintext on loopback; any other address speaks TLS with the public port's certificate (server
  authentication only: the caller proves itself with the bearer token, which ServerSettings then requires);
- health port: always plaintext, grpc.health.v1 only;
- /metrics: HTTPS with `metrics_cert_file`/`metrics_key_file`, else plain HTTP.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from tabserve_common.address import is_loopback, split_address
from tabserve_server.settings import ServerSettings
from tabserve_server.transport.tls import TlsFiles


def public_tls(settings: ServerSettings) -> TlsFiles | None:
    if not settings.tls:
        return None
    return TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)


def control_tls(settings: ServerSettings) -> TlsFiles | None:
    if is_loopback(split_address(settings.control_address)[0]):
        return None
    return TlsFiles(settings.tls_cert_file, settings.tls_key_file)


def start_metrics_server(settings: ServerSettings, registry: CollectorRegistry) -> Any:
    """The /metrics HTTP(S) server, started; `.server_port` is its port, `.shutdown()` stops it."""
    host, port = split_address(settings.metrics_address)
    server, _ = start_http_server(
        port, addr=host, registry=registry,
        certfile=settings.metrics_cert_file or None, keyfile=settings.metrics_key_file or None,
    )
    return server
