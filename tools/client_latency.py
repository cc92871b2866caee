"""Measure what one scoring call costs through the client: 1 row and 1,000 rows, against a real server process.

Usage: .venv/bin/python tools/client_latency.py [--calls 2000] [--data-dir DIR]
Prints p50/p99 per call and, side by side in the same run, the in-process Booster.predict time on the
same rows, so the figures read as ratios (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightgbm
import numpy as np

from tabserve_client import ScoringClient
from tabserve_demo.applicants import make_applicants
from tabserve_demo.embedded import bootstrap_embedded_registry, embedded_paths

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tabserve_demo.processes import ServerProcess
from tests.support import MODEL_NAME, server_settings, wait_for


def percentiles(samples: list[float]) -> tuple[float, float]:
    values = np.asarray(samples) * 1e3
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="tabserve-latency-"))
    tracking_uri = bootstrap_embedded_registry(data_dir, model_name=MODEL_NAME)
    rows = make_applicants(1000, seed=11)[0]
    settings = server_settings(tracking_uri, embedded_paths(data_dir).cache_dir)
    with ServerProcess(settings) as server, ScoringClient(server.target, timeout=10) as client:
        wait_for(lambda: client.health() == "SERVING", what="SERVING")
        booster_file = next(embedded_paths(data_dir).cache_dir.rglob("model.lgb"))
        booster = lightgbm.Booster(model_file=str(booster_file))
        results = {}
        for label, batch, calls in [("1 row", rows[:1], args.calls), ("1000 rows", rows, max(50, args.calls // 20))]:
            for _ in range(20):
                client.score(batch)
            rpc, local = [], []
            for _ in range(calls):
                started = time.perf_counter()
                client.score(batch)
                rpc.append(time.perf_counter() - started)
                started = time.perf_counter()
                booster.predict(batch, num_threads=1 if len(batch) == 1 else 0)
                local.append(time.perf_counter() - started)
            results[label] = (percentiles(rpc), percentiles(local), calls)
        server.terminate()
    header = ("request", "calls", "client p50 ms", "client p99 ms", "predict p50 ms", "ratio p50")
    print("{:<10} {:>6} {:>14} {:>14} {:>15} {:>10}".format(*header))
    for label, ((p50, p99), (l50, _), calls) in results.items():
        print(f"{label:<10} {calls:>6} {p50:>14.3f} {p99:>14.3f} {l50:>15.3f} {p50 / l50:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
