"""The compiled backend (core/compiled.py, core/compiling.py) on the demo model: compiled in the verifier process,
checked against Booster.predict, swapped in, cached; every way it fails leaves the booster serving and says why."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client import ControlClient, ControlError, ScoringClient
from tabserve_demo.applicants import FEATURE_NAMES
from tabserve_demo.training import train_booster
from tabserve_server.core.compiled import (
    ABSOLUTE_BOUND,
    OBJECT,
    VERIFIED,
    CompiledPredictor,
    CompileFailed,
    checked_predictor,
    compare,
    compile_checked,
)
from tabserve_server.core.compiling import COMPILING
from tabserve_server.core.model import LightGBMPredictor
from tabserve_server.decisions.record import decision_records
from tabserve_server.settings import ServerSettings
from tests.support import run_admin, running_app, sample_key, scrape, server_settings, wait_for

MAX_CALLS = 20_000  # the scoring loop's bound (it stops as soon as the compiled backend answered 20 calls)
COMPILE_WAIT = 120.0  # the demo model (60 trees) compiles in seconds; a loaded 2-core machine is slower


@pytest.fixture(scope="module")
def booster() -> Any:
    return train_booster(seed=3, n_rows=4_000)


def _rows(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(0.0, 2.0, size=(count, len(FEATURE_NAMES)))
    rows[rng.random(rows.shape) < 0.05] = np.nan
    return rows


def test_compiled_scores_match_the_booster_within_the_bound_on_10000_rows(booster: Any, tmp_path: Path) -> None:
    lightgbm = LightGBMPredictor(booster, batch_threads=1)
    facts = compile_checked(lightgbm, booster.model_to_string().encode(), tmp_path / "entry", threshold=0.48)
    assert facts["max_abs_diff"] <= ABSOLUTE_BOUND
    code = (tmp_path / "entry" / OBJECT).read_bytes()
    assert hashlib.sha256(code).hexdigest() == json.loads((tmp_path / "entry" / VERIFIED).read_text())["object_sha256"]
    predictor, _ = checked_predictor(lightgbm, code, facts["compiler"], 0.48, rows=64, threads=2)
    rows = _rows(10_000, seed=11)
    expected = lightgbm.predict_batch(rows)
    got = predictor.predict(rows)  # threaded: 10,000 rows are split over the pool
    assert np.max(np.abs(got - expected)) <= ABSOLUTE_BOUND
    assert np.array_equal(got >= 0.48, expected >= 0.48)
    single = np.array([predictor.predict(rows[i:i + 1])[0] for i in range(200)])
    assert np.array_equal(single, got[:200])


def test_a_wrong_predictor_is_refused(booster: Any, tmp_path: Path) -> None:
    other = train_booster(seed=4, n_rows=4_000)
    lightgbm = LightGBMPredictor(booster, batch_threads=1)
    facts = compile_checked(LightGBMPredictor(other, 1), other.model_to_string().encode(), tmp_path / "other", 0.48)
    with pytest.raises(CompileFailed, match=r"differs from Booster\.predict") as refused:
        code = (tmp_path / "other" / OBJECT).read_bytes()
        checked_predictor(lightgbm, code, facts["compiler"], 0.48, rows=256, threads=1)
    assert refused.value.reason == "unverified"
    expected = np.array([0.4, 0.5, 0.6])
    with pytest.raises(CompileFailed, match="flips 1 decisions"):
        compare(expected, expected + np.array([0.0, -1e-13, 0.0]), threshold=0.5)


def test_the_single_row_path_is_checked_on_its_own(
    booster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lightgbm = LightGBMPredictor(booster, batch_threads=1)
    facts = compile_checked(lightgbm, booster.model_to_string().encode(), tmp_path / "entry", threshold=0.48)
    code = (tmp_path / "entry" / OBJECT).read_bytes()
    one = CompiledPredictor.predict_one
    # Batches right, single rows off by more than the bound: only the one-by-one check can see it.
    monkeypatch.setattr(CompiledPredictor, "predict_one", lambda self, matrix: one(self, matrix) + 1e-9)
    with pytest.raises(CompileFailed, match=r"differs from Booster\.predict") as refused:
        checked_predictor(lightgbm, code, facts["compiler"], 0.48, rows=256, threads=1)
    assert refused.value.reason == "unverified"


def test_single_rows_scored_from_many_threads_at_once_each_get_their_own_score(
    booster: Any, tmp_path: Path
) -> None:
    lightgbm = LightGBMPredictor(booster, batch_threads=1)
    facts = compile_checked(lightgbm, booster.model_to_string().encode(), tmp_path / "entry", threshold=0.48)
    predictor, _ = checked_predictor(lightgbm, (tmp_path / "entry" / OBJECT).read_bytes(), facts["compiler"],
                                     0.48, rows=64, threads=1)
    rows = _rows(2_000, seed=13)
    expected = predictor.predict_batch(rows)
    got = np.full(len(rows), np.nan)

    def score(offset: int) -> None:  # each thread its own rows; the C call releases the GIL between them
        for i in range(offset, len(rows), 4):
            got[i] = predictor.predict(rows[i : i + 1])[0]

    threads = [threading.Thread(target=score, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert np.array_equal(got, expected)


# --- through the server --------------------------------------------------------------------------------------


def _compiled_settings(tracking_uri: str, cache: Path, **overrides: Any) -> ServerSettings:
    return server_settings(tracking_uri, cache, backend="compiled", **overrides)


def _settled_backend(app: Any) -> Any:
    """The served version's status once the compiled backend settled (compiled, or given up with a note)."""
    with ControlClient(f"127.0.0.1:{app.control_port}", timeout=30) as control:
        def settled() -> Any:
            try:
                served = control.status().serving
            except ControlError:  # a control call past its deadline on a loaded machine: asked again
                return None
            note = served.backend_note
            settled = served.backend == "compiled" or (note and not note.startswith(COMPILING))
            return served if settled else None

        return wait_for(settled, timeout=COMPILE_WAIT, interval=0.2, what="the compiled backend to settle")


