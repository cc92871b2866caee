"""Test support: settings of real servers and monitors on port 0, and waiting helpers.

The child processes themselves (server, monitor, `mlflow server`) are in tools/processes.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tabserve_server.settings import ServerSettings
from tools.debian import ToolUnavailable, ensure_command

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


def required_command(command: str, package: str) -> str:
    """A tool from a Debian package that a test needs: installed when missing; the test fails, never skips."""
    try:
        return ensure_command(command, package)
    except ToolUnavailable as exc:
        pytest.fail(str(exc))
