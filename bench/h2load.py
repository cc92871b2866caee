"""Load from h2load (Debian's nghttp2-client): gRPC unary calls over HTTP/2 at a fraction of a Python
generator's CPU, so the server, not the generator, is what saturates the two cores.

The body is prebuilt: one length-prefixed gRPC message (flag byte, 4-byte big-endian length, a serialized
single-row ScoreRequest), sent with `content-type: application/grpc` and `te: trailers`. gRPC reports
errors with HTTP 200 and a `grpc-status` trailer, which h2load does not read, so success is verified on
the server side: the project's `tabserve_server_requests_total{code="OK"}` delta, and the reference
servicer's own response counter (SIGUSR1). A run counts as failed calls whatever h2load sent that the
server did not answer OK.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.processes import SCORE_METHOD, score_calls_by_code
from bench.report import H2LOAD, SectionResult, Target, ratio
from bench.serving import score_request
from tabserve_demo.processes import ChildProcess

CONNECTIONS = 16  # 16 concurrent callers, one connection each (SO_REUSEPORT spreads connections, not streams)
# Issue 18: against the fast-path reference, >= 0.9 replaces the old ">= 1.0 against Booster.predict's reference".
SINGLE_ROW_TARGET = "single-row throughput vs fast path (h2load)"


@dataclass(frozen=True)
class H2Run:
    seconds: float
    requests: int
    http_ok: int  # 2xx responses (gRPC errors included: they are HTTP 200 too)
    grpc_ok: int  # answered OK according to the server
    p50_ms: float
    p99_ms: float

    @property
    def failed(self) -> int:
        return max(0, self.requests - self.grpc_ok)

    @property
    def ok_per_second(self) -> float:
        return min(self.grpc_ok, self.http_ok) / self.seconds if self.seconds else float("nan")


def ensure_h2load() -> str:
    from tools.debian import ensure_command

    return ensure_command("h2load", "nghttp2-client")


def write_body(path: Path, rows: np.ndarray, request: Any = None) -> Path:
    """A length-prefixed gRPC message: `request`, by default the single-row ScoreRequest of `rows`."""
    message = (score_request(rows) if request is None else request).SerializeToString()
    path.write_bytes(struct.pack(">?I", False, len(message)) + message)
    return path


def reference_ok_count(child: ChildProcess) -> int:
    os.kill(child.pid, signal.SIGUSR1)
    return int(child.read_event("count", 10.0)["ok"])


def project_ok_count(metrics_port: int, method: str = SCORE_METHOD) -> int:
    return int(score_calls_by_code(metrics_port, method).get("OK", 0.0))


_COUNTS = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")


def run_h2load(args: list[str]) -> tuple[float, dict[str, int]]:
    """Run h2load with `args`: the seconds it reports and its request counts (`_COUNTS`)."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
    finished = re.search(r"finished in ([\d.]+)(m?s)", done.stdout)
    counts = re.search(r"requests: " + ", ".join(rf"(\d+) {name}" for name in _COUNTS), done.stdout)
    if finished is None or counts is None:
        raise RuntimeError(f"cannot parse h2load output: {done.stdout[-2000:]}")
    elapsed = float(finished[1]) / (1000.0 if finished[2] == "ms" else 1.0)
    return elapsed, {name: int(value) for name, value in zip(_COUNTS, counts.groups(), strict=True)}


def h2load(
    binary: str, port: int, body: Path, *, log_file: Path, ok_count: Callable[[], int], requests: int = 0,
    seconds: int = 0, method: str = SCORE_METHOD,
) -> H2Run:
    """`requests` calls split evenly over the connections, or (`seconds`) every connection busy for that long.

    Throughput is measured with `seconds`: with a fixed count, each connection has the same quota, so when
    SO_REUSEPORT gives one worker more connections than the other, the other idles once its share is done
    and the run measures the busiest worker, not the server.
    """
    url = f"http://127.0.0.1:{port}/{method}"
    amount = ["-D", str(seconds)] if seconds else ["-n", str(requests)]
    args = [
        binary, *amount, "-c", str(CONNECTIONS), "-m", "1", "-t", "1", "-d", str(body),
        "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log_file), url,
    ]
    before = ok_count()
    elapsed, counts = run_h2load(args)
    after = ok_count()
    # --log-file: one line per request, "start time (µs)  HTTP status  duration (µs)".
    durations = [int(line.split()[2]) for line in log_file.read_text().splitlines() if line.strip()]
    micro = np.asarray(durations, dtype=np.float64)
    return H2Run(
        # A timed run stops with calls still in flight: only the calls h2load saw done count as sent.
        seconds=elapsed, requests=counts["done" if seconds else "total"], http_ok=counts["succeeded"],
        grpc_ok=after - before,
        p50_ms=float(np.percentile(micro, 50) / 1e3) if micro.size else float("nan"),
        p99_ms=float(np.percentile(micro, 99) / 1e3) if micro.size else float("nan"),
    )


