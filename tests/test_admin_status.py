"""`tabserve-admin status` against a running server: a supervisor with two workers and a control token, on the
session's SQLite registry; a failing load; an unreachable control port; a wrong token."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tabserve_client import aspired_version
from tests.support import MODEL_NAME, Server, run_admin, server_settings, wait_for

TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("admin-status") / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture(scope="module")
def server(tracking_uri: str, token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cache = tmp_path_factory.mktemp("admin-status-cache")
    settings = server_settings(tracking_uri, cache, workers=2, control_token_file=str(token_file))
    running = Server(settings, control_token=TOKEN)
    try:
        running.settle_on("1", timeout=120)
        yield running
    finally:
        running.close()


@pytest.fixture(autouse=True)
def _no_server_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("TABSERVE_SERVER_")]:
        monkeypatch.delenv(name)


def status(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_admin(capsys, "status", *args)


def test_status_in_words_with_every_worker(capsys: pytest.CaptureFixture[str], server: Server, token_file: Path
                                           ) -> None:
    code, out, _ = status(capsys, "--control-address", server.control_address,
                          "--control-token-file", str(token_file))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"server (control port {server.control_address})"
    assert lines[1].startswith(f"  serving:   {MODEL_NAME} version 1, loaded from registry (models:/{MODEL_NAME}/1)")
    assert f"  aspired:   {MODEL_NAME} version 1 (models:/{MODEL_NAME}/1)" in lines
    assert "  load:      idle (the aspired version is the served one)" in lines
    workers = [line for line in lines if line.startswith("  worker ")]
    assert len(workers) == 2 and all(", up, 0 restarts)" in line for line in workers)
    assert sum(line.startswith(f"    serving:   {MODEL_NAME} version 1") for line in lines) == 2


def test_status_as_json_with_the_token_from_the_environment(
    capsys: pytest.CaptureFixture[str], server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TABSERVE_SERVER_CONTROL_TOKEN", TOKEN)  # the server's own variable, as the monitor's
    monkeypatch.setenv("TABSERVE_SERVER_CONTROL_ADDRESS", server.control_address)
    code, out, _ = status(capsys, "--json")
    found = json.loads(out)
    assert code == 0 and found["serving"]["version"] == "1" and found["load_state"] == "LOAD_STATE_IDLE"
    assert found["serving"]["digest"].startswith("sha256:") and len(found["workers"]) == 2


def test_a_failing_load_is_said_with_its_next_attempt(
    capsys: pytest.CaptureFixture[str], server: Server, token_file: Path
) -> None:
    server.control.set_aspired(aspired_version(f"models:/{MODEL_NAME}/99"))
    try:
        wait_for(lambda: server.status().last_error, timeout=60, what="the failed load of version 99")
        code, out, _ = status(capsys, "--control-address", server.control_address,
                              "--control-token-file", str(token_file))
        assert code == 1
        assert f"  aspired:   {MODEL_NAME} version 99 (models:/{MODEL_NAME}/99)" in out
        assert "  load:      FAILED: the aspired version does not load; the served one keeps serving" in out
        assert "  last error: " in out and "(version 99, at " in out and "  next attempt: 20" in out
    finally:
        server.settle_on("1")


def test_an_unreachable_server_or_a_wrong_token_is_exit_1(
    capsys: pytest.CaptureFixture[str], server: Server, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token")
    code, _, err = status(capsys, "--control-address", server.control_address, "--control-token-file", str(wrong))
    assert code == 1 and "PERMISSION_DENIED" in err
    code, _, err = status(capsys, "--control-address", "127.0.0.1:1", "--timeout", "2")
    assert code == 1 and "control port 127.0.0.1:1 did not answer: UNAVAILABLE" in err
    code, _, err = status(capsys, "--control-address", server.control_address, "--control-token-file",
                          str(tmp_path / "missing"))
    assert code == 2 and "cannot read the control token file" in err
