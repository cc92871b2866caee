"""Registration of demo model versions in an MLflow registry: train, log, wait until READY, tag, move the alias.

Also registers deliberately broken versions (artifact deleted, or features renamed) for the tour and the tests.
mlflow is imported by the functions that call it, so importing the names and defaults here stays cheap.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from tabserve_demo.applicants import FEATURE_NAMES, make_applicants, wrong_feature_names
from tabserve_demo.reasons import write_reason_table
from tabserve_demo.training import train_booster
from tabserve_server.core.loading import DIGEST_TAG, NEGATIVE_LABEL_TAG, POSITIVE_LABEL_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME: Final = "credit-default"
DEFAULT_THRESHOLD: Final = 0.48
DEFAULT_ALIAS: Final = "production"
EXPERIMENT_NAME: Final = "tabserve-demo"
THRESHOLD_PARAM: Final = "optimal_threshold"
MODEL_ARTIFACT_FILE: Final = "model.lgb"
BROKEN_MODES: Final = ("missing_artifacts", "wrong_features")
# What a positive (1) and a negative (0) decision mean for the demo model: P(default) above the threshold
# declines the applicant. The server reports these labels next to every decision.
DECISION_TAGS: Final = {POSITIVE_LABEL_TAG: "decline", NEGATIVE_LABEL_TAG: "approve"}
# The seed of the version that bootstrap registers: version N of the demo model is trained with seed N.
BOOTSTRAP_SEED: Final = 1
_READY_TIMEOUT_S: Final = 300.0


def registry_client(tracking_uri: str) -> MlflowClient:
    """A client of `tracking_uri` (also MLflow's global tracking and registry URI, which log_model uses)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _default_artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, keep artifacts next to the database (<db dir>/artifacts), never in ./mlruns."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    db_path = Path(tracking_uri.removeprefix(prefix).split("?", 1)[0])
    if not db_path.is_absolute():
        db_path = Path.cwd() / db_path
    return (db_path.parent / "artifacts").as_uri()


def ensure_experiment(client: MlflowClient, artifact_location: str | None) -> str:
    """The id of the demo experiment, created (with `artifact_location`) or restored when needed."""
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is None:
        logger.info("creating experiment %r (artifacts at %s)", EXPERIMENT_NAME, artifact_location)
        experiment_id: str = client.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location)
        return experiment_id
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return str(experiment.experiment_id)


def _wait_until_ready(client: MlflowClient, model_name: str, version: str) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while True:
        status = client.get_model_version(model_name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION":
            raise RuntimeError(f"registration of {model_name} version {version} failed")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{model_name} version {version} still {status} after {_READY_TIMEOUT_S}s")
        time.sleep(0.5)


def _local_path(uri: str) -> Path | None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _model_file_sha256(model_name: str, version: str) -> str:
    """sha256 (hex) of the registered version's model file, as the server checks it (DIGEST_TAG)."""
    import hashlib
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=tmp))
        return hashlib.sha256((local / MODEL_ARTIFACT_FILE).read_bytes()).hexdigest()


def artifact_location(client: MlflowClient, model_name: str, version: str) -> str:
    """Where a registered version's files are in the artifact store (file:, s3:, mlflow-artifacts: URI)."""
    artifact_uri: str = client.get_model_version_download_uri(model_name, version)
    if artifact_uri.startswith("models:/m-"):  # a LoggedModel that the registry did not resolve
        model_id = artifact_uri.removeprefix("models:/").split("/", 1)[0]
        artifact_uri = client.get_logged_model(model_id).artifact_location
    return artifact_uri


def _delete_model_file(client: MlflowClient, model_name: str, version: str) -> list[str]:
    """Delete model.lgb of a registered version from its artifact store; returns what was deleted."""
    artifact_uri = artifact_location(client, model_name, version)
    local = _local_path(artifact_uri)
    if local is not None:
        deleted = sorted(local.rglob(MODEL_ARTIFACT_FILE))
        for path in deleted:
            path.unlink()
        return [str(path) for path in deleted]
    # Remote store (e.g. mlflow-artifacts:/ proxied by a tracking server): go through its repository.
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo: Any = get_artifact_repository(artifact_uri)
    found: list[str] = []
    pending = [""]
    while pending:
        for info in repo.list_artifacts(pending.pop() or None):
            if info.is_dir:
                pending.append(info.path)
            elif info.path.rsplit("/", 1)[-1] == MODEL_ARTIFACT_FILE:
                found.append(info.path)
    for artifact_path in found:
        repo.delete_artifacts(artifact_path)
    return [f"{artifact_uri.rstrip('/')}/{artifact_path}" for artifact_path in found]


