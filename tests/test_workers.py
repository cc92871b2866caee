"""A multi-worker server (workers=2) as real processes against a SQLite registry: one version everywhere,
two-phase reloads, aggregated status and metrics, worker restarts, SIGTERM.

Every test passes alone and in any order: the module's registry holds two good versions from the start, the
tests that share the module's server move it between them and read what it serves instead of assuming it,
and the SIGTERM test stops a server of its own. The rollout's decisions themselves are tested without
processes in test_rollout.py.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from prometheus_client import CollectorRegistry

from tabserve.control.v1 import control_pb2
from tabserve_client import ControlClient, ScoringClient, aspired_version
from tabserve_demo.applicants import make_applicants
from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_demo.processes import MonitorProcess
from tabserve_demo.registration import register_demo_version
from tabserve_server.app import ServingApp
from tabserve_server.core.model import AspiredVersion
from tests.support import MODEL_NAME, Server, sample_key, score_calls, scrape, server_settings, wait_for

ROWS = make_applicants(3, seed=99)[0]
GOOD = ("1", "2")  # the module registry's good versions; 1 is under the alias `production`


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = bootstrap_embedded_registry(tmp_path_factory.mktemp("workers-registry"), model_name=MODEL_NAME)
    assert register_demo_version(uri, MODEL_NAME, seed=2, alias=None) == GOOD[1]
    return uri


def other_good(version: str) -> str:
    """The good version that is not `version`: where a test that needs a reload moves the server."""
    return GOOD[1] if version == GOOD[0] else GOOD[0]


def versions_over_fresh_channels(target: str, channels: int, calls: int = 2) -> list[str]:
    """Each ScoringClient opens its own channel (a new connection, so the kernel picks a worker)."""
    found = []
    for _ in range(channels):
        with ScoringClient(target, timeout=10) as client:
            found += [client.score(ROWS).model_version for _ in range(calls)]
    return found


def test_supervised_worker_holds_a_staged_version_until_commit(registry_uri: str, tmp_path: Path) -> None:
    """In-process: the two-phase reload of one worker, and LOAD_STATE_STAGED on its control port."""
    app = ServingApp(server_settings(registry_uri, tmp_path / "cache"), registry=CollectorRegistry(), supervised=True)
    app.start()
    control = ControlClient(f"127.0.0.1:{app.control_port}", timeout=10)
    try:
        assert app.manager.status().aspired is None  # a supervised worker loads nothing on its own
        one = AspiredVersion(MODEL_NAME, "1", f"models:/{MODEL_NAME}/1")
        app.manager.set_aspired(one, stage_only=True)

        def staged() -> Any:
            status = control.status()
            return status if status.load_state == control_pb2.LOAD_STATE_STAGED else None

        status = wait_for(staged, timeout=60, what="version 1 staged")
        assert status.staged.version == "1" and not status.serving.model_name and not status.accepting_requests
        assert app.manager.current() is None
        assert not app.manager.commit_staged(AspiredVersion(MODEL_NAME, "9", f"models:/{MODEL_NAME}/9"))
        commit = control.commit_staged(aspired_version(f"models:/{MODEL_NAME}/1"))
        assert commit.serving and commit.status.serving.version == "1" and commit.status.accepting_requests
        assert not commit.status.staged.model_name
        assert app.manager.commit_staged(one)  # idempotent
    finally:
        control.close()
        app.stop(0)


def start_settled(registry_uri: str, cache_dir: Path) -> Server:
    """A 2-worker server on the alias, once both workers serve one good version and accept requests."""
    server = Server(server_settings(registry_uri, cache_dir, workers=2))
    try:
        wait_for(lambda: server.serving() in GOOD and server.settled_on(server.serving()), timeout=120,
                 interval=0.2, what="both workers serve the alias's version")
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="module")
def server(registry_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The module's shared server; each test leaves it settled on a good version."""
    server = start_settled(registry_uri, tmp_path_factory.mktemp("workers-cache"))
    try:
        yield server
    finally:
        server.close()


def test_every_worker_answers_with_one_version(server: Server) -> None:
    assert set(versions_over_fresh_channels(server.target, channels=30)) == {server.serving()}
    status = server.status()
    pids = {w.pid for w in status.workers}
    assert len(pids) == 2 and os.getpid() not in pids
    # Both workers took connections (the chance that 30 connections all hash to one is 2**-29).
    per_worker = [score_calls(scrape(w.metrics_port)) for w in status.workers]
    assert all(calls > 0 for calls in per_worker), per_worker


def test_metrics_sum_across_workers(server: Server) -> None:
    versions_over_fresh_channels(server.target, channels=10)
    status = server.status()
    per_worker = [scrape(w.metrics_port) for w in status.workers]
    total = scrape(server.process.metrics_port)
    assert score_calls(total) == sum(score_calls(m) for m in per_worker) > 0
    rows = "tabserve_server_rows_scored_total"
    assert total[rows] == sum(m[rows] for m in per_worker)
    count = "tabserve_server_prediction_score_count"
    assert total[count] == sum(m[count] for m in per_worker) == total[rows]
    assert total["tabserve_server_workers"] == 2
    assert total["tabserve_server_serving"] == 1
    assert total["tabserve_server_model_load_failing"] == 0
    info = [k for k in total if k.startswith("tabserve_server_model_info{")]
    assert len(info) == 1 and f'model_version="{status.serving.version}"' in info[0]


