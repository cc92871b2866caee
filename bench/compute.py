"""The compute limit: in-process `Booster.predict` on the same rows, no RPC at all.

Single rows in a loop and 1,000-row batches, each with 1 and 2 LightGBM threads. The 1,000-row
figure with the server's thread count is the denominator of the batch target.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.report import IN_PROCESS, SectionResult, percentile_ms


def run(model_file: str, rows: np.ndarray, quick: bool) -> dict[str, Any]:
    """The compute section (the batch target's denominator is re-measured inside the serving section, in
    the same alternating blocks as the servers, so that both see the same machine load)."""
    import lightgbm

    booster = lightgbm.Booster(model_file=model_file)
    result = SectionResult()
    single_calls = 200 if quick else 2000
    single_budget = 5.0 if quick else 15.0  # seconds: 2 OpenMP threads on a busy machine can take ms per row
    batch_calls = 3 if quick else 40
    batch = np.ascontiguousarray(rows[:1000])
    batch_rows_per_second: dict[int, float] = {}
    for threads in (1, 2):
        for i in range(20):
            booster.predict(rows[i : i + 1], num_threads=threads)
        samples = []
        deadline = time.perf_counter() + single_budget
        for i in range(single_calls):
            if time.perf_counter() > deadline:
                break
            row = rows[i % len(rows)].reshape(1, -1)
            started = time.perf_counter()
            booster.predict(row, num_threads=threads)
            samples.append(time.perf_counter() - started)
        label = f"single row, {threads} thread{'s' if threads > 1 else ''}"
        result.add(f"{label}: p50", "booster", IN_PROCESS, percentile_ms(samples, 50), "ms", samples=len(samples))
        result.add(f"{label}: p99", "booster", IN_PROCESS, percentile_ms(samples, 99), "ms", samples=len(samples))

        booster.predict(batch, num_threads=threads)
        started = time.perf_counter()
        for _ in range(batch_calls):
            booster.predict(batch, num_threads=threads)
        elapsed = time.perf_counter() - started
        batch_rows_per_second[threads] = batch_calls * len(batch) / elapsed
        result.add(
            f"1000-row batch, {threads} thread{'s' if threads > 1 else ''}", "booster", IN_PROCESS,
            batch_rows_per_second[threads], "rows/s", samples=batch_calls,
        )
    return result.as_dict()
