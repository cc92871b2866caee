"""The public port's HTTP/2 stream limit (transport/admission.stream_options): one connection cannot queue calls in
gRPC core beyond what admission control sees, and a client that keeps to the limit is never reset."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench.h2load import ensure_h2load, write_body
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tests.support import SCORE_METHOD, Server, server_settings, settled_server

FEATURES = 189
WORKERS = 2  # the stream limit defaults to max_workers
CALLS = 400


@pytest.fixture(scope="module")
def server(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    settings = server_settings(tracking_uri, tmp_path_factory.mktemp("streams") / "cache", max_workers=WORKERS,
                               max_waiting=WORKERS)
    with settled_server(settings) as running:
        yield running


def _refused(server: Server) -> float:
    return sum(server.metric("tabserve_server_requests_refused_total", reason=r) or 0.0
               for r in ("queue_full", "queue_time", "deadline", "caller_share"))


def _answered(server: Server) -> float:
    return sum(server.metric("tabserve_server_requests_total", method=SCORE_METHOD, code=code) or 0.0
               for code in ("OK", "UNAVAILABLE"))


def test_one_connection_cannot_overflow_admission(server: Server) -> None:
    """400 concurrent calls on one channel: the client holds all but max_workers of them, so none waits for a
    thread long and none is refused (without the limit, most of them queue in the server and max_waiting refuses)."""
    request = scoring_pb2.ScoreRequest()
    request.matrix.float64_le = np.full((1, FEATURES), np.nan).tobytes()
    request.matrix.num_rows = 1
    before = _refused(server)
    with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        pending = [stub.Score.future(request, timeout=60) for _ in range(CALLS)]
        codes = [future.exception(timeout=70) for future in pending]
    assert [c for c in codes if c is not None] == []
    assert _refused(server) == before


def test_a_client_keeping_to_the_limit_is_never_reset(server: Server, tmp_path: Path) -> None:
    """h2load, told the limit, opens a new stream as soon as one closes: every one is answered by the server
    (with gRPC core's default overload protection, streams not yet freed count and such streams are reset)."""
    rows = np.full((1, FEATURES), np.nan)
    body = write_body(tmp_path / "score.grpc", rows)
    port = server.target.rsplit(":", 1)[1]
    before = _answered(server)
    done = subprocess.run(
        [ensure_h2load(), "-n", "3000", "-c", "2", "-m", str(WORKERS), "-t", "1", "-d", str(body),
         "-H", "content-type: application/grpc", "-H", "te: trailers", f"http://127.0.0.1:{port}/{SCORE_METHOD}"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "3000 succeeded, 0 failed, 0 errored" in done.stdout, done.stdout[-1500:]
    assert _answered(server) - before == 3000
