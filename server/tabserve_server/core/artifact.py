"""Reads a model's artifacts into a predictor: the MLmodel file, its signature and the flavor's data.

Two steps, so that what is parsed is exactly what was digested: `read_files` takes the bytes the model
is read from into memory (MLmodel and, for LightGBM, the model file) and digests them; `read_artifact`
parses those bytes. The verifier process (core/verify) and the serving process run the same two steps.

LightGBM Boosters load from LightGBM's own text format; pickle-based flavors only through pyfunc, and only
when the operator opted in (logged as a warning). Nothing here talks to the registry, and nothing imports
mlflow unless the flavor is pyfunc.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabserve_server.core.model import LightGBMPredictor, Predictor, PyfuncPredictor
from tabserve_server.core.reasons import REASON_TABLE_PATH, ReasonTable, parse_reason_table
from tabserve_server.core.schema import Feature, FeatureSchema
from tabserve_server.errors import ModelLoadError

log = logging.getLogger(__name__)

MLMODEL = "MLmodel"


@dataclass(frozen=True)
class ArtifactFiles:
    """The bytes of one model version in memory: `contents` maps file names (MLmodel, the model file) to bytes."""

    directory: Path
    label: str
    mlmodel: Mapping[str, Any]
    contents: Mapping[str, bytes]
    lightgbm_file: str  # the LightGBM model file's name in `contents`; '' for other flavors

    @property
    def digest(self) -> str:
        """sha256 over every file's name and content: equal digests mean the same bytes are parsed."""
        outer = hashlib.sha256()
        for name in sorted(self.contents):
            outer.update(f"{name}\0{hashlib.sha256(self.contents[name]).hexdigest()}\n".encode())
        return f"sha256:{outer.hexdigest()}"

    @property
    def model_file_sha256(self) -> str:
        """sha256 (hex) of the LightGBM model file, as the `tabserve.sha256` version tag states it; '' if none."""
        return hashlib.sha256(self.contents[self.lightgbm_file]).hexdigest() if self.lightgbm_file else ""


@dataclass(frozen=True)
class Artifact:
    """What a model directory holds once read: its flavor, a predictor, the feature schema and the reason table."""

    flavor: str
    predictor: Predictor
    schema: FeatureSchema
    reasons: ReasonTable | None = None


def read_files(directory: Path, label: str, max_model_bytes: int) -> ArtifactFiles:
    """The bytes the model in `directory` is read from; a file larger than `max_model_bytes` is refused unread.

    `label` names the model in errors (its source URI).
    """
    import yaml  # type: ignore[import-untyped]

    raw = _read(directory, MLMODEL, label, max_model_bytes)
    try:
        # libyaml's loader when PyYAML has it: the pure-Python one holds the GIL about 30 ms on a 190-feature
        # signature, time taken from request threads during every reload (libyaml: about 1 ms).
        mlmodel = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # both safe
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{label}: unreadable MLmodel: {exc}") from exc
    if not isinstance(mlmodel, dict) or not isinstance(mlmodel.get("flavors"), dict):
        raise ModelLoadError(f"{label}: unreadable MLmodel: no flavors")
    contents = {MLMODEL: raw}
    lgb_conf = mlmodel["flavors"].get("lightgbm")
    data = str(lgb_conf.get("data", "")) if isinstance(lgb_conf, dict) else ""
    lightgbm_file = data if data.endswith(".lgb") else ""
    if lightgbm_file:
        contents[lightgbm_file] = _read(directory, lightgbm_file, label, max_model_bytes)
    if (directory / REASON_TABLE_PATH).is_file():  # read and digested with the model: the same bytes are checked
        contents[REASON_TABLE_PATH] = _read(directory, REASON_TABLE_PATH, label, max_model_bytes)
    return ArtifactFiles(directory, label, mlmodel, contents, lightgbm_file)


