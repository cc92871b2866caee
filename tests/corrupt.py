"""Corrupted copies of one good model directory: the faults a truncated download or a bad disk produce."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

MODEL_FILE = "model.lgb"


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _zero(data: bytes) -> bytes:
    return b""


def _header_only(data: bytes) -> bytes:
    return data[: data.index(b"Tree=0")]


def _mid_tree(data: bytes) -> bytes:
    return data[: data.index(b"\nTree=2") - 200]


def _random(data: bytes) -> bytes:
    return np.random.default_rng(1).bytes(len(data))


def _flipped(data: bytes) -> bytes:
    """A few digits inside the tree section become letters."""
    out = bytearray(data)
    start = data.index(b"Tree=0")
    digits = [i for i in range(start, len(data)) if chr(out[i]).isdigit()]
    for i in digits[100:len(digits):len(digits) // 6][:5]:
        out[i] = ord("x")
    return bytes(out)


def _more_trees(data: bytes) -> bytes:
    """The header lists more tree sizes than the file holds trees."""
    return re.sub(rb"tree_sizes=([^\n]*)", lambda m: b"tree_sizes=" + m[1] + b" 4000 4000 4000", data, count=1)


def _more_features(data: bytes) -> bytes:
    """The header claims more features than the trees and the feature names describe."""
    return re.sub(rb"max_feature_idx=\d+", b"max_feature_idx=400", data, count=1)


MODEL_FILE_FAULTS: dict[str, Callable[[bytes], bytes]] = {
    "half": _half, "zero": _zero, "header-only": _header_only, "mid-tree": _mid_tree, "random": _random,
    "flipped": _flipped, "more-trees": _more_trees, "more-features": _more_features,
}
FAULTS = (*MODEL_FILE_FAULTS, "signature-mismatch")


def corrupted_copy(good: Path, fault: str, destination: Path) -> Path:
    """A copy of the model directory `good` with `fault` applied; returns the copy's path."""
    shutil.copytree(good, destination)
    if fault == "signature-mismatch":  # a valid booster whose signature names one feature fewer
        mlmodel = yaml.safe_load((destination / "MLmodel").read_text())
        inputs = json.loads(mlmodel["signature"]["inputs"])
        mlmodel["signature"]["inputs"] = json.dumps(inputs[:-1])
        (destination / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    else:
        path = destination / MODEL_FILE
        path.write_bytes(MODEL_FILE_FAULTS[fault](path.read_bytes()))
    return destination


def fault_copies(tracking_uri: str, model_name: str, root: Path, faults: tuple[str, ...] = FAULTS) -> dict[str, Path]:
    """Version 1 of `model_name` downloaded as "good", and a corrupted copy of it for each of `faults`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    good = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/1", dst_path=str(root / "good")))
    return {"good": good, **{fault: corrupted_copy(good, fault, root / fault) for fault in faults}}
