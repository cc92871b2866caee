"""A loaded, validated model version: identity, provenance, schema, threshold, decision labels and its predictor."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from tabserve_server.core.lgbm_fast import SingleRowFast
from tabserve_server.core.reasons import ReasonTable
from tabserve_server.core.schema import FeatureSchema, FloatMatrix

log = logging.getLogger(__name__)


class LoadedFrom(enum.Enum):
    REGISTRY = "registry"
    CACHE = "cache"
    LOCAL = "local"


@dataclass(frozen=True)
class AspiredVersion:
    """What should be served: `model_uri` pinned to `version` when the version is known.

    Idempotent: stating the same aspired version again changes nothing. An empty version means the URI
    names no registry version (runs:/, local path) or is an alias/stage resolved at load (start-up).
    """

    model_name: str
    version: str
    model_uri: str


# The prediction backends, as decision records name them (decisions/record.py) and replay re-runs them.
BACKEND_LIGHTGBM_SINGLE_ROW = "lightgbm-single-row"  # lgbm_fast: LightGBM's single-row fast API
BACKEND_LIGHTGBM_BATCH = "lightgbm-batch"  # Booster.predict
BACKEND_PYFUNC = "pyfunc"


class Predictor(Protocol):
    def predict(self, matrix: FloatMatrix) -> np.ndarray:
        """Probability of the positive class, one float64 per row."""
        ...

    def backend(self, rows: int) -> str:
        """The backend `predict` uses for `rows` rows (one of the BACKEND_* names)."""
        ...


class Explainer(Protocol):
    def contributions(self, matrix: FloatMatrix) -> np.ndarray:
        """Exact per-feature contributions in margin space, [rows, features + 1]: the last column is the
        expected value, and each row sums to the row's raw margin."""
        ...


class LightGBMPredictor:
    """A LightGBM Booster loaded from LightGBM's own text format (never pickle).

    One row goes through LightGBM's single-row fast API when it proved equal to `Booster.predict`
    (see lgbm_fast); batches go through `Booster.predict` with the configured thread count.
    """

    backend_family = "lightgbm"

    def __init__(self, booster: Any, batch_threads: int, fast_single_row: bool = True) -> None:
        import lightgbm

        self.backend_version = str(lightgbm.__version__)
        self.booster = booster
        self._batch_threads = batch_threads
        self.fast = SingleRowFast.create(booster) if fast_single_row else None

    def predict(self, matrix: FloatMatrix) -> np.ndarray:
        if matrix.shape[0] == 1 and self.fast is not None:
            return np.array([self.fast.predict_one(np.ascontiguousarray(matrix[0]))])
        return self.predict_batch(matrix)

    def predict_batch(self, matrix: FloatMatrix) -> np.ndarray:
        """Through `Booster.predict`, whatever the row count."""
        # One row gains nothing from OpenMP threads and pays their start-up; batches use the configured count.
        threads = 1 if matrix.shape[0] == 1 else self._batch_threads
        scores = self.booster.predict(matrix, num_threads=threads)
        return np.asarray(scores, dtype=np.float64).reshape(-1)

    def backend(self, rows: int) -> str:
        return BACKEND_LIGHTGBM_SINGLE_ROW if rows == 1 and self.fast is not None else BACKEND_LIGHTGBM_BATCH

    def contributions(self, matrix: FloatMatrix) -> np.ndarray:
        """LightGBM's exact TreeSHAP (`pred_contrib`), in margin space."""
        threads = 1 if matrix.shape[0] == 1 else self._batch_threads
        values = self.booster.predict(matrix, pred_contrib=True, num_threads=threads)
        return np.asarray(values, dtype=np.float64).reshape(matrix.shape[0], matrix.shape[1] + 1)


class PyfuncPredictor:
    """Any MLflow pyfunc model (opt-in): called with a DataFrame in the schema's column order."""

    backend_family = "pyfunc"
    backend_version = ""

    def __init__(self, model: Any, schema: FeatureSchema) -> None:
        self.model = model
        self._columns = list(schema.names)

    def predict(self, matrix: FloatMatrix) -> np.ndarray:
        import pandas as pd

        output = np.asarray(self.model.predict(pd.DataFrame(matrix, columns=self._columns)), dtype=np.float64)
        if output.ndim == 2:
            output = output[:, -1]  # probabilities per class: keep the positive class
        return output.reshape(-1)

    def backend(self, rows: int) -> str:
        return BACKEND_PYFUNC


@dataclass(frozen=True)
class DecisionLabels:
    """What a decision means, in the model version's words: `positive` for decision=true (score >= threshold,
    e.g. "decline" for a default-risk model), `negative` for false (e.g. "approve")."""

    positive: str = "positive"
    negative: str = "negative"


@dataclass(frozen=True)
class LoadedModel:
    """One model version in memory. Immutable: a request that captured it runs entirely on it."""

    name: str
    version: str
    run_id: str
    requested_uri: str
    source_uri: str
    loaded_from: LoadedFrom
    loaded_at: datetime
    load_duration_seconds: float
    schema: FeatureSchema
    threshold: float
    threshold_source: str
    flavor: str
    predictor: Predictor
    labels: DecisionLabels = DecisionLabels()
    digest: str = ""  # of the bytes it was parsed from (core/artifact.ArtifactFiles.digest)
    reasons: ReasonTable | None = None  # the version's reason table (core/reasons.py), if it has one
    adverse_positive: bool = True  # the adverse decision (what reasons explain) is decision=true
    source_dir: str = ""  # the directory its files were read from (the compiled backend compiles them again)
    backend_note: str = ""  # why the configured backend does not serve (yet): compiling, or what failed

    def satisfies(self, aspired: AspiredVersion) -> bool:
        """Whether this model is what `aspired` asks for."""
        if aspired.model_name and aspired.model_name != self.name:
            return False
        if aspired.version:
            return aspired.version == self.version
        # An alias or stage is resolved at load: a cached copy does not prove where it points now.
        return aspired.model_uri == self.requested_uri and self.loaded_from is not LoadedFrom.CACHE

    def predict(self, matrix: FloatMatrix) -> np.ndarray:
        return self.predictor.predict(matrix)

    @property
    def backend(self) -> tuple[str, str]:
        """The backend serving it and its version, as status, GetModelInfo and metrics report them:
        ('lightgbm', '4.7.0'), ('compiled', 'lleaves 1.3.0, llvmlite 0.44.0'), ('pyfunc', '')."""
        return (str(getattr(self.predictor, "backend_family", self.flavor)),
                str(getattr(self.predictor, "backend_version", "")))

    @property
    def adverse_label(self) -> str:
        return self.labels.positive if self.adverse_positive else self.labels.negative
