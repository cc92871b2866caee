"""Whether a loaded model version is fit to serve: feature schema against the served one, warm-up predictions."""

from __future__ import annotations

import logging

import numpy as np

from tabserve_server.core.model import LoadedModel, Predictor
from tabserve_server.core.schema import FeatureSchema
from tabserve_server.errors import ModelLoadError

log = logging.getLogger(__name__)


def warm_up_rows(schema: FeatureSchema, count: int = 8, seed: int = 0) -> np.ndarray:
    """Rows for the warm-up check: all zeros, all missing, and random values."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(count, len(schema)))
    rows[0] = 0.0
    rows[1] = np.nan
    return rows


def validate(model: LoadedModel, served: LoadedModel | None, allow_schema_change: bool) -> None:
    """Raise ModelLoadError unless `model` is fit to replace `served`."""
    if served is not None and served.name == model.name and not model.schema.same_inputs(served.schema):
        if not allow_schema_change:
            ours, theirs = set(model.schema.names), set(served.schema.names)
            added, removed = sorted(ours - theirs), sorted(theirs - ours)
            detail = f"added {added[:5]}, removed {removed[:5]}" if added or removed else "same names, new order"
            raise ModelLoadError(
                f"feature schema of version {model.version} differs from served version {served.version} "
                f"({len(model.schema)} vs {len(served.schema)} features; {detail})"
            )
        log.warning("serving a new feature schema for %s (allow_schema_change is on)", model.name)
    warm_up(model.predictor, model.schema)


def warm_up(predictor: Predictor, schema: FeatureSchema) -> None:
    """Raise ModelLoadError unless `predictor` answers finite probabilities for the warm-up rows."""
    try:
        scores = predictor.predict(warm_up_rows(schema))
    except Exception as exc:
        raise ModelLoadError(f"warm-up prediction failed: {exc}") from exc
    if scores.shape != (8,) or not np.isfinite(scores).all() or (scores < 0).any() or (scores > 1).any():
        raise ModelLoadError(f"warm-up predictions not finite probabilities in [0, 1]: {scores[:8]!r}")


__all__ = ["validate", "warm_up", "warm_up_rows"]
