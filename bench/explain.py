"""Reason codes (issue 14): what explaining costs through the server against exact TreeSHAP in process.

One project server (the bench model's version has no reason table: reasons by feature name, the same TreeSHAP
work). In alternating rounds, so that drift on a shared machine hits every figure alike:
- one row, in process: `Booster.predict(pred_contrib=True)`, 1 thread; one row served without explanation;
  one adverse row served with its reasons (the client library, sequential calls);
- 1,000 rows, in process: `pred_contrib` with the server's thread count; served with every row explained.
Targets: explained single-row p50 <= 1.15 x (in-process pred_contrib p50 + served single-row p50); explained
rows/s on 1,000-row batches >= 0.9 x in-process pred_contrib rows/s with the same threads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.report import IN_PROCESS, PYTHON_CLIENT, SectionResult, Target, percentile_ms, ratio
from tabserve_client import ScoringClient
from tabserve_demo.processes import ServerProcess

SINGLE_TARGET = "explained single row p50 vs pred_contrib + serving"
BATCH_TARGET = "explained 1000-row rows/s vs pred_contrib"


def run(
    model_file: str, rows: np.ndarray, *, quick: bool, start_server: Callable[..., ServerProcess],
    wait_serving: Callable[..., None],
) -> dict[str, Any]:
    import lightgbm

    booster = lightgbm.Booster(model_file=model_file)
    threads = os.cpu_count() or 1
    server = start_server("explain", predict_threads=threads)
    try:
        wait_serving(server.target)
        with ScoringClient(server.target, timeout=120.0) as client:
            return _measure(booster, client, rows, threads, quick)
    finally:
        server.stop()


def _timed(call: Callable[[], Any], samples: list[float]) -> None:
    started = time.perf_counter()
    call()
    samples.append(time.perf_counter() - started)


def _measure(booster: Any, client: ScoringClient, rows: np.ndarray, threads: int, quick: bool) -> dict[str, Any]:
    threshold = client.model_info().threshold
    scores = booster.predict(rows)
    adverse = [i for i in np.argsort(-scores) if scores[i] >= threshold] or [int(np.argmax(scores))]
    singles = [np.ascontiguousarray(rows[i : i + 1]) for i in adverse[:50]]
    batch = np.ascontiguousarray(rows[:1000])
    rounds, per_round, batch_calls = (2, 10, 1) if quick else (10, 100, 3)
    contrib: list[float] = []
    served: list[float] = []
    explained: list[float] = []
    in_process_rows = served_rows = 0.0
    for _ in range(rounds):
        for i in range(per_round):
            row = singles[i % len(singles)]  # each lambda below runs at once, within this iteration
            _timed(lambda: booster.predict(row, pred_contrib=True, num_threads=1), contrib)  # noqa: B023
            _timed(lambda: client.score(row), served)  # noqa: B023
            _timed(lambda: client.score(row, explain=True, explain_all_rows=True), explained)  # noqa: B023
        started = time.perf_counter()
        for _ in range(batch_calls):
            booster.predict(batch, pred_contrib=True, num_threads=threads)
        in_process_rows += batch_calls * len(batch) / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(batch_calls):
            client.score(batch, explain=True, explain_all_rows=True)
        served_rows += batch_calls * len(batch) / (time.perf_counter() - started)
    result = SectionResult()
    n = rounds * per_round
    p50 = {
        "contrib": result.add("single row: pred_contrib p50", "booster", IN_PROCESS, percentile_ms(contrib, 50),
                              "ms", samples=n),
        "served": result.add("single row: score p50", "project", PYTHON_CLIENT, percentile_ms(served, 50), "ms",
                             samples=n),
        "explained": result.add("single adverse row: score + reasons p50", "project", PYTHON_CLIENT,
                                percentile_ms(explained, 50), "ms", samples=n),
    }
    in_process = result.add(f"1000 rows: pred_contrib, {threads} threads", "booster", IN_PROCESS,
                            in_process_rows / rounds, "rows/s", samples=rounds * batch_calls)
    through_server = result.add("1000 rows: score + reasons of every row", "project", PYTHON_CLIENT,
                                served_rows / rounds, "rows/s", samples=rounds * batch_calls)
    result.targets.append(Target(
        SINGLE_TARGET, ratio(p50["explained"], p50["contrib"] + p50["served"]), 1.15, True,
        "explained single-row p50 / (in-process pred_contrib p50 + served single-row p50), alternating calls",
    ))
    result.targets.append(Target(
        BATCH_TARGET, ratio(through_server, in_process), 0.9, False,
        f"served explained rows/s / in-process pred_contrib rows/s, {threads} threads, alternating rounds",
    ))
    return result.as_dict()


__all__ = ["BATCH_TARGET", "SINGLE_TARGET", "run"]
