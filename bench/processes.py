"""Child processes of the benchmark: the project's server and the reference servicer.

Each child prints one JSON line `{"event": "listening", ...ports}` on stdout first; stderr goes to a
file (never a pipe that could fill up). `stop()` is always called from a `finally` (or an ExitStack).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tabserve_server.settings import ENV_PREFIX, ServerSettings

REPO = Path(__file__).resolve().parent.parent


class ChildProcess:
    """A child that announces its ports on its first stdout line."""

    def __init__(
        self, args: Sequence[str], log_file: Path, env: Mapping[str, str] | None = None, start_timeout: float = 60.0
    ) -> None:
        self.log_file = log_file
        self._log = log_file.open("w")
        self.proc = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=REPO,
            env=dict(env) if env is not None else None,
        )
        try:
            self.ports: dict[str, Any] = self.read_event("listening", start_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_event(self, event: str, timeout: float) -> dict[str, Any]:
        """The next stdout JSON line whose `event` is `event` (other lines are skipped)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {event!r} line within {timeout} s; log: ...{self.log_tail(600)}")
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"exited ({self.proc.wait(5)}) before {event!r}; log: ...{self.log_tail(600)}")
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("event") == event:
                return message

    def log_tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_file.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def python_env() -> dict[str, str]:
    """The environment of a child: ours without TABSERVE_SERVER_* and with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def has_setting(name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(ServerSettings)}


def start_project_server(
    tracking_uri: str, model_uri: str, workdir: Path, name: str = "project", start_timeout: float = 120.0,
    **overrides: Any,
) -> ChildProcess:
    """`python -m tabserve_server` in its production configuration (metrics and validation on) on port 0."""
    values: dict[str, Any] = {
        "model_uri": model_uri,
        "tracking_uri": tracking_uri,
        "address": "127.0.0.1:0",
        "control_address": "127.0.0.1:0",
        "metrics_address": "127.0.0.1:0",
        "cache_dir": str(workdir / f"{name}-cache"),
        **overrides,
    }
    env = python_env()
    for key, value in values.items():
        env[ENV_PREFIX + key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return ChildProcess([sys.executable, "-m", "tabserve_server"], workdir / f"{name}.log", env, start_timeout)


def start_reference_server(model_file: Path, workdir: Path, model_name: str, version: str) -> ChildProcess:
    args = [
        sys.executable, "-m", "bench.reference_server", "--model-file", str(model_file),
        "--address", "127.0.0.1:0", "--model-name", model_name, "--model-version", version,
    ]
    return ChildProcess(args, workdir / "reference.log", python_env(), 120.0)


def wait_serving(target: str, timeout: float = 180.0) -> None:
    """Wait until grpc.health.v1 says SERVING (the project server loads its model after it listens)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
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


def score_calls_by_code(metrics_port: int) -> dict[str, float]:
    """`tabserve_server_requests_total` of the Score method, by gRPC status code, from /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "tabserve_server_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("method") == SCORE_METHOD:
                code = sample.labels.get("code", "")
                counts[code] = counts.get(code, 0.0) + sample.value
    return counts
