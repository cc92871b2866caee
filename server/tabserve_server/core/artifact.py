"""Reads a model's artifacts on disk into a predictor: the MLmodel file, its signature and the flavor's data.

LightGBM Boosters load from LightGBM's own text format; pickle-based flavors only through pyfunc, and only
when the operator opted in (logged as a warning). Nothing here talks to the registry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabserve_server.core.model import LightGBMPredictor, Predictor, PyfuncPredictor
from tabserve_server.core.schema import Feature, FeatureSchema
from tabserve_server.errors import ModelLoadError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Artifact:
    """What a model directory holds once read: its flavor, a predictor and the feature schema."""

    flavor: str
    predictor: Predictor
    schema: FeatureSchema


def read_artifact(directory: Path, label: str, *, allow_pyfunc: bool, predict_threads: int) -> Artifact:
    """Read the model in `directory`; `label` names it in errors (its source URI)."""
    from mlflow.models import Model

    mlmodel_path = directory / "MLmodel"
    if not mlmodel_path.is_file():
        raise ModelLoadError(f"{label}: no MLmodel file in the model artifacts")
    try:
        mlmodel = Model.load(str(mlmodel_path))
    except Exception as exc:
        raise ModelLoadError(f"{label}: unreadable MLmodel: {exc}") from exc
    flavors: Mapping[str, Any] = mlmodel.flavors
    signature_schema = _signature_schema(mlmodel)
    lgb_conf = flavors.get("lightgbm")
    if lgb_conf and str(lgb_conf.get("data", "")).endswith(".lgb"):
        return _lightgbm(directory / lgb_conf["data"], label, signature_schema, predict_threads)
    if "python_function" not in flavors:
        raise ModelLoadError(f"{label}: no lightgbm or python_function flavor")
    if not allow_pyfunc:
        raise ModelLoadError(
            f"{label}: flavors {sorted(flavors)} load through pyfunc, which may unpickle code; "
            "set allow_pyfunc to opt in"
        )
    if signature_schema is None:
        raise ModelLoadError(f"{label}: a pyfunc model needs a signature with named inputs")
    log.warning("loading %s through MLflow pyfunc (allow_pyfunc is on): it may execute pickled code", label)
    import mlflow.pyfunc

    try:
        model = mlflow.pyfunc.load_model(str(directory))
    except Exception as exc:
        raise ModelLoadError(f"{label}: pyfunc load failed: {exc}") from exc
    return Artifact("python_function", PyfuncPredictor(model, signature_schema), signature_schema)


def _lightgbm(model_file: Path, label: str, signature_schema: FeatureSchema | None, threads: int) -> Artifact:
    import lightgbm

    if not model_file.is_file():
        raise ModelLoadError(f"{label}: model file {model_file.name} is missing")
    try:
        booster = lightgbm.Booster(model_file=str(model_file))
    except Exception as exc:
        raise ModelLoadError(f"{label}: LightGBM cannot read {model_file.name}: {exc}") from exc
    booster_names = [str(n) for n in booster.feature_name()]
    schema = signature_schema or FeatureSchema(tuple(Feature(n, "double") for n in booster_names))
    if len(schema) != booster.num_feature():
        raise ModelLoadError(f"signature has {len(schema)} features, the booster {booster.num_feature()}")
    named = signature_schema is not None and not all(n.startswith("Column_") for n in booster_names)
    if named and tuple(booster_names) != schema.names:
        raise ModelLoadError("signature feature names do not match the booster's feature names")
    return Artifact("lightgbm", LightGBMPredictor(booster, threads or (os.cpu_count() or 1)), schema)


def _signature_schema(mlmodel: Any) -> FeatureSchema | None:
    signature = mlmodel.signature
    if signature is None or signature.inputs is None or not signature.inputs.has_input_names():
        return None
    features = []
    for spec in signature.inputs.inputs:
        kind = getattr(spec.type, "name", str(spec.type))
        features.append(Feature(str(spec.name), str(kind)))
    return FeatureSchema(tuple(features))


__all__ = ["Artifact", "read_artifact"]
