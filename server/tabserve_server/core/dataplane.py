"""The data plane shared by every protocol front: capture the live version, validate, predict, decide.

A transport decodes its request into a `RowBatch` and calls `score()`; everything after that (schema
validation, limits, prediction, threshold) happens here, on the one model version captured at the start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tabserve_server.core.manager import ModelManager
from tabserve_server.core.model import LoadedModel
from tabserve_server.core.schema import FloatMatrix
from tabserve_server.errors import ModelNotFound, ModelUnavailable, RequestTooLarge


@dataclass(frozen=True)
class RowBatch:
    """Rows as decoded by a transport; exactly one of the encodings is set."""

    named: Sequence[Mapping[str, float]] | None = None
    dense: Sequence[Sequence[float]] | None = None
    matrix_bytes: bytes | None = None
    columns: Mapping[str, np.ndarray] | None = None
    num_rows: int = 0  # for matrix_bytes
    matrix: np.ndarray | None = None  # an already decoded [rows, features] array

    def to_matrix(self, model: LoadedModel) -> FloatMatrix:
        schema = model.schema
        if self.matrix is not None:
            return schema.checked(self.matrix)
        if self.matrix_bytes is not None:
            return schema.matrix_from_bytes(self.matrix_bytes, self.num_rows)
        if self.dense is not None:
            return schema.matrix_from_dense(self.dense)
        if self.columns is not None:
            return schema.matrix_from_columns(self.columns)
        return schema.matrix_from_named(self.named or ())

    def row_count(self) -> int:
        if self.matrix is not None:
            return int(self.matrix.shape[0]) if self.matrix.ndim else 0
        if self.matrix_bytes is not None:
            return self.num_rows
        if self.dense is not None:
            return len(self.dense)
        if self.columns is not None:
            return max((len(c) for c in self.columns.values()), default=0)
        return len(self.named or ())


@dataclass(frozen=True)
class RequestContext:
    """What the transport knows about one call besides its rows.

    `caller`: the calling service's identity, its client certificate's first subject alternative name under
    mutual TLS ('' when unknown). For logs, and for the per-caller records and limits built on the data plane.
    """

    caller: str = ""


UNKNOWN_CALLER = RequestContext()


@dataclass(frozen=True)
class ScoreResult:
    model: LoadedModel
    scores: np.ndarray  # float64 per row
    decisions: np.ndarray  # bool per row

    @property
    def threshold(self) -> float:
        return self.model.threshold


ScoreObserver = Callable[[np.ndarray], None]


class DataPlane:
    def __init__(self, manager: ModelManager, max_rows: int, observe_scores: ScoreObserver | None = None) -> None:
        self._manager = manager
        self._max_rows = max_rows
        self._observe = observe_scores

    def model(self, name: str = "", version: str = "") -> LoadedModel:
        """The live model, checked against the name/version a caller asked for (empty: any)."""
        model = self._manager.current()
        if model is None:
            raise ModelUnavailable("no model is loaded yet; retry later")
        if name and name != model.name:
            raise ModelNotFound(f"model {name!r} is not served here (serving {model.name!r})")
        if version and version != model.version:
            raise ModelNotFound(f"model {model.name!r} version {version!r} is not served (serving {model.version!r})")
        return model

    def score(
        self, batch: RowBatch, name: str = "", version: str = "", request: RequestContext = UNKNOWN_CALLER
    ) -> ScoreResult:
        """Score `batch` on the live version (checked against `name`/`version`) for the caller in `request`."""
        model = self.model(name, version)
        rows = batch.row_count()
        if rows > self._max_rows:
            raise RequestTooLarge(f"{rows} rows in one request, the limit is {self._max_rows}")
        matrix = batch.to_matrix(model)
        return self.predict(model, matrix)

    def predict(self, model: LoadedModel, matrix: FloatMatrix) -> ScoreResult:
        scores = model.predict(matrix)
        if self._observe is not None:
            self._observe(scores)
        return ScoreResult(model, scores, scores >= model.threshold)
