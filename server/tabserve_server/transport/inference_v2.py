"""inference.GRPCInferenceService (Open Inference Protocol, KServe V2): a second thin translator over DataPlane.

Decodes tensors into a `RowBatch` and encodes the `ScoreResult`; validation, limits, prediction and the
threshold all stay in the data plane. Every malformed request raises a core error (the Edge maps it).

Tensors the model accepts (FP64 or FP32, as `raw_input_contents` little-endian or as typed contents):
- a single tensor under any name that is not a feature's (ModelMetadata advertises `input`; MLServer clients
  send `input-0`), shape `[rows, features]`, row-major, features in the model's order; or
- one tensor per feature, named as the feature, shape `[rows]` or `[rows, 1]` (not listed in the
  metadata, which advertises the `input` form only).
Anything else (two tensors that are not features, a feature given twice) is refused naming both forms.
Outputs: `score` (FP64 `[rows]`) and `decision` (BOOL `[rows]`: score >= threshold), always as
`raw_output_contents`. ModelMetadata's `parameters` name the version's decision labels (what true and false mean),
the adverse one, and whether the version has a reason table. Reason codes: request parameters and extra
outputs, in inference_v2_reasons.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc
import numpy as np

from tabserve.inference.v2 import open_inference_grpc_pb2 as pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from tabserve_server.core.dataplane import DataPlane, RowBatch, ScoreResult
from tabserve_server.core.model import LoadedModel
from tabserve_server.errors import InvalidInput, ModelUnavailable
from tabserve_server.transport.edge import check_deadline
from tabserve_server.transport.identity import request_context
from tabserve_server.transport.inference_v2_reasons import REASON_OUTPUTS, encode_reason_outputs, explain_options

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "tabserve"
MATRIX_INPUT = "input"
SCORE_OUTPUT = "score"
DECISION_OUTPUT = "decision"
OUTPUTS = (SCORE_OUTPUT, DECISION_OUTPUT)
# ModelMetadata parameters (MLServer's extension): what decision=true (score >= threshold) and false mean.
POSITIVE_LABEL_PARAMETER = "tabserve.decision.positive"
NEGATIVE_LABEL_PARAMETER = "tabserve.decision.negative"
ADVERSE_LABEL_PARAMETER = "tabserve.decision.adverse"
REASON_TABLE_PARAMETER = "tabserve.reason_table"

# Accepted input datatypes: wire dtype of the raw bytes, and the typed-contents field.
_INPUT_TYPES: dict[str, tuple[np.dtype[Any], str]] = {
    "FP64": (np.dtype("<f8"), "fp64_contents"),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
}


def _package_version() -> str:
    try:
        return version("tabserve")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0+unknown"


def _decode_tensor(tensor: Any, raw: bytes | None) -> np.ndarray:
    """One input tensor as a float64 array of its declared shape."""
    name, datatype = tensor.name, tensor.datatype
    if datatype not in _INPUT_TYPES:
        raise InvalidInput(f"input tensor {name!r}: datatype {datatype!r} is not supported (use FP64 or FP32)")
    shape = [int(d) for d in tensor.shape]
    if not shape or any(d < 0 for d in shape):
        raise InvalidInput(f"input tensor {name!r}: shape {shape} is not a concrete tensor shape")
    count = math.prod(shape)
    dtype, field = _INPUT_TYPES[datatype]
    if raw is not None:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input tensor {name!r}: both raw_input_contents and typed contents are set")
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise InvalidInput(
                f"input tensor {name!r}: {len(raw)} bytes of raw contents, expected {expected} "
                f"for shape {shape} {datatype} (little-endian, row-major)"
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        typed = getattr(tensor.contents, field)
        if len(typed) != count:
            raise InvalidInput(
                f"input tensor {name!r}: {len(typed)} values in contents.{field}, expected {count} for shape {shape}"
            )
        values = np.asarray(typed, dtype=dtype)
    return values.astype(np.float64, copy=False).reshape(shape)


def decode_inputs(request: Any, model: LoadedModel) -> RowBatch:
    """The request's tensors as a RowBatch: a single feature matrix under any name, or one column per feature."""
    tensors = list(request.inputs)
    if not tensors:
        raise InvalidInput("empty request: no input tensors")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(tensors):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(tensors)} input tensors")
    arrays = [_decode_tensor(t, raw[i] if raw else None) for i, t in enumerate(tensors)]
    names = model.schema.names
    # A tensor named as a feature is that feature's column; any other single tensor is the matrix, whatever
    # its name (`input` as ModelMetadata advertises, `input-0` as MLServer clients send).
    if len(tensors) == 1 and tensors[0].name not in names:
        return _matrix_batch(tensors[0].name, arrays[0], len(names))
    return _column_batch(tensors, arrays, names)


