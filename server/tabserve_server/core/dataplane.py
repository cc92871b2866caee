"""The data plane shared by every protocol front: capture the live version, validate, predict, decide, explain.

A transport decodes its request into a `RowBatch` and calls `score()`; everything after that (schema
validation, limits, prediction, threshold, reasons for the explained rows) happens here, on the one model
version captured at the start.

Every answered call is handed to the `record` hook (the decision log, decisions/record.py) with its request,
its validated rows and its result, after the result is complete and before the transport answers: a hook that
raises (required mode, the record could not be written) fails the call instead.

Limits: a request weighs its rows plus EXPLAIN_ROW_COST per explained row against max_rows (exact TreeSHAP
costs about 70 predictions a row). Explaining every row is weighed before predicting; explaining adverse rows
only, once the decisions say how many there are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tabserve_server.core.manager import ModelManager
from tabserve_server.core.model import Explainer, LoadedModel
from tabserve_server.core.reasons import ExplainOptions, RowExplanation, explain_rows, request_cost, rows_to_explain
from tabserve_server.core.schema import FloatMatrix
from tabserve_server.errors import InvalidInput, ModelNotFound, ModelUnavailable, RequestTooLarge

# What one explained row weighs against max_rows, in rows (see the module docstring).
EXPLAIN_ROW_COST = 70


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
    `peer`: the caller's address as gRPC reports it (`ipv4:127.0.0.1:40212`). `request_id`: the call's request
    id (transport/request_id.py).
    """

    caller: str = ""
    peer: str = ""
    request_id: str = ""


UNKNOWN_CALLER = RequestContext()


@dataclass(frozen=True)
class Explanations:
    """Reasons for the explained rows, and the model's expected value (margin space) they start from."""

    expected_value: float
    rows: Sequence[RowExplanation]


@dataclass(frozen=True)
class ScoreResult:
    model: LoadedModel
    scores: np.ndarray  # float64 per row
    decisions: np.ndarray  # bool per row
    explanations: Explanations | None = None

    @property
    def threshold(self) -> float:
        return self.model.threshold


def explain_chosen(model: LoadedModel, matrix: FloatMatrix, chosen: Sequence[int], top_k: int) -> Explanations:
    """The reasons of rows `chosen` of `matrix` (a LightGBM model's), and the expected value."""
    explainer: Explainer = model.predictor  # type: ignore[assignment]
    # Rows not explained still give the expected value, from the one row computed for it.
    contributions = explainer.contributions(matrix[list(chosen)] if chosen else matrix[:1])
    explained = explain_rows(
        chosen, matrix, contributions[:, :-1], names=model.schema.names, table=model.reasons,
        adverse_positive=model.adverse_positive, top_k=top_k,
    ) if chosen else []
    return Explanations(float(contributions[0, -1]), explained)


ScoreObserver = Callable[[np.ndarray], None]
# The decision log's hook: (request, validated rows, result, explain options asked) of every answered call.
DecisionRecorder = Callable[[RequestContext, FloatMatrix, ScoreResult, ExplainOptions | None], None]


class DataPlane:
    def __init__(
        self, manager: ModelManager, max_rows: int, observe_scores: ScoreObserver | None = None,
        explain_row_cost: int = EXPLAIN_ROW_COST, record: DecisionRecorder | None = None,
    ) -> None:
        self._manager = manager
        self._record = record
        self._max_rows = max_rows
        self._observe = observe_scores
        self._explain_row_cost = explain_row_cost

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
        self, batch: RowBatch, name: str = "", version: str = "", request: RequestContext = UNKNOWN_CALLER,
        explain: ExplainOptions | None = None,
    ) -> ScoreResult:
        """Score `batch` on the live version (checked against `name`/`version`) for the caller in `request`;
        with `explain`, give the reasons of the rows it asks for."""
        return self.score_on(self.model(name, version), batch, request, explain)

    def score_on(
        self, model: LoadedModel, batch: RowBatch, request: RequestContext = UNKNOWN_CALLER,
        explain: ExplainOptions | None = None,
    ) -> ScoreResult:
        """`score` on `model`, a version the transport already captured with `model()` (to decode its request
        against that version's schema): the call runs on it, and the live model is looked up once per call."""
        rows = batch.row_count()
        if explain is not None:
            explain = explain.checked()
        self._check_cost(rows, rows if explain is not None and explain.all_rows else 0)
        matrix = batch.to_matrix(model)
        result = self.predict(model, matrix)
        if explain is not None:
            result = ScoreResult(model, result.scores, result.decisions, self.explain(model, matrix, result, explain))
        if self._record is not None:
            self._record(request, matrix, result, explain)
        return result

    def explain(self, model: LoadedModel, matrix: FloatMatrix, result: ScoreResult, options: ExplainOptions
                ) -> Explanations:
        """Exact TreeSHAP reasons for the rows `options` asks for (core/reasons.py says which and in what order)."""
        if not hasattr(model.predictor, "contributions"):
            raise InvalidInput(f"explanations need a LightGBM model; {model.name} version {model.version} "
                               f"is served through {model.flavor}")
        chosen = rows_to_explain(result.decisions, model.adverse_positive, options.all_rows)
        self._check_cost(len(result.scores), len(chosen))
        return explain_chosen(model, matrix, chosen, options.top_k)

    def _check_cost(self, rows: int, explained: int) -> None:
        cost = request_cost(rows, explained, self._explain_row_cost)
        if cost <= self._max_rows:
            return
        if not explained:
            raise RequestTooLarge(f"{rows} rows in one request, the limit is {self._max_rows}")
        raise RequestTooLarge(f"{rows} rows and {explained} explained rows (each weighs {self._explain_row_cost} "
                              f"rows) in one request weigh {cost} rows, the limit is {self._max_rows}")

    def predict(self, model: LoadedModel, matrix: FloatMatrix) -> ScoreResult:
        scores = model.predict(matrix)
        if self._observe is not None:
            self._observe(scores)
        return ScoreResult(model, scores, scores >= model.threshold)
