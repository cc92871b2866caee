"""OpenTelemetry tracing (`tracing`): with the SDK's in-memory exporter in process, server spans of both fronts
with the caller's trace as parent, the request id, the model version and the status; none for health; no
interceptor at all when off. Then a real two-worker server exporting over OTLP/gRPC to a receiver in this test
(the opentelemetry-proto stubs), each worker with its own provider."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from tabserve.inference.v2 import open_inference_grpc_pb2 as v2_pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as v2_grpc
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_demo.applicants import make_applicants
from tabserve_server.app import ServingApp
from tabserve_server.transport.edge import Edge
from tests.support import MODEL_NAME, Server, loopback_servicer, running_app, server_settings, wait_for

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SCORE = "/tabserve.scoring.v1.Scoring/Score"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def _traceparent(span_id: str) -> tuple[str, str]:
    return ("traceparent", f"00-{TRACE_ID}-{span_id}-01")


def _score(channel: grpc.Channel, metadata: Any, rows: int = 1) -> None:
    matrix = make_applicants(rows, seed=5)[0]
    request = scoring_pb2.ScoreRequest(matrix=scoring_pb2.MatrixRows(float64_le=matrix.tobytes(), num_rows=rows))
    scoring_pb2_grpc.ScoringStub(channel).Score(request, metadata=metadata, timeout=10)


def _infer(channel: grpc.Channel, metadata: Any, matrix: np.ndarray) -> None:
    tensor = v2_pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=list(matrix.shape))
    request = v2_pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor], raw_input_contents=[matrix.tobytes()])
    v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata, timeout=10)


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def traced(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory, exporter: InMemorySpanExporter
           ) -> Iterator[ServingApp]:
    settings = server_settings(tracking_uri, tmp_path_factory.mktemp("tracing-cache"), tracing=True)
    app = ServingApp(settings, registry=CollectorRegistry(), span_exporter=exporter)
    app.start()
    try:
        wait_for(lambda: app.manager.current() is not None and app.accepting(), timeout=60, what="first model load")
        yield app
    finally:
        app.stop(1.0)


def _spans(app: ServingApp, exporter: InMemorySpanExporter, name: str, request_id: str) -> list[ReadableSpan]:
    assert app.tracing is not None
    app.tracing.traces.force_flush()
    return [s for s in exporter.get_finished_spans()
            if s.name == name and (s.attributes or {}).get("tabserve.request_id") == request_id]


def test_a_call_is_a_server_span_under_the_callers_trace(traced: ServingApp, exporter: InMemorySpanExporter) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{traced.public_port}") as channel:
        _score(channel, (_traceparent("b7ad6b7169203331"), ("x-request-id", "trace-score")))
        _infer(channel, (_traceparent("00f067aa0ba902b7"), ("x-request-id", "trace-v2")), make_applicants(2)[0])
    for name, request_id, parent in ((SCORE, "trace-score", "b7ad6b7169203331"), (INFER, "trace-v2",
                                                                                   "00f067aa0ba902b7")):
        (span,) = _spans(traced, exporter, name, request_id)
        assert span.kind is SpanKind.SERVER and span.parent is not None and span.parent.is_remote
        assert f"{span.context.trace_id:032x}" == TRACE_ID and f"{span.parent.span_id:016x}" == parent
        attributes = span.attributes or {}
        assert attributes["tabserve.model.name"] == MODEL_NAME and attributes["tabserve.model.version"] == "1"
        assert attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
        assert span.resource.attributes["service.name"] == "tabserve-server"
        assert span.resource.attributes["tabserve.process"] == "server"


def test_a_refused_call_has_its_status_and_request_id_and_no_caller_trace_makes_a_root(
    traced: ServingApp, exporter: InMemorySpanExporter
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{traced.public_port}") as channel:
        with pytest.raises(grpc.RpcError):
            _infer(channel, (("x-request-id", "trace-bad"),), np.zeros((1, 3)))
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    (span,) = _spans(traced, exporter, INFER, "trace-bad")
    assert span.parent is None
    assert span.status.status_code is StatusCode.UNSET  # OpenTelemetry's convention: a caller's mistake, no error
    assert (span.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "tabserve.model.version" not in (span.attributes or {})
    assert not [s for s in exporter.get_finished_spans() if "grpc.health" in s.name]


def test_off_installs_nothing(tracking_uri: str, tmp_path: Path) -> None:
    with running_app(server_settings(tracking_uri, tmp_path / "cache")) as app:
        assert app.tracing is None
        # grpcio's own record of the listener's interceptors: the Edge alone.
        interceptors = app._public._state.interceptor_pipeline.interceptors
        assert [type(i) for i in interceptors] == [Edge]


def test_the_instrumentation_keeps_the_thread_pool_a_behaviour_names(traced: ServingApp) -> None:
    """The Edge answers load refusals on gRPC's polling thread by naming a pool on the behaviour; traced, it still
    does (the instrumentation's wrapper alone would drop the name and send refusals through the worker pool)."""
    assert traced.tracing is not None
    pool = futures.ThreadPoolExecutor(max_workers=1)
    refuse = lambda requests, context: None  # noqa: E731
    refuse.experimental_thread_pool = pool  # type: ignore[attr-defined]
    handler = grpc.stream_unary_rpc_method_handler(refuse)
    details = type("Details", (), {"method": SCORE, "invocation_metadata": ()})()
    wrapped = traced.tracing.spans().intercept_service(lambda _: handler, details)
    assert wrapped is not handler and wrapped.stream_unary.experimental_thread_pool is pool
    pool.shutdown()


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """An OTLP/gRPC trace receiver on loopback: keeps every exported request."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, str], Any]]:
        """(resource attributes, span) of every span received."""
        found = []
        with self.lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    found += [(resource, s) for scope in resource_spans.scope_spans for s in scope.spans]
        return found


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    received = Receiver()
    with loopback_servicer(trace_service_pb2_grpc.add_TraceServiceServicer_to_server, received) as port:
        yield received, port


def test_every_worker_exports_its_spans_over_otlp(tracking_uri: str, tmp_path: Path,
                                                  receiver: tuple[Receiver, int]) -> None:
    received, port = receiver
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_SERVICE_NAME": "scoring-eu"}
    server = Server(server_settings(tracking_uri, tmp_path / "cache", workers=2, tracing=True), extra_env=env)
    try:
        wait_for(lambda: server.settled_on("1"), timeout=120, interval=0.2, what="both workers serve version 1")
        for i in range(30):  # each over a new connection, so both workers take some (2**-29 that one takes none)
            with grpc.insecure_channel(server.target) as channel:
                _score(channel, (_traceparent(f"{i + 1:016x}"), ("x-request-id", f"otlp-{i}")))

        def exported() -> list[tuple[dict[str, str], Any]]:
            spans = [(r, s) for r, s in received.spans() if s.name == SCORE]
            return spans if len(spans) == 30 else []

        spans = wait_for(exported, timeout=30, what="30 Score spans at the receiver")
    finally:
        server.close()
    assert {r["tabserve.process"] for r, _ in spans} == {"worker-0", "worker-1"}
    assert {r["service.name"] for r, _ in spans} == {"scoring-eu"}
    for _, span in spans:
        assert span.trace_id.hex() == TRACE_ID and span.kind == span.SPAN_KIND_SERVER
        attributes = {a.key: a.value.string_value for a in span.attributes}
        i = int(attributes["tabserve.request_id"].removeprefix("otlp-"))
        assert span.parent_span_id.hex() == f"{i + 1:016x}" and attributes["tabserve.model.version"] == "1"
