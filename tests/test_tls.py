"""TLS on a real in-process server: server-only TLS and rotation without restart; mutual TLS with the caller's
identity and the allow-list; the plaintext health port; the control port off loopback (TLS + token file).

Certificates are made here (tests/certs.py): one CA for the servers and the allowed clients, another CA whose
client certificate must be refused at the handshake.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client import ControlClient, ControlError, ScoringClient, ScoringError, TlsOptions
from tabserve_client.channel import open_channel
from tabserve_demo.applicants import make_applicants
from tabserve_server.app import ServingApp
from tabserve_server.core.dataplane import RequestContext
from tabserve_server.transport.tls import CertificateReloader, TlsFiles
from tests.certs import ALLOWED, OUTSIDER, SERVER_NAMES, Issued, Pki, install, make_pki
from tests.support import scrape, server_settings, wait_for

ROWS = make_applicants(3, seed=11)[0]
TOKEN = "control-s3cret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def started(settings: Any) -> ServingApp:
    app = ServingApp(settings, registry=CollectorRegistry())
    app.start()
    try:
        wait_for(lambda: app.manager.current() is not None and app.accepting(), what="first model load")
    except BaseException:
        app.stop(0)
        raise
    return app


def score(target: str, tls: TlsOptions | None) -> str:
    with ScoringClient(target, channel=open_channel(target, tls=tls), timeout=5) as client:
        return client.score(ROWS).model_version


def refused(call: Callable[[], Any]) -> ScoringError:
    with pytest.raises(ScoringError) as caught:
        call()
    return caught.value


# --- server-only TLS, rotation -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_app(tracking_uri: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingApp]:
    """Server-only TLS from files of its own (the rotation test replaces them)."""
    directory = tmp_path_factory.mktemp("tls-app")
    cert, key = directory / "tls.crt", directory / "tls.key"
    install(pki.server, cert, key)
    app = started(server_settings(tracking_uri, directory / "cache", tls_cert_file=str(cert), tls_key_file=str(key)))
    yield app
    app.stop(0)


def test_server_only_tls_scores_and_refuses_plaintext(tls_app: ServingApp, pki: Pki) -> None:
    target = f"127.0.0.1:{tls_app.public_port}"
    assert score(target, pki.client()) == "1"
    # Without an allow-list no metric carries a caller.
    assert "tabserve_server_caller_requests_total{" not in generate_latest(tls_app.metrics.registry).decode()
    assert refused(lambda: score(target, None)).code == grpc.StatusCode.UNAVAILABLE
    # A server certificate from a CA the client does not trust fails the handshake too.
    assert refused(lambda: score(target, pki.client(ca=pki.other_ca))).code == grpc.StatusCode.UNAVAILABLE


def presented_serial(port: int, ca_file: Path) -> int:
    """The serial number of the certificate the server presents to a new connection (ssl, ALPN h2)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_rotation_new_connections_get_the_new_certificate_open_calls_finish(
    tls_app: ServingApp, pki: Pki, tmp_path: Path
) -> None:
    port, target = tls_app.public_port, f"127.0.0.1:{tls_app.public_port}"
    settings = tls_app.settings
    assert presented_serial(port, pki.ca.cert_file) == pki.server.serial
    renewed = pki.ca.issue("renewed", ("localhost", "127.0.0.1"), server=True)
    big = make_applicants(20_000, seed=5)[0]
    with ScoringClient(target, channel=open_channel(target, tls=pki.client()), timeout=30) as old:
        assert old.score(ROWS).model_version == "1"  # the connection is open before the rotation
        with futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(old.score, big)
            install(renewed, Path(settings.tls_cert_file), Path(settings.tls_key_file))
            serial = wait_for(lambda: presented_serial(port, pki.ca.cert_file) == renewed.serial, timeout=10,
                              what="a new connection sees the renewed certificate")
            assert serial
            assert len(in_flight.result(30).scores) == len(big)  # the call in flight finished
        assert old.score(ROWS).model_version == "1"  # and its connection still serves
    assert score(target, pki.client()) == "1"  # new connections verify against the same CA
    assert tls_app.public_port == port and tls_app.accepting()  # no restart


# --- mutual TLS, identity, allow-list, health port, control off loopback -------------------------------


@pytest.fixture(scope="module")
def mtls_app(tracking_uri: str, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingApp]:
    directory = tmp_path_factory.mktemp("mtls-app")
    token_file = directory / "control-token"
    token_file.write_text(TOKEN + "\n")
    app = started(server_settings(
        tracking_uri, directory / "cache", tls_cert_file=str(pki.server.cert_file),
        tls_key_file=str(pki.server.key_file), tls_client_ca_file=str(pki.ca.cert_file), allowed_callers=ALLOWED,
        health_address="127.0.0.1:0", control_address="0.0.0.0:0", control_token_file=str(token_file),
        metrics_cert_file=str(pki.server.cert_file), metrics_key_file=str(pki.server.key_file),
    ))
    yield app
    app.stop(0)