def _log_model(
    client: MlflowClient, experiment_id: str, model_name: str, booster: Any, *, feature_names: Sequence[str],
    params: dict[str, Any],
) -> tuple[str, str]:
    """Log `booster` in a new run and register it under `model_name`; returns (version, run id)."""
    import mlflow
    import mlflow.lightgbm
    import pandas as pd
    from mlflow.models import infer_signature

    seed = int(params["seed"])
    sample, _ = make_applicants(20, seed=seed + 1_000_003)
    sample_df = pd.DataFrame(sample, columns=list(feature_names), dtype=np.float64)
    signature = infer_signature(sample_df, np.asarray(booster.predict(sample), dtype=np.float64))
    with (
        warnings.catch_warnings(),
        tempfile.TemporaryDirectory() as scratch,
        mlflow.start_run(experiment_id=experiment_id, run_name=f"{model_name}-seed{seed}") as run,
    ):
        # The reason table names the demo's features: a version trained on other names ships none.
        extra_files = [str(write_reason_table(Path(scratch)))] if tuple(feature_names) == FEATURE_NAMES else None
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        mlflow.log_params(params)
        mlflow.set_tag("tabserve.demo", "true")
        model_info = mlflow.lightgbm.log_model(
            booster, name="model", registered_model_name=model_name, signature=signature, input_example=None,
            extra_files=extra_files,
        )
    run_id: str = run.info.run_id
    if model_info.registered_model_version is not None:
        return str(model_info.registered_model_version), run_id
    versions = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    return str(max(int(mv.version) for mv in versions)), run_id


def _point_at(client: MlflowClient, model_name: str, version: str, alias: str | None, stage: str | None) -> None:
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, version)
        logger.info("alias %s of %s -> version %s", alias, model_name, version)
    if stage is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # model stages are deprecated since 2.9
            client.transition_model_version_stage(model_name, version, stage, archive_existing_versions=False)
        logger.info("stage of %s version %s -> %s", model_name, version, stage)


def register_demo_version(
    tracking_uri: str,
    model_name: str,
    *,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    alias: str | None = DEFAULT_ALIAS,
    stage: str | None = None,
    broken: str | None = None,
) -> str:
    """Train a demo booster and register it as a new version of `model_name`; returns the version.

    The version carries the demo's decision labels (DECISION_TAGS) and reason table (tabserve_demo.reasons:
    `age` is never a reason) and its model file's sha256 (DIGEST_TAG). broken="missing_artifacts" deletes
    model.lgb from the artifact store after registering, and broken="wrong_features" trains on renamed
    features so the schema does not match FEATURE_NAMES.
    """
    if broken is not None and broken not in BROKEN_MODES:
        raise ValueError(f"broken must be one of {BROKEN_MODES} or None, got {broken!r}")
    client = registry_client(tracking_uri)
    experiment_id = ensure_experiment(client, _default_artifact_location(tracking_uri))

    feature_names = wrong_feature_names() if broken == "wrong_features" else FEATURE_NAMES
    started = time.monotonic()
    booster = train_booster(seed, feature_names=feature_names)
    logger.info("trained the demo booster (seed %d) in %.1f s", seed, time.monotonic() - started)

    started = time.monotonic()
    logger.info("registering: logging the model to MLflow as a new version of %s", model_name)
    params = {THRESHOLD_PARAM: threshold, "seed": seed, "broken": broken or "no"}
    version, run_id = _log_model(client, experiment_id, model_name, booster, feature_names=feature_names, params=params)
    _wait_until_ready(client, model_name, version)
    for key, value in {**DECISION_TAGS, DIGEST_TAG: _model_file_sha256(model_name, version)}.items():
        client.set_model_version_tag(model_name, version, key, value)
    logger.info("registered %s version %s (run %s) in %.1f s", model_name, version, run_id,
                time.monotonic() - started)

    if broken == "missing_artifacts":
        deleted = _delete_model_file(client, model_name, version)
        if not deleted:
            raise RuntimeError(f"found no {MODEL_ARTIFACT_FILE} to delete for {model_name} version {version}")
        logger.info("broke %s version %s: deleted %s", model_name, version, ", ".join(deleted))
    _point_at(client, model_name, version, alias, stage)
    return version


def next_seed(client: MlflowClient, model_name: str) -> int:
    """The seed of the next version: the latest version number + 1 (version N is trained with seed N)."""
    versions = client.search_model_versions(f"name='{model_name}'")
    return max((int(mv.version) for mv in versions), default=0) + 1
