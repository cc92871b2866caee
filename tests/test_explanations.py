"""Reasons served with the score, against real servers and a real registry (docs/explanations.md).

A two-worker server process serves the demo model, whose reason table excludes `age`: exactness on 2,000 rows
(each served contribution is LightGBM's exact TreeSHAP value, contributions plus expected value give the raw
margin, the reasons are the strongest adverse-pushing eligible features in the documented order), adverse
rows only by default, top_k bounds, the cost limit, identical reasons from both workers. An in-process server
loads local copies of the model: without a table (served, no codes) and with a table naming an unknown
feature (refused at load, the good version keeps serving).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import lightgbm
import numpy as np
import pytest

from tabserve_client import ControlClient, ScoreBatch, ScoringClient, ScoringError, aspired_version
from tabserve_client.cli import main
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants, write_example_applicants
from tabserve_demo.processes import ServerProcess
from tabserve_server.app import ServingApp
from tabserve_server.core.reasons import REASON_TABLE_PATH
from tests.support import (
    MODEL_NAME,
    SCORE_METHOD,
    Server,
    running_app,
    sample_key,
    scrape,
    server_settings,
    wait_for,
)

AGE = FEATURE_NAMES.index("age")


@pytest.fixture(scope="module")
def model_dir(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The registered version 1's model directory, as the server downloads it."""
    import mlflow
    from mlflow import MlflowClient

    target = tmp_path_factory.mktemp("explain-model")
    # The registry is named explicitly: a models:/ URI alone resolves in MLflow's process-wide registry URI,
    # which other test modules set to registries of their own.
    source = MlflowClient(tracking_uri, tracking_uri).get_model_version_download_uri(MODEL_NAME, "1")
    path = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=tracking_uri)
    return Path(path)


@pytest.fixture(scope="module")
def booster(model_dir: Path) -> lightgbm.Booster:
    return lightgbm.Booster(model_file=str(model_dir / "model.lgb"))


