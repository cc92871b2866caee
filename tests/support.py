"""Test support: settings of real servers and monitors on port 0, a server child process with its control
client, /metrics scraping, waiting helpers, and the venv of the real tritonclient.

The child processes themselves (server, monitor, `mlflow server`) are in tabserve_demo/processes.py (demo/).
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tabserve.control.v1 import control_pb2
from tabserve_client import ControlClient, TlsOptions, aspired_version
from tabserve_demo.processes import ServerProcess
from tabserve_server.app import ServingApp
from tabserve_server.settings import ServerSettings
from tools.debian import ToolUnavailable, ensure_command

MODEL_NAME = "credit-default"
SCORE_METHOD = "tabserve.scoring.v1.Scoring/Score"


@contextlib.contextmanager
def running_app(settings: ServerSettings) -> Iterator[ServingApp]:
    """An in-process server with `settings`, started and SERVING; stopped on exit."""
    serving = ServingApp(settings, registry=CollectorRegistry())
    serving.start()
    try:
        wait_for(lambda: serving.manager.current() is not None and serving.accepting(), what="first model load")
        yield serving
    finally:
        serving.stop(1.0)


def run_admin(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`tabserve-admin ARGS` run in this process: (exit code, stdout, stderr)."""
    from tabserve_admin import cli

    capsys.readouterr()
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll `condition` until it returns something truthy; bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def loopback_servicer(add: Callable[[Any, Any], None], servicer: Any) -> Iterator[int]:
    """`servicer` alone on a plain gRPC server on loopback port 0 (`add`: its generated add_*_to_server): the port;
    stopped on exit."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add(servicer, server)
    port: int = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def server_settings(tracking_uri: str, cache_dir: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "model_uri": f"models:/{MODEL_NAME}@production",
        "tracking_uri": tracking_uri,
        "address": "127.0.0.1:0",
        "control_address": "127.0.0.1:0",
        "metrics_address": "127.0.0.1:0",
        "cache_dir": str(cache_dir),
        # Beside the cache, never the working directory (the decision log is on by default).
        "decision_log_dir": str(cache_dir.with_name(cache_dir.name + "-decisions")),
        "retry_initial_seconds": 0.2,
        "retry_max_seconds": 1.0,
        "registry_timeout_seconds": 2.0,
        "shutdown_grace_seconds": 5.0,
    }
    values.update(overrides)
    return ServerSettings(**values)


def monitor_settings(
    tracking_uri: str, public_address: str, control_address: str, **overrides: object
) -> dict[str, object]:
    """TABSERVE_MONITOR_* values (without the prefix) of a monitor following the server at these addresses."""
    values: dict[str, object] = {
        "tracking_uri": tracking_uri,
        "model_name": MODEL_NAME,
        "public_address": public_address,
        "control_address": control_address,
        "metrics_address": "127.0.0.1:0",
        "poll_interval_seconds": 1.0,
        "rpc_timeout_seconds": 5.0,
        "backoff_max_seconds": 2.0,
    }
    values.update(overrides)
    return values


def required_command(command: str, package: str, also_in: tuple[str, ...] = ()) -> str:
    """A tool from a Debian package that a test needs: installed when missing; the test fails, never skips.
    `also_in`: directories off PATH where the package puts it (tools/debian.py)."""
    try:
        return ensure_command(command, package, also_in)
    except ToolUnavailable as exc:
        pytest.fail(str(exc))


def sample_key(name: str, **labels: str) -> str:
    """How `scrape` keys a sample: `name`, or `name{label="value",...}` with the labels sorted."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


def score_calls(metrics: dict[str, float]) -> float:
    """Score calls answered OK, from `scrape`'s samples."""
    return metrics.get(sample_key("tabserve_server_requests_total", code="OK", method=SCORE_METHOD), 0.0)


def scrape(port: int, ca_file: Path | None = None) -> dict[str, float]:
    """Every sample of the /metrics endpoint on loopback `port`, keyed by `sample_key`; over HTTPS verified with
    `ca_file` when given (the certificate must name localhost)."""
    if ca_file is None:
        url, context = f"http://127.0.0.1:{port}/metrics", None
    else:
        url, context = f"https://localhost:{port}/metrics", ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(url, timeout=10, context=context) as response:
        text = response.read().decode()
    return {sample_key(s.name, **s.labels): float(s.value)
            for family in text_string_to_metric_families(text) for s in family.samples}


class Server:
    """The server as a child process (`python -m tabserve_server`) with a control client, the same calls the
    monitor makes, and a /metrics reader. `workers` in the settings > 1 makes it a supervisor."""

    def __init__(
        self, settings: ServerSettings, extra_env: Mapping[str, str] | None = None, *,
        control_tls: TlsOptions | None = None, control_token: str = "",
    ) -> None:
        self.settings = settings
        self.process = ServerProcess(settings, extra_env)
        self.target = self.process.target
        self.control_address = self.process.control_target
        self.control = ControlClient(self.control_address, timeout=10, tls=control_tls, token=control_token)

    def status(self) -> Any:
        return self.control.status()

    def serving(self) -> str:
        return str(self.status().serving.version)

    def loading(self, version: str) -> bool:
        status = self.status()
        return bool(status.load_state == control_pb2.LOAD_STATE_LOADING and status.aspired.version == version)

    def state(self, version: str) -> Any:
        """SetAspiredVersion of models:/MODEL_NAME/`version`, exactly as the monitor states it."""
        return self.control.set_aspired(aspired_version(f"models:/{MODEL_NAME}/{version}"))

    def settled_on(self, version: str) -> Any:
        """The status once `version` is served (by every worker), accepted and nothing is pending; else None."""
        status = self.status()
        expected = self.settings.workers if self.settings.workers > 1 else 0  # a single process lists none
        workers_ok = len(status.workers) == expected and all(
            w.up and w.status.serving.version == version and w.status.accepting_requests for w in status.workers
        )
        ok = (status.serving.version == version and status.load_state == control_pb2.LOAD_STATE_IDLE
              and status.accepting_requests and workers_ok)
        return status if ok else None

    def settle_on(self, version: str, timeout: float = 60.0) -> Any:
        self.state(version)
        return wait_for(lambda: self.settled_on(version), timeout=timeout, interval=0.1,
                        what=f"server settled on version {version}")

    def metrics(self) -> dict[str, float]:
        return scrape(self.process.metrics_port)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get(sample_key(name, **labels))

    def close(self, grace: float = 30.0) -> int:
        self.control.close()
        try:
            return self.process.terminate(grace)
        finally:
            self.process.close()


@contextlib.contextmanager
def settled_server(settings: ServerSettings, version: str = "1") -> Iterator[Server]:
    """A server child process with `settings`, settled on `version` of MODEL_NAME; closed at the end."""
    running = Server(settings)
    try:
        running.settle_on(version)
        yield running
    finally:
        running.close()


TRITONCLIENT = "tritonclient[grpc]==2.73.0"
TRITON_VENV = Path(__file__).resolve().parent.parent / ".venv" / "tritonclient"


def tritonclient_python() -> Path:
    """The python of a venv holding the real tritonclient (created on first use, then reused: a stamp file
    records the installed version). tritonclient needs protobuf < 7, so it cannot share the project's venv."""
    python = TRITON_VENV / "bin" / "python"
    stamp = TRITON_VENV / ".installed"
    if stamp.exists() and stamp.read_text() == TRITONCLIENT and python.exists():
        return python
    shutil.rmtree(TRITON_VENV, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(TRITON_VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", TRITONCLIENT, "numpy"],
        check=True,
    )
    stamp.write_text(TRITONCLIENT)
    return python