def add_runs(result: SectionResult, server: str, label: str, runs: list[H2Run]) -> float:
    """The figures of one server's runs (throughput, p50, p99, failed calls); returns the throughput."""
    total_ok = sum(min(r.grpc_ok, r.http_ok) for r in runs)
    seconds = sum(r.seconds for r in runs)
    requests = sum(r.requests for r in runs)
    rate = result.add(
        f"{label}: verified OK throughput", server, H2LOAD, total_ok / seconds, "calls/s", samples=requests
    )
    result.add(f"{label}: p50", server, H2LOAD, float(np.median([r.p50_ms for r in runs])), "ms", samples=requests)
    result.add(f"{label}: p99", server, H2LOAD, float(np.median([r.p99_ms for r in runs])), "ms", samples=requests)
    result.add(f"{label}: failed calls", server, H2LOAD, sum(r.failed for r in runs), "calls", samples=requests)
    return rate


Servers = dict[str, tuple[int, Callable[[], int]]]  # name -> (port, count of calls answered OK)


def alternate(
    binary: str, workdir: Path, body: Path, servers: Servers, *, seconds: int, rounds: int, tag: str,
    method: str = SCORE_METHOD,
) -> dict[str, list[H2Run]]:
    """A 200-call warm-up per server, then `rounds` timed runs each, alternating (drift hits all alike)."""
    runs: dict[str, list[H2Run]] = {name: [] for name in servers}
    for i, (port, count) in enumerate(servers.values()):
        h2load(binary, port, body, requests=200, log_file=workdir / f"h2load-{tag}-{i}-warmup.log", ok_count=count,
               method=method)
    for r in range(rounds):
        for i, (name, (port, count)) in enumerate(servers.items()):
            log_file = workdir / f"h2load-{tag}-{i}-{r}.log"
            runs[name].append(h2load(binary, port, body, seconds=seconds, log_file=log_file, ok_count=count,
                                     method=method))
    return runs


def run(
    binary: str, workdir: Path, rows: np.ndarray, *, project: ChildProcess, reference: ChildProcess, quick: bool
) -> dict[str, Any]:
    """Single-row throughput of the project vs the reference under h2load, in alternating rounds."""
    result = SectionResult()
    body = write_body(workdir / "score-1row.grpc", rows[:1])
    metrics_port = int(project.ports["metrics_port"])
    servers: Servers = {
        "reference": (int(reference.ports["public_port"]), lambda: reference_ok_count(reference)),
        "project": (int(project.ports["public_port"]), lambda: project_ok_count(metrics_port)),
    }
    runs = alternate(binary, workdir, body, servers, seconds=1 if quick else 10, rounds=1 if quick else 2, tag="score")
    label = f"single row, {CONNECTIONS} connections"
    rates = {name: add_runs(result, name, label, name_runs) for name, name_runs in runs.items()}
    failed = sum(r.failed for r in runs["project"])
    result.targets.append(Target(
        SINGLE_ROW_TARGET, ratio(rates["project"], rates["reference"]), 0.9, False,
        f"verified OK calls/s, project / fast-path reference, h2load {CONNECTIONS} connections x 1 stream",
        extra_ok=failed == 0, detail=f"{failed} failed calls" if failed else "",
    ))
    return result.as_dict()


# --- multi-worker (SO_REUSEPORT) ------------------------------------------------------------------


def run_multi_worker(
    binary: str, workdir: Path, rows: np.ndarray, *, reference: ChildProcess, quick: bool,
    start_server: Callable[..., ChildProcess], wait_serving: Callable[[str], None],
) -> dict[str, Any]:
    """Several worker processes on one port vs the single-process reference (target >= 1.6x), measured in
    alternating rounds like the h2load section (the project's single-process server is stopped by then)."""
    result = SectionResult()
    workers = os.cpu_count() or 1
    body = write_body(workdir / "score-1row-mw.grpc", rows[:1])
    server = start_server(name="multi-worker", start_timeout=240.0, workers=workers)
    try:
        port = int(server.ports["public_port"])
        wait_serving(f"127.0.0.1:{port}")
        metrics_port = int(server.ports["metrics_port"])
        servers: Servers = {
            "reference": (int(reference.ports["public_port"]), lambda: reference_ok_count(reference)),
            f"project, {workers} workers": (port, lambda: project_ok_count(metrics_port)),
        }
        runs = alternate(binary, workdir, body, servers, seconds=1 if quick else 10, rounds=1 if quick else 2,
                         tag="mw")
    finally:
        server.stop()
    label = f"single row, {CONNECTIONS} connections"
    rates = {name: add_runs(result, name, label, name_runs) for name, name_runs in runs.items()}
    failed = sum(r.failed for name, name_runs in runs.items() if name != "reference" for r in name_runs)
    result.targets.append(Target(
        "multi-worker throughput vs single-process reference",
        ratio(rates[f"project, {workers} workers"], rates["reference"]), 1.6, False,
        f"verified OK calls/s, {workers} workers (SO_REUSEPORT) / single-process reference, h2load, alternating",
        extra_ok=failed == 0, detail=f"{failed} failed calls" if failed else "",
    ))
    result.notes.append("success verified from the metrics endpoint: assumes it aggregates all workers")
    return result.as_dict()
