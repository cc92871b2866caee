"""The monitor against real processes: a SQLite registry of its own, a real server child process, and the
monitor loop in a thread with a fresh metrics registry."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from prometheus_client import CollectorRegistry

from tabserve.control.v1 import control_pb2
from tabserve_client import ScoringClient
from tabserve_demo.applicants import make_applicants
from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_demo.processes import MonitorProcess, free_port
from tabserve_demo.registration import register_demo_version
from tabserve_monitor.loop import Monitor
from tabserve_monitor.metrics import MonitorMetrics
from tabserve_monitor.registry import Problem, RegistryWatcher
from tabserve_monitor.settings import MonitorSettings
from tests.support import MODEL_NAME, SCORE_METHOD, Server, server_settings, wait_for

POLL = 0.5
ROWS = make_applicants(4, seed=4242)[0]


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A registry of this module's own: the tests move its alias."""
    return bootstrap_embedded_registry(tmp_path_factory.mktemp("monitor-registry"), model_name=MODEL_NAME)


@contextmanager
def running_monitor(registry_uri: str, public: str, control: str) -> Iterator[Monitor]:
    settings = MonitorSettings(
        tracking_uri=registry_uri, poll_interval_seconds=POLL, public_address=public, control_address=control,
        backoff_max_seconds=2.0, rpc_timeout_seconds=2.0,
    )
    monitor = Monitor(settings, MonitorMetrics(CollectorRegistry()))
    stop = threading.Event()
    thread = threading.Thread(target=monitor.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield monitor
    finally:
        stop.set()
        thread.join(10)
        monitor.close()
        assert not thread.is_alive(), "the monitor loop did not stop on its stop event"


def sample(monitor: Monitor, name: str, **labels: str) -> float:
    found = monitor.metrics.collector_registry.get_sample_value(name, labels or None)
    return 0.0 if found is None else float(found)


def served(target: str) -> str:
    with ScoringClient(target, timeout=5) as client:
        return client.score(ROWS).model_version


@pytest.fixture(scope="module")
def stack(registry_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Monitor]]:
    """One server (starting on the production alias) and its monitor, shared by the ordered tests below."""
    server = Server(server_settings(registry_uri, tmp_path_factory.mktemp("monitor-cache")))
    try:
        with running_monitor(registry_uri, server.target, server.control_address) as monitor:
            wait_for(lambda: sample(monitor, "tabserve_monitor_served_version") == 1
                     and sample(monitor, "tabserve_monitor_server_up") == 1, what="monitor sees version 1")
            # The canary scores as a client would, and shows up in the server's own request count.
            wait_for(lambda: sample(monitor, "tabserve_monitor_canary_up") == 1, what="canary succeeds")
            assert sample(monitor, "tabserve_monitor_canary_requests_total", result="success") >= 1
            assert sample(monitor, "tabserve_monitor_canary_duration_seconds_count") >= 1
            assert (server.metric("tabserve_server_requests_total", code="OK", method=SCORE_METHOD) or 0) >= 1
            yield server, monitor
    finally:
        server.close()


def test_hot_reload_under_load(stack: tuple[Server, Monitor], registry_uri: str) -> None:
    server, monitor = stack
    # Trained and registered before the load starts, so promotion is only the alias move (as in production).
    version = register_demo_version(registry_uri, MODEL_NAME, seed=2, alias=None)
    assert version == "2"
    responses: list[tuple[float, str]] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def score_continuously() -> None:
        deadline = time.monotonic() + 30
        with ScoringClient(server.process.target, timeout=5) as client:
            while not done.is_set() and time.monotonic() < deadline:
                try:
                    responses.append((time.monotonic(), client.score(ROWS).model_version))
                except Exception as exc:
                    failures.append(exc)

    scorer = threading.Thread(target=score_continuously, daemon=True)
    scorer.start()
    try:
        wait_for(lambda: len(responses) >= 5, what="first responses")
        MlflowClient(registry_uri, registry_uri).set_registered_model_alias(MODEL_NAME, "production", version)
        promoted = time.monotonic()
        wait_for(lambda: any(v == "2" for _, v in responses[-5:]), timeout=25, what="version 2 served")
        time.sleep(0.3)  # some more responses after the switch
    finally:
        done.set()
        scorer.join(10)

    assert not failures, failures[:3]
    versions = [int(v) for _, v in responses]
    assert versions[0] == 1 and versions[-1] == 2
    assert versions == sorted(versions), "a response came from version 1 after version 2"
    switched = next(t for t, v in responses if v == "2") - promoted
    load_time = server.metric("tabserve_server_model_load_duration_seconds") or 0.0
    print(f"switch after {switched:.2f}s (load {load_time:.2f}s), {len(responses)} calls")
    assert switched <= POLL + load_time + 1.0
    wait_for(lambda: sample(monitor, "tabserve_monitor_served_version") == 2, timeout=5, what="monitor sees 2")
    assert sample(monitor, "tabserve_monitor_target_version") == 2
    assert sample(monitor, "tabserve_monitor_reloads_total", result="success") >= 1
    assert sample(monitor, "tabserve_monitor_served_version_lag_seconds") == 0
    assert sample(monitor, "tabserve_monitor_registry_up") == 1
    assert sample(monitor, "tabserve_monitor_polls_total", result="success") >= 1
    assert sample(monitor, "tabserve_monitor_last_successful_poll_timestamp_seconds") > time.time() - 10


