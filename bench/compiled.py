"""The compiled backend (backend=compiled) against LightGBM: through two project servers, one per backend, and
in process on the same rows with the compiled server's own object code.

The compiled server's cache directory lives under bench/.cache beside the model, so only the first run compiles
(minutes for the seed-sized model); later runs load the cached object code, as a restarted server does. Server
figures alternate between the two servers in blocks, so both see the same machine load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.model import CACHE_DIR
from bench.report import IN_PROCESS, RAW_STUB, SectionResult, Target, percentile_ms, ratio
from bench.serving import Generators, _sequential
from tabserve_client import ControlClient

COMPILE_WAIT_SECONDS = 1800.0  # a first compile of the seed-sized model on a busy 2-core machine


def _wait_compiled(control_target: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    with ControlClient(control_target, timeout=30) as control:
        while True:
            served = control.status().serving
            if served.backend == "compiled":
                return served
            if served.backend_note and not served.backend_note.startswith("compiling"):  # attempts remain while it does
                raise RuntimeError(f"the compiled backend did not come up: {served.backend_note}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the compiled backend was not serving after {timeout:g} s")
            time.sleep(1.0)


def _in_process(result: SectionResult, model_file: str, cache: Path, rows: np.ndarray, quick: bool) -> None:
    import lightgbm

    from tabserve_server.core.compiled import CompiledPredictor, compiler_version, load_forest, read_entry
    from tabserve_server.core.model import LightGBMPredictor

    entry = next(p for p in (cache / "compiled").iterdir() if read_entry(p) is not None)
    code, _ = read_entry(entry)  # type: ignore[misc]
    singles = [np.ascontiguousarray(rows[i : i + 1]) for i in range(len(rows))]
    batch = np.ascontiguousarray(rows[:1000])
    calls = 200 if quick else 3000
    for threads in (1, 2):
        booster = LightGBMPredictor(lightgbm.Booster(model_file=model_file), threads)
        compiled = CompiledPredictor(booster, load_forest(code), compiler_version(), threads)
        rates: dict[str, float] = {}
        if threads == 1:
            _single_rows(result, {"lightgbm": booster, "compiled": compiled}, singles, calls)
        for name, predictor in (("lightgbm", booster), ("compiled", compiled)):
            predictor.predict(batch)
            started, batches = time.perf_counter(), 3 if quick else 30
            for _ in range(batches):
                predictor.predict(batch)
            rates[name] = result.add(f"1000-row batch, {threads} thread{'s' * (threads > 1)}", name, IN_PROCESS,
                                     batches * len(batch) / (time.perf_counter() - started), "rows/s",
                                     samples=batches)
        result.targets.append(Target(f"compiled batch rows/s, {threads} thread(s), in process", ratio(
            rates["compiled"], rates["lightgbm"]), 2.0, at_most=False, basis="compiled / LightGBM Booster.predict"))


def _single_rows(result: SectionResult, predictors: dict[str, Any], singles: list[np.ndarray], calls: int) -> None:
    """Single-row p50s of both predictors on the same rows, in alternating blocks, so both see the same machine
    load (one after the other, a change of load between them moves the ratio)."""
    samples: dict[str, list[float]] = {name: [] for name in predictors}
    block = min(calls, 250)
    for start in range(0, calls, block):
        for name, predictor in predictors.items():
            samples[name] += _sequential(predictor.predict, singles, block, start)
    p50s = {name: result.add("single row: p50", name, IN_PROCESS, percentile_ms(values, 50), "ms",
                             samples=len(values)) for name, values in samples.items()}
    result.targets.append(Target("compiled single row, in process: speed-up", ratio(
        p50s["lightgbm"], p50s["compiled"]), 2.0, at_most=False,
        basis="p50 of LightGBM's single-row fast path / p50 of the compiled predictor, 1 thread, alternating blocks"))


def _served(result: SectionResult, targets: dict[str, str], rows: np.ndarray, quick: bool) -> None:
    singles = [np.ascontiguousarray(rows[i : i + 1]) for i in range(len(rows))]
    batch = np.ascontiguousarray(rows[:1000])
    gens = {name: Generators(target) for name, target in targets.items()}
    try:
        calls = {name: g.call(RAW_STUB) for name, g in gens.items()}
        for call in calls.values():
            _sequential(call, singles, 20, 0)
            call(batch)
        latencies: dict[str, list[float]] = {name: [] for name in calls}
        seconds: dict[str, float] = dict.fromkeys(calls, 0.0)
        blocks, block = (2, 20) if quick else (8, 250)
        for start in range(0, blocks * block, block):
            for name, call in calls.items():
                latencies[name] += _sequential(call, singles, block, start)
                began = time.perf_counter()
                for _ in range(1 if quick else 5):
                    call(batch)
                seconds[name] += time.perf_counter() - began
        rates = {}
        for name in calls:
            result.add("single row, sequential: p50", name, RAW_STUB, percentile_ms(latencies[name], 50), "ms",
                       samples=len(latencies[name]))
            rates[name] = result.add("1000-row batch", name, RAW_STUB,
                                     blocks * (1 if quick else 5) * len(batch) / seconds[name], "rows/s",
                                     samples=blocks * (1 if quick else 5))
        result.targets.append(Target("server batch rows/s, compiled / lightgbm", ratio(
            rates["compiled"], rates["lightgbm"]), 1.8, at_most=False, basis="1000-row batches, raw stub"))
    finally:
        for g in gens.values():
            g.close()


def run(model_file: str, model_key: str, rows: np.ndarray, *, quick: bool, start_server: Callable[..., Any],
        wait_serving: Callable[[str], None]) -> dict[str, Any]:
    result = SectionResult()
    cache = CACHE_DIR / model_key / "compiled-server-cache"
    servers = {"lightgbm": start_server("backend-lightgbm"),
               "compiled": start_server("backend-compiled", backend="compiled", cache_dir=str(cache))}
    try:
        targets = {}
        for name, server in servers.items():
            targets[name] = f"127.0.0.1:{server.ports['public_port']}"
            wait_serving(targets[name])
        started = time.monotonic()
        served = _wait_compiled(f"127.0.0.1:{servers['compiled'].ports['control_port']}", COMPILE_WAIT_SECONDS)
        result.notes.append(f"compiled backend {served.backend_version} serving {time.monotonic() - started:.1f} s "
                            f"after the booster (cores: {os.cpu_count()})")
        _served(result, targets, rows, quick)
    finally:
        for server in servers.values():
            server.stop()
    _in_process(result, model_file, cache, rows, quick)
    return result.as_dict()
