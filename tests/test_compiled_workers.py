"""The compiled backend under a supervisor (workers=2, real processes): one compile serves both workers (the shared
compile cache and its lock file, core/compiling.py), and a reload under load onto a version that compiles in
the background answers every call."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_demo.applicants import make_applicants
from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_demo.registration import register_demo_version
from tabserve_server.core.compiling import COMPILING
from tests.support import MODEL_NAME, Server, sample_key, server_settings, wait_for

COMPILE_WAIT = 180.0  # the demo model compiles in seconds; a loaded 2-core machine with two workers is slower
CALLERS = 3
MAX_CALLS = 20_000  # per caller: the loop's bound (it stops as soon as the test has seen enough)
CALLS_PER_CHANNEL = 10  # a fresh connection every few calls, so calls keep landing on both workers


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = bootstrap_embedded_registry(tmp_path_factory.mktemp("compiled-workers-registry"), model_name=MODEL_NAME,
                                      threshold=0.48)
    assert register_demo_version(uri, MODEL_NAME, seed=2, alias=None) == "2"
    return uri


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compiled-workers") / "cache"


def _compiled_everywhere(server: Server, version: str) -> Any:
    """The status once every worker serves `version` on the compiled backend; fails fast when one gave up."""
    status = server.status()
    served = [w.status.serving for w in status.workers if w.up]
    given_up = [s.backend_note for s in served if s.backend_note and not s.backend_note.startswith(COMPILING)]
    assert not given_up, given_up
    ok = len(served) == 2 and all(s.version == version and s.backend == "compiled" for s in served)
    return status if ok else None


@pytest.fixture(scope="module")
def server(registry_uri: str, cache: Path) -> Iterator[Server]:
    # What is tested is the reload, not admission: a call queued behind a compile on a loaded 2-core machine may
    # wait past the default max_queue_seconds (0.25 s) and be refused for load; this server lets it wait.
    running = Server(server_settings(registry_uri, cache, workers=2, backend="compiled", max_queue_seconds=30.0))
    try:
        running.settle_on("1", timeout=120)
        wait_for(lambda: _compiled_everywhere(running, "1"), timeout=COMPILE_WAIT, interval=0.2,
                 what="both workers on the compiled backend")
        yield running
    finally:
        assert running.close() == 0


def _compiles(server: Server, outcome: str) -> float | None:
    return server.metrics().get(sample_key("tabserve_server_compiles_total", outcome=outcome))


def test_one_compile_serves_both_workers(server: Server, cache: Path) -> None:
    # The supervisor's /metrics sums the workers': one compiled, the other waited and read the entry.
    assert (_compiles(server, "compiled"), _compiles(server, "cache_hit")) == (1, 1)
    entries = [p.name for p in (cache / "compiled").iterdir() if p.is_dir()]
    assert len(entries) == 1, entries  # in the shared compile cache, not one per worker's cache directory


class Callers:
    """CALLERS threads scoring single rows through raw stubs (the client library would retry an UNAVAILABLE call
    and hide it) until stopped, each opening a new channel every CALLS_PER_CHANNEL calls."""

    def __init__(self, target: str) -> None:
        rows = make_applicants(20, seed=5)[0]
        self._requests = [scoring_pb2.ScoreRequest(matrix=scoring_pb2.MatrixRows(
            float64_le=row.astype("<f8").tobytes(), num_rows=1)) for row in rows]
        self._target = target
        self._stop = threading.Event()
        self.versions: list[str] = []
        self.failed: list[str] = []
        self._threads = [threading.Thread(target=self._score, daemon=True) for _ in range(CALLERS)]

    def __enter__(self) -> Callers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _score(self) -> None:
        for start in range(0, MAX_CALLS, CALLS_PER_CHANNEL):
            with grpc.insecure_channel(self._target) as channel:
                stub = scoring_pb2_grpc.ScoringStub(channel)
                for i in range(start, start + CALLS_PER_CHANNEL):
                    if self._stop.is_set():
                        return
                    try:
                        self.versions.append(stub.Score(self._requests[i % len(self._requests)], timeout=30)
                                             .model_version)
                    except grpc.RpcError as exc:  # any failed call fails the test, with its status
                        self.failed.append(f"{exc.code()}: {exc.details()}")


def test_a_reload_under_load_onto_a_version_that_compiles_fails_no_call(server: Server) -> None:
    with Callers(server.target) as callers:
        wait_for(lambda: len(callers.versions) >= 20, timeout=60, what="first answers")
        assert not server.state("2").already_serving
        wait_for(lambda: server.settled_on("2"), timeout=120, interval=0.2, what="both workers on version 2")
        wait_for(lambda: _compiled_everywhere(server, "2"), timeout=COMPILE_WAIT, interval=0.2,
                 what="version 2 on the compiled backend in both workers")
        answered = len(callers.versions)
        wait_for(lambda: len(callers.versions) >= answered + 20, timeout=60, what="answers after the swap")
    assert callers.failed == [], callers.failed[:5]
    assert set(callers.versions) == {"1", "2"}
    assert callers.versions[-1] == "2"
    assert (_compiles(server, "compiled"), _compiles(server, "cache_hit")) == (2, 2)
