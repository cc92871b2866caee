"""A busy port: `make run` (tabserve_demo.embedded) and the server itself print one clear line, before any banner
or training, and exit 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabserve_common.address import unavailable_address
from tabserve_demo.processes import free_port

BUSY = "cannot listen on 127.0.0.1:{port}: address already in use"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port with a listening socket on it, as a running server holds it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_unavailable_address_names_the_busy_one(busy_port: int) -> None:
    free = free_port()
    assert unavailable_address([f"127.0.0.1:{free}", "127.0.0.1:0"]) is None
    assert unavailable_address([f"127.0.0.1:{free}", f"127.0.0.1:{busy_port}"]) == BUSY.format(port=busy_port)


def test_second_run_on_a_busy_port_prints_one_line_and_exits_2(busy_port: int, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TABSERVE_SERVER_", "TABSERVE_MONITOR_"))}
    # Only the public port is taken; the other listeners pick free ports.
    env |= {"TABSERVE_SERVER_CONTROL_ADDRESS": "127.0.0.1:0", "TABSERVE_SERVER_METRICS_ADDRESS": "127.0.0.1:0",
            "TABSERVE_MONITOR_METRICS_ADDRESS": "127.0.0.1:0"}
    data_dir = tmp_path / "data"
    run = subprocess.run(
        [sys.executable, "-m", "tabserve_demo.embedded", "--data-dir", str(data_dir),
         "--address", f"127.0.0.1:{busy_port}"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr == f"error: {BUSY.format(port=busy_port)}\n"
    assert run.stdout == ""
    assert not data_dir.exists(), "the check comes before the registry is bootstrapped (and trained)"


def test_server_on_a_busy_port_prints_one_line_and_exits_2(busy_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABSERVE_SERVER_")}
    run = subprocess.run(
        [sys.executable, "-m", "tabserve_server", "--address", f"127.0.0.1:{busy_port}", "--model-uri", "/nowhere",
         "--control-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr == f"error: {BUSY.format(port=busy_port)}\n"
    assert run.stdout == ""
