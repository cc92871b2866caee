"""The public scoring API against a real in-process server: results and every row of the error contract."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client import ControlClient, ControlError, ScoringClient, ScoringError
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants
from tabserve_server.app import ServingApp
from tabserve_server.core.dataplane import DataPlane
from tabserve_server.metrics import ServerMetrics
from tabserve_server.transport import inference_v2
from tabserve_server.transport.edge import Edge
from tabserve_server.transport.scoring import ScoringServicer
from tests.support import server_settings, wait_for


def rows(n: int, seed: int = 3) -> np.ndarray:
    return make_applicants(n, seed=seed)[0]


def test_scores_match_the_booster_bit_for_bit_on_every_encoding(app: ServingApp, client: ScoringClient) -> None:
    matrix = rows(20)
    model = app.manager.current()
    assert model is not None
    expected = model.predictor.booster.predict(matrix)  # type: ignore[attr-defined]
    as_dicts = [dict(zip(FEATURE_NAMES, row, strict=True)) for row in matrix]
    for batch in (client.score(matrix), client.score(as_dicts)):
        assert batch.model_name == "credit-default" and batch.model_version == "1"
        np.testing.assert_array_equal(batch.scores, expected)
        np.testing.assert_array_equal(batch.decisions, expected >= batch.threshold)
    stub = scoring_pb2_grpc.ScoringStub(grpc.insecure_channel(f"127.0.0.1:{app.public_port}"))
    dense = scoring_pb2.ScoreRequest(dense=scoring_pb2.DenseRows(rows=[scoring_pb2.DenseRow(values=r) for r in matrix]))
    np.testing.assert_array_equal(np.array(stub.Score(dense).scores), expected)


def test_threshold_comes_from_the_run_parameter(client: ScoringClient) -> None:
    info = client.model_info()
    assert (info.threshold, info.threshold_source) == (0.48, "run_param:optimal_threshold")
    assert info.requested_uri == "models:/credit-default@production"
    assert info.source_uri == "models:/credit-default/1" and info.version == "1"
    assert info.loaded_from == "registry" and info.flavor == "lightgbm" and info.run_id
    assert info.feature_names == FEATURE_NAMES and {f.type for f in info.features} == {"double"}


def test_nan_means_missing_and_is_accepted(client: ScoringClient) -> None:
    matrix = np.full((2, len(FEATURE_NAMES)), np.nan)
    batch = client.score(matrix)
    assert np.isfinite(batch.scores).all() and len(batch) == 2


def _error(call: object) -> ScoringError:
    with pytest.raises(ScoringError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_wrong_feature_count_names_the_row(client: ScoringClient) -> None:
    bad = rows(3)
    err = _error(lambda: client.score([dict(zip(FEATURE_NAMES, r, strict=True)) for r in bad[:2]]
                                      + [dict(zip(FEATURE_NAMES[:-1], bad[2][:-1], strict=True))]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 2" in err.details and FEATURE_NAMES[-1] in err.details


def test_dense_row_with_wrong_length(app: ServingApp) -> None:
    stub = scoring_pb2_grpc.ScoringStub(grpc.insecure_channel(f"127.0.0.1:{app.public_port}"))
    request = scoring_pb2.ScoreRequest(dense=scoring_pb2.DenseRows(
        rows=[scoring_pb2.DenseRow(values=[0.0] * 189), scoring_pb2.DenseRow(values=[0.0] * 5)]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "row 1: has 5 values" in (caught.value.details() or "")


def test_unknown_feature_is_named(client: ScoringClient) -> None:
    row = dict(zip(FEATURE_NAMES, rows(1)[0], strict=True))
    row["shoe_size"] = 42.0
    err = _error(lambda: client.score([row]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "row 0: unknown feature 'shoe_size'" in err.details


def test_missing_feature_is_named(client: ScoringClient) -> None:
    row = dict(zip(FEATURE_NAMES, rows(1)[0], strict=True))
    del row[FEATURE_NAMES[7]]
    row["other"] = 1.0
    err = _error(lambda: client.score([row, row]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "row 0" in err.details and "'other'" in err.details
    del row["other"]
    err = _error(lambda: client.score([row]))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and f"missing feature '{FEATURE_NAMES[7]}'" in err.details


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_values_are_rejected_with_row_and_feature(client: ScoringClient, value: float) -> None:
    matrix = rows(4)
    matrix[2, 5] = value
    err = _error(lambda: client.score(matrix))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"row 2: feature '{FEATURE_NAMES[5]}'" in err.details


def test_non_numeric_payload_is_rejected(app: ServingApp) -> None:
    # The matrix path carries raw bytes: a length that is not rows x features x 8 is not numbers.
    stub = scoring_pb2_grpc.ScoringStub(grpc.insecure_channel(f"127.0.0.1:{app.public_port}"))
    request = scoring_pb2.ScoreRequest(matrix=scoring_pb2.MatrixRows(float64_le=b"not numbers", num_rows=1))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "matrix" in (caught.value.details() or "")


def test_empty_request_is_invalid(app: ServingApp, client: ScoringClient) -> None:
    assert _error(lambda: client.score([])).code == grpc.StatusCode.INVALID_ARGUMENT
    stub = scoring_pb2_grpc.ScoringStub(grpc.insecure_channel(f"127.0.0.1:{app.public_port}"))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(scoring_pb2.ScoreRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty request" in (caught.value.details() or "")


def test_unknown_model_name_or_version_is_not_found(client: ScoringClient, app: ServingApp) -> None:
    err = _error(lambda: client.score(rows(1), model_name="fraud"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "'fraud'" in err.details
    stub = scoring_pb2_grpc.ScoringStub(grpc.insecure_channel(f"127.0.0.1:{app.public_port}"))
    request = scoring_pb2.ScoreRequest(model_version="99", matrix=scoring_pb2.MatrixRows(
        float64_le=rows(1).tobytes(), num_rows=1))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "'99'" in (caught.value.details() or "")


def test_too_many_rows_and_too_many_bytes_are_resource_exhausted(tracking_uri: str, tmp_path: Path) -> None:
    app = ServingApp(server_settings(tracking_uri, tmp_path, max_rows=10, max_message_bytes=200_000),
                     registry=CollectorRegistry())
    app.start()
    try:
        wait_for(app.accepting, what="first load")
        with ScoringClient(f"127.0.0.1:{app.public_port}") as client:
            err = _error(lambda: client.score(rows(11)))
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "11 rows" in err.details
            err = _error(lambda: client.score(np.zeros((200, 189))))
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(client.score(rows(10))) == 10
    finally:
        app.stop(0)


def test_no_model_loaded_is_unavailable(tracking_uri: str, tmp_path: Path) -> None:
    app = ServingApp(server_settings(tracking_uri, tmp_path, model_uri="models:/no-such-model@production"),
                     registry=CollectorRegistry())
    app.start()
    try:
        with ScoringClient(f"127.0.0.1:{app.public_port}", timeout=3) as client:
            started = time.monotonic()
            err = _error(lambda: client.score(rows(1)))
            assert err.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started > 3 - client.retry.max_seconds  # retried until its deadline
            assert client.health() == "NOT_SERVING"
        # The client retried the one call, each attempt refused (its back-off is 50 ms doubling up to 1 s).
        refused = app.metrics.registry.get_sample_value(
            "tabserve_server_requests_total", {"method": "tabserve.scoring.v1.Scoring/Score", "code": "UNAVAILABLE"}
        )
        assert refused is not None and refused >= 4
        wait_for(lambda: app.manager.status().last_error, what="load failure recorded")
        assert "no-such-model" in app.manager.status().last_error
    finally:
        app.stop(0)


def test_unexpected_errors_are_internal_and_logged(app: ServingApp, client: ScoringClient,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    class Exploding:
        def predict(self, matrix: np.ndarray) -> np.ndarray:
            raise RuntimeError("boom")

    model = app.manager.current()
    assert model is not None
    app.manager._swap(dataclasses.replace(model, predictor=Exploding()))
    err = _error(lambda: client.score(rows(1)))
    assert err.code == grpc.StatusCode.INTERNAL and "RuntimeError" in err.details
    assert any("boom" in (r.exc_text or "") for r in caplog.records)


def test_control_requires_the_token_when_set(tracking_uri: str, tmp_path: Path) -> None:
    app = ServingApp(server_settings(tracking_uri, tmp_path, control_token="s3cret"), registry=CollectorRegistry())
    app.start()
    try:
        address = f"127.0.0.1:{app.control_port}"
        for token, code in (("", grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.PERMISSION_DENIED)):
            with ControlClient(address, token=token) as control, pytest.raises(ControlError) as caught:
                control.status()
            assert caught.value.code == code
        with ControlClient(address, token="s3cret") as control:
            assert control.status().aspired.model_uri == "models:/credit-default@production"
    finally:
        app.stop(0)


def test_metrics_count_requests_rows_and_model(app: ServingApp, client: ScoringClient) -> None:
    client.score(rows(5))
    _error(lambda: client.score([]))
    registry = app.metrics.registry
    method = "tabserve.scoring.v1.Scoring/Score"
    assert registry.get_sample_value("tabserve_server_requests_total", {"method": method, "code": "OK"}) == 1
    assert registry.get_sample_value(
        "tabserve_server_requests_total", {"method": method, "code": "INVALID_ARGUMENT"}) == 1
    assert registry.get_sample_value("tabserve_server_rows_scored_total") == 5
    assert registry.get_sample_value(
        "tabserve_server_model_info", {"model_name": "credit-default", "model_version": "1", "loaded_from": "registry"}
    ) == 1
    assert registry.get_sample_value("tabserve_server_prediction_score_count") == 5
    assert registry.get_sample_value("tabserve_server_request_duration_seconds_count", {"method": method}) == 2
    assert registry.get_sample_value("tabserve_server_requests_in_flight") == 0
    model = app.manager.current()
    assert model is not None
    assert registry.get_sample_value("tabserve_server_model_loads_total", {"result": "success"}) == 1
    assert registry.get_sample_value("tabserve_server_model_loaded_timestamp_seconds") == model.loaded_at.timestamp()
    assert registry.get_sample_value("tabserve_server_model_load_duration_seconds") == model.load_duration_seconds


# --- the server's own deadline check ------------------------------------------------------------------

STALL_SECONDS = 1.0


class _Stall(grpc.ServerInterceptor):  # type: ignore[misc]
    """Holds every call before the server's own handling starts, as a slow read or decode of a large request
    would: the caller's deadline passes before the servicer runs, so only the servicer's check can see it."""

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        inner = handler.unary_unary

        def stalled(request: Any, context: grpc.ServicerContext) -> Any:
            time.sleep(STALL_SECONDS)
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            stalled,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@contextlib.contextmanager
def _serving(app: ServingApp, stall_inside_edge: bool) -> Iterator[tuple[grpc.Channel, ServerMetrics]]:
    """The scoring and V2 servicers on the live model behind the Edge and a stall (before the Edge, or inside
    it), with metrics of their own."""
    metrics = ServerMetrics(CollectorRegistry())
    dataplane = DataPlane(app.manager, 1000, metrics.observe_scores)
    interceptors = [Edge(metrics), _Stall()] if stall_inside_edge else [_Stall(), Edge(metrics)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=interceptors)
    scoring_pb2_grpc.add_ScoringServicer_to_server(ScoringServicer(dataplane), server)
    inference_v2.pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        inference_v2.InferenceServicer(dataplane, lambda: True), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, metrics
    finally:
        server.stop(0)


@pytest.fixture
def stalled_server(app: ServingApp) -> Iterator[tuple[grpc.Channel, ServerMetrics]]:
    with _serving(app, stall_inside_edge=False) as served:
        yield served


def _score_call(channel: grpc.Channel, matrix: np.ndarray) -> Callable[[float], Any]:
    request = scoring_pb2.ScoreRequest(
        matrix=scoring_pb2.MatrixRows(float64_le=matrix.astype("<f8").tobytes(), num_rows=matrix.shape[0])
    )
    return lambda timeout: scoring_pb2_grpc.ScoringStub(channel).Score(request, timeout=timeout)


def _infer_call(channel: grpc.Channel, matrix: np.ndarray) -> Callable[[float], Any]:
    pb = inference_v2.pb
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=list(matrix.shape))
    request = pb.ModelInferRequest(inputs=[tensor], raw_input_contents=[matrix.astype("<f8").tobytes()])
    return lambda timeout: inference_v2.pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("tabserve.scoring.v1.Scoring/Score", _score_call),
        ("inference.GRPCInferenceService/ModelInfer", _infer_call),
    ],
)
def test_the_server_does_not_score_a_call_whose_deadline_has_passed(
    stalled_server: tuple[grpc.Channel, ServerMetrics],
    method: str,
    call: Callable[[grpc.Channel, np.ndarray], Callable[[float], Any]],
) -> None:
    channel, metrics = stalled_server
    send = call(channel, rows(3))
    with pytest.raises(grpc.RpcError) as caught:
        send(STALL_SECONDS / 4)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # the client's own deadline, either way

    def answered(code: str) -> float:
        return metrics.registry.get_sample_value("tabserve_server_requests_total", {"method": method, "code": code})

    # The server finishes its side after the stall: it must refuse the call, not score rows nobody waits for.
    wait_for(lambda: answered("DEADLINE_EXCEEDED") or answered("OK"), timeout=10, what="the server's answer")
    assert (answered("DEADLINE_EXCEEDED"), answered("OK")) == (1, None)
    assert metrics.registry.get_sample_value("tabserve_server_rows_scored_total") == 0
    # With time to spare, the same call through the same stall is scored.
    send(STALL_SECONDS * 10)
    assert answered("OK") == 1
    assert metrics.registry.get_sample_value("tabserve_server_rows_scored_total") == 3


def test_requests_in_flight_counts_a_call_while_it_runs(app: ServingApp) -> None:
    with _serving(app, stall_inside_edge=True) as (channel, metrics):
        call = scoring_pb2_grpc.ScoringStub(channel).Score.future(
            scoring_pb2.ScoreRequest(dense=scoring_pb2.DenseRows(rows=[scoring_pb2.DenseRow(values=rows(1)[0])])),
            timeout=STALL_SECONDS * 10,
        )

        def in_flight() -> float | None:
            return metrics.registry.get_sample_value("tabserve_server_requests_in_flight")

        wait_for(lambda: in_flight() == 1, timeout=STALL_SECONDS / 2, interval=0.01, what="the call in flight")
        assert len(call.result().scores) == 1
        assert in_flight() == 0