def _read(directory: Path, name: str, label: str, max_model_bytes: int) -> bytes:
    path = (directory / name).resolve()
    if not path.is_relative_to(directory.resolve()):
        raise ModelLoadError(f"{label}: file {name!r} is outside the model directory")
    if not path.is_file():
        missing = "no MLmodel file in the model artifacts" if name == MLMODEL else f"model file {name} is missing"
        raise ModelLoadError(f"{label}: {missing}")
    size = path.stat().st_size
    if size > max_model_bytes:
        raise ModelLoadError(f"{label}: {name} is {size} bytes, more than max_model_bytes ({max_model_bytes})")
    return path.read_bytes()


def read_artifact(files: ArtifactFiles, *, allow_pyfunc: bool, predict_threads: int) -> Artifact:
    """Parse the model held in `files` (LightGBM: from the bytes in memory, never from the file again),
    and its reason table when it has one (checked against the model's features)."""
    artifact = _read_model(files, allow_pyfunc=allow_pyfunc, predict_threads=predict_threads)
    raw_table = files.contents.get(REASON_TABLE_PATH)
    if raw_table is None:
        return artifact
    table = parse_reason_table(raw_table, artifact.schema.names, files.label)
    return Artifact(artifact.flavor, artifact.predictor, artifact.schema, table)


def _read_model(files: ArtifactFiles, *, allow_pyfunc: bool, predict_threads: int) -> Artifact:
    label = files.label
    flavors: Mapping[str, Any] = files.mlmodel["flavors"]
    signature_schema = _signature_schema(files.mlmodel, label)
    if files.lightgbm_file:
        return _lightgbm(files, signature_schema, predict_threads)
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
        model = mlflow.pyfunc.load_model(str(files.directory))
    except Exception as exc:
        raise ModelLoadError(f"{label}: pyfunc load failed: {exc}") from exc
    return Artifact("python_function", PyfuncPredictor(model, signature_schema), signature_schema)


def _lightgbm(files: ArtifactFiles, signature_schema: FeatureSchema | None, threads: int) -> Artifact:
    import lightgbm

    label, name = files.label, files.lightgbm_file
    try:
        booster = lightgbm.Booster(model_str=files.contents[name].decode("utf-8"))
    except Exception as exc:
        raise ModelLoadError(f"{label}: LightGBM cannot read {name}: {exc}") from exc
    booster_names = [str(n) for n in booster.feature_name()]
    schema = signature_schema or FeatureSchema(tuple(Feature(n, "double") for n in booster_names))
    if len(schema) != booster.num_feature():
        raise ModelLoadError(f"signature has {len(schema)} features, the booster {booster.num_feature()}")
    named = signature_schema is not None and not all(n.startswith("Column_") for n in booster_names)
    if named and tuple(booster_names) != schema.names:
        raise ModelLoadError("signature feature names do not match the booster's feature names")
    return Artifact("lightgbm", LightGBMPredictor(booster, threads or (os.cpu_count() or 1)), schema)


def _signature_schema(mlmodel: Mapping[str, Any], label: str) -> FeatureSchema | None:
    """The named inputs of the MLmodel's signature (as MLflow writes it: a JSON list of column specs), or None."""
    signature = mlmodel.get("signature")
    raw = signature.get("inputs") if isinstance(signature, dict) else None
    if not raw:
        return None
    try:
        specs = json.loads(raw)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{label}: unreadable signature inputs: {exc}") from exc
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) and s.get("name") for s in specs):
        return None
    features = []
    for spec in specs:
        kind = spec.get("type")
        if kind == "tensor":
            kind = (spec.get("tensor-spec") or {}).get("dtype", "tensor")
        features.append(Feature(str(spec["name"]), str(kind)))
    try:
        return FeatureSchema(tuple(features))
    except ValueError as exc:
        raise ModelLoadError(f"{label}: signature inputs: {exc}") from exc


__all__ = ["MLMODEL", "Artifact", "ArtifactFiles", "read_artifact", "read_files"]
