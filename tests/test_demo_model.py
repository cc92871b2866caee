"""Tests of the demo credit-scoring model (tabserve_demo) and its registration in a real SQLite MLflow registry."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.lightgbm
import numpy as np
import numpy.typing as npt
import pytest
from mlflow import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from tabserve_demo import new_version
from tabserve_demo.applicants import FEATURE_NAMES, MISSING_VALUE_COLUMNS, make_applicants, write_example_applicants
from tabserve_demo.embedded import bootstrap_embedded_registry, embedded_paths
from tabserve_demo.registration import register_demo_version
from tabserve_demo.training import train_booster


@pytest.fixture(autouse=True)
def _restore_mlflow_uris(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The code under test sets MLflow's global tracking/registry URIs (and their env vars): undo it."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    yield


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite registry for the tests below; each test registers its own model name."""
    return embedded_paths(tmp_path_factory.mktemp("registry")).tracking_uri


def _auc(labels: npt.NDArray[np.int64], scores: npt.NDArray[np.float64]) -> float:
    """ROC AUC from the Mann-Whitney U statistic, with average ranks for ties."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _versions(uri: str, name: str) -> list[str]:
    return sorted(str(mv.version) for mv in MlflowClient(uri, uri).search_model_versions(f"name='{name}'"))


def _params(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    run_id = client.get_model_version(name, version).run_id
    assert run_id is not None
    params: dict[str, str] = client.get_run(run_id).data.params
    return params


def _production(client: MlflowClient, name: str) -> str:
    # The SQLite store returns an int version from get_model_version_by_alias, a str elsewhere.
    return str(client.get_model_version_by_alias(name, "production").version)


def test_feature_names_are_stable_identifiers() -> None:
    assert len(FEATURE_NAMES) == 189
    assert len(set(FEATURE_NAMES)) == 189
    assert all(name.isidentifier() for name in FEATURE_NAMES)
    assert FEATURE_NAMES[:3] == ("age", "annual_income", "employment_years")
    assert {"debt_to_income", "bureau_inquiries_6m", "utilization_m01", "payment_delay_m12"} <= set(FEATURE_NAMES)


def test_make_applicants_shape_missing_values_and_determinism() -> None:
    features, labels = make_applicants(5000, seed=3)
    assert features.shape == (5000, 189)
    assert features.dtype == np.float64
    assert features.flags.c_contiguous
    assert labels.shape == (5000,)
    assert set(np.unique(labels)) <= {0, 1}

    missing = np.isnan(features).mean(axis=0)
    columns_with_missing = {FEATURE_NAMES[j] for j in np.flatnonzero(missing)}
    assert columns_with_missing == set(MISSING_VALUE_COLUMNS)
    assert np.all((missing[missing > 0] > 0.01) & (missing[missing > 0] < 0.03))
    assert np.all(np.isfinite(features[:, missing == 0]))

    again, again_labels = make_applicants(5000, seed=3)
    np.testing.assert_array_equal(features, again)
    np.testing.assert_array_equal(labels, again_labels)
    assert not np.array_equal(make_applicants(50, seed=4)[0], features[:50])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_positive_rate_is_imbalanced(seed: int) -> None:
    _, labels = make_applicants(20000, seed=seed)
    assert 0.05 < labels.mean() < 0.12


def test_booster_learns_on_fresh_data() -> None:
    booster = train_booster(seed=0)
    assert booster.feature_name() == list(FEATURE_NAMES)
    features, labels = make_applicants(10000, seed=12345)
    scores = np.asarray(booster.predict(features), dtype=np.float64)
    assert np.all((scores >= 0.0) & (scores <= 1.0))
    assert _auc(labels, scores) > 0.7


def test_auc_helper() -> None:
    labels = np.array([0, 0, 1, 1], dtype=np.int64)
    assert _auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert _auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5


def test_bootstrap_registers_once_and_cli_adds_a_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    uri = bootstrap_embedded_registry(data_dir)
    paths = embedded_paths(data_dir)
    assert uri == paths.tracking_uri == f"sqlite:///{(data_dir / 'mlflow.db').absolute().as_posix()}"
    assert paths.db_file.is_file()
    assert any(paths.artifacts_dir.rglob("model.lgb")), "artifacts must live under the data dir"

    client = MlflowClient(uri, uri)
    version = client.get_model_version_by_alias("credit-default", "production")
    assert str(version.version) == "1"
    assert client.get_model_version("credit-default", "1").status == "READY"
    params = _params(client, "credit-default", "1")
    assert float(params["optimal_threshold"]) == pytest.approx(0.48)
    tags = client.get_model_version("credit-default", "1").tags
    assert {k: v for k, v in tags.items() if k.startswith("tabserve.decision.")} == {
        "tabserve.decision.positive": "decline", "tabserve.decision.negative": "approve"
    }

    assert bootstrap_embedded_registry(data_dir) == uri
    assert _versions(uri, "credit-default") == ["1"]

    assert new_version.main(["--data-dir", str(data_dir), "--set-alias", "production"]) == 0
    out = capsys.readouterr().out
    assert "training a new version of credit-default, then moving alias production to it" in out
    assert "registered credit-default version 2 (alias production -> 2)" in out
    assert "moved alias production from version 1 to version 2: a server following " in out
    assert _production(client, "credit-default") == "2"
    assert _params(client, "credit-default", "2")["seed"] == "2"


def test_register_moves_alias_and_sets_stage(registry_uri: str) -> None:
    name = "alias-model"
    first = register_demo_version(registry_uri, name, seed=1, threshold=0.3)
    client = MlflowClient(registry_uri, registry_uri)
    assert _production(client, name) == first

    second = register_demo_version(registry_uri, name, seed=2, alias="production", stage="Staging")
    assert second != first
    assert _production(client, name) == second
    assert client.get_model_version(name, second).current_stage == "Staging"
    assert client.get_model_version(name, first).current_stage == "None"

    third = register_demo_version(registry_uri, name, seed=3, alias=None)
    assert _production(client, name) == second
    assert client.get_model_version(name, third).status == "READY"
    assert float(_params(client, name, first)["optimal_threshold"]) == 0.3


def test_missing_artifacts_breaks_downloads(registry_uri: str, tmp_path: Path) -> None:
    name = "missing-artifacts-model"
    version = register_demo_version(registry_uri, name, seed=1, broken="missing_artifacts")
    client = MlflowClient(registry_uri, registry_uri)
    assert client.get_model_version(name, version).status == "READY"
    assert _production(client, name) == version
    try:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path))
    except Exception:  # the download itself may fail: that is broken enough
        return
    assert not list(Path(local).rglob("model.lgb"))


def test_wrong_features_changes_the_schema(registry_uri: str) -> None:
    name = "wrong-features-model"
    version = register_demo_version(registry_uri, name, seed=1, broken="wrong_features")
    uri = f"models:/{name}/{version}"
    booster = mlflow.lightgbm.load_model(uri)
    names = booster.feature_name()
    assert len(names) == len(FEATURE_NAMES)
    assert names != list(FEATURE_NAMES)
    assert names[0] == "other_feature_00"
    assert names[10:] == list(FEATURE_NAMES[10:])
    signature = mlflow.models.get_model_info(uri).signature
    assert signature is not None
    assert signature.inputs.input_names() == names


def test_good_version_has_matching_schema_and_local_artifacts(registry_uri: str) -> None:
    name = "good-model"
    version = register_demo_version(registry_uri, name, seed=1)
    client = MlflowClient(registry_uri, registry_uri)
    db_file = Path(registry_uri.removeprefix("sqlite:///"))
    location = client.get_model_version_download_uri(name, version)
    assert location.startswith((db_file.parent / "artifacts").as_uri()), "artifacts next to the SQLite db"
    uri = f"models:/{name}/{version}"
    info = mlflow.models.get_model_info(uri)
    assert info.signature is not None
    assert info.signature.inputs.input_names() == list(FEATURE_NAMES)
    booster = mlflow.lightgbm.load_model(uri)
    features, _ = make_applicants(5, seed=99)
    np.testing.assert_allclose(booster.predict(features), train_booster(seed=1).predict(features))


def test_rejects_unknown_broken_mode(registry_uri: str) -> None:
    with pytest.raises(ValueError, match="broken"):
        register_demo_version(registry_uri, "never-registered", broken="nope")


def test_write_example_applicants(tmp_path: Path) -> None:
    path = tmp_path / "examples" / "applicants.csv"
    write_example_applicants(path)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["applicant_id", *FEATURE_NAMES]
    assert len(rows) == 26
    assert [row[0] for row in rows[1:4]] == ["A0001", "A0002", "A0003"]
    expected, _ = make_applicants(25, seed=7)
    parsed = np.array([[float(v) if v else math.nan for v in row[1:]] for row in rows[1:]])
    np.testing.assert_array_equal(parsed, expected)


def test_checked_in_example_csv_is_current(tmp_path: Path) -> None:
    checked_in = Path(__file__).resolve().parents[1] / "clients" / "examples" / "applicants.csv"
    fresh = tmp_path / "applicants.csv"
    write_example_applicants(fresh)
    assert checked_in.read_text(encoding="utf-8") == fresh.read_text(encoding="utf-8")
