"""Test certificates made with `cryptography`: CAs, server certificates for localhost / 127.0.0.1, and client
certificates whose subject alternative name is the caller's identity (EC P-256 keys: fast to make); `make_pki`
makes the set the TLS tests share."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tabserve_client import TlsOptions

SERVER_NAMES = ("localhost", "127.0.0.1")
ALLOWED = "spiffe://tabserve.test/scorer"
OUTSIDER = "outsider.tabserve.test"


@dataclass(frozen=True)
class Issued:
    """A certificate and its key as PEM files."""

    cert_file: Path
    key_file: Path

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.cert_file.read_bytes()).serial_number


class TestCA:
    """A certificate authority writing what it issues under `directory`."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            _builder(subject, subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_file = directory / f"{name}.crt"
        self.cert_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, file_name: str, names: tuple[str, ...], *, server: bool, client: bool = False) -> Issued:
        """A certificate for `names` (DNS names, IP addresses or URIs, as SANs), for a server or a client, or
        both with `server` and `client` (a pod whose sidecar presents the pod's certificate as a client)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client or not server else []
        cert = (
            _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]), self.cert.subject,
                     key.public_key())
            .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        issued = Issued(self.directory / f"{file_name}.crt", self.directory / f"{file_name}.key")
        issued.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return issued


def install(issued: Issued, cert_file: Path, key_file: Path) -> None:
    """Replace `cert_file` and `key_file` with `issued`'s, each by an atomic rename (as a Secret update does)."""
    for source, target in ((issued.key_file, key_file), (issued.cert_file, cert_file)):
        temporary = target.with_suffix(".new")
        temporary.write_bytes(source.read_bytes())
        os.replace(temporary, target)


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
    )


def _general_name(name: str) -> x509.GeneralName:
    if "://" in name:
        return x509.UniformResourceIdentifier(name)
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class Pki:
    """The test's certificates: `ca` issued the server's and the clients' (`allowed`, whose SAN is ALLOWED, and
    `outsider`, OUTSIDER); `other_ca` issued `stranger` (SAN ALLOWED too), which must be refused at the handshake."""

    ca: TestCA
    other_ca: TestCA
    server: Issued
    allowed: Issued
    outsider: Issued
    stranger: Issued

    def client(self, issued: Issued | None = None, ca: TestCA | None = None) -> TlsOptions:
        """TLS options of a client trusting `ca` (default: the main CA), presenting `issued` when given."""
        ca_file = str((ca or self.ca).cert_file)
        if issued is None:
            return TlsOptions(ca_file=ca_file, server_name="localhost")
        return TlsOptions(ca_file, str(issued.cert_file), str(issued.key_file), "localhost")


def make_pki(directory: Path) -> Pki:
    ca, other = TestCA(directory / "ca", "tabserve-test-ca"), TestCA(directory / "other", "other-ca")
    return Pki(
        ca, other,
        server=ca.issue("server", SERVER_NAMES, server=True),
        allowed=ca.issue("allowed", (ALLOWED,), server=False),
        outsider=ca.issue("outsider", (OUTSIDER,), server=False),
        stranger=other.issue("stranger", (ALLOWED,), server=False),
    )