@pytest.fixture(scope="module")
def server(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(server_settings(tracking_uri, tmp_path_factory.mktemp("explain-cache"), workers=2))
    try:
        wait_for(lambda: server.settled_on("1"), timeout=120, interval=0.2, what="both workers serve version 1")
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[ScoringClient]:
    with ScoringClient(server.target, timeout=60) as scoring:
        yield scoring


def check_exact(batch: ScoreBatch, matrix: np.ndarray, booster: lightgbm.Booster, top_k: int) -> None:
    """Every explained row of `batch` against LightGBM's own TreeSHAP in this process."""
    contributions = booster.predict(matrix, pred_contrib=True)
    margins = booster.predict(matrix, raw_score=True)
    assert batch.expected_value == contributions[0, -1]
    np.testing.assert_allclose(contributions.sum(axis=1), margins, rtol=0, atol=1e-9)
    for row, reasons in batch.reasons.items():
        features = [FEATURE_NAMES.index(r.feature) for r in reasons]
        push = contributions[row, :-1]
        assert AGE not in features
        assert [r.contribution for r in reasons] == [push[i] for i in features]  # bit for bit
        np.testing.assert_array_equal([r.value for r in reasons], matrix[row, features])  # NaN: missing
        assert all(p > 0 for p in push[features]), "a reason must push toward the adverse decision (decline)"
        # Strongest first; equal contributions in feature order.
        assert [(-push[i], i) for i in features] == sorted((-push[i], i) for i in features)
        eligible = [i for i in range(len(FEATURE_NAMES)) if push[i] > 0 and i != AGE]
        rest = set(eligible) - set(features)
        if len(features) < top_k:
            assert not rest, "fewer reasons than top_k although eligible features remain"
        else:
            assert all(push[i] <= push[features[-1]] for i in rest)
        assert all(r.code.startswith("R") and r.text for r in reasons)


def test_exact_reasons_on_2000_rows(client: ScoringClient, booster: lightgbm.Booster) -> None:
    matrix = make_applicants(2000, seed=11)[0]
    for start in (0, 1000):
        part = matrix[start:start + 1000]
        batch = client.score(part, explain=True, explain_all_rows=True)
        assert sorted(batch.reasons) == list(range(1000))
        check_exact(batch, part, booster, top_k=4)
    # Rows where age pushes hardest toward decline exist, so excluding it is exercised.
    contributions = booster.predict(matrix, pred_contrib=True)[:, :-1]
    assert (contributions.argmax(axis=1) == AGE).sum() > 0


def test_only_adverse_rows_by_default(client: ScoringClient, booster: lightgbm.Booster) -> None:
    matrix = make_applicants(400, seed=12)[0]
    batch = client.score(matrix, explain=True, top_k=2)
    assert sorted(batch.reasons) == [int(i) for i in np.flatnonzero(batch.decisions)]
    assert batch.reasons, "the sample holds declined applicants"
    check_exact(batch, matrix, booster, top_k=2)
    plain = client.score(matrix)
    assert plain.reasons == {} and plain.expected_value is None


def test_model_info_says_table_and_adverse_label(client: ScoringClient) -> None:
    info = client.model_info()
    assert info.has_reason_table and info.adverse_label == "decline"


@pytest.mark.parametrize(("top_k", "most"), [(1, 1), (0, 4), (20, 20)])
def test_top_k(client: ScoringClient, top_k: int, most: int) -> None:
    matrix = make_applicants(50, seed=13)[0]
    batch = client.score(matrix, explain=True, top_k=top_k, explain_all_rows=True)
    assert max(len(r) for r in batch.reasons.values()) == most


def test_top_k_above_20_is_invalid(client: ScoringClient) -> None:
    with pytest.raises(ScoringError) as caught:
        client.score(make_applicants(1, seed=13)[0], explain=True, top_k=21)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "top_k is 21" in caught.value.details


def test_explained_rows_weigh_against_max_rows(client: ScoringClient) -> None:
    matrix = make_applicants(1409, seed=14)[0]  # 1409 * 71 > 100,000 = max_rows
    with pytest.raises(ScoringError) as caught:
        client.score(matrix, explain=True, explain_all_rows=True)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "weigh 100039 rows" in caught.value.details
    declined = client.score(matrix)
    adverse = matrix[np.flatnonzero(declined.decisions)[:1]].repeat(1409, axis=0)  # every row adverse
    with pytest.raises(ScoringError) as caught:
        client.score(adverse, explain=True)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(client.score(matrix, explain=True).reasons) == declined.decisions.sum()  # adverse only: fits


def test_both_workers_give_identical_reasons(server: Server) -> None:
    matrix = make_applicants(300, seed=15)[0]
    answers = []
    for _ in range(20):  # fresh connections (not the module client's shared one): the kernel spreads them
        with grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            batch = ScoringClient(channel=channel, timeout=60).score(matrix, explain=True)
            answers.append((batch.expected_value, dict(batch.reasons)))
    assert all(answer == answers[0] for answer in answers) and answers[0][1]
    calls = [scrape(w.metrics_port).get(sample_key("tabserve_server_requests_total", code="OK",
                                                   method=SCORE_METHOD), 0.0) for w in server.status().workers]
    assert len(calls) == 2 and all(c > 0 for c in calls), calls


def test_cli_score_explain_writes_reason_columns(
    server: Server, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_example_applicants(tmp_path / "applicants.csv", n_rows=100)
    argv = ["score", str(tmp_path / "applicants.csv"), "--target", server.target, "--explain", "--top-k", "2"]
    assert main(argv) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    declined = [r for r in rows if r["label"] == "decline"]
    assert declined and all(r["reason_1_code"].startswith("R") and r["reason_1_text"] for r in declined)
    assert all(r["reason_1_feature"] not in ("", "age") and float(r["reason_1_contribution"]) > 0 for r in declined)
    assert all(r["reason_1_code"] == r["expected_value"] == "" for r in rows if r["label"] == "approve")
    assert "reason_2_value" in rows[0] and "reason_3_code" not in rows[0]


def test_identical_reasons_after_a_restart_from_the_cache(tracking_uri: str, tmp_path: Path) -> None:
    """A restarted server process with the registry down serves the cached copy: same table, same adverse
    label, same reasons."""
    matrix = make_applicants(300, seed=17)[0]
    cache = tmp_path / "cache"
    answers = []
    for uri in (tracking_uri, "http://127.0.0.1:9"):  # the second: a registry that does not exist
        with ServerProcess(server_settings(uri, cache, registry_timeout_seconds=1.0)) as process:
            with ScoringClient(process.target, timeout=60) as scoring:
                wait_for(lambda scoring=scoring: scoring.health() == "SERVING", timeout=60, what="SERVING")
                info = scoring.model_info()
                batch = scoring.score(matrix, explain=True)
                answers.append((info.loaded_from, info.has_reason_table, info.adverse_label, batch.expected_value,
                                dict(batch.reasons)))
            assert process.terminate() == 0
    assert [a[0] for a in answers] == ["registry", "cache"]
    assert answers[0][1:] == answers[1][1:] and answers[0][1] and answers[0][4]


# --- versions without a table and with a bad one: local copies of the model, in-process server ----------------


@pytest.fixture(scope="module")
def app(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingApp]:
    with running_app(server_settings(tracking_uri, tmp_path_factory.mktemp("explain-app-cache"))) as serving:
        yield serving


def copy_model(model_dir: Path, target: Path, table: dict[str, Any] | None) -> Path:
    shutil.copytree(model_dir, target)
    if table is None:
        (target / REASON_TABLE_PATH).unlink()
    else:
        (target / REASON_TABLE_PATH).write_text(json.dumps(table))
    return target


def serve_local(app: ServingApp, path: Path, version: str) -> Any:
    with ControlClient(f"127.0.0.1:{app.control_port}", timeout=30) as control:
        control.set_aspired(aspired_version(str(path), name=MODEL_NAME, version=version))
        return wait_for(lambda: (s := control.status()).serving.version == version or
                        (s.last_error and s.aspired.version == version and s), timeout=60, what=f"{version} loads")


def test_version_without_table_serves_reasons_without_codes(app: ServingApp, model_dir: Path, tmp_path: Path
                                                            ) -> None:
    serve_local(app, copy_model(model_dir, tmp_path / "model", None), "no-table")
    with ScoringClient(f"127.0.0.1:{app.public_port}") as client:
        assert not client.model_info().has_reason_table
        matrix = make_applicants(400, seed=16)[0]
        batch = client.score(matrix, explain=True, explain_all_rows=True)
    reasons = [r for rs in batch.reasons.values() for r in rs]
    assert reasons and all(r.code == "" and r.text == "" for r in reasons)
    assert "age" in {r.feature for r in reasons}  # no table: nothing is excluded


def test_table_naming_an_unknown_feature_is_refused(app: ServingApp, model_dir: Path, tmp_path: Path) -> None:
    before = app.manager.current()
    assert before is not None
    table = {"format": "tabserve.reasons/v1", "reasons": {"salary": {"code": "X1", "text": "Salary"}}}
    status = serve_local(app, copy_model(model_dir, tmp_path / "model", table), "bad-table")
    assert status.serving.version == before.version
    assert "features the model does not have: ['salary']" in status.last_error
    assert app.manager.current() is before
