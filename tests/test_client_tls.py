"""The client library's and the CLI's TLS options against a real server requiring mutual TLS.

Certificates come from tests/certs.py. The server's certificate names `localhost` and 127.0.0.1 only, so a
target of 127.0.0.2 needs the server name override; the keepalive option rides along on the same channel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tabserve_client import Keepalive, ScoringClient, ScoringError, TlsOptions
from tabserve_client.cli import main
from tabserve_demo.applicants import FEATURE_NAMES
from tabserve_server.app import ServingApp
from tests.certs import Issued, TestCA
from tests.support import server_settings, wait_for


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"), "client-tls-test-ca")


@pytest.fixture(scope="module")
def caller(ca: TestCA) -> Issued:
    return ca.issue("caller", ("spiffe://tabserve.test/caller",), server=False)


@pytest.fixture(scope="module")
def port(ca: TestCA, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A server on 0.0.0.0 (so 127.0.0.2 reaches it too) requiring a client certificate from `ca`."""
    server = ca.issue("server", ("localhost", "127.0.0.1"), server=True)
    settings = server_settings(
        tracking_uri, tmp_path_factory.mktemp("cache"), address="0.0.0.0:0", tls_cert_file=str(server.cert_file),
        tls_key_file=str(server.key_file), tls_client_ca_file=str(ca.cert_file),
    )
    app = ServingApp(settings, registry=CollectorRegistry())
    app.start()
    try:
        wait_for(app.accepting, timeout=60, what="TLS server serving")
        yield app.public_port
    finally:
        app.stop(1.0)


def test_the_client_scores_over_mutual_tls(ca: TestCA, caller: Issued, port: int) -> None:
    tls = TlsOptions(ca_file=str(ca.cert_file), cert_file=str(caller.cert_file), key_file=str(caller.key_file))
    with ScoringClient(f"localhost:{port}", tls=tls, keepalive=Keepalive(interval_seconds=10)) as client:
        assert len(client.score(np.zeros((2, len(FEATURE_NAMES))))) == 2
    # An address the certificate does not name: only with the server name override.
    elsewhere = f"127.0.0.2:{port}"
    with ScoringClient(elsewhere, tls=TlsOptions(**{**tls.__dict__, "server_name": "localhost"})) as client:
        assert client.health() == "SERVING"
    with ScoringClient(elsewhere, tls=tls, timeout=3) as client, pytest.raises(ScoringError) as refused:
        client.health()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_without_a_client_certificate_or_the_ca_the_handshake_fails(ca: TestCA, port: int) -> None:
    for tls in (TlsOptions(ca_file=str(ca.cert_file)), TlsOptions()):  # no certificate; the system's roots
        with ScoringClient(f"localhost:{port}", tls=tls, timeout=3) as client, pytest.raises(ScoringError) as refused:
            client.health()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE, tls
    with ScoringClient(f"localhost:{port}", timeout=3) as plaintext, pytest.raises(ScoringError) as refused:
        plaintext.health()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_cli_takes_the_same_tls_options(
    ca: TestCA, caller: Issued, port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tls = ["--ca-file", str(ca.cert_file), "--cert-file", str(caller.cert_file), "--key-file", str(caller.key_file)]
    target = ["--target", f"127.0.0.2:{port}", "--timeout", "3"]
    assert main(["health", *target, *tls, "--server-name", "localhost", "--keepalive-seconds", "10"]) == 0
    assert capsys.readouterr().out == "SERVING\n"

    assert main(["health", *target, *tls]) == 1  # the certificate does not name 127.0.0.2
    assert main(["health", *target, "--ca-file", str(ca.cert_file), "--server-name", "localhost"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err

    missing = tmp_path / "missing.pem"
    assert main(["health", *target, "--ca-file", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: cannot read {missing}: No such file or directory\n"
    assert main(["health", *target, "--cert-file", str(caller.cert_file)]) == 2
    assert capsys.readouterr().err == "error: --cert-file and --key-file go together\n"
    assert main(["health", *target, "--keepalive-seconds", "0"]) == 2
    assert capsys.readouterr().err == "error: --keepalive-seconds must be a positive number, got 0.0\n"