@dataclass(frozen=True)
class FirstRun:
    """What a first server with backend=compiled and an empty cache showed once it settled."""

    cache: Path
    served: Any
    info: Any
    metrics: dict[str, float]
    records: list[dict[str, Any]]
    decisions: Path
    answered: int  # single-row calls made throughout, from the first load until after the swap
    failed: list[str]


def _score_throughout(target: str, stop: threading.Event, answered: list[int], failed: list[str]) -> None:
    """One caller scoring single rows until `stop` (bounded: MAX_CALLS), counting answers and failures. A raw
    stub: the client library would retry an UNAVAILABLE call and hide it."""
    requests = [scoring_pb2.ScoreRequest(matrix=scoring_pb2.MatrixRows(float64_le=row.astype("<f8").tobytes(),
                                                                       num_rows=1)) for row in _rows(50, seed=7)]
    with grpc.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)
        for i in range(MAX_CALLS):
            if stop.is_set():
                return
            try:
                stub.Score(requests[i % len(requests)], timeout=30)
                answered[0] += 1
            except grpc.RpcError as exc:  # any failed call fails the test, with its status
                failed.append(f"{exc.code()}: {exc.details()}")


@pytest.fixture(scope="module")
def first_run(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    cache = tmp_path_factory.mktemp("compiled") / "cache"
    settings = _compiled_settings(tracking_uri, cache, decision_log_inputs="full")
    answered, failed, stop = [0], list[str](), threading.Event()
    with running_app(settings) as app:
        target = f"127.0.0.1:{app.public_port}"
        caller = threading.Thread(target=_score_throughout, args=(target, stop, answered, failed), daemon=True)
        caller.start()
        served = _settled_backend(app)
        wait_for(lambda: app.manager.current().predictor.backend_family == "compiled" and answered[0] > 0,  # type: ignore[union-attr]
                 what="calls answered")
        before = answered[0]
        wait_for(lambda: answered[0] > before + 20, timeout=60, what="calls answered by the compiled backend")
        stop.set()
        caller.join(60)
        with ScoringClient(target) as client:
            info = client.model_info()
        metrics = scrape(app.metrics_port)
    records = [record for _, record in decision_records(Path(settings.decision_log_dir))]
    return FirstRun(cache, served, info, metrics, records, Path(settings.decision_log_dir), answered[0], failed)


def test_the_server_compiles_verifies_and_swaps_in_the_compiled_backend(first_run: FirstRun) -> None:
    served = first_run.served
    assert (served.backend, served.backend_note) == ("compiled", ""), served
    assert served.backend_version.startswith("lleaves ")
    assert (first_run.info.backend, first_run.info.backend_version) == ("compiled", served.backend_version)
    metrics = first_run.metrics
    assert metrics[sample_key("tabserve_server_backend_info", backend="compiled", version=served.backend_version)] == 1
    assert metrics[sample_key("tabserve_server_compiles_total", outcome="compiled")] == 1
    lleaves_version = served.backend_version.split(",")[0].split()[1]
    assert first_run.records and first_run.records[-1]["backend"] == f"compiled-lleaves-{lleaves_version}"


def test_calls_made_throughout_the_compile_and_swap_all_succeed(first_run: FirstRun) -> None:
    assert first_run.failed == [] and first_run.answered > 20
    backends = [record["backend"] for record in first_run.records]
    assert len(backends) == first_run.answered
    # Served by the booster first, then by the compiled code, never back: the swap happened under the calls.
    switched = backends.index(next(b for b in backends if b.startswith("compiled-")))
    assert switched > 0 and set(backends[:switched]) == {"lightgbm-single-row"}
    assert all(b.startswith("compiled-") for b in backends[switched:])


def test_replay_rescores_compiled_records_on_the_compiled_backend(
    tracking_uri: str, first_run: FirstRun, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_admin(capsys, "decisions", "replay", str(first_run.decisions), "--tracking-uri", tracking_uri,
                               "--cache-dir", str(first_run.cache))
    assert code == 0, out + err
    assert "every score and reason identical" in out and f"({len(first_run.records)} rows)" in out


def test_a_restart_loads_the_compiled_backend_from_the_cache(tracking_uri: str, first_run: FirstRun) -> None:
    with running_app(_compiled_settings(tracking_uri, first_run.cache)) as app:
        assert _settled_backend(app).backend == "compiled"
        metrics = scrape(app.metrics_port)
        assert metrics.get(sample_key("tabserve_server_compiles_total", outcome="cache_hit")) == 1
        assert metrics.get(sample_key("tabserve_server_compiles_total", outcome="compiled")) == 0  # created at start


def test_a_wrong_compiled_predictor_in_the_cache_leaves_the_booster_serving(
    tracking_uri: str, first_run: FirstRun, booster: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(first_run.cache, cache)
    entry = next(path for path in (cache / "compiled").iterdir() if path.is_dir())  # not its lock file
    # Another model's code, with facts that name its bytes: only the serving process's own check can catch it.
    compile_checked(LightGBMPredictor(booster, 1), booster.model_to_string().encode(), tmp_path / "wrong", 0.48)
    shutil.copy(tmp_path / "wrong" / OBJECT, entry / OBJECT)
    facts = json.loads((entry / VERIFIED).read_text())
    facts["object_sha256"] = hashlib.sha256((entry / OBJECT).read_bytes()).hexdigest()
    (entry / VERIFIED).write_text(json.dumps(facts))
    with running_app(_compiled_settings(tracking_uri, cache)) as app:
        served = _settled_backend(app)
        assert served.backend == "lightgbm"
        assert "(unverified, attempt 1 of 3, not retried)" in served.backend_note
        assert "differs from Booster.predict" in served.backend_note
        assert isinstance(app.manager.current().predictor, LightGBMPredictor)  # type: ignore[union-attr]


FAKE_COMPILERS = {
    "failed": "raise RuntimeError('LLVM ERROR: out of registers (a fake compiler)')",
    "timeout": "import time; time.sleep(60)",
}
FAKE_MODEL = """
class Model:
    def __init__(self, model_file):
        pass

    def num_model_per_iteration(self):
        return 1

    def compile(self, cache=None):
        {body}
"""
# A compiler that fails its first compile (the verifier process of the first attempt) and is the real lleaves
# from then on: it replaces itself in sys.modules, with its own directory out of sys.path.
FAILS_ONCE = FAKE_MODEL.format(body="raise RuntimeError('LLVM ERROR: a fake compiler failing once')") + """
import os, sys
_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_marker = os.path.join(_here, "failed-once")
if os.path.exists(_marker):
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    del sys.modules["lleaves"]
    import lleaves
    sys.modules[__name__] = lleaves
else:
    open(_marker, "w").close()
"""


def _fake_lleaves(directory: Path, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (directory / "lleaves").mkdir(parents=True)
    (directory / "lleaves" / "__init__.py").write_text(module)
    monkeypatch.setenv("PYTHONPATH", str(directory))  # the verifier process imports the fake first


@pytest.mark.parametrize(("outcome", "attempts"), [("failed", 3), ("timeout", 1)])
def test_a_compiler_that_fails_or_hangs_leaves_the_booster_serving(
    outcome: str, attempts: int, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_lleaves(tmp_path / "fake", FAKE_MODEL.format(body=FAKE_COMPILERS[outcome]), monkeypatch)
    settings = _compiled_settings(tracking_uri, tmp_path / "cache", compile_timeout_seconds=8.0,
                                  compile_attempts=attempts)
    with running_app(settings) as app:
        served = _settled_backend(app)
        assert served.backend == "lightgbm"
        assert f"compiled backend unavailable ({outcome}, attempt {attempts} of {attempts})" in served.backend_note
        expected = "out of registers" if outcome == "failed" else "ran past compile_timeout_seconds"
        assert expected in served.backend_note
        metrics = scrape(app.metrics_port)
        assert metrics[sample_key("tabserve_server_compiles_total", outcome=outcome)] == attempts
        assert metrics[sample_key("tabserve_server_backend_info", backend="lightgbm",
                                  version=served.backend_version)] == 1


def test_a_failed_compile_is_tried_again_and_then_serves(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_lleaves(tmp_path / "fake", FAILS_ONCE, monkeypatch)
    notes: list[str] = []
    with running_app(_compiled_settings(tracking_uri, tmp_path / "cache", compile_attempts=2,
                                        retry_initial_seconds=3.0, retry_max_seconds=3.0)) as app:
        def compiled() -> bool:
            model = app.manager.current()
            if model is not None and model.backend_note not in notes:
                notes.append(model.backend_note)
            return model is not None and model.predictor.backend_family == "compiled"

        wait_for(compiled, timeout=COMPILE_WAIT, interval=0.05, what="the second attempt to serve compiled code")
        metrics = scrape(app.metrics_port)
    assert metrics[sample_key("tabserve_server_compiles_total", outcome="failed")] == 1
    assert metrics[sample_key("tabserve_server_compiles_total", outcome="compiled")] == 1
    waiting = next(note for note in notes if "attempt 1 of 2 failed" in note)  # seen during the 3 s back-off
    assert waiting.startswith("compiling: ") and "a fake compiler failing once" in waiting
    assert "next attempt in 3 s" in waiting
