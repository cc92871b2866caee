"""Single-row throughput over mutual TLS against plaintext, measured in the same run (issue 11's figure pair).

Two project servers run side by side: one plaintext, one with TLS and a client CA (mutual TLS, certificates
made here with tests/certs.py's test CA). The same generator (raw stubs, 16 caller threads on one channel)
loads them in alternating blocks, so drift on a shared machine hits both alike. A channel makes its TLS
handshake once; the figure is the cost of encrypting and authenticating every call after that (the server
ends connections every max_connection_age_seconds, 300 s, so handshakes stay rare). h2load cannot present a
client certificate, hence a Python generator; it costs about a core itself, so the ratio shows how much of
the whole path TLS adds, at this generator's rate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import RAW_STUB, SectionResult, Target, ratio
from bench.serving import CALLERS, concurrent_calls, score_request
from tabserve.scoring.v1 import scoring_pb2_grpc
from tabserve_client import TlsOptions
from tabserve_client.channel import open_channel
from tabserve_demo.processes import ServerProcess
from tests.certs import TestCA

MTLS = "mutual TLS"
PLAINTEXT = "plaintext"
TARGET = "single-row throughput, mutual TLS vs plaintext"


def run(
    workdir: Path, rows: np.ndarray, *, quick: bool, start_server: Callable[..., ServerProcess],
    wait_serving: Callable[..., None],
) -> dict[str, Any]:
    ca = TestCA(workdir / "pki", "bench-ca")
    server_cert = ca.issue("server", ("localhost", "127.0.0.1"), server=True)
    client_cert = ca.issue("client", ("spiffe://tabserve.bench/caller",), server=False)
    tls = TlsOptions(str(ca.cert_file), str(client_cert.cert_file), str(client_cert.key_file))
    servers: dict[str, ServerProcess] = {}
    try:
        servers[PLAINTEXT] = start_server("plaintext")
        servers[MTLS] = start_server(
            "mtls", tls_cert_file=str(server_cert.cert_file), tls_key_file=str(server_cert.key_file),
            tls_client_ca_file=str(ca.cert_file),
        )
        options = {PLAINTEXT: None, MTLS: tls}
        for name, process in servers.items():
            wait_serving(process.target, tls=options[name])
        return _measure({name: (process.target, options[name]) for name, process in servers.items()}, rows, quick)
    finally:
        for process in servers.values():
            process.stop()


def single_row_pair(
    targets: Mapping[str, tuple[str, TlsOptions | None]], rows: np.ndarray, quick: bool
) -> tuple[dict[str, float], dict[str, int], int]:
    """Single-row throughput of each target (calls/s), its failed calls and the calls made per target: the same
    generator (raw stubs, CALLERS threads on one channel per target) loads them in alternating blocks."""
    singles = [np.ascontiguousarray(rows[i : i + 1]) for i in range(len(rows))]
    channels = {name: open_channel(target, (), tls) for name, (target, tls) in targets.items()}
    try:
        calls = {}
        for name, channel in channels.items():
            stub = scoring_pb2_grpc.ScoringStub(channel)
            # As the serving section's raw stub: the request is built from the numpy row in every call.
            calls[name] = lambda row, stub=stub: stub.Score(score_request(row), timeout=30.0)
            calls[name](singles[0])  # connect (and handshake) before the clock starts
        blocks, per_block = (2, 160) if quick else (6, 1000)
        elapsed = dict.fromkeys(calls, 0.0)
        failed = dict.fromkeys(calls, 0)
        for _ in range(blocks):
            for name, call in calls.items():
                rate, failures = concurrent_calls(call, singles, per_block, CALLERS)
                elapsed[name] += per_block / rate
                failed[name] += failures
    finally:
        for channel in channels.values():
            channel.close()
    made = blocks * max(1, per_block // CALLERS) * CALLERS  # concurrent_calls gives each caller an equal share
    return {name: blocks * per_block / seconds for name, seconds in elapsed.items()}, failed, made


def _measure(targets: dict[str, tuple[str, TlsOptions | None]], rows: np.ndarray, quick: bool) -> dict[str, Any]:
    result = SectionResult()
    rates, failed, samples = single_row_pair(targets, rows, quick)
    for name, rate in rates.items():
        result.add(f"single row, {CALLERS} callers: throughput", name, RAW_STUB, rate, "calls/s", samples=samples)
    result.targets.append(Target(
        TARGET, ratio(rates[MTLS], rates[PLAINTEXT]), 0.85, False,
        f"mutual TLS / plaintext, raw stubs, {CALLERS} callers on one channel each, alternating blocks",
        extra_ok=not any(failed.values()), detail=f"failed calls: {failed}",
    ))
    return result.as_dict()
