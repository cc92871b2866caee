"""The reference servicer: the least a careful engineer writes with grpcio to serve this model.

One unary method (`tabserve.scoring.v1.Scoring/Score`, the same request encoding as the project's
server: matrix or dense rows), the booster loaded once at start, no validation, no metrics, no health,
no reflection. It exists only to show, in the same run, what the project's own layers cost.

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

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc


class ReferenceScoring(scoring_pb2_grpc.ScoringServicer):
    def __init__(self, booster: Any, model_name: str, version: str, threshold: float, batch_threads: int) -> None:
        self._booster = booster
        self._width = int(booster.num_feature())
        self._name = model_name
        self._version = version
        self._threshold = threshold
        self._batch_threads = batch_threads
        self._served = itertools.count()  # next() is one C call under the GIL: atomic across threads

    def served(self) -> int:
        # A count has no reader: a copy yields the current value without advancing the original.
        return next(copy.copy(self._served))

    def Score(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.WhichOneof("rows") == "matrix":
            rows = np.frombuffer(request.matrix.float64_le, dtype="<f8").reshape(-1, self._width)
        else:
            rows = np.array([row.values for row in request.dense.rows], dtype=np.float64)
        scores = self._booster.predict(rows, num_threads=1 if rows.shape[0] == 1 else self._batch_threads)
        next(self._served)
        return scoring_pb2.ScoreResponse(
            model_name=self._name,
            model_version=self._version,
            threshold=self._threshold,
            scores=scores.tolist(),
            decisions=(scores >= self._threshold).tolist(),
        )


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
    servicer = ReferenceScoring(booster, args.model_name, args.model_version, args.threshold, args.batch_threads)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.max_workers),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    scoring_pb2_grpc.add_ScoringServicer_to_server(servicer, server)
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
            print(json.dumps({"event": "count", "ok": servicer.served()}), flush=True)
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
