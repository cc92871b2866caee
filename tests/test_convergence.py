"""Convergence under failures, with real processes only: a SQLite MLflow registry (also served over http by a
real `mlflow server` child process), the server as a child process, and the monitor as a child process
(`python -m tabserve_monitor`, configured with TABSERVE_MONITOR_* variables). No mocks.

Version 1 of the model is a LightGBM version; version 2 a pyfunc whose load sleeps SLOW_LOAD seconds in the server
process: a reload that takes seconds, during which the tests kill the monitor, score, and probe. Both versions'
scores are known exactly (their boosters), so every response is checked against the version it claims to come
from: a half-loaded or mixed-up model cannot go unnoticed. The registry, the monitor process and the scoring and
probing threads are in tests/convergence_harness.py.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from tabserve.control.v1 import control_pb2
from tabserve_client import ScoringClient
from tabserve_demo.processes import free_port
from tabserve_server.settings import ServerSettings
from tests.convergence_harness import (
    FAST,
    POLL,
    RECONNECT,
    ROWS,
    SLOW,
    SLOW_LOAD,
    Monitor,
    ReadinessProbe,
    Registry,
    Scorer,
    pyfunc_settings,
    slow_load_env,
    two_version_registry,
)
from tests.support import MODEL_NAME, Server, wait_for

# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Version 1 (LightGBM) under alias `production`, version 2 (slow-loading pyfunc) without alias.

    When the registry-outage test is selected, its `mlflow server` starts here, so that its long start-up
    overlaps the other tests.
    """
    registry = two_version_registry(tmp_path_factory.mktemp("convergence-registry"))
    selected = request.session.items
    if any(item.get_closest_marker("mlflow_server") and item.module is request.module for item in selected):
        registry.tracking.start()
    try:
        yield registry
    finally:
        registry.tracking.stop()


