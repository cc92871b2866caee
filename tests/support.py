"""Test support: real servers on port 0, in-process or as child processes, and waiting helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tabserve_server.settings import ENV_PREFIX, ServerSettings

MODEL_NAME = "credit-default"


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


def server_settings(tracking_uri: str, cache_dir: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "model_uri": f"models:/{MODEL_NAME}@production",
        "tracking_uri": tracking_uri,
        "address": "127.0.0.1:0",
        "control_address": "127.0.0.1:0",
        "metrics_address": "127.0.0.1:0",
        "cache_dir": str(cache_dir),
        "retry_initial_seconds": 0.2,
        "retry_max_seconds": 1.0,
        "registry_timeout_seconds": 2.0,
        "shutdown_grace_seconds": 5.0,
    }
    values.update(overrides)
    return ServerSettings(**values)


class ServerProcess:
    """`python -m tabserve_server` as a child process; ports are read from its 'listening' line."""

    def __init__(self, settings: ServerSettings, extra_env: Mapping[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        for field, value in vars(settings).items():
            env[ENV_PREFIX + field.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        env.update(extra_env or {})
        # stderr goes to a file, not a pipe: a server that logs a lot must never block on a full pipe.
        self._stderr_file = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tabserve_server"], env=env, stdout=subprocess.PIPE, stderr=self._stderr_file,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"server exited early: {self.stderr()}")
        ports = json.loads(line)
        self.public_port: int = ports["public_port"]
        self.control_port: int = ports["control_port"]
        self.metrics_port: int = ports["metrics_port"]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.public_port}"

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        self._stderr_file.seek(0)
        return self._stderr_file.read()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr_file.close()


def free_port() -> int:
    """A TCP port free on loopback right now (for tools that cannot bind port 0 and report it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def read_first_line(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The first stdout line of `proc`, waiting at most `timeout` seconds (readline alone can block forever)."""
    import queue
    import threading

    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline() if proc.stdout else ""), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"{what} printed nothing within {timeout}s") from None
    if not line:
        raise AssertionError(f"{what} exited before printing its ports (exit code {proc.wait(10)})")
    return line


class MonitorProcess:
    """`python -m tabserve_monitor` as a child process following `server`; metrics port read from its first line."""

    def __init__(
        self, tracking_uri: str, server: ServerProcess, start_timeout: float = 60.0, **settings: object
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TABSERVE_MONITOR_")}
        values: dict[str, object] = {
            "tracking_uri": tracking_uri,
            "model_name": MODEL_NAME,
            "public_address": server.target,
            "control_address": f"127.0.0.1:{server.control_port}",
            "metrics_address": "127.0.0.1:0",
            "poll_interval_seconds": 1.0,
            "rpc_timeout_seconds": 5.0,
            "backoff_max_seconds": 2.0,
        }
        values.update(settings)
        env.update({"TABSERVE_MONITOR_" + key.upper(): str(value) for key, value in values.items()})
        self._stderr_file = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tabserve_monitor"], env=env, stdout=subprocess.PIPE, stderr=self._stderr_file,
            text=True,
        )
        try:
            line = json.loads(read_first_line(self.proc, start_timeout, "the monitor"))
        except BaseException:
            self.__exit__()
            raise
        self.metrics_port: int = line["metrics_port"]

    def terminate(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self._stderr_file.seek(0)
        return self._stderr_file.read()

    def __enter__(self) -> MonitorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr_file.close()
