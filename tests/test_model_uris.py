"""Every model URI form, resolved to a concrete version, against SQLite and a real `mlflow server`."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import mlflow
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry

from tabserve_client import ScoringClient
from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_demo.processes import MlflowServer
from tabserve_demo.registration import register_demo_version
from tabserve_server.app import ServingApp, loader_config
from tabserve_server.core.loading import NEGATIVE_LABEL_TAG, POSITIVE_LABEL_TAG, ModelLoader
from tabserve_server.core.model import AspiredVersion, DecisionLabels, LoadedFrom
from tabserve_server.transport import inference_v2
from tests.support import MODEL_NAME, server_settings, wait_for

V1_LABELS = ("default", "repay")
V2_LABELS = ("decline", "approve")
LABEL_KEYS = (inference_v2.POSITIVE_LABEL_PARAMETER, inference_v2.NEGATIVE_LABEL_PARAMETER)


@pytest.fixture(scope="module")
def uri_registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Its own registry: v1 (alias production), v2 (stage Production, version tags for threshold and labels)."""
    tracking = bootstrap_embedded_registry(tmp_path_factory.mktemp("uris"), model_name=MODEL_NAME, threshold=0.48)
    v2 = register_demo_version(tracking, MODEL_NAME, seed=2, threshold=0.338, alias=None, stage="Production")
    client = MlflowClient(tracking, tracking)
    client.set_model_version_tag(MODEL_NAME, v2, "decision_threshold", "0.41")
    for version, (positive, negative) in {"1": V1_LABELS, v2: V2_LABELS}.items():
        client.set_model_version_tag(MODEL_NAME, version, POSITIVE_LABEL_TAG, positive)
        client.set_model_version_tag(MODEL_NAME, version, NEGATIVE_LABEL_TAG, negative)
    return tracking, v2


def _served(tracking_uri: str, tmp_path: Path, model_uri: str, **extra: object) -> ServingApp:
    app = ServingApp(server_settings(tracking_uri, tmp_path, model_uri=model_uri, **extra),
                     registry=CollectorRegistry())
    app.start()
    wait_for(app.accepting, what=f"load of {model_uri}")
    return app


@pytest.mark.parametrize(
    ("uri", "version", "threshold", "source", "labels"),
    [
        ("models:/credit-default@production", "1", 0.48, "run_param:optimal_threshold", V1_LABELS),
        ("models:/credit-default/Production", "2", 0.41, "model_version_tag:decision_threshold", V2_LABELS),
        ("models:/credit-default/1", "1", 0.48, "run_param:optimal_threshold", V1_LABELS),
    ],
)
def test_registry_uris_resolve_to_a_reported_version(
    uri_registry: tuple[str, str],
    tmp_path: Path,
    uri: str,
    version: str,
    threshold: float,
    source: str,
    labels: tuple[str, str],
) -> None:
    tracking, _ = uri_registry
    app = _served(tracking, tmp_path, uri)
    try:
        model = app.manager.current()
        assert model is not None
        assert (model.version, model.requested_uri) == (version, uri)
        assert model.source_uri == f"models:/{MODEL_NAME}/{version}"
        assert (model.threshold, model.threshold_source) == (threshold, source)
        assert model.labels == DecisionLabels(*labels)
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
        assert model.labels == DecisionLabels("positive", "negative")  # no version tags: the defaults
    finally:
        app.stop(0)


def test_decision_labels_are_reported_and_kept_in_the_cache(uri_registry: tuple[str, str], tmp_path: Path) -> None:
    tracking, v2 = uri_registry
    cache = tmp_path / "cache"
    app = _served(tracking, cache, f"models:/{MODEL_NAME}/{v2}")
    try:
        with ScoringClient(f"127.0.0.1:{app.public_port}") as client:
            info = client.model_info()
            assert (info.positive_label, info.negative_label) == V2_LABELS
            assert (info.label(True), info.label(False)) == V2_LABELS
        with grpc.insecure_channel(f"127.0.0.1:{app.public_port}") as channel:
            stub = inference_v2.pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = stub.ModelMetadata(inference_v2.pb.ModelMetadataRequest(name=MODEL_NAME))
        parameters = {k: p.string_param for k, p in metadata.parameters.items()}
        # The labels; the other parameters (adverse label, reason table) are test_explanations.py's.
        assert {k: parameters[k] for k in LABEL_KEYS} == dict(zip(LABEL_KEYS, V2_LABELS, strict=True))
    finally:
        app.stop(0)
    # Restarted with the registry down: the cached copy keeps the version's labels.
    settings = server_settings(
        "http://127.0.0.1:9", cache, model_uri=f"models:/{MODEL_NAME}/{v2}", registry_timeout_seconds=1.0
    )
    down = ServingApp(settings, registry=CollectorRegistry())
    down.start()
    try:
        wait_for(down.accepting, what="serving from the cache")
        model = down.manager.current()
        assert model is not None and model.loaded_from is LoadedFrom.CACHE
        assert model.labels == DecisionLabels(*V2_LABELS)
    finally:
        down.stop(0)


def test_decision_labels_that_cannot_be_told_apart_fail_the_load(
    uri_registry: tuple[str, str], tmp_path: Path
) -> None:
    tracking, _ = uri_registry
    client = MlflowClient(tracking, tracking)
    client.set_model_version_tag(MODEL_NAME, "1", NEGATIVE_LABEL_TAG, V1_LABELS[0])
    settings = server_settings(tracking, tmp_path, model_uri=f"models:/{MODEL_NAME}/1")
    app = ServingApp(settings, registry=CollectorRegistry())
    app.start()
    try:
        wait_for(lambda: app.manager.status().last_error, what="the load failure")
        assert "two different, non-empty words" in app.manager.status().last_error
        assert app.manager.current() is None
    finally:
        app.stop(0)
        client.set_model_version_tag(MODEL_NAME, "1", NEGATIVE_LABEL_TAG, V1_LABELS[1])


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
