"""The Open Inference Protocol (KServe V2) front through the project's own grpc stack: typed tensor contents, one
live-model lookup per call, health and reflection, the stubs' namespace, and readiness while no model is served
(test_inference_v2.py drives the front with the real tritonclient).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import CollectorRegistry

from tabserve.inference.v2 import open_inference_grpc_pb2 as pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from tabserve_client import ScoringClient
from tabserve_demo.applicants import make_applicants
from tabserve_server.app import ServingApp
from tabserve_server.transport.inference_v2 import SERVICE_NAME
from tests.support import MODEL_NAME, server_settings, wait_for

SERVICE = "inference.GRPCInferenceService"


def test_typed_contents_fp64_and_fp32(app: ServingApp, client: ScoringClient) -> None:
    matrix = make_applicants(3, seed=5)[0]
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{app.public_port}"))
    shape = list(matrix.shape)
    tensor = pb.ModelInferRequest.InferInputTensor
    contents = pb.InferTensorContents
    fp64 = stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[
        tensor(name="input", datatype="FP64", shape=shape, contents=contents(fp64_contents=matrix.ravel()))
    ]))
    fp32 = stub.ModelInfer(pb.ModelInferRequest(inputs=[
        tensor(name="input", datatype="FP32", shape=shape, contents=contents(fp32_contents=matrix.ravel()))
    ]))
    assert [o.name for o in fp64.outputs] == ["score", "decision"] and fp64.model_version == "1"
    np.testing.assert_array_equal(np.frombuffer(fp64.raw_output_contents[0], "<f8"), client.score(matrix).scores)
    as_fp32 = matrix.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(np.frombuffer(fp32.raw_output_contents[0], "<f8"), client.score(as_fp32).scores)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(pb.ModelInferRequest(inputs=[
            tensor(name="input", datatype="FP64", shape=shape, contents=contents(fp64_contents=[1.0]))
        ]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'input'" in (caught.value.details() or "")


def test_model_infer_looks_the_live_model_up_once(app: ServingApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are decoded against the version captured first, and the call runs on it: one lookup per call."""
    lookups: list[int] = []
    current = app.manager.current

    def counted() -> Any:
        lookups.append(1)
        return current()

    monkeypatch.setattr(app.manager, "current", counted)
    matrix = make_applicants(1, seed=3)[0]
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{app.public_port}"))
    request = pb.ModelInferRequest(model_name=MODEL_NAME, raw_input_contents=[matrix.tobytes()])
    request.inputs.add(name="input-0", datatype="FP64", shape=list(matrix.shape))
    assert stub.ModelInfer(request).model_version == "1"
    assert len(lookups) == 1


def test_health_and_reflection_list_the_inference_service(app: ServingApp) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{app.public_port}")
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE, "tabserve.scoring.v1.Scoring", "grpc.health.v1.Health"} <= services
    assert ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(SERVICE).package == "inference"


def test_stubs_live_under_the_project_namespace_with_the_protocols_wire_names() -> None:
    # A top-level `inference` would collide with another distribution of that name; the wire names
    # must not move with the Python package, or tritonclient and every V2 client would break.
    assert importlib.util.find_spec("inference") is None
    assert pb.__name__ == "tabserve.inference.v2.open_inference_grpc_pb2"
    assert pb.DESCRIPTOR.package == "inference"
    assert SERVICE_NAME == SERVICE
    assert {m.full_name for m in pb.DESCRIPTOR.message_types_by_name.values()} >= {
        "inference.ModelInferRequest", "inference.ModelInferResponse", "inference.ModelMetadataResponse",
    }
    assert all(m.full_name.startswith("inference.") for m in pb.DESCRIPTOR.message_types_by_name.values())


@pytest.fixture
def unloaded_app(tracking_uri: str, tmp_path: Path) -> Any:
    """A server whose model never loads (no such version, empty cache): health NOT_SERVING."""
    settings = server_settings(tracking_uri, tmp_path / "cache", model_uri=f"models:/{MODEL_NAME}/99")
    serving = ServingApp(settings, registry=CollectorRegistry())
    serving.start()
    try:
        wait_for(lambda: serving.manager.status().last_error, what="a failed load")
        yield serving
    finally:
        serving.stop(1.0)


def _not_ready(call: Any) -> bool:
    """ready=false, or UNAVAILABLE from the Edge, which drains every non-health method while not serving."""
    try:
        return not call().ready
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[no-any-return]


def test_readiness_agrees_with_health_before_a_model_loads(unloaded_app: ServingApp) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{unloaded_app.public_port}")
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert _not_ready(lambda: stub.ServerReady(pb.ServerReadyRequest()))
    assert _not_ready(lambda: stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME)))


def test_server_live_and_ready_false_while_not_serving(unloaded_app: ServingApp) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"127.0.0.1:{unloaded_app.public_port}"))
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert not stub.ServerReady(pb.ServerReadyRequest()).ready

