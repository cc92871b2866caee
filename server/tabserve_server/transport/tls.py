"""TLS credentials of the gRPC listeners, re-read from their files when the files change (no restart).

Contract: `server_credentials()` builds grpcio's dynamic server credentials. gRPC calls the fetcher before the
handshake of every new connection; the fetcher compares the files' stat signatures (device, inode, size,
mtime) with those of the configuration in use and re-reads them only when one changed, as when cert-manager
swaps a mounted Secret's files. Connections already open, and the calls on them, keep the certificate they
were set up with. A set of files that does not load (half written, a key that does not match its
certificate) is not taken: the server keeps the last good configuration, logs why, and tries again on the
next connection after the files change again.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

_Signature = tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a TLS listener; `client_ca_file` set: mutual TLS (clients must present a certificate
    issued by one of those CAs)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.cert_file, self.key_file, self.client_ca_file) if self.client_ca_file else (
            self.cert_file, self.key_file)

    def signature(self) -> _Signature:
        """What changes when any of the files is replaced or rewritten (stat follows symlinks, as a mounted
        Secret's `..data` link swap needs)."""
        stats = [os.stat(path) for path in self.paths]
        return tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """Read and check the files (the key must match the certificate); raises OSError or ssl.SSLError."""
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self.cert_file, self.key_file)
        key, chain = Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes()
        roots = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)


class CertificateReloader:
    """The certificate-configuration fetcher of one listener's dynamic credentials (see the module contract)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._signature = files.signature()
        self.initial = files.configuration()
        self._rejected: _Signature | None = None
        self.reloads = 0

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            signature = self.files.signature()
        except OSError as exc:  # a file is being replaced: keep the configuration in use
            log.warning("TLS files not readable, keeping the current certificate: %s", exc)
            return None
        with self._lock:
            if signature in (self._signature, self._rejected):
                return None
            try:
                configuration = self.files.configuration()
                settled = self.files.signature() == signature  # not rewritten while we read
            except (OSError, ssl.SSLError) as exc:
                log.error("new TLS files of %s do not load, keeping the current certificate: %s",
                          self.files.cert_file, exc)
                self._rejected = signature
                return None
            if not settled:
                return None
            self._signature, self._rejected = signature, None
            self.reloads += 1
        log.info("TLS certificate reloaded from %s for new connections", self.files.cert_file)
        return configuration


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Dynamic TLS credentials from `files`, re-read on change; the files must load now (raises otherwise)."""
    reloader = CertificateReloader(files)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, reloader, require_client_authentication=bool(files.client_ca_file)
    )


def bind(server: grpc.Server, address: str, files: TlsFiles | None) -> int:
    """Bind `address` to `server`: TLS with `files`, plaintext without; the port bound (port 0 picks one)."""
    if files is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, server_credentials(files)))