@pytest.fixture(scope="module")
def slow_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose load of version 2 takes SLOW_LOAD seconds; starts on the alias (version 1)."""
    cache = tmp_path_factory.mktemp("slow-server-cache")
    server = Server(pyfunc_settings(registry.uri, cache), slow_load_env(SLOW_LOAD))
    try:
        wait_for(lambda: server.serving() == FAST, timeout=60, interval=0.1, what="version 1 served")
        yield server
    finally:
        assert server.close() == 0


# --- the tests ---------------------------------------------------------------------------------


def test_monitor_killed_mid_reload(registry: Registry, slow_server: Server) -> None:
    server = slow_server
    registry.promote(FAST)
    server.settle_on(FAST)
    with Monitor(registry.uri, server.target, server.control_address) as first:
        wait_for(lambda: first.converged_on(FAST), timeout=60, interval=0.2, what="first monitor on version 1")
        with Scorer(server.target, ROWS) as scorer:
            registry.promote(SLOW)
            wait_for(lambda: server.loading(SLOW), timeout=30, interval=0.05, what="server LOADING version 2")
            assert first.kill() == -signal.SIGKILL
            killed_at = time.monotonic()
            status = server.status()
            assert status.load_state == control_pb2.LOAD_STATE_LOADING, "the reload ended before the kill"
            assert status.serving.version == FAST
            # The server finishes the reload on its own: the statement was made, nobody needs to repeat it.
            wait_for(lambda: server.serving() == SLOW, timeout=SLOW_LOAD + 30, interval=0.1, what="version 2")
            with Monitor(registry.uri, server.target, server.control_address) as second:
                wait_for(lambda: second.converged_on(SLOW), timeout=60, interval=0.2,
                         what="fresh monitor converged on version 2")
                assert server.serving() == SLOW
                assert second.terminate() == 0
    switch = scorer.check_switch(registry.references, FAST, SLOW)
    assert scorer.calls[switch].finished > killed_at
    assert len(scorer.calls) - switch >= 5
    print(f"{len(scorer.calls)} calls, switch at call {switch}, "
          f"{scorer.calls[switch].finished - killed_at:.2f}s after the kill")


def test_slow_load_does_not_stall_scoring(registry: Registry, slow_server: Server) -> None:
    server = slow_server
    server.settle_on(FAST)
    with Scorer(server.target, ROWS[:1]) as scorer:
        time.sleep(0.2)
        stated = time.monotonic()
        server.state(SLOW)
        wait_for(lambda: server.loading(SLOW), timeout=10, interval=0.05, what="server LOADING version 2")
        wait_for(lambda: server.serving() == SLOW, timeout=SLOW_LOAD + 30, interval=0.1, what="version 2")
        time.sleep(0.2)
    switch = scorer.check_switch(registry.references, FAST, SLOW)
    swapped = scorer.calls[switch].started
    during = [call for call in scorer.calls if stated <= call.started and call.finished <= swapped]
    latencies = [call.finished - call.started for call in during]
    load_seconds = server.metric("tabserve_server_model_load_duration_seconds")
    print(f"load {load_seconds:.2f}s; {len(during)} calls during it, slowest {max(latencies) * 1000:.0f} ms")
    assert load_seconds is not None and load_seconds >= SLOW_LOAD
    assert swapped - stated >= SLOW_LOAD
    assert len(during) >= 20, f"only {len(during)} calls completed during a {swapped - stated:.1f}s load"
    assert max(latencies) < 1.0, f"a call took {max(latencies):.2f}s during the load"


def test_readiness_holds_during_a_reload(slow_server: Server) -> None:
    server = slow_server
    server.settle_on(FAST)
    with ReadinessProbe(server) as probe:
        wait_for(lambda: probe.answers and probe.watched, timeout=20, what="first probes")
        server.state(SLOW)
        wait_for(lambda: server.serving() == SLOW, timeout=SLOW_LOAD + 30, interval=0.1, what="version 2")
        time.sleep(0.3)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert not probe.errors, probe.errors[:5]
    during_load = [a for a in probe.answers if a[0] == control_pb2.LOAD_STATE_LOADING]
    print(f"{len(probe.answers)} probe rounds, {len(during_load)} while LOADING; Watch saw {probe.watched}")
    assert len(during_load) >= 5, "too few probes while the server was loading"
    for _, server_ready, model_ready, statuses in probe.answers:
        assert server_ready and model_ready
        assert set(statuses.values()) == {serving}, statuses
    assert probe.watched and set(probe.watched) == {serving}, probe.watched


def test_restarted_server_pinned_to_an_old_version_converges(registry: Registry, tmp_path: Path) -> None:
    registry.promote(SLOW)
    public, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    restart_load = 1.0  # version 2 loads in ~1 s in these servers

    def settings(model_uri: str) -> ServerSettings:
        return pyfunc_settings(registry.uri, tmp_path / "cache", model_uri=model_uri, address=public,
                         control_address=control)

    first = Server(settings(f"models:/{MODEL_NAME}@production"), slow_load_env(restart_load))
    try:
        with Monitor(registry.uri, public, control) as monitor:
            wait_for(lambda: monitor.converged_on(SLOW), timeout=60, interval=0.2, what="monitor on version 2")
            assert first.close() == 0
            wait_for(lambda: monitor.metric("tabserve_monitor_control_up") == 0.0, timeout=15, interval=0.2,
                     what="monitor notices the server is gone")
            second = Server(settings(f"models:/{MODEL_NAME}/1"), slow_load_env(restart_load))
            try:
                seen: list[tuple[float, str]] = []

                def serving_slow() -> bool:
                    version = second.serving()
                    seen.append((time.monotonic(), version))
                    return version == SLOW

                wait_for(serving_slow, timeout=60, interval=0.05, what="restarted server moved to version 2")
                old_since = min((t for t, v in seen if v == FAST), default=None)
                assert old_since is not None, f"the restarted server never served version 1: {seen[:5]}"
                took = seen[-1][0] - old_since
                load = second.metric("tabserve_server_model_load_duration_seconds")
                assert load is not None and load >= restart_load
                bound = POLL + RECONNECT + load + 3.0
                print(f"moved from version 1 to 2 in {took:.2f}s (load {load:.2f}s, bound {bound:.2f}s)")
                assert took <= bound
                wait_for(lambda: monitor.converged_on(SLOW), timeout=15, interval=0.2, what="monitor sees version 2")
                log = second.process.stderr()
                assert log.index("version 1 from registry (was nothing)") < log.index(
                    f"version 2 from registry (was {MODEL_NAME} 1)"), log[-3000:]
                with ScoringClient(public, timeout=10) as client:
                    batch = client.score(ROWS)
                assert batch.model_version == SLOW
                np.testing.assert_array_equal(batch.scores, registry.references[SLOW])
            finally:
                assert second.close() == 0
            assert monitor.terminate() == 0
    finally:
        if first.process.proc.poll() is None:
            first.close()


@pytest.mark.mlflow_server
def test_registry_outage_and_alias_moved_while_down(registry: Registry, tmp_path: Path) -> None:
    tracking = registry.tracking
    registry.promote(FAST)
    if tracking.proc is None:
        tracking.start()
    tracking.wait_healthy()
    server = Server(pyfunc_settings(tracking.url, tmp_path / "cache"), slow_load_env(0.0))
    try:
        with Monitor(tracking.url, server.target, server.control_address) as monitor:
            wait_for(lambda: monitor.converged_on(FAST), timeout=60, interval=0.2, what="monitor on version 1")
            with Scorer(server.target, ROWS) as scorer:
                tracking.stop()
                down_at = time.monotonic()
                wait_for(lambda: monitor.metric("tabserve_monitor_registry_up") == 0.0, timeout=30, interval=0.2,
                         what="registry_up 0")
                # Moved on the backend store itself while the tracking server is down: nobody can see it yet.
                registry.promote(SLOW)
                errors = monitor.metric("tabserve_monitor_polls_total", result="registry_error") or 0.0
                wait_for(lambda: (monitor.metric("tabserve_monitor_polls_total", result="registry_error") or 0)
                         >= errors + 2, timeout=30, interval=0.2, what="more failed polls")
                m = monitor.metrics()
                assert m["tabserve_monitor_registry_up"] == 0.0
                assert m["tabserve_monitor_target_version"] == 1.0  # the last known target, still stated
                assert m["tabserve_monitor_served_version"] == 1.0
                assert server.serving() == FAST
                tracking.start()
                tracking.wait_healthy()
                up_at = time.monotonic()
                wait_for(lambda: server.serving() == SLOW, timeout=60, interval=0.1, what="version 2 served")
                converged = time.monotonic() - up_at
                wait_for(lambda: monitor.converged_on(SLOW), timeout=30, interval=0.2, what="monitor on version 2")
            switch = scorer.check_switch(registry.references, FAST, SLOW)
            during_outage = [c for c in scorer.calls[:switch] if down_at <= c.started and c.finished <= up_at]
            print(f"outage {up_at - down_at:.1f}s with {len(during_outage)} calls served; "
                  f"version 2 served {converged:.2f}s after the registry came back")
            assert len(during_outage) >= 10
            assert monitor.terminate() == 0
    finally:
        assert server.close() == 0
