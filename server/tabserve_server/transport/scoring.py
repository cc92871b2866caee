"""tabserve.scoring.v1.Scoring: translate messages to the data plane and back, nothing more."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_server.core.dataplane import DataPlane, Explanations, RowBatch, ScoreResult
from tabserve_server.core.model import LoadedFrom
from tabserve_server.core.reasons import DEFAULT_TOP_K, ExplainOptions
from tabserve_server.errors import InvalidInput
from tabserve_server.transport.edge import check_deadline
from tabserve_server.transport.identity import request_context

_LOADED_FROM = {
    LoadedFrom.REGISTRY: scoring_pb2.LOADED_FROM_REGISTRY,
    LoadedFrom.CACHE: scoring_pb2.LOADED_FROM_CACHE,
    LoadedFrom.LOCAL: scoring_pb2.LOADED_FROM_LOCAL,
}


def decode_rows(request: Any) -> RowBatch:
    which = request.WhichOneof("rows")
    if which == "dense":
        return RowBatch(dense=[row.values for row in request.dense.rows])
    if which == "matrix":
        return RowBatch(matrix_bytes=request.matrix.float64_le, num_rows=request.matrix.num_rows)
    if which == "named":
        return RowBatch(named=[row.features for row in request.named.rows])
    raise InvalidInput("empty request: set named, dense or matrix rows")


def decode_explain(request: Any) -> ExplainOptions | None:
    if not request.HasField("explain"):
        return None
    return ExplainOptions(top_k=request.explain.top_k or DEFAULT_TOP_K, all_rows=request.explain.all_rows)


def encode_scores(result: ScoreResult, packed: bool) -> dict[str, Any]:
    """The ScoreResponse fields of the scores and decisions: packed bytes when the request asked for them, else
    the repeated fields (every client before packed_response)."""
    if packed:
        # The arrays' own buffers, little-endian: one copy into bytes, no Python object per value.
        return {"packed_scores": result.scores.astype("<f8", copy=False).tobytes(),
                "packed_decisions": result.decisions.astype(np.bool_, copy=False).tobytes()}
    return {"scores": result.scores.tolist(), "decisions": result.decisions.tolist()}


def encode_explanations(explanations: Explanations | None) -> dict[str, Any]:
    """The ScoreResponse fields of `explanations` (none when the request asked for none)."""
    if explanations is None:
        return {}
    rows = [
        scoring_pb2.RowExplanation(row=row.row, reasons=[
            scoring_pb2.Reason(feature=r.feature, value=r.value, contribution=r.contribution, code=r.code,
                               text=r.text)
            for r in row.reasons
        ])
        for row in explanations.rows
    ]
    return {"explanations": rows, "expected_value": explanations.expected_value}


class ScoringServicer(scoring_pb2_grpc.ScoringServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    def Score(self, request: Any, context: grpc.ServicerContext) -> Any:
        batch = decode_rows(request)
        check_deadline(context)
        result = self._dataplane.score(
            batch, request.model_name, request.model_version, request_context(context), decode_explain(request)
        )
        return scoring_pb2.ScoreResponse(
            model_name=result.model.name,
            model_version=result.model.version,
            threshold=result.threshold,
            **encode_scores(result, request.packed_response),
            **encode_explanations(result.explanations),
        )

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._dataplane.model()
        loaded_at = Timestamp()
        loaded_at.FromDatetime(model.loaded_at)
        return scoring_pb2.ModelInfo(
            name=model.name,
            version=model.version,
            run_id=model.run_id,
            requested_uri=model.requested_uri,
            source_uri=model.source_uri,
            loaded_from=_LOADED_FROM[model.loaded_from],
            loaded_at=loaded_at,
            load_duration_seconds=model.load_duration_seconds,
            features=[scoring_pb2.Feature(name=f.name, type=f.type) for f in model.schema.features],
            threshold=model.threshold,
            threshold_source=model.threshold_source,
            flavor=model.flavor,
            positive_label=model.labels.positive,
            negative_label=model.labels.negative,
            adverse_label=model.adverse_label,
            has_reason_table=model.reasons is not None,
            digest=model.digest,
            backend=model.backend[0],
            backend_version=model.backend[1],
        )
