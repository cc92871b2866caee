"""Child processes of the benchmark: the project's server and the reference servicer.

Both are `tabserve_demo.processes.ChildProcess`es: each prints one JSON line `{"event": "listening", ...ports}` on
stdout first; stderr goes to a log file in the work directory. `stop()` is always called from a `finally`
(or an ExitStack).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tabserve_client import TlsOptions
from tabserve_client.channel import open_channel
from tabserve_demo.processes import ChildProcess, ServerProcess
from tabserve_server.settings import ENV_PREFIX

REPO = Path(__file__).resolve().parent.parent


def python_env() -> dict[str, str]:
    """The environment of a child: ours without TABSERVE_SERVER_* and with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def start_project_server(
    tracking_uri: str, model_uri: str, workdir: Path, name: str = "project", start_timeout: float = 120.0,
    **overrides: Any,
) -> ServerProcess:
    """`python -m tabserve_server` in its production configuration (metrics and validation on) on port 0."""
    values: dict[str, Any] = {
        "model_uri": model_uri,
        "tracking_uri": tracking_uri,
        "address": "127.0.0.1:0",
        "control_address": "127.0.0.1:0",
        "metrics_address": "127.0.0.1:0",
        "cache_dir": str(workdir / f"{name}-cache"),
        # On by default in the server: in the work directory, never the repository's.
        "decision_log_dir": str(workdir / f"{name}-decisions"),
        **overrides,
    }
    return ServerProcess(values, {"PYTHONPATH": python_env()["PYTHONPATH"]}, log_file=workdir / f"{name}.log",
                         cwd=REPO, start_timeout=start_timeout, name=f"{name} server")


def start_reference_server(model_file: Path, workdir: Path, model_name: str, version: str) -> ChildProcess:
    args = [
        sys.executable, "-m", "bench.reference_server", "--model-file", str(model_file),
        "--address", "127.0.0.1:0", "--model-name", model_name, "--model-version", version,
    ]
    return ChildProcess(args, env=python_env(), log_file=workdir / "reference.log", cwd=REPO, start_timeout=120.0,
                        name="reference server")


def wait_serving(target: str, timeout: float = 180.0, tls: TlsOptions | None = None) -> None:
    """Wait until grpc.health.v1 says SERVING (the project server loads its model after it listens)."""
    deadline = time.monotonic() + timeout
    with open_channel(target, (), tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target} not SERVING after {timeout} s")
            time.sleep(0.1)


SCORE_METHOD = "tabserve.scoring.v1.Scoring/Score"


def score_calls_by_code(metrics_port: int, method: str = SCORE_METHOD) -> dict[str, float]:
    """`tabserve_server_requests_total` of one method (default Score), by gRPC status code, from /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "tabserve_server_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("method") == method:
                code = sample.labels.get("code", "")
                counts[code] = counts.get(code, 0.0) + sample.value
    return counts