def test_mtls_refuses_a_client_without_a_certificate_or_from_another_ca(mtls_app: ServingApp, pki: Pki) -> None:
    target = f"127.0.0.1:{mtls_app.public_port}"
    assert refused(lambda: score(target, pki.client())).code == grpc.StatusCode.UNAVAILABLE
    assert refused(lambda: score(target, pki.client(pki.stranger))).code == grpc.StatusCode.UNAVAILABLE


def test_allowed_caller_scores_and_the_data_plane_knows_who_asked(
    mtls_app: ServingApp, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[RequestContext] = []
    original = mtls_app.dataplane.score

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(mtls_app.dataplane, "score", spy)
    assert score(f"127.0.0.1:{mtls_app.public_port}", pki.client(pki.allowed)) == "1"
    assert [s.caller for s in seen] == [ALLOWED] and seen[0].request_id and seen[0].peer.startswith("ipv")
    registry = mtls_app.metrics.registry
    assert registry.get_sample_value("tabserve_server_caller_requests_total", {"caller": ALLOWED}) == 1


def test_caller_outside_the_allow_list_gets_permission_denied_naming_it(mtls_app: ServingApp, pki: Pki) -> None:
    target = f"127.0.0.1:{mtls_app.public_port}"
    error = refused(lambda: score(target, pki.client(pki.outsider)))
    assert error.code == grpc.StatusCode.PERMISSION_DENIED and OUTSIDER in error.details
    registry = mtls_app.metrics.registry
    assert registry.get_sample_value(
        "tabserve_server_requests_total",
        {"method": "tabserve.scoring.v1.Scoring/Score", "code": "PERMISSION_DENIED"}) == 1
    assert registry.get_sample_value("tabserve_server_caller_requests_total", {"caller": OUTSIDER}) is None


def test_health_port_is_plaintext_and_serves_health_only(mtls_app: ServingApp) -> None:
    assert mtls_app.health_port and mtls_app.health_port != mtls_app.public_port
    with grpc.insecure_channel(f"127.0.0.1:{mtls_app.health_port}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            scoring_pb2_grpc.ScoringStub(channel).GetModelInfo(scoring_pb2.GetModelInfoRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(f"127.0.0.1:{mtls_app.public_port}") as channel, pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # the public port wants TLS


def test_control_off_loopback_speaks_tls_and_needs_the_token_from_its_file(mtls_app: ServingApp, pki: Pki) -> None:
    address = f"127.0.0.1:{mtls_app.control_port}"
    with ControlClient(address, token=TOKEN, tls=pki.client(), timeout=5) as control:
        assert control.status().serving.version == "1"
    for token, tls, code in (
        (TOKEN, None, grpc.StatusCode.UNAVAILABLE),  # plaintext: no handshake
        ("", pki.client(), grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", pki.client(), grpc.StatusCode.PERMISSION_DENIED),
    ):
        with ControlClient(address, token=token, tls=tls, timeout=5) as control, pytest.raises(ControlError) as err:
            control.status()
        assert err.value.code == code, (token, tls)


def test_scores_are_the_same_over_mtls(mtls_app: ServingApp, pki: Pki) -> None:
    target = f"127.0.0.1:{mtls_app.public_port}"
    with ScoringClient(target, channel=open_channel(target, tls=pki.client(pki.allowed))) as client:
        model = mtls_app.manager.current()
        assert model is not None
        expected = model.predictor.booster.predict(ROWS)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(client.score(ROWS).scores, expected)


def test_metrics_are_served_over_https_only(mtls_app: ServingApp, pki: Pki) -> None:
    assert scrape(mtls_app.metrics_port, pki.ca.cert_file)["tabserve_server_serving"] == 1
    with pytest.raises(OSError):  # plain HTTP to a TLS endpoint: the connection is dropped
        scrape(mtls_app.metrics_port)


def test_rotation_ignores_files_that_do_not_load_and_keeps_the_last_good_ones(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fetcher alone (no server): a key that does not match its certificate is not taken, nor retried
    until the files change again; the next good pair is."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(pki.server, cert, key)
    reloader = CertificateReloader(TlsFiles(str(cert), str(key)))
    assert reloader() is None  # unchanged files: nothing to do
    mismatched = Issued(pki.ca.issue("next", SERVER_NAMES, server=True).cert_file, pki.outsider.key_file)
    install(mismatched, cert, key)
    assert reloader() is None and reloader() is None
    assert sum("do not load" in r.message for r in caplog.records) == 1  # logged once per set of files
    install(pki.ca.issue("good", SERVER_NAMES, server=True), cert, key)
    assert reloader() is not None and reloader.reloads == 1
    cert.unlink()  # mid-replacement: keep what is in use
    assert reloader() is None