def _expected_forms(width: int) -> str:
    return f"one tensor per feature, named as the feature, or a single tensor of shape [rows, {width}]"


def _matrix_batch(name: str, matrix: np.ndarray, width: int) -> RowBatch:
    if matrix.ndim != 2 or matrix.shape[1] != width:
        raise InvalidInput(
            f"input tensor {name!r}: shape {list(matrix.shape)}, expected [rows, {width}] (features in the model's "
            f"order); send {_expected_forms(width)}"
        )
    return RowBatch(matrix=matrix)


def _column_batch(tensors: list[Any], arrays: list[np.ndarray], names: tuple[str, ...]) -> RowBatch:
    width = len(names)
    columns: dict[str, np.ndarray] = {}
    for tensor, array in zip(tensors, arrays, strict=True):
        if tensor.name not in names:
            raise InvalidInput(
                f"input tensor {tensor.name!r} is not a feature of the model and not the only tensor: "
                f"send {_expected_forms(width)}"
            )
        if tensor.name in columns:
            raise InvalidInput(f"input tensor {tensor.name!r} is given twice")
        if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] != 1):
            raise InvalidInput(
                f"input tensor {tensor.name!r}: shape {list(array.shape)}, expected [rows] or [rows, 1] for a "
                f"per-feature tensor; send {_expected_forms(width)}"
            )
        columns[tensor.name] = array.reshape(-1)
    return RowBatch(columns=columns)


def requested_outputs(request: Any, explain: bool) -> list[str]:
    """The outputs to produce, in order: those requested, else score and decision (and the reasons when explaining)."""
    produced = (*OUTPUTS, *REASON_OUTPUTS) if explain else OUTPUTS
    names = [o.name for o in request.outputs] or list(produced)
    for name in names:
        if name not in produced:
            raise InvalidInput(f"requested output {name!r} is not produced (outputs: {', '.join(produced)})")
    return names


def encode_outputs(request: Any, result: ScoreResult, names: list[str], top_k: int = 0) -> Any:
    response = pb.ModelInferResponse(model_name=result.model.name, model_version=result.model.version, id=request.id)
    rows = len(result.scores)
    for name in names:
        if name in REASON_OUTPUTS:
            assert result.explanations is not None  # requested_outputs allows them only when explaining
            encode_reason_outputs(response, result.explanations, rows, top_k, [name])
            continue
        if name == SCORE_OUTPUT:
            datatype, data = "FP64", np.ascontiguousarray(result.scores, dtype="<f8").tobytes()
        else:
            datatype, data = "BOOL", np.ascontiguousarray(result.decisions, dtype=np.bool_).tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=[rows])
        response.raw_output_contents.append(data)
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """`ready` must be the flag that drives grpc.health.v1, so ServerReady/ModelReady always agree with it."""

    def __init__(
        self, dataplane: DataPlane, ready: Callable[[], bool], live: Callable[[], bool] = lambda: True
    ) -> None:
        self._dataplane = dataplane
        self._ready = ready
        self._live = live
        self._version = _package_version()

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self._live())

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self._ready())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Unknown model name: NOT_FOUND; the served name with another version: ready=false."""
        try:
            model = self._dataplane.model(request.name)
        except ModelUnavailable:
            return pb.ModelReadyResponse(ready=False)
        ready = self._ready() and request.version in ("", model.version)
        return pb.ModelReadyResponse(ready=ready)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version, extensions=[])

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._dataplane.model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=model.flavor,
            inputs=[tensor(name=MATRIX_INPUT, datatype="FP64", shape=[-1, len(model.schema)])],
            outputs=[
                tensor(name=SCORE_OUTPUT, datatype="FP64", shape=[-1]),
                tensor(name=DECISION_OUTPUT, datatype="BOOL", shape=[-1]),
            ],
            parameters={
                POSITIVE_LABEL_PARAMETER: pb.InferParameter(string_param=model.labels.positive),
                NEGATIVE_LABEL_PARAMETER: pb.InferParameter(string_param=model.labels.negative),
                ADVERSE_LABEL_PARAMETER: pb.InferParameter(string_param=model.adverse_label),
                REASON_TABLE_PARAMETER: pb.InferParameter(bool_param=model.reasons is not None),
            },
        )

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        model = self._dataplane.model(request.model_name, request.model_version)
        explain = explain_options(request, [o.name for o in request.outputs])
        names = requested_outputs(request, explain is not None)
        batch = decode_inputs(request, model)
        check_deadline(context)
        # The rows were decoded against `model`'s schema: the call runs on that version, captured once.
        result = self._dataplane.score_on(model, batch, request_context(context), explain)
        return encode_outputs(request, result, names, explain.top_k if explain is not None else 0)