def test_reload_reaches_all_workers_without_failed_calls(server: Server) -> None:
    before = server.serving()
    version = other_good(before)
    seen: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def score_continuously() -> None:
        while not done.is_set():
            try:  # a fresh channel every few calls, so calls keep landing on both workers
                with ScoringClient(server.target, timeout=10) as client:
                    seen.extend(client.score(ROWS).model_version for _ in range(5))
            except Exception as exc:
                failures.append(exc)

    scorers = [threading.Thread(target=score_continuously, daemon=True) for _ in range(3)]
    for thread in scorers:
        thread.start()
    try:
        wait_for(lambda: len(seen) >= 20, timeout=30, what="first responses")
        response = server.state(version)
        assert not response.already_serving
        wait_for(lambda: server.settled_on(version), timeout=90, interval=0.2, what=f"both workers on {version}")
        settled = len(seen)
        wait_for(lambda: len(seen) >= settled + 20, timeout=30, what="responses after the reload")
    finally:
        done.set()
        for thread in scorers:
            thread.join(20)
    assert not failures, failures[:3]
    assert set(seen) == {before, version}
    assert set(versions_over_fresh_channels(server.target, channels=10)) == {version}


@pytest.mark.parametrize(("broken", "explains"), [("missing_artifacts", "missing"), ("wrong_features", "feature")])
def test_broken_version_is_refused_everywhere(
    server: Server, registry_uri: str, broken: str, explains: str
) -> None:
    good = server.status().serving.version
    version = register_demo_version(registry_uri, MODEL_NAME, seed=7, alias=None, broken=broken)
    server.state(version)

    def failed() -> Any:
        status = server.status()
        return status if status.load_state == control_pb2.LOAD_STATE_FAILED and status.failed_version == version \
            else None

    status = wait_for(failed, timeout=60, interval=0.2, what=f"failed load of broken version {version}")
    print(f"{broken}: {status.last_error}")
    assert status.serving.version == good and status.aspired.version == version
    assert status.last_error.startswith("worker ") and explains in status.last_error.lower()
    assert status.accepting_requests
    for worker in status.workers:
        assert worker.status.serving.version == good
        assert not worker.status.staged.model_name or worker.status.staged.version != version
    assert set(versions_over_fresh_channels(server.target, channels=6)) == {good}
    server.state(good)  # back to the good version: the failure is history
    wait_for(lambda: server.settled_on(good), timeout=30, interval=0.2, what="settled back on the good version")
    assert server.status().last_error == ""


def test_killed_worker_is_restarted_and_serves_the_same_version(server: Server) -> None:
    before = server.status()
    version = before.serving.version
    calls_before = score_calls(scrape(server.process.metrics_port))
    restarts_before = server.metric("tabserve_server_worker_restarts_total")
    victim = before.workers[1].pid
    os.kill(victim, signal.SIGKILL)

    def replaced() -> Any:
        status = server.settled_on(version)
        return status if status is not None and status.workers[1].pid != victim else None

    status = wait_for(replaced, timeout=120, interval=0.2, what="worker 1 restarted and serving")
    assert status.workers[1].restarts == before.workers[1].restarts + 1
    assert set(versions_over_fresh_channels(server.target, channels=10)) == {version}
    total = scrape(server.process.metrics_port)
    assert total["tabserve_server_worker_restarts_total"] == (restarts_before or 0) + 1
    assert total["tabserve_server_workers"] == 2
    # Counters stay monotonic: the dead worker's last scraped counts are carried over.
    assert score_calls(total) >= calls_before


def test_monitor_sees_one_server_and_moves_every_worker(server: Server, registry_uri: str, tmp_path: Path) -> None:
    """The real monitor in front of the supervisor: it states the alias target to the one control address,
    every worker switches, and its probes (health, canary) go through the shared public port."""
    serving = server.status().serving.version
    target = other_good(serving)
    MlflowClient(registry_uri, registry_uri).set_registered_model_alias(MODEL_NAME, "production", target)
    monitor = MonitorProcess(
        {"tracking_uri": registry_uri, "model_name": MODEL_NAME, "poll_interval_seconds": 0.5,
         "control_address": server.control_address, "public_address": server.target,
         "metrics_address": "127.0.0.1:0", "rpc_timeout_seconds": 5.0},
        log_file=tmp_path / "monitor.log",
    )
    try:
        wait_for(lambda: server.settled_on(target), timeout=120, interval=0.2, what=f"every worker on {target}")

        def converged() -> Any:
            found = scrape(monitor.metrics_port)
            ok = (found.get("tabserve_monitor_served_version") == float(target)
                  and found.get("tabserve_monitor_served_version_lag_seconds") == 0
                  and found.get("tabserve_monitor_canary_up") == 1)
            return found if ok else None

        found = wait_for(converged, timeout=30, interval=0.2, what="monitor sees the switch")
        assert found["tabserve_monitor_target_version"] == float(target)
        assert found["tabserve_monitor_server_up"] == 1
        assert found["tabserve_monitor_control_up"] == 1
        assert found[sample_key("tabserve_monitor_reloads_total", result="success")] >= 1
        assert set(versions_over_fresh_channels(server.target, channels=10)) == {target}
        assert monitor.stop(30) == 0
    finally:
        monitor.close()


def test_sigterm_drains_every_worker_and_exits_zero(registry_uri: str, tmp_path: Path) -> None:
    """A server of its own: the test stops it."""
    server = start_settled(registry_uri, tmp_path / "cache")
    try:
        pids = [w.pid for w in server.status().workers]
        assert len(pids) == 2
        assert server.process.terminate(60) == 0
        for pid in pids:
            wait_for(lambda pid=pid: not _alive(pid), timeout=10, what=f"worker {pid} gone")
    finally:
        server.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0) until its parent reaps it; the parent exited, so init reaps it soon.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
