"""Memory returns after reloads (issue 3 target: RSS after 50 reloads <= 1.10 x RSS after 1).

A real server child process serves version 1 of a two-version registry; the control port's
SetAspiredVersion then alternates versions 2, 1, 2, ... and every swap is awaited through GetStatus.
RSS (VmRSS from /proc/<pid>/status, summed over the server and any worker children) is read after
reload 1 and after reload 50, with the curve in between.

The model is the seed-sized bench model (bench/model.py), the tiny one in quick mode, or any LightGBM
model file given as `model_file`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.model import FULL, TINY, BenchModel, ensure_model, register, registry_for
from bench.processes import start_project_server, wait_serving
from bench.report import SectionResult, Target, ratio
from tabserve.control.v1 import control_pb2
from tabserve_client import ControlClient, aspired_version

log = logging.getLogger(__name__)

TARGET = 1.10


def rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and of its child processes (worker processes, if any)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for one in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def _swap(control: ControlClient, model_name: str, version: str, timeout: float = 300.0) -> float:
    """State `version` as aspired and wait until the server serves it; returns the seconds it took."""
    started = time.monotonic()
    control.set_aspired(aspired_version(f"models:/{model_name}/{version}"))
    while True:
        status = control.status()
        if status.serving.version == version and status.load_state != control_pb2.LOAD_STATE_LOADING:
            return time.monotonic() - started
        if status.load_state == control_pb2.LOAD_STATE_FAILED and status.failed_version == version:
            raise RuntimeError(f"version {version} failed to load: {status.last_error}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"version {version} not served after {timeout} s")
        time.sleep(0.05)


def measure(tracking_uri: str, model_name: str, workdir: Path, reloads: int, settle: float = 1.0) -> dict[str, Any]:
    """Reload `reloads` times between versions 1 and 2; RSS after each reload (after `settle` seconds)."""
    server = start_project_server(tracking_uri, f"models:/{model_name}/1", workdir, name="reload-memory")
    try:
        wait_serving(f"127.0.0.1:{server.ports['public_port']}")
        with ControlClient(f"127.0.0.1:{server.ports['control_port']}", timeout=10) as control:
            rss_start = rss_bytes(server.pid)
            curve: list[int] = []
            durations: list[float] = []
            for i in range(1, reloads + 1):
                durations.append(_swap(control, model_name, "2" if i % 2 else "1"))
                time.sleep(settle)  # the old model is dropped after the swap; let the loader thread go idle
                curve.append(rss_bytes(server.pid))
    finally:
        server.stop()
    return {"rss_start": rss_start, "rss": curve, "reload_seconds": durations}


def run(quick: bool, model_file: Path | None = None, reloads: int | None = None) -> dict[str, Any]:
    """The reload-memory section (see bench/report.py for the shape)."""
    reloads = reloads or (6 if quick else 50)
    section = SectionResult()
    if model_file is None:
        model = ensure_model(TINY if quick else FULL)
    else:
        model = BenchModel(FULL, Path(model_file), 0.0, 0.0)
    with tempfile.TemporaryDirectory(prefix="tabserve-reload-memory-") as tmp:
        workdir = Path(tmp)
        # The bench model's registry is cached beside it (the server only reads it); a given model file gets a
        # fresh one here rather than a directory written next to it.
        registry = registry_for(model) if model_file is None else register(model, workdir / "registry", versions=2)
        result = measure(registry.tracking_uri, registry.model_name, workdir, reloads)
    curve = result["rss"]
    generator = "control SetAspiredVersion + GetStatus"
    section.add("RSS before the first reload", "project", generator, result["rss_start"] / 2**20, "MiB")
    for i, rss in enumerate(curve, start=1):
        if i in (1, 2, 10, 25) or i == len(curve):
            section.add(f"RSS after reload {i}", "project", generator, rss / 2**20, "MiB")
    section.add("reload time, median", "project", generator, sorted(result["reload_seconds"])[len(curve) // 2],
                "s", samples=len(curve))
    grown = ratio(float(curve[-1]), float(curve[0]))
    section.targets.append(Target(
        name="memory after reloads", ratio=grown, limit=TARGET, at_most=True,
        basis=f"RSS after reload {len(curve)} / after reload 1",
        detail=f"{curve[0] / 2**20:.0f} -> {curve[-1] / 2**20:.0f} MiB, model {model.model_file.name}",
    ))
    section.notes.append("RSS per reload (MiB): " + " ".join(f"{r / 2**20:.0f}" for r in curve))
    return section.as_dict()


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(json.dumps(run("--quick" in sys.argv, Path(args[0]) if args else None), indent=2))
