"""Client-side load balancing through a real DNS answer, as with a Kubernetes headless Service.

`localhost` resolves to 127.0.0.1 only here, so the test runs its own DNS server (dnslib, UDP on loopback) that
answers NAME with two A records, 127.0.0.1 and 127.0.0.2. Two servers listen on the same port, one on each
address, and the client's target is `dns://127.0.0.1:DNS_PORT/NAME:PORT` (gRPC's resolver asks that DNS
server). round_robin must spread the calls over both; pick_first keeps them on one (the control).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dnslib import QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer
from prometheus_client import CollectorRegistry

from tabserve_client import ScoringClient
from tabserve_client.cli import main
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants
from tabserve_server.app import ServingApp
from tests.support import server_settings, wait_for

NAME = "scoring.tabserve.test"
ADDRESSES = ("127.0.0.1", "127.0.0.2")
CALLS = 60


class _Replicas(BaseResolver):  # type: ignore[misc]
    """NAME has an A record per replica (no AAAA); every other name does not exist."""

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        question = request.q
        if str(question.qname).rstrip(".").lower() != NAME:
            reply.header.rcode = RCODE.NXDOMAIN
        elif question.qtype == QTYPE.A:
            for address in ADDRESSES:
                reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply


@pytest.fixture(scope="module")
def dns_port() -> Iterator[int]:
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    server = DNSServer(_Replicas(), address="127.0.0.1", port=0, logger=quiet)
    server.start_thread()
    try:
        yield int(server.server.server_address[1])
    finally:
        server.stop()
        server.server.server_close()


def _free_port_on_both() -> int:
    probe = socket.socket()
    probe.bind((ADDRESSES[0], 0))
    port = int(probe.getsockname()[1])
    probe.close()
    return port


@pytest.fixture(scope="module")
def replicas(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[ServingApp]]]:
    """One server on each address, all on the same port."""
    port = _free_port_on_both()
    apps = []
    try:
        for i, address in enumerate(ADDRESSES):
            cache = tmp_path_factory.mktemp(f"replica-{i}")
            app = ServingApp(server_settings(tracking_uri, cache, address=f"{address}:{port}"),
                             registry=CollectorRegistry())
            apps.append(app)
            app.start()
            assert app.public_port == port
        for app in apps:
            wait_for(app.accepting, timeout=60, what="replica serving")
        yield port, apps
    finally:
        for app in apps:
            app.stop(1.0)


def _rows_scored(apps: list[ServingApp]) -> list[float]:
    return [app.metrics.registry.get_sample_value("tabserve_server_rows_scored_total") or 0.0 for app in apps]


def _scored_by_each(apps: list[ServingApp], before: list[float]) -> list[float]:
    return [after - b for after, b in zip(_rows_scored(apps), before, strict=True)]


@pytest.mark.parametrize("policy", ["round_robin", "pick_first"])
def test_calls_spread_over_every_address_of_the_dns_answer_with_round_robin(
    policy: str, dns_port: int, replicas: tuple[int, list[ServingApp]]
) -> None:
    port, apps = replicas
    before = _rows_scored(apps)
    target = f"dns://127.0.0.1:{dns_port}/{NAME}:{port}"
    with ScoringClient(target, load_balancing=policy, timeout=10) as client:
        for _ in range(CALLS):
            client.score(np.zeros((1, len(FEATURE_NAMES))))
    scored = _scored_by_each(apps, before)
    print(policy, scored)
    assert sum(scored) == CALLS
    if policy == "round_robin":
        assert min(scored) >= CALLS / 4, scored  # round_robin alternates: 30 / 30 is expected
    else:
        assert sorted(scored) == [0, CALLS], scored


def test_the_cli_balances_with_round_robin(
    dns_port: int, replicas: tuple[int, list[ServingApp]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port, apps = replicas
    rows = make_applicants(20, seed=3)[0]
    csv_file = tmp_path / "rows.csv"
    lines = [",".join(FEATURE_NAMES), *(",".join("" if np.isnan(v) else repr(float(v)) for v in row) for row in rows)]
    csv_file.write_text("\n".join(lines) + "\n")
    before = _rows_scored(apps)
    code = main(["score", str(csv_file), "--batch-size", "1", "--load-balancing", "round_robin",
                 "--target", f"dns://127.0.0.1:{dns_port}/{NAME}:{port}"])
    err = capsys.readouterr().err
    assert code == 0, err
    scored = _scored_by_each(apps, before)
    assert sum(scored) == 20 and min(scored) >= 5, scored
