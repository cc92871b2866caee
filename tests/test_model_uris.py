"""Every model URI form, resolved to a concrete version, against SQLite and a real `mlflow server`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry

from tabserve_server.app import ServingApp, loader_config
from tabserve_server.core.loading import ModelLoader
from tabserve_server.core.model import AspiredVersion, LoadedFrom
from tabserve_server.demo_model import bootstrap_embedded_registry, register_demo_version
from tests.support import MODEL_NAME, server_settings, wait_for
from tools.processes import MlflowServer


@pytest.fixture(scope="module")
def uri_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Its own registry: v1 (alias production), v2 (stage Production, version tag threshold)."""
    tracking = bootstrap_embedded_registry(tmp_path_factory.mktemp("uris"), model_name=MODEL_NAME, threshold=0.48)
    v2 = register_demo_version(tracking, MODEL_NAME, seed=2, threshold=0.338, alias=None, stage="Production")
    MlflowClient(tracking, tracking).set_model_version_tag(MODEL_NAME, v2, "decision_threshold", "0.41")
    return tracking, v2


def _served(tracking_uri: str, tmp_path: Path, model_uri: str, **extra: object) -> ServingApp:
    app = ServingApp(server_settings(tracking_uri, tmp_path, model_uri=model_uri, **extra),
                     registry=CollectorRegistry())
    app.start()
    wait_for(app.accepting, what=f"load of {model_uri}")
    return app


@pytest.mark.parametrize(
    ("uri", "version", "threshold", "source"),
    [
        ("models:/credit-default@production", "1", 0.48, "run_param:optimal_threshold"),
        ("models:/credit-default/Production", "2", 0.41, "model_version_tag:decision_threshold"),
        ("models:/credit-default/1", "1", 0.48, "run_param:optimal_threshold"),
    ],
)
def test_registry_uris_resolve_to_a_reported_version(
    uri_registry: tuple[str, str], tmp_path: Path, uri: str, version: str, threshold: float, source: str
) -> None:
    tracking, _ = uri_registry
    app = _served(tracking, tmp_path, uri)
    try:
        model = app.manager.current()
        assert model is not None
        assert (model.version, model.requested_uri) == (version, uri)
        assert model.source_uri == f"models:/{MODEL_NAME}/{version}"
        assert (model.threshold, model.threshold_source) == (threshold, source)
    finally:
        app.stop(0)


def test_runs_uri_and_local_directory(uri_registry: tuple[str, str], tmp_path: Path) -> None:
    tracking, _ = uri_registry
    client = MlflowClient(tracking, tracking)
    mv = client.get_model_version(MODEL_NAME, "1")
    app = _served(tracking, tmp_path / "a", f"runs:/{mv.run_id}/model", model_name=MODEL_NAME)
    try:
        model = app.manager.current()
        assert model is not None and model.run_id == mv.run_id and model.version == f"run-{mv.run_id[:8]}"
        assert model.threshold_source == "run_param:optimal_threshold"
    finally:
        app.stop(0)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path / "local")))
    app = _served(tracking, tmp_path / "b", str(local), model_name=MODEL_NAME)
    try:
        model = app.manager.current()
        assert model is not None and model.loaded_from is LoadedFrom.LOCAL and model.threshold_source == "default"
    finally:
        app.stop(0)


def test_unsupported_uri_is_a_clear_load_error(uri_registry: tuple[str, str], tmp_path: Path) -> None:
    tracking, _ = uri_registry
    loader = ModelLoader(loader_config(server_settings(tracking, tmp_path)))
    with pytest.raises(Exception, match="unsupported model URI"):
        loader.resolve(AspiredVersion("x", "", "s3://bucket/thing"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on loopback with a SQLite backend (about 20 s to come up), stopped as a process group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log").start() as server:
        server.wait_healthy(120)
        yield server.url


@pytest.mark.mlflow_server
def test_alias_through_a_real_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v1 = register_demo_version(mlflow_server, MODEL_NAME, seed=1, threshold=0.48, alias="production")
        v2 = register_demo_version(mlflow_server, MODEL_NAME, seed=2, threshold=0.3, alias="champion")
    assert (v1, v2) == ("1", "2")
    for uri, version, threshold in [("models:/credit-default@production", "1", 0.48),
                                    ("models:/credit-default@champion", "2", 0.3)]:
        app = _served(mlflow_server, tmp_path / version, uri)
        try:
            model = app.manager.current()
            assert model is not None and (model.version, model.threshold) == (version, threshold)
            assert model.loaded_from is LoadedFrom.REGISTRY
        finally:
            app.stop(0)
