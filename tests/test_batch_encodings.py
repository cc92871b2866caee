"""The batch encodings against a real in-process server: packed scores (ScoreRequest.packed_response) beside the
repeated fields, the client library's use of both, refusals of malformed packed rows, rows decoded without a
copy, and decision records identical whichever encoding carried the rows."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tabserve.inference.v2 import open_inference_grpc_pb2 as pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client import ScoringClient, ScoringError
from tabserve_client.client import _scores
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants
from tabserve_server.app import ServingApp
from tabserve_server.core.model import LoadedModel
from tabserve_server.decisions.record import decision_records
from tabserve_server.transport.inference_v2 import decode_inputs
from tabserve_server.transport.scoring import decode_rows
from tests.support import running_app, server_settings, wait_for

ROWS = make_applicants(40, seed=5)[0]  # the demo's applicants: some values missing (NaN)


@pytest.fixture(scope="module")
def served(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServingApp, Path]]:
    """An in-process server in its production configuration (decision log on, input digests)."""
    root = tmp_path_factory.mktemp("encodings")
    with running_app(server_settings(tracking_uri, root / "cache", decision_log_dir=str(root / "log"))) as app:
        yield app, root / "log"


@pytest.fixture(scope="module")
def channel(served: tuple[ServingApp, Path]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{served[0].public_port}") as opened:
        yield opened


def _model(app: ServingApp) -> LoadedModel:
    model = app.manager.current()
    assert model is not None
    return model


def _expected(app: ServingApp, rows: np.ndarray) -> np.ndarray:
    return np.asarray(_model(app).predictor.booster.predict(rows), dtype=np.float64)  # type: ignore[attr-defined]


def _matrix_request(rows: np.ndarray, **fields: Any) -> Any:
    return scoring_pb2.ScoreRequest(
        matrix=scoring_pb2.MatrixRows(float64_le=rows.astype("<f8").tobytes(), num_rows=rows.shape[0]), **fields
    )


def test_packed_response_carries_the_scores_bit_for_bit_and_leaves_the_repeated_fields_empty(
    served: tuple[ServingApp, Path], channel: grpc.Channel
) -> None:
    app, _ = served
    stub = scoring_pb2_grpc.ScoringStub(channel)
    for rows in (ROWS, ROWS[:1]):  # a batch, and one row (the single-row fast path)
        response = stub.Score(_matrix_request(rows, packed_response=True), timeout=10)
        expected = _expected(app, rows)
        assert len(response.packed_scores) == 8 * len(rows) and len(response.packed_decisions) == len(rows)
        np.testing.assert_array_equal(np.frombuffer(response.packed_scores, dtype="<f8"), expected)
        assert response.packed_decisions == (expected >= response.threshold).astype(np.uint8).tobytes()
        assert not response.scores and not response.decisions


def test_a_request_without_packed_response_gets_the_repeated_fields_as_before(
    served: tuple[ServingApp, Path], channel: grpc.Channel
) -> None:
    app, _ = served
    response = scoring_pb2_grpc.ScoringStub(channel).Score(_matrix_request(ROWS), timeout=10)
    expected = _expected(app, ROWS)
    np.testing.assert_array_equal(np.array(response.scores), expected)
    assert list(response.decisions) == (expected >= response.threshold).tolist()
    assert not response.packed_scores and not response.packed_decisions


class _Responses(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Keeps every response the channel receives."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        self.seen.append(outcome.result())
        return outcome


def test_the_client_asks_for_packed_scores_and_reads_them(served: tuple[ServingApp, Path]) -> None:
    app, _ = served
    responses = _Responses()
    with grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{app.public_port}"), responses) as channel, \
            ScoringClient(channel=channel) as client:
        as_dicts = [dict(zip(FEATURE_NAMES, row, strict=True)) for row in ROWS[:3]]
        batches = [client.score(ROWS), client.score(as_dicts),
                   client.score(ROWS[:10], explain=True, explain_all_rows=True)]
    for batch, rows in zip(batches, (ROWS, ROWS[:3], ROWS[:10]), strict=True):
        np.testing.assert_array_equal(batch.scores, _expected(app, rows))
        np.testing.assert_array_equal(batch.decisions, batch.scores >= batch.threshold)
        assert batch.scores.dtype == np.float64 and batch.decisions.dtype == np.bool_
        assert batch.scores.flags.writeable and batch.decisions.flags.writeable  # as before packed scores
    assert batches[2].reasons and batches[2].expected_value is not None
    assert [len(r.packed_scores) for r in responses.seen] == [8 * 40, 8 * 3, 8 * 10]
    assert not any(r.scores for r in responses.seen)


class _OlderScoring(scoring_pb2_grpc.ScoringServicer):
    """A server from before packed_response: the field is unknown to it, so it answers with the repeated fields."""

    def Score(self, request: Any, context: grpc.ServicerContext) -> Any:
        return scoring_pb2.ScoreResponse(model_name="m", model_version="1", threshold=0.5,
                                         scores=[0.25, 0.75], decisions=[False, True])


def test_the_client_reads_the_repeated_fields_of_an_older_server() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    scoring_pb2_grpc.add_ScoringServicer_to_server(_OlderScoring(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ScoringClient(f"127.0.0.1:{port}") as client:
            batch = client.score(ROWS[:2])
    finally:
        server.stop(None)
    np.testing.assert_array_equal(batch.scores, [0.25, 0.75])
    np.testing.assert_array_equal(batch.decisions, [False, True])


def test_the_client_refuses_packed_scores_of_the_wrong_length() -> None:
    response = scoring_pb2.ScoreResponse(packed_scores=b"\0" * 16, packed_decisions=b"\1")
    with pytest.raises(ScoringError) as caught:
        _scores(response)
    assert caught.value.code == grpc.StatusCode.INTERNAL and "16 bytes of packed scores" in caught.value.details


@pytest.mark.parametrize("packed", [False, True])
def test_malformed_packed_rows_are_refused_naming_the_problem(channel: grpc.Channel, packed: bool) -> None:
    stub = scoring_pb2_grpc.ScoringStub(channel)
    short = scoring_pb2.ScoreRequest(packed_response=packed, matrix=scoring_pb2.MatrixRows(
        float64_le=ROWS[:2].astype("<f8").tobytes(), num_rows=3))
    infinite = ROWS[:4].copy()
    infinite[3, 7] = -np.inf
    cases = [
        (short, f"matrix: {2 * 189 * 8} bytes for 3 rows x 189 features, expected {3 * 189 * 8}"),
        (_matrix_request(infinite, packed_response=packed), f"row 3: feature '{FEATURE_NAMES[7]}' is -inf"),
        (_matrix_request(ROWS[:0], packed_response=packed), "empty request"),
    ]
    for request, words in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Score(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (caught.value.details() or "")


def test_packed_rows_reach_the_predictor_without_a_copy(served: tuple[ServingApp, Path]) -> None:
    model = _model(served[0])
    raw = ROWS.astype("<f8").tobytes()
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=list(ROWS.shape))
    decoded = [
        decode_rows(_matrix_request(ROWS)).to_matrix(model),
        decode_inputs(pb.ModelInferRequest(inputs=[tensor], raw_input_contents=[raw]), model).to_matrix(model),
    ]
    for matrix in decoded:
        # A view of the request's bytes (read-only, owning nothing), not a copy of its values.
        assert not matrix.flags.owndata and not matrix.flags.writeable
        np.testing.assert_array_equal(matrix, ROWS)


def _v2_request(rows: np.ndarray, raw: bool) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=list(rows.shape))
    if raw:
        return pb.ModelInferRequest(inputs=[tensor], raw_input_contents=[rows.astype("<f8").tobytes()])
    tensor.contents.fp64_contents.extend(rows.reshape(-1).tolist())
    return pb.ModelInferRequest(inputs=[tensor])


def test_decision_records_are_identical_whichever_encoding_carried_the_rows(
    served: tuple[ServingApp, Path], channel: grpc.Channel
) -> None:
    _, log = served
    rows = ROWS[:6]
    scoring, inference = scoring_pb2_grpc.ScoringStub(channel), pb_grpc.GRPCInferenceServiceStub(channel)
    dense = scoring_pb2.ScoreRequest(dense=scoring_pb2.DenseRows(rows=[scoring_pb2.DenseRow(values=r) for r in rows]))
    named = scoring_pb2.ScoreRequest(named=scoring_pb2.NamedRows(rows=[
        scoring_pb2.NamedRow(features=dict(zip(FEATURE_NAMES, r, strict=True))) for r in rows]))
    calls = {
        "named": lambda m: scoring.Score(named, metadata=m),
        "dense": lambda m: scoring.Score(dense, metadata=m),
        "matrix": lambda m: scoring.Score(_matrix_request(rows), metadata=m),
        "matrix-packed": lambda m: scoring.Score(_matrix_request(rows, packed_response=True), metadata=m),
        "v2-raw": lambda m: inference.ModelInfer(_v2_request(rows, raw=True), metadata=m),
        "v2-typed": lambda m: inference.ModelInfer(_v2_request(rows, raw=False), metadata=m),
    }
    for name, call in calls.items():
        call((("x-request-id", f"encoding-{name}"),))
    ids = {f"encoding-{name}" for name in calls}
    records = wait_for(lambda: (found := [r for _, r in decision_records(log) if r["request_id"] in ids])
                       and len(found) == len(ids) and found, timeout=10, what="a record per encoding")
    digests = [hashlib.sha256(row.astype("<f8").tobytes()).hexdigest() for row in rows]
    assert [row["input_sha256"] for row in records[0]["rows"]] == digests
    assert all(record["rows"] == records[0]["rows"] for record in records)
