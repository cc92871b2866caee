"""The monitor's status page (`/` on its metrics listener) in a real headless browser (Debian's `chromium`).

A registry of this module's own (the test moves its alias), a real server and a real monitor as child processes.
The alias goes to a version whose digest tag is wrong (the server refuses it: a failed reload with its reason),
then `tabserve-admin promote` moves it to a good version 2: the page, rendered by chromium, shows served and
target version 2, both reloads with their results, and the score histogram as an SVG chart. The screenshot is
kept in build/test-artifacts/status-page.png (README: Monitor sidecar).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from mlflow import MlflowClient

from tabserve_client import ScoringClient
from tabserve_demo.applicants import make_applicants
from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_demo.processes import MonitorProcess, ServerProcess
from tabserve_monitor.state import RELOAD_HISTORY, MonitorState, ReloadEvent, Snapshot
from tabserve_monitor.status_page import render
from tabserve_server.core.loading import DIGEST_TAG
from tests.support import MODEL_NAME, monitor_settings, required_command, scrape, server_settings, wait_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "build" / "test-artifacts"
TIMEOUT = 60.0

pytestmark = pytest.mark.timeout(400)


class Stack(NamedTuple):
    tracking_uri: str
    server: ServerProcess
    monitor: MonitorProcess
    page: str  # the status page's URL


def _copy_of_version_1(uri: str, **tags: str) -> str:
    """A new version registering version 1's files, with its tags (changed by `tags`)."""
    client = MlflowClient(uri, uri)
    first = client.get_model_version(MODEL_NAME, "1")
    version = str(client.create_model_version(MODEL_NAME, first.source, run_id=first.run_id).version)
    for key, value in {**first.tags, **tags}.items():
        client.set_model_version_tag(MODEL_NAME, version, key, value)
    return version


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("status-page")
    uri = bootstrap_embedded_registry(tmp / "registry", model_name=MODEL_NAME)
    with ServerProcess(server_settings(uri, tmp / "cache")) as server:
        with ScoringClient(server.target, timeout=10) as client:
            wait_for(lambda: client.health() == "SERVING", timeout=TIMEOUT, interval=0.2, what="server SERVING")
            for seed in range(3):  # scores for the histogram
                client.score(make_applicants(50, seed=seed)[0])
        settings = monitor_settings(uri, server.target, server.control_target,
                                    server_metrics_url=f"http://127.0.0.1:{server.metrics_port}/metrics")
        with MonitorProcess(settings) as monitor:
            yield Stack(uri, server, monitor, f"http://127.0.0.1:{monitor.metrics_port}/")
            assert monitor.terminate(15) == 0, monitor.stderr()[-3000:]
        assert server.terminate(30) == 0, server.stderr()[-3000:]


def _page(stack: Stack) -> str:
    with urllib.request.urlopen(stack.page, timeout=10) as response:
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        return str(response.read().decode())


def _served(stack: Stack, version: str) -> bool:
    return bool(re.search(rf'id="served">{version}<', _page(stack)) and re.search(rf'id="target">{version}<',
                                                                                  _page(stack)))


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # As root chromium needs --no-sandbox; its own profile directory keeps it away from any user's.
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={profile}", "--window-size=1000,1400", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "HOME": str(profile)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_page_after_a_failed_reload_and_a_promotion(stack: Stack, tmp_path: Path) -> None:
    chromium = required_command("chromium", "chromium")
    wait_for(lambda: _served(stack, "1"), timeout=TIMEOUT, interval=0.5, what="the page showing version 1")

    broken = _copy_of_version_1(stack.tracking_uri, **{DIGEST_TAG: "0" * 64})
    good = _copy_of_version_1(stack.tracking_uri)
    MlflowClient(stack.tracking_uri, stack.tracking_uri).set_registered_model_alias(MODEL_NAME, "production", broken)
    wait_for(lambda: "failure" in _page(stack) and f"1 &rarr; {broken}" in _page(stack), timeout=TIMEOUT,
             interval=0.5, what="the failed reload on the page")
    admin = Path(sys.executable).parent / "tabserve-admin"
    done = subprocess.run([str(admin), "promote", MODEL_NAME, good, "--reason", "status page test",
                           "--tracking-uri", stack.tracking_uri], capture_output=True, text=True, timeout=300,
                          check=False, env={k: v for k, v in os.environ.items() if not k.startswith("TABSERVE_")})
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for(lambda: _served(stack, good), timeout=TIMEOUT, interval=0.5, what=f"the page showing version {good}")

    dom = _chromium(chromium, tmp_path / "profile", "--dump-dom", stack.page).stdout
    assert re.search(rf'id="served">{good}<', dom) and re.search(rf'id="target">{good}<', dom), dom[:3000]
    history = dom[dom.index('id="reloads"'):]
    assert re.search(rf"failure.*1 → {broken}", history.replace("&rarr;", "→"), re.S), history[:2000]
    assert re.search(rf"success.*1 → {good}", history.replace("&rarr;", "→"), re.S), history[:2000]
    assert "tabserve.sha256" in history, history[:2000]  # the server's reason for the failure
    chart = dom[dom.index('<svg id="scores"'):dom.index("</svg>")]
    shown = re.search(r"(\d+) rows scored", dom)
    assert chart.count("<rect") == 21 and shown and int(shown.group(1)) >= 150, chart[:500]
    assert "<script" not in dom and not re.search(r'\b(src|href)="(https?:)?//', dom)  # nothing from elsewhere

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    _chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", stack.page)
    assert shot.stat().st_size > 10_000


def test_metrics_unchanged_beside_the_page(stack: Stack) -> None:
    metrics = scrape(stack.monitor.metrics_port)
    assert metrics["tabserve_monitor_registry_up"] == 1.0
    with urllib.request.urlopen(stack.page + "metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")


def test_every_text_is_escaped() -> None:
    """Registry names, versions and server errors are not the page's to trust."""
    evil = '<script>alert("x")</script>'
    snapshot = Snapshot(model_name=evil, follows=f"alias {evil}", target_version=evil, served_version=evil,
                        load_state=evil, last_error=evil, registry_problem=evil, registry_detail=evil,
                        canary_result=evil, reloads=(ReloadEvent(0.0, "failure", evil, evil, evil),))
    page = render(snapshot, [(0.5, 1.0), (float("inf"), 2.0)], evil)
    assert "<script" not in page and page.count("&lt;script&gt;") >= 10


def test_a_retried_failure_is_one_entry_with_its_count() -> None:
    """The server retrying one bad version must not push the other events out of the page's history."""
    state = MonitorState("m", "alias production", canary_enabled=True)
    state.reload("success", "1", "")
    for _ in range(RELOAD_HISTORY + 5):
        state.reload("failure", "2", "1", "digest mismatch")
    state.reload("failure", "2", "1", "registry unreachable")  # another reason: its own entry
    state.reload("success", "3", "1")
    reloads = state.snapshot().reloads
    assert [(e.result, e.version, e.repeats) for e in reloads] == [
        ("success", "1", 1), ("failure", "2", RELOAD_HISTORY + 5), ("failure", "2", 1), ("success", "3", 1)]
    page = render(state.snapshot(), None, "")
    assert f"failure</span> &times; {RELOAD_HISTORY + 5}</td>" in page, page
