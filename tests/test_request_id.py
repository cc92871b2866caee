"""The request id of a public call (transport/request_id.py) against a real in-process server: the caller's
`x-request-id` is returned in the trailing metadata of both fronts (and of errors), a missing or unacceptable one
is replaced by a new one, the client library exposes it, and the server's log lines of the call carry it."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from tabserve.inference.v2 import open_inference_grpc_pb2 as pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as pb_grpc
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client import ScoringClient, ScoringError
from tabserve_client.retry import returned_request_id
from tabserve_demo.applicants import make_applicants
from tabserve_server.app import ServingApp
from tabserve_server.logs import RequestIdFilter
from tabserve_server.transport import request_id

KEY = "x-request-id"


@pytest.fixture
def channel(app: ServingApp) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{app.public_port}") as opened:
        yield opened


def _matrix(n: int = 1) -> np.ndarray:
    return make_applicants(n, seed=7)[0]


def _score_request(n: int = 1) -> Any:
    matrix = _matrix(n)
    return scoring_pb2.ScoreRequest(matrix=scoring_pb2.MatrixRows(float64_le=matrix.tobytes(), num_rows=n))


def _returned(call: Any) -> str:
    """The id, which must come in the trailing metadata: sending it in the initial metadata cost a batch of its own
    on gRPC's polling thread per call (docs/performance.md, run 12)."""
    assert KEY not in dict(call.initial_metadata() or ())
    returned = returned_request_id(call)
    assert returned == dict(call.trailing_metadata())[KEY]
    return returned


def test_the_callers_request_id_is_returned_by_both_fronts(channel: grpc.Channel) -> None:
    _, call = scoring_pb2_grpc.ScoringStub(channel).Score.with_call(_score_request(), metadata=((KEY, "abc-1"),))
    assert _returned(call) == "abc-1"
    matrix = _matrix(2)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP64", shape=list(matrix.shape))
    v2 = pb.ModelInferRequest(model_name="credit-default", inputs=[tensor], raw_input_contents=[matrix.tobytes()])
    _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(v2, metadata=((KEY, "abc-2"),))
    assert _returned(call) == "abc-2"


def test_a_missing_or_unacceptable_request_id_is_replaced_by_a_new_one(channel: grpc.Channel) -> None:
    stub = scoring_pb2_grpc.ScoringStub(channel)
    seen = set()
    for metadata in ((), ((KEY, "has space"),), ((KEY, "x" * 129),)):
        _, call = stub.Score.with_call(_score_request(), metadata=metadata)
        seen.add(_returned(call))
    assert len(seen) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", s) for s in seen)


def test_an_error_answer_carries_the_request_id_too(channel: grpc.Channel) -> None:
    bad = scoring_pb2.ScoreRequest(dense=scoring_pb2.DenseRows(rows=[scoring_pb2.DenseRow(values=[1.0])]))
    with pytest.raises(grpc.RpcError) as caught:
        scoring_pb2_grpc.ScoringStub(channel).Score(bad, metadata=((KEY, "bad-1"),))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _returned(caught.value) == "bad-1"


def test_the_client_exposes_the_request_id_it_sent(app: ServingApp, channel: grpc.Channel) -> None:
    seen: list[str] = []
    original = app.dataplane.score

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[3].request_id)
        return original(*args, **kwargs)

    app.dataplane.score = spy  # type: ignore[method-assign]
    try:
        with ScoringClient(channel=channel) as client:
            batches = [client.score(_matrix()) for _ in range(2)]
    finally:
        app.dataplane.score = original  # type: ignore[method-assign]
    assert [b.request_id for b in batches] == seen and seen[0] != seen[1]


def test_the_clients_error_carries_the_request_id_the_server_returned(channel: grpc.Channel) -> None:
    with ScoringClient(channel=channel) as client, pytest.raises(ScoringError) as caught:
        client.score(np.zeros((1, 3)))  # the wrong width: INVALID_ARGUMENT from the server
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.fullmatch(r"[0-9a-f]{32}", caught.value.request_id)


def test_the_client_reads_an_older_servers_id_from_the_initial_metadata() -> None:
    class Call:
        def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("grpc-retry-pushback-ms", "10"),)

        def initial_metadata(self) -> tuple[tuple[str, str], ...]:
            return ((KEY, "older-1"),)

    assert returned_request_id(Call()) == "older-1"


def test_the_servers_log_lines_of_a_call_carry_its_request_id(
    app: ServingApp, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    class Exploding:
        def predict(self, matrix: np.ndarray) -> np.ndarray:
            raise RuntimeError("boom")

        def backend(self, rows: int) -> str:
            return "exploding"

    model = app.manager.current()
    assert model is not None
    app.manager._swap(dataclasses.replace(model, predictor=Exploding()))
    caplog.handler.addFilter(RequestIdFilter())
    with pytest.raises(grpc.RpcError):
        scoring_pb2_grpc.ScoringStub(channel).Score(_score_request(), metadata=((KEY, "boom-1"),))
    lines = [r for r in caplog.records if "unexpected error" in r.getMessage()]
    assert lines and all(getattr(r, "request_id", "") == "boom-1" for r in lines)


def test_new_ids_are_unique_and_a_forked_child_draws_its_own_prefix() -> None:
    """New ids are a per-process random prefix and a counter (no system call per call): unique within the process,
    and a worker forked from it starts from another prefix, so two workers never make the same id."""
    ids = [request_id.new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(writer, request_id.new_request_id().encode())
        os._exit(0)
    os.close(writer)
    child = os.read(reader, 64).decode()
    os.waitpid(pid, 0)
    os.close(reader)
    assert re.fullmatch(r"[0-9a-f]{32}", child) and child[:16] != ids[0][:16]
