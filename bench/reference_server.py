"""The reference servicers: the least a careful engineer writes with grpcio to serve this model.

Two unary methods: `tabserve.scoring.v1.Scoring/Score` (the same request encoding as the project's server:
matrix or dense rows) and the Open Inference Protocol's `inference.GRPCInferenceService/ModelInfer` (one
FP64 tensor `[rows, features]` in `raw_input_contents`, any name; outputs `score` and `decision` as raw
contents, like the project's V2 front). The booster is loaded once at start and predicts through the
project's own `LightGBMPredictor`, so a single row takes LightGBM's single-row fast path (the true floor)
and batches `Booster.predict`. No validation, no metrics, no health, no reflection, no decision log. It
exists only to show, in the same run, what the project's own layers cost.

`python -m bench.reference_server --model-file model.lgb --address 127.0.0.1:0` prints one JSON line
`{"event": "listening", "public_port": N}`. For the h2load section, which cannot see gRPC status codes,
SIGUSR1 prints `{"event": "count", "ok": N}`: the number of responses returned (one C-level counter
increment per call, the cheapest possible).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc
import lightgbm
import numpy as np

from tabserve.inference.v2 import open_inference_grpc_pb2 as v2_pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as v2_pb_grpc
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_server.core.model import LightGBMPredictor


class Reference:
    """What both servicers share: the predictor, the served model's identity and one response counter."""

    def __init__(self, booster: Any, model_name: str, version: str, threshold: float, batch_threads: int) -> None:
        self.predictor = LightGBMPredictor(booster, batch_threads)
        self.width = int(booster.num_feature())
        self.name = model_name
        self.version = version
        self.threshold = threshold
        self._served = itertools.count()  # next() is one C call under the GIL: atomic across threads

    def count(self) -> None:
        next(self._served)

    def served(self) -> int:
        # A count has no reader: a copy yields the current value without advancing the original.
        return next(copy.copy(self._served))


class ReferenceScoring(scoring_pb2_grpc.ScoringServicer):
    def __init__(self, reference: Reference) -> None:
        self._ref = reference

    def Score(self, request: Any, context: grpc.ServicerContext) -> Any:
        ref = self._ref
        if request.WhichOneof("rows") == "matrix":
            rows = np.frombuffer(request.matrix.float64_le, dtype="<f8").reshape(-1, ref.width)
        else:
            rows = np.array([row.values for row in request.dense.rows], dtype=np.float64)
        scores = ref.predictor.predict(rows)
        ref.count()
        return scoring_pb2.ScoreResponse(
            model_name=ref.name,
            model_version=ref.version,
            threshold=ref.threshold,
            scores=scores.tolist(),
            decisions=(scores >= ref.threshold).tolist(),
        )


class ReferenceInference(v2_pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, reference: Reference) -> None:
        self._ref = reference

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        ref = self._ref
        rows = np.frombuffer(request.raw_input_contents[0], dtype="<f8").reshape(-1, ref.width)
        scores = ref.predictor.predict(rows)
        ref.count()
        response = v2_pb.ModelInferResponse(model_name=ref.name, model_version=ref.version, id=request.id)
        response.outputs.add(name="score", datatype="FP64", shape=[len(scores)])
        response.outputs.add(name="decision", datatype="BOOL", shape=[len(scores)])
        response.raw_output_contents.extend([scores.astype("<f8").tobytes(), (scores >= ref.threshold).tobytes()])
        return response


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-file", required=True)
    parser.add_argument("--address", default="127.0.0.1:0")
    parser.add_argument("--model-name", default="model")
    parser.add_argument("--model-version", default="1")
    parser.add_argument("--threshold", type=float, default=0.48)
    parser.add_argument("--max-workers", type=int, default=16, help="same as the project's default")
    parser.add_argument("--batch-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)

    booster = lightgbm.Booster(model_file=args.model_file)
    reference = Reference(booster, args.model_name, args.model_version, args.threshold, args.batch_threads)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.max_workers),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    scoring_pb2_grpc.add_ScoringServicer_to_server(ReferenceScoring(reference), server)
    v2_pb_grpc.add_GRPCInferenceServiceServicer_to_server(ReferenceInference(reference), server)
    port = server.add_insecure_port(args.address)
    server.start()

    stop = threading.Event()
    report = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: report.set())
    print(json.dumps({"event": "listening", "public_port": port}), flush=True)
    while not stop.wait(0.05):
        if report.is_set():
            report.clear()
            print(json.dumps({"event": "count", "ok": reference.served()}), flush=True)
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
