"""The benchmark model: seed-sized LightGBM (189 features, 968 trees, depth 10), trained once and cached.

The booster is cached under `bench/.cache/` keyed by every training parameter, so a changed parameter
trains a new model and an unchanged one is never retrained (training the full model takes minutes).
`register()` puts it in a bench-local SQLite MLflow registry, so the project's server loads it through its
normal path (resolve → pinned download → load → validate).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tabserve_demo.applicants import FEATURE_NAMES, make_applicants

log = logging.getLogger(__name__)

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
MODEL_NAME = "bench-credit-default"
THRESHOLD = 0.48


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines the trained booster (the cache key is a hash of these fields)."""

    num_trees: int
    max_depth: int
    learning_rate: float
    num_leaves: int
    train_rows: int
    seed: int = 7
    num_features: int = len(FEATURE_NAMES)

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return f"lgb-{self.num_trees}t-d{self.max_depth}-{digest}"


# The seed story's model: 189 features, about 968 trees, max depth 10, learning rate 0.0188.
FULL = ModelSpec(num_trees=968, max_depth=10, learning_rate=0.0188, num_leaves=31, train_rows=20_000)
# --quick: the same features and code paths, a model that trains in about a second.
TINY = ModelSpec(num_trees=20, max_depth=4, learning_rate=0.1, num_leaves=15, train_rows=2_000)


@dataclass(frozen=True)
class BenchModel:
    spec: ModelSpec
    model_file: Path  # LightGBM text format
    trained_seconds: float  # 0.0 when it came from the cache
    first_train_seconds: float  # how long training took when the cache entry was made


def ensure_model(spec: ModelSpec, cache_dir: Path = CACHE_DIR) -> BenchModel:
    """The cached booster for `spec`, training it first when it is not cached."""
    model_file = cache_dir / spec.key() / "model.lgb"
    if model_file.is_file():
        try:
            first = float(json.loads((model_file.parent / "spec.json").read_text())["train_seconds"])
        except (OSError, ValueError, KeyError):
            first = float("nan")
        return BenchModel(spec, model_file, 0.0, first)
    import lightgbm

    model_file.parent.mkdir(parents=True, exist_ok=True)
    features, labels = make_applicants(spec.train_rows, seed=spec.seed)
    params: dict[str, Any] = {
        "objective": "binary",
        "learning_rate": spec.learning_rate,
        "max_depth": spec.max_depth,
        "num_leaves": spec.num_leaves,
        "min_data_in_leaf": 20,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "seed": spec.seed,
        "deterministic": True,
        "num_threads": os.cpu_count() or 1,
        "verbose": -1,
    }
    log.info("training the benchmark model %s (%d trees); cached afterwards", spec.key(), spec.num_trees)
    started = time.monotonic()
    dataset = lightgbm.Dataset(features, label=labels, feature_name=list(FEATURE_NAMES))
    booster = lightgbm.train(params, dataset, num_boost_round=spec.num_trees)
    seconds = time.monotonic() - started
    if booster.num_trees() != spec.num_trees:
        raise RuntimeError(f"trained {booster.num_trees()} trees, expected {spec.num_trees}")
    partial = model_file.with_suffix(".partial")
    booster.save_model(str(partial))
    partial.replace(model_file)  # atomic: an interrupted run never leaves a half-written cache entry
    (model_file.parent / "spec.json").write_text(
        json.dumps({**dataclasses.asdict(spec), "train_seconds": round(seconds, 1)}, indent=2) + "\n"
    )
    return BenchModel(spec, model_file, seconds, seconds)


def bench_rows(n_rows: int, seed: int = 11) -> np.ndarray:
    """Rows to score (not the training rows), float64 [n_rows, 189] in the model's feature order."""
    rows, _ = make_applicants(n_rows, seed=seed)
    return rows


@dataclass(frozen=True)
class Registry:
    tracking_uri: str
    model_name: str
    versions: tuple[str, ...]

    def uri(self, version: str) -> str:
        return f"models:/{self.model_name}/{version}"


def registry_for(model: BenchModel, versions: int = 2) -> Registry:
    """The bench-local registry of `model`, cached beside it (registering costs MLflow start-up and a
    schema migration of a new SQLite file: tens of seconds on a busy machine). The servers only read it."""
    directory = model.model_file.parent / "registry"
    marker = directory / "registered.json"
    with (model.model_file.parent / "registry.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: the second waits and reuses
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if len(saved["versions"]) == versions and (directory / "mlflow.db").is_file():
                return Registry(saved["tracking_uri"], saved["model_name"], tuple(saved["versions"]))
        shutil.rmtree(directory, ignore_errors=True)
        registry = register(model, directory, versions)
        marker.write_text(json.dumps(dataclasses.asdict(registry)) + "\n")
        return registry


def register(model: BenchModel, registry_dir: Path, versions: int = 2) -> Registry:
    """A new SQLite MLflow registry under `registry_dir` holding `versions` versions of the model.

    Every version is the same booster; the reload section switches between them. Version 1 carries the
    alias `production` and, like the demo model, the run parameter `optimal_threshold`.
    """
    import lightgbm
    import mlflow
    import mlflow.lightgbm
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    registry_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{(registry_dir / 'mlflow.db').absolute().as_posix()}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment("tabserve-bench", artifact_location=(registry_dir / "artifacts").as_uri())
    booster = lightgbm.Booster(model_file=str(model.model_file))
    sample = bench_rows(20, seed=3)
    signature = infer_signature(
        pd.DataFrame(sample, columns=list(FEATURE_NAMES)), np.asarray(booster.predict(sample), dtype=np.float64)
    )
    registered: list[str] = []
    for _ in range(versions):
        with warnings.catch_warnings(), mlflow.start_run(experiment_id=experiment_id):
            warnings.simplefilter("ignore")
            mlflow.log_param("optimal_threshold", THRESHOLD)
            info = mlflow.lightgbm.log_model(
                booster, name="model", registered_model_name=MODEL_NAME, signature=signature,
                pip_requirements=["lightgbm"],  # skips MLflow's requirement inference (a subprocess per call)
            )
        registered.append(str(info.registered_model_version))
    for version in registered:
        deadline = time.monotonic() + 60
        while client.get_model_version(MODEL_NAME, version).status != "READY":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{MODEL_NAME} version {version} is not READY after 60 s")
            time.sleep(0.2)
    client.set_registered_model_alias(MODEL_NAME, "production", registered[0])
    return Registry(tracking_uri, MODEL_NAME, tuple(registered))
