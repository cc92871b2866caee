"""The whole stack over TLS: a 2-worker server (mutual TLS on the shared public port, allow-list, plaintext health
port shared by the workers, control port off loopback with TLS and a token file) and the real monitor process,
which speaks mutual TLS to the public port and TLS + token to the control port, following a promotion."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow import MlflowClient

from tabserve_client import ScoringClient
from tabserve_client.channel import open_channel
from tabserve_demo.applicants import make_applicants
from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_demo.processes import MonitorProcess
from tabserve_demo.registration import register_demo_version
from tests.certs import ALLOWED, Pki, make_pki
from tests.support import MODEL_NAME, Server, sample_key, scrape, server_settings, wait_for

TOKEN = "monitor-s3cret"
ROWS = make_applicants(2, seed=21)[0]


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A registry of this module's own (the test moves its alias): version 1 on `production`, and version 2."""
    uri = bootstrap_embedded_registry(tmp_path_factory.mktemp("tls-registry"), model_name=MODEL_NAME)
    assert register_demo_version(uri, MODEL_NAME, seed=2, alias=None) == "2"
    return uri


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "control-token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def server(registry_uri: str, pki: Pki, token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = server_settings(
        registry_uri, tmp_path_factory.mktemp("tls-cache"), workers=2, tls_cert_file=str(pki.server.cert_file),
        tls_key_file=str(pki.server.key_file), tls_client_ca_file=str(pki.ca.cert_file), allowed_callers=ALLOWED,
        health_address="127.0.0.1:0", control_address="0.0.0.0:0", control_token_file=str(token_file),
    )
    server = Server(settings, control_tls=pki.client(), control_token=TOKEN)
    try:
        wait_for(lambda: server.settled_on("1"), timeout=120, interval=0.2, what="both workers serve version 1")
        yield server
    finally:
        server.close()


def scored_version(server: Server, pki: Pki) -> str:
    with ScoringClient(server.target, channel=open_channel(server.target, tls=pki.client(pki.allowed))) as client:
        return client.score(ROWS).model_version


def test_workers_share_the_tls_public_port_and_the_plaintext_health_port(server: Server, pki: Pki) -> None:
    assert {scored_version(server, pki) for _ in range(6)} == {"1"}  # new connections, spread over both workers
    with grpc.insecure_channel(f"127.0.0.1:{server.process.health_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_monitor_over_tls_follows_a_promotion(
    server: Server, pki: Pki, token_file: Path, registry_uri: str, tmp_path: Path
) -> None:
    monitor = MonitorProcess(
        {"tracking_uri": registry_uri, "model_name": MODEL_NAME, "poll_interval_seconds": 0.5,
         "public_address": server.target, "tls": True, "tls_ca_file": pki.ca.cert_file,
         "tls_cert_file": pki.allowed.cert_file, "tls_key_file": pki.allowed.key_file, "tls_server_name": "localhost",
         "control_address": server.control_address, "control_tls": True, "control_token_file": token_file,
         "metrics_address": "127.0.0.1:0", "metrics_cert_file": pki.server.cert_file,
         "metrics_key_file": pki.server.key_file, "rpc_timeout_seconds": 5.0},
        log_file=tmp_path / "monitor.log",
    )
    try:
        def monitor_sees(version: str) -> Any:
            found = scrape(monitor.metrics_port, pki.ca.cert_file)  # its /metrics is HTTPS too
            ok = (found.get("tabserve_monitor_served_version") == float(version)
                  and found.get("tabserve_monitor_control_up") == 1 and found.get("tabserve_monitor_server_up") == 1
                  and found.get("tabserve_monitor_canary_up") == 1)
            return found if ok else None

        wait_for(lambda: monitor_sees("1"), timeout=60, interval=0.2, what="monitor reaches the server over TLS")
        MlflowClient(registry_uri, registry_uri).set_registered_model_alias(MODEL_NAME, "production", "2")
        wait_for(lambda: server.settled_on("2"), timeout=120, interval=0.2, what="every worker on version 2")
        found = wait_for(lambda: monitor_sees("2"), timeout=30, interval=0.2, what="monitor sees version 2")
        assert found[sample_key("tabserve_monitor_reloads_total", result="success")] >= 1
        assert scored_version(server, pki) == "2"
        assert monitor.stop(30) == 0
    finally:
        monitor.close()
