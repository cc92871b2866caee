"""The compute limit: in-process `Booster.predict` on the same rows, no RPC at all.

Single rows in a loop and 1,000-row batches, each with 1 and 2 LightGBM threads. The 1,000-row
figure with the server's thread count is the denominator of the batch target.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.report import IN_PROCESS, SectionResult, percentile_ms


def run(model_file: str, rows: np.ndarray, quick: bool) -> tuple[dict[str, Any], dict[int, float]]:
    """The section, and rows/s of 1,000-row batches by thread count (for the batch target)."""
    import lightgbm

    booster = lightgbm.Booster(model_file=model_file)
    result = SectionResult()
    single_calls = 200 if quick else 3000
    batch_calls = 3 if quick else 40
    batch = np.ascontiguousarray(rows[:1000])
    batch_rows_per_second: dict[int, float] = {}
    for threads in (1, 2):
        for i in range(20):
            booster.predict(rows[i : i + 1], num_threads=threads)
        samples = []
        for i in range(single_calls):
            row = rows[i % len(rows)].reshape(1, -1)
            started = time.perf_counter()
            booster.predict(row, num_threads=threads)
            samples.append(time.perf_counter() - started)
        label = f"single row, {threads} thread{'s' if threads > 1 else ''}"
        result.add(f"{label}: p50", "booster", IN_PROCESS, percentile_ms(samples, 50), "ms", samples=single_calls)
        result.add(f"{label}: p99", "booster", IN_PROCESS, percentile_ms(samples, 99), "ms", samples=single_calls)

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
    return result.as_dict(), batch_rows_per_second