def test_rollback_moves_alias_back(stack: tuple[Server, Monitor], registry_uri: str) -> None:
    server, monitor = stack
    MlflowClient(registry_uri, registry_uri).set_registered_model_alias(MODEL_NAME, "production", "1")
    wait_for(lambda: served(server.process.target) == "1", timeout=15, interval=0.1, what="rollback to 1")
    wait_for(lambda: sample(monitor, "tabserve_monitor_served_version") == 1, timeout=5, what="monitor sees 1")
    assert server.status().serving.version == "1"


@pytest.mark.parametrize(("broken", "explains"), [("missing_artifacts", "missing"), ("wrong_features", "feature")])
def test_broken_version_keeps_good_one(
    stack: tuple[Server, Monitor], registry_uri: str, broken: str, explains: str
) -> None:
    server, monitor = stack
    good = server.status().serving.version
    failures_before = sample(monitor, "tabserve_monitor_reloads_total", result="failure")
    version = register_demo_version(registry_uri, MODEL_NAME, seed=7, alias="production", broken=broken)

    def failed() -> Any:
        status = server.status()
        return status if status.load_state == control_pb2.LOAD_STATE_FAILED and status.failed_version == version \
            else None

    status = wait_for(failed, timeout=20, what=f"failed load of broken version {version}")
    print(f"{broken}: {status.last_error}")
    assert status.serving.version == good
    assert status.aspired.version == version
    assert status.last_error
    assert explains.lower() in status.last_error.lower()
    assert served(server.process.target) == good
    wait_for(lambda: sample(monitor, "tabserve_monitor_reloads_total", result="failure") > failures_before,
             timeout=5, what="monitor counts the failure")
    assert sample(monitor, "tabserve_monitor_served_version") == float(good)
    assert sample(monitor, "tabserve_monitor_target_version") == float(version)
    wait_for(lambda: sample(monitor, "tabserve_monitor_served_version_lag_seconds") > 0, timeout=5, what="lag")
    assert sample(monitor, "tabserve_monitor_server_up") == 1


def test_registry_watcher_classifies(registry_uri: str) -> None:
    watcher = RegistryWatcher(registry_uri, MODEL_NAME, alias="no-such-alias")
    resolution = watcher.resolve()
    assert resolution.target is None and resolution.problem is Problem.ALIAS_DANGLING
    missing = RegistryWatcher(registry_uri, "no-such-model").resolve()
    assert missing.target is None and missing.problem is Problem.MODEL_MISSING
    # Legacy stage: read from the registered model's latest_versions, pinned to the version.
    staged = RegistryWatcher(registry_uri, MODEL_NAME, stage="Production")
    assert staged.resolve().problem is Problem.STAGE_EMPTY
    MlflowClient(registry_uri, registry_uri).transition_model_version_stage(MODEL_NAME, "2", "Production")
    resolution = staged.resolve()
    assert resolution.target is not None and resolution.target.uri == f"models:/{MODEL_NAME}/2"
    assert resolution.target.ready and not resolution.ambiguous


def test_monitor_started_before_server_converges(registry_uri: str, tmp_path: Path) -> None:
    MlflowClient(registry_uri, registry_uri).set_registered_model_alias(MODEL_NAME, "production", "2")
    public, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with running_monitor(registry_uri, public, control) as monitor:
        wait_for(lambda: sample(monitor, "tabserve_monitor_polls_total", result="server_error") >= 2,
                 what="polls without a server")
        assert sample(monitor, "tabserve_monitor_server_up") == 0
        assert sample(monitor, "tabserve_monitor_canary_up") == 0
        assert sample(monitor, "tabserve_monitor_canary_requests_total", result="failure") >= 1
        assert sample(monitor, "tabserve_monitor_target_version") == 2
        # The server starts on version 1; the monitor must move it to the alias's version 2.
        server = Server(server_settings(registry_uri, tmp_path / "cache", model_uri=f"models:/{MODEL_NAME}/1",
                                        address=public, control_address=control))
        try:
            started = time.monotonic()
            wait_for(lambda: sample(monitor, "tabserve_monitor_served_version") == 2, timeout=30,
                     what="server converges on version 2")
            print(f"converged {time.monotonic() - started:.2f}s after the server printed its ports")
            assert served(public) == "2"
            wait_for(lambda: sample(monitor, "tabserve_monitor_server_up") == 1, timeout=5, what="server_up")
            wait_for(lambda: sample(monitor, "tabserve_monitor_canary_up") == 1, timeout=5, what="canary_up")
        finally:
            server.close()


def test_process_serves_metrics_and_exits_on_sigterm(registry_uri: str) -> None:
    settings = {
        "tracking_uri": registry_uri, "metrics_address": "127.0.0.1:0",
        "control_address": f"127.0.0.1:{free_port()}", "public_address": f"127.0.0.1:{free_port()}",
        # A long interval: exiting well before it ends proves the wait between polls is interrupted.
        "poll_interval_seconds": 300,
    }
    with MonitorProcess(settings) as monitor:
        url = f"http://127.0.0.1:{monitor.metrics_port}/metrics"

        def registry_up() -> bool:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return "tabserve_monitor_registry_up 1.0" in resp.read().decode()

        wait_for(registry_up, timeout=20, interval=0.2, what="registry_up in /metrics")
        assert monitor.terminate(60) == 0  # the loop was waiting up to 300 s for its next poll
