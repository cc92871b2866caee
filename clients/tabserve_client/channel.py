"""The base of the clients: one gRPC channel (plaintext or TLS, keepalive pings), closed with the client when the client
opened it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc


@dataclass(frozen=True)
class TlsOptions:
    """TLS of a client's channel; files are PEM and read when the channel is opened.

    Attributes:
        ca_file: CA certificates that verify the server's certificate; empty: the system's trusted roots.
        cert_file: the client's own certificate chain, for a server that requires mutual TLS (with ``key_file``).
        key_file: the private key of ``cert_file``.
        server_name: the name checked against the server's certificate instead of the target's host (for a
            target given by IP address, or a certificate issued for the service's DNS name).
    """

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("TlsOptions: cert_file and key_file go together (both or neither)")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file), private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive pings, so that a dead connection (a peer gone without a FIN, a NAT or load balancer that
    dropped the flow) is noticed within `interval_seconds` + `timeout_seconds`, not at the next call's deadline.

    A tabserve server accepts pings every 5 s or slower (its ``keepalive_min_ping_interval_seconds``); a server
    with gRPC's default policy answers pings more frequent than every 5 minutes with GOAWAY ``too_many_pings``.

    Attributes:
        interval_seconds: time between pings on a quiet connection.
        timeout_seconds: how long to wait for a ping's answer before closing the connection.
        without_calls: ping also while no call is in flight (keeps an idle connection known to be alive).
    """

    interval_seconds: float = 10.0
    timeout_seconds: float = 20.0
    without_calls: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.interval_seconds < math.inf and 0 < self.timeout_seconds < math.inf):
            raise ValueError("Keepalive: interval_seconds and timeout_seconds must be positive numbers")

    def channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", max(1, round(self.interval_seconds * 1000))),
            ("grpc.keepalive_timeout_ms", max(1, round(self.timeout_seconds * 1000))),
            ("grpc.keepalive_permit_without_calls", int(self.without_calls)),
            # gRPC's client stops pinging after 2 pings without data by default: keep pinging a quiet connection.
            ("grpc.http2.max_pings_without_data", 0),
        ]


def open_channel(
    target: str, options: Sequence[tuple[str, Any]] = (), tls: TlsOptions | None = None, *,
    keepalive: Keepalive | None = None,
) -> grpc.Channel:
    """A channel to `target`: TLS with `tls`, plaintext without; keepalive pings with `keepalive`."""
    options = [*options, *(keepalive.channel_options() if keepalive else [])]
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, tls.credentials(), options=[*options, *tls.channel_options()])


class ChannelClient:
    """A client over `channel`; use as a context manager (or call ``close()``). A channel passed in by the
    caller (`own` false) stays open: its owner closes it."""

    def __init__(self, channel: grpc.Channel, *, own: bool) -> None:
        self._channel = channel
        self._own_channel = own

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()
