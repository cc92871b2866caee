"""The Open Inference Protocol (KServe V2) front, driven by the real, unmodified `tritonclient[grpc]`: metadata,
inference in every tensor form, refusals and reasons (test_inference_v2_grpc.py drives it with our own stubs).

tritonclient 2.73 requires protobuf < 7 and this project pins protobuf >= 7.35.1, so the client runs
in its own virtual environment (`.venv/tritonclient`, created on first use and reused; a stamp file
records the installed version) as a subprocess that prints JSON; the tests compare its results with
the project's own scoring API in this process.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tabserve_client import ScoringClient
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants
from tabserve_server.app import ServingApp
from tests.support import MODEL_NAME, tritonclient_python

# Runs inside the tritonclient venv: reads a list of operations (JSON on stdin), prints one result each.
CLIENT_SCRIPT = r'''
import base64, json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

spec = json.load(sys.stdin)
client = tc.InferenceServerClient(spec["url"])
arrays = {}

def array(path):
    if path not in arrays:
        arrays[path] = np.load(path)
    return arrays[path]

def make_input(d):
    data = array(d["npy"])
    if "column" in d:
        data = data[:, d["column"]]
        data = data.reshape(-1, 1) if d.get("as_2d") else data.reshape(-1)
    data = np.ascontiguousarray(data.astype(d["np_dtype"]))
    tensor = tc.InferInput(d["name"], list(data.shape), d["datatype"])
    tensor.set_data_from_numpy(data)
    if "shape" in d:  # a shape that does not match the data: the byte length is then wrong
        tensor.set_shape(d["shape"])
    return tensor

def run(op):
    kind = op["op"]
    if kind == "live":
        return client.is_server_live()
    if kind == "ready":
        return client.is_server_ready()
    if kind == "model_ready":
        return client.is_model_ready(op["name"], op.get("version", ""))
    if kind == "server_metadata":
        return client.get_server_metadata(as_json=True)
    if kind == "metadata":
        return client.get_model_metadata(op["name"], op.get("version", ""), as_json=True)
    if kind == "infer":
        outputs = [tc.InferRequestedOutput(n) for n in op["outputs"]] if op.get("outputs") else None
        result = client.infer(op["model"], [make_input(d) for d in op["inputs"]],
                              model_version=op.get("version", ""), outputs=outputs, request_id=op.get("id", ""),
                              parameters=op.get("parameters"))
        response = result.get_response()
        out = {}
        for tensor in response.outputs:
            value = result.as_numpy(tensor.name)
            out[tensor.name] = {"datatype": tensor.datatype, "shape": list(tensor.shape), "dtype": str(value.dtype)}
            if value.dtype == object:  # BYTES: tritonclient's own deserialization, as UTF-8 strings
                out[tensor.name]["strings"] = [v.decode() for v in value.reshape(-1)]
            else:
                out[tensor.name]["b64"] = base64.b64encode(value.tobytes()).decode()
        return {"model_name": response.model_name, "model_version": response.model_version, "id": response.id,
                "outputs": out}
    raise ValueError(kind)

results = []
for op in spec["ops"]:
    try:
        results.append({"ok": True, "value": run(op)})
    except InferenceServerException as e:
        results.append({"ok": False, "status": str(e.status()), "message": e.message()})
print(json.dumps(results))
'''


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """The python of a venv holding the real tritonclient (its protobuf < 7 cannot share ours)."""
    return tritonclient_python()


@pytest.fixture
def triton(triton_python: Path, app: ServingApp, tmp_path: Path) -> Any:
    """Run operations through tritonclient against `app`; `triton(ops)` returns one result per op."""
    script = tmp_path / "triton_client.py"
    script.write_text(CLIENT_SCRIPT)

    def run(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        spec = json.dumps({"url": f"127.0.0.1:{app.public_port}", "ops": ops})
        done = subprocess.run(
            [str(triton_python), str(script)], input=spec, capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr
        results: list[dict[str, Any]] = json.loads(done.stdout)
        return results

    return run


def rows(n: int, seed: int = 11) -> np.ndarray:
    return make_applicants(n, seed=seed)[0]


def save(tmp_path: Path, name: str, matrix: np.ndarray) -> str:
    path = tmp_path / f"{name}.npy"
    np.save(path, matrix)
    return str(path)


def matrix_input(npy: str, datatype: str = "FP64", name: str = "input", **extra: Any) -> dict[str, Any]:
    np_dtype = {"FP64": "float64", "FP32": "float32", "INT64": "int64"}[datatype]
    return {"name": name, "npy": npy, "datatype": datatype, "np_dtype": np_dtype, **extra}


def decoded(output: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(output["b64"]), dtype=output["dtype"])


def infer_op(inputs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"op": "infer", "model": MODEL_NAME, "inputs": inputs, **extra}


def assert_invalid(result: dict[str, Any], *needles: str) -> None:
    assert not result["ok"], result
    assert result["status"] == "StatusCode.INVALID_ARGUMENT", result
    for needle in needles:
        assert needle in result["message"], result


# --- tritonclient ------------------------------------------------------------------------------


def test_liveness_readiness_and_metadata(triton: Any) -> None:
    live, ready, model_ready, any_version, other_version, server, meta = triton([
        {"op": "live"},
        {"op": "ready"},
        {"op": "model_ready", "name": MODEL_NAME, "version": "1"},
        {"op": "model_ready", "name": MODEL_NAME},
        {"op": "model_ready", "name": MODEL_NAME, "version": "2"},
        {"op": "server_metadata"},
        {"op": "metadata", "name": MODEL_NAME},
    ])
    assert live == ready == model_ready == any_version == {"ok": True, "value": True}
    assert other_version == {"ok": True, "value": False}
    assert server["value"]["name"] == "tabserve" and server["value"]["version"] == "0.1.0"
    value = meta["value"]
    assert value["name"] == MODEL_NAME and value["versions"] == ["1"] and value["platform"] == "lightgbm"
    assert value["inputs"] == [{"name": "input", "datatype": "FP64", "shape": ["-1", str(len(FEATURE_NAMES))]}]
    assert value["outputs"] == [
        {"name": "score", "datatype": "FP64", "shape": ["-1"]},
        {"name": "decision", "datatype": "BOOL", "shape": ["-1"]},
    ]


def test_infer_fp64_matches_the_scoring_api_bit_for_bit(
    triton: Any, client: ScoringClient, tmp_path: Path
) -> None:
    one, thousand = rows(1, seed=1), rows(1000, seed=2)
    results = triton([
        infer_op([matrix_input(save(tmp_path, "one", one))], id="req-1"),
        infer_op([matrix_input(save(tmp_path, "thousand", thousand))], version="1"),
    ])
    for matrix, result in zip((one, thousand), results, strict=True):
        assert result["ok"], result
        value = result["value"]
        assert (value["model_name"], value["model_version"]) == (MODEL_NAME, "1")
        expected = client.score(matrix)
        score, decision = value["outputs"]["score"], value["outputs"]["decision"]
        assert (score["datatype"], score["shape"], decision["datatype"]) == ("FP64", [len(matrix)], "BOOL")
        np.testing.assert_array_equal(decoded(score), expected.scores)
        assert decoded(score).tobytes() == np.asarray(expected.scores, dtype=np.float64).tobytes()
        np.testing.assert_array_equal(decoded(decision), expected.decisions)
    assert results[0]["value"]["id"] == "req-1"


def test_infer_fp32_and_per_feature_tensors(triton: Any, client: ScoringClient, tmp_path: Path) -> None:
    matrix = rows(25, seed=4)
    npy = save(tmp_path, "m", matrix)
    per_feature_2d = [
        {"name": n, "npy": npy, "column": i, "as_2d": True, "datatype": "FP64", "np_dtype": "float64"}
        for i, n in enumerate(FEATURE_NAMES)
    ]
    per_feature_1d = [
        {"name": n, "npy": npy, "column": i, "datatype": "FP32", "np_dtype": "float32"}
        for i, n in enumerate(FEATURE_NAMES)
    ]
    fp32, cols_2d, cols_1d, only_score = triton([
        infer_op([matrix_input(npy, "FP32")]),
        infer_op(per_feature_2d),
        infer_op(per_feature_1d[::-1]),  # any order: tensors are matched by name
        infer_op([matrix_input(npy)], outputs=["score"]),
    ])
    as_fp32 = matrix.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(decoded(fp32["value"]["outputs"]["score"]), client.score(as_fp32).scores)
    np.testing.assert_array_equal(decoded(cols_1d["value"]["outputs"]["score"]), client.score(as_fp32).scores)
    np.testing.assert_array_equal(decoded(cols_2d["value"]["outputs"]["score"]), client.score(matrix).scores)
    assert list(only_score["value"]["outputs"]) == ["score"]


def test_a_single_matrix_under_any_name_while_metadata_advertises_input(
    triton: Any, client: ScoringClient, tmp_path: Path
) -> None:
    """MLServer clients send the matrix as `input-0`: a drop-in replacement scores it; metadata still says `input`."""
    matrix = rows(40, seed=8)
    npy = save(tmp_path, "m", matrix)
    mlserver, fp32_other, meta = triton([
        infer_op([matrix_input(npy, name="input-0")]),
        infer_op([matrix_input(npy, "FP32", name="features")]),
        {"op": "metadata", "name": MODEL_NAME},
    ])
    assert mlserver["ok"], mlserver
    np.testing.assert_array_equal(decoded(mlserver["value"]["outputs"]["score"]), client.score(matrix).scores)
    as_fp32 = matrix.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(decoded(fp32_other["value"]["outputs"]["score"]), client.score(as_fp32).scores)
    assert [t["name"] for t in meta["value"]["inputs"]] == ["input"]


def test_tensors_in_neither_form_are_refused_naming_both_forms(triton: Any, tmp_path: Path) -> None:
    matrix = rows(3)
    npy = save(tmp_path, "m", matrix)
    width = len(FEATURE_NAMES)
    both_forms = ("one tensor per feature, named as the feature", f"a single tensor of shape [rows, {width}]")
    two_matrices, two_unknown_columns, matrix_and_feature, one_column = triton([
        infer_op([matrix_input(npy, name="input-0"), matrix_input(npy, name="input-1")]),
        infer_op([
            {"name": f"col-{i}", "npy": npy, "column": i, "datatype": "FP64", "np_dtype": "float64"} for i in range(2)
        ]),
        infer_op([
            matrix_input(npy, name="input-0"),
            {"name": FEATURE_NAMES[0], "npy": npy, "column": 0, "datatype": "FP64", "np_dtype": "float64"},
        ]),
        infer_op([{"name": "input-0", "npy": npy, "column": 0, "datatype": "FP64", "np_dtype": "float64"}]),
    ])
    assert_invalid(two_matrices, "'input-0'", *both_forms)
    assert_invalid(two_unknown_columns, "'col-0'", *both_forms)
    assert_invalid(matrix_and_feature, "'input-0'", *both_forms)
    assert_invalid(one_column, "'input-0'", "[3]", *both_forms)


def test_invalid_tensors_are_invalid_argument_naming_the_tensor(triton: Any, tmp_path: Path) -> None:
    matrix = rows(2)
    npy = save(tmp_path, "m", matrix)
    narrow = save(tmp_path, "narrow", matrix[:, :-1])
    ints = save(tmp_path, "ints", np.zeros((2, len(FEATURE_NAMES)), dtype=np.int64))
    wide_feature = {"name": FEATURE_NAMES[0], "npy": npy, "datatype": "FP64", "np_dtype": "float64"}
    datatype, shape, length, feature_shape, output = triton([
        infer_op([matrix_input(ints, "INT64")]),
        infer_op([matrix_input(narrow)]),
        infer_op([matrix_input(npy, shape=[3, len(FEATURE_NAMES)])]),
        infer_op([wide_feature]),
        infer_op([matrix_input(npy)], outputs=["probability"]),
    ])
    assert_invalid(datatype, "'input'", "INT64")
    assert_invalid(shape, "'input'", f"[2, {len(FEATURE_NAMES) - 1}]")
    assert_invalid(length, "'input'", "bytes")
    assert_invalid(feature_shape, repr(FEATURE_NAMES[0]), "shape")
    assert_invalid(output, "'probability'")


def test_unknown_model_or_version_is_not_found(triton: Any, tmp_path: Path) -> None:
    npy = save(tmp_path, "m", rows(2))
    results = triton([
        {"op": "infer", "model": "other-model", "inputs": [matrix_input(npy)]},
        infer_op([matrix_input(npy)], version="2"),
        {"op": "metadata", "name": "other-model"},
        {"op": "metadata", "name": MODEL_NAME, "version": "2"},
        {"op": "model_ready", "name": "other-model"},
    ])
    for result in results:
        assert not result["ok"] and result["status"] == "StatusCode.NOT_FOUND", result


def test_reasons_through_request_parameters_and_extra_outputs(
    triton: Any, client: ScoringClient, tmp_path: Path
) -> None:
    """tritonclient asks for reasons with request parameters and reads the BYTES and FP64 reason tensors; they
    equal the scoring API's reasons (docs/explanations.md)."""
    matrix = rows(300, seed=21)
    npy = save(tmp_path, "explain", matrix)
    parameters = {"tabserve.explain": True, "tabserve.explain.top_k": 3}
    explained, bad_top_k, not_explaining = triton([
        infer_op([matrix_input(npy)], parameters=parameters),
        infer_op([matrix_input(npy)], parameters={"tabserve.explain.top_k": 0}),
        infer_op([matrix_input(npy)], outputs=["score", "reason_code"], parameters={"tabserve.explain": False}),
    ])
    assert explained["ok"], explained
    outputs = explained["value"]["outputs"]
    expected = client.score(matrix, explain=True, top_k=3)
    assert expected.reasons
    for name in ("reason_code", "reason_text", "reason_feature"):
        assert (outputs[name]["datatype"], outputs[name]["shape"]) == ("BYTES", [300, 3])
    for name in ("reason_contribution", "reason_value"):
        assert (outputs[name]["datatype"], outputs[name]["shape"]) == ("FP64", [300, 3])
    codes = np.array(outputs["reason_code"]["strings"], dtype=object).reshape(300, 3)
    features = np.array(outputs["reason_feature"]["strings"], dtype=object).reshape(300, 3)
    contributions = decoded(outputs["reason_contribution"]).reshape(300, 3)
    for row in range(300):
        reasons = expected.reasons.get(row, ())
        assert list(codes[row][: len(reasons)]) == [r.code for r in reasons]
        assert list(features[row][: len(reasons)]) == [r.feature for r in reasons]
        assert contributions[row][: len(reasons)].tolist() == [r.contribution for r in reasons]
        assert all(c == "" for c in codes[row][len(reasons):]) and np.isnan(contributions[row][len(reasons):]).all()
    assert decoded(outputs["expected_value"]).tolist() == [expected.expected_value]
    np.testing.assert_array_equal(decoded(outputs["score"]), expected.scores)
    assert_invalid(bad_top_k, "top_k is 0")
    assert_invalid(not_explaining, "reason outputs requested with tabserve.explain=false")
