"""Logs a machine can read (`log_format=json`): the formatters alone, then a real two-worker server and a real
monitor whose every stderr line is one JSON object, the lines of a refused call on either front carrying the
request id its caller was given."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tabserve.inference.v2 import open_inference_grpc_pb2 as v2_pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as v2_grpc
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client.retry import returned_request_id
from tabserve_common.logs import JsonLineFormatter, TextFormatter
from tabserve_demo.processes import MonitorProcess
from tests.support import MODEL_NAME, Server, monitor_settings, scrape, server_settings, wait_for

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
KEYS = {"time", "level", "logger", "process", "pid", "thread", "message"}


def _record(request_id: str = "", exc: bool = False, value: str = "é\n") -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("tabserve_server.x", logging.WARNING, __file__, 1, "row %d: %s", (3, value), exc_info)
    record.request_id = request_id
    return record


def test_a_json_line_is_one_object_with_the_fields_and_the_request_id() -> None:
    line = JsonLineFormatter("worker-1").format(_record("req-7", exc=True))
    assert "\n" not in line and line.isascii()
    parsed = json.loads(line)
    assert set(parsed) == KEYS | {"request_id", "exception"}
    assert RFC3339_UTC.fullmatch(parsed["time"])
    assert (parsed["level"], parsed["logger"], parsed["process"]) == ("WARNING", "tabserve_server.x", "worker-1")
    assert parsed["message"] == "row 3: é\n" and parsed["request_id"] == "req-7"
    assert "ValueError: bad" in parsed["exception"] and parsed["exception"].startswith("Traceback")
    assert set(json.loads(JsonLineFormatter("server").format(_record()))) == KEYS  # outside a call: no request_id


def test_a_text_line_ends_with_the_request_id_before_the_traceback() -> None:
    first, second = TextFormatter("worker-0").format(_record("req-8", exc=True, value="é")).splitlines()[:2]
    assert first.endswith(" WARNING worker-0 tabserve_server.x: row 3: é [request req-8]"), first
    assert second.startswith("Traceback")
    assert TextFormatter().format(_record(value="é")).endswith(" WARNING tabserve_server.x: row 3: é")


@pytest.fixture(scope="module")
def server(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A two-worker server logging JSON at DEBUG (so a refused call logs its refusal), settled on version 1."""
    settings = server_settings(tracking_uri, tmp_path_factory.mktemp("logs-cache"), workers=2, log_format="json",
                               log_level="debug")
    running = Server(settings)
    try:
        wait_for(lambda: running.settled_on("1"), timeout=120, interval=0.2, what="both workers serve version 1")
        yield running
    finally:
        running.close()


def _parsed_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of `stderr` as JSON (a line that does not parse fails the test, naming it)."""
    lines = []
    for line in stderr.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(parsed, dict) and set(parsed) >= KEYS, line
        assert RFC3339_UTC.fullmatch(parsed["time"]), line
        lines.append(parsed)
    assert lines
    return lines


def _refused_calls(target: str) -> list[str]:
    """A bad call on each front (one with the caller's request id, one with the server's): the ids returned."""
    ids = []
    with grpc.insecure_channel(target) as channel:
        bad = scoring_pb2.ScoreRequest(dense=scoring_pb2.DenseRows(rows=[scoring_pb2.DenseRow(values=[1.0])]))
        for metadata in ((("x-request-id", "logs-score-1"),), ()):
            with pytest.raises(grpc.RpcError) as caught:
                scoring_pb2_grpc.ScoringStub(channel).Score(bad, metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            ids.append(returned_request_id(caught.value))
        tensor = v2_pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=[1, 3])
        infer = v2_pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor], raw_input_contents=[bytes(24)])
        with pytest.raises(grpc.RpcError) as caught:
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                infer, metadata=(("x-request-id", "logs-v2-1"),), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ids.append(returned_request_id(caught.value))
    assert ids[0] == "logs-score-1" and ids[2] == "logs-v2-1" and re.fullmatch(r"[0-9a-f]{32}", ids[1])
    return ids


def test_every_server_line_is_json_and_a_calls_lines_carry_its_request_id(server: Server) -> None:
    ids = _refused_calls(server.target)
    wait_for(lambda: all(f'"request_id": "{i}"' in server.process.stderr() for i in ids), timeout=10,
             what="the refused calls' log lines")
    lines = _parsed_lines(server.process.stderr())
    assert {"supervisor", "worker-0", "worker-1"} <= {line["process"] for line in lines}
    for request_id in ids:
        mine = [line for line in lines if line.get("request_id") == request_id]
        assert mine and all(line["process"].startswith("worker-") for line in mine)
        assert any("INVALID_ARGUMENT" in line["message"] for line in mine), mine
    # Lines written outside a call carry no request id (the load, the listeners).
    assert any("request_id" not in line for line in lines)


def test_every_monitor_line_is_json(server: Server, tmp_path: Path) -> None:
    """On a registry not made yet: MLflow creates its tables and says so (MLflow has a stderr handler of its own
    unless told otherwise), and the monitor logs an ERROR for the missing model."""
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    settings = monitor_settings(empty, server.target, server.control_address, log_format="json")
    with MonitorProcess(settings, log_file=tmp_path / "monitor.log") as monitor:
        wait_for(lambda: scrape(monitor.metrics_port).get("tabserve_monitor_registered_model_missing") == 1,
                 timeout=60, what="the monitor's first poll")
        monitor.stop()
    lines = _parsed_lines((tmp_path / "monitor.log").read_text())
    assert {line["process"] for line in lines} == {"monitor"}
    assert any(line["logger"].startswith("mlflow.") for line in lines)
    assert any(line["level"] == "ERROR" and "no target" in line["message"] for line in lines)
