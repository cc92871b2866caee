"""Convergence under failures, with real processes only: a SQLite MLflow registry (also served over http by a
real `mlflow server` child process), the server as a child process, and the monitor as a child process
(`python -m tabserve_monitor`, configured with TABSERVE_MONITOR_* variables). No mocks.

Version 1 of the model is a LightGBM version; version 2 is a pyfunc model-from-code
(tests/models/slow_load_model.py) wrapping another booster, whose load sleeps SLOW_LOAD_SECONDS in the
server process: a reload that takes seconds, during which the tests kill the monitor, score, and probe.
Both versions' scores are known exactly (their boosters), so every response is checked against the
version it claims to come from: a half-loaded or mixed-up model cannot go unnoticed.
"""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import lightgbm
import mlflow
import mlflow.lightgbm
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow import MlflowClient
from mlflow.models import infer_signature

from tabserve.control.v1 import control_pb2
from tabserve.inference.v2 import open_inference_grpc_pb2 as v2_pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as v2_grpc
from tabserve_client import ScoringClient, ScoringError
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants
from tabserve_demo.processes import MlflowServer, MonitorProcess, free_port
from tabserve_server.settings import ServerSettings
from tests.support import MODEL_NAME, Server, monitor_settings, sample_key, scrape, server_settings, wait_for

POLL = 0.5  # the monitors' poll interval
SLOW_LOAD = 4.0  # seconds the slow version's load sleeps in the shared server
FAST, SLOW = "1", "2"  # version 1: LightGBM flavor; version 2: the slow-loading pyfunc
THRESHOLDS = {FAST: 0.48, SLOW: 0.3}
ROWS = make_applicants(4, seed=20261126)[0]
# The monitor's gRPC channels reconnect with a back-off of at most 2 s (+20 % jitter) to a restarted server.
RECONNECT = 2.4
SLOW_MODEL_FILE = Path(__file__).parent / "models" / "slow_load_model.py"


# --- processes ---------------------------------------------------------------------------------


class Monitor(MonitorProcess):
    """`python -m tabserve_monitor` as a child process, following a server at fixed addresses (which need not
    be up yet)."""

    def __init__(self, tracking_uri: str, public_address: str, control_address: str) -> None:
        super().__init__(monitor_settings(tracking_uri, public_address, control_address, alias="production",
                                          poll_interval_seconds=POLL, rpc_timeout_seconds=2.0))

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get(sample_key(name, **labels))

    def converged_on(self, version: str) -> bool:
        """served_version == target_version == `version`, lag 0, registry and server up (its /metrics)."""
        m = self.metrics()
        return (
            m.get("tabserve_monitor_served_version") == float(version)
            and m.get("tabserve_monitor_target_version") == float(version)
            and m.get("tabserve_monitor_served_version_lag_seconds") == 0.0
            and m.get("tabserve_monitor_registry_up") == 1.0
            and m.get("tabserve_monitor_server_up") == 1.0
        )

    def __enter__(self) -> Monitor:
        return self


# --- scoring and probing threads ---------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    started: float
    finished: float
    version: str
    threshold: float
    scores: np.ndarray


@dataclass
class Scorer:
    """Scores `rows` in a loop on a channel without retries, so every failed call is counted."""

    target: str
    rows: np.ndarray
    pause: float = 0.02
    calls: list[Call] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scorer", daemon=True)

    def __enter__(self) -> Scorer:
        self._thread.start()
        wait_for(lambda: self.calls or self.failures, timeout=30, what="first scoring call")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the scoring loop did not stop"

    def _run(self) -> None:
        channel = grpc.insecure_channel(self.target, options=[("grpc.enable_retries", 0)])
        deadline = time.monotonic() + 240  # bounded even if a test forgets to stop it
        try:
            with ScoringClient(channel=channel, timeout=10) as client:
                while not self._stop.is_set() and time.monotonic() < deadline:
                    started = time.monotonic()
                    try:
                        batch = client.score(self.rows)
                    except ScoringError as exc:
                        self.failures.append(f"{exc.code.name}: {exc.details}")
                    else:
                        self.calls.append(Call(started, time.monotonic(), batch.model_version, batch.threshold,
                                               batch.scores))
                    self._stop.wait(self.pause)
        finally:
            channel.close()

    def check_switch(self, references: dict[str, np.ndarray], old: str, new: str) -> int:
        """No failure; `old` until the switch and `new` after, each with that version's exact scores and
        threshold. Returns the index of the first call answered by `new`."""
        assert not self.failures, self.failures[:5]
        versions = [call.version for call in self.calls]
        assert new in versions, f"no response from version {new}: {sorted(set(versions))}"
        switch = versions.index(new)
        assert switch > 0, "no response from the old version before the switch"
        assert set(versions[:switch]) == {old} and set(versions[switch:]) == {new}, (
            f"responses not {old}...{old},{new}...{new}: {versions}"
        )
        for call in self.calls:
            np.testing.assert_array_equal(call.scores, references[call.version][: len(self.rows)])
            assert call.threshold == THRESHOLDS[call.version]
        return switch


# --- the registry ------------------------------------------------------------------------------


@dataclass
class Registry:
    uri: str  # sqlite:///...: the backend store, used directly
    tracking: MlflowServer  # the same store over http (started early: its start-up takes long)
    references: dict[str, np.ndarray]  # version -> exact scores of ROWS

    def promote(self, version: str) -> None:
        MlflowClient(self.uri, self.uri).set_registered_model_alias(MODEL_NAME, "production", version)


def _booster(seed: int) -> lightgbm.Booster:
    """A small booster on the demo features (single-threaded: quick on a busy machine)."""
    features, labels = make_applicants(3000, seed=seed)
    params = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 20, "seed": seed, "deterministic": True,
              "num_threads": 1, "verbose": -1}
    booster: lightgbm.Booster = lightgbm.train(
        params, lightgbm.Dataset(features, label=labels, feature_name=list(FEATURE_NAMES)), num_boost_round=15
    )
    return booster


@pytest.fixture(scope="module")
def registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Version 1 (LightGBM) under alias `production`, version 2 (slow-loading pyfunc) without alias.

    When the registry-outage test is selected, its `mlflow server` starts here, so that its long start-up
    overlaps the other tests.
    """
    root = tmp_path_factory.mktemp("convergence-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("convergence", artifact_location=(root / "artifacts").as_uri())
    frame = pd.DataFrame(ROWS, columns=list(FEATURE_NAMES))
    references: dict[str, np.ndarray] = {}

    fast = _booster(seed=1)
    references[FAST] = np.asarray(fast.predict(ROWS), dtype=np.float64)
    with warnings.catch_warnings(), mlflow.start_run(experiment_id=experiment):
        warnings.simplefilter("ignore")  # MLflow's own deprecation and type-hint notices
        mlflow.log_param("optimal_threshold", THRESHOLDS[FAST])
        info = mlflow.lightgbm.log_model(fast, name="model", registered_model_name=MODEL_NAME,
                                         signature=infer_signature(frame, references[FAST]))
    assert str(info.registered_model_version) == FAST

    slow = _booster(seed=2)
    references[SLOW] = np.asarray(slow.predict(ROWS), dtype=np.float64)
    booster_file = root / "booster-2.lgb"
    slow.save_model(str(booster_file))
    with warnings.catch_warnings(), mlflow.start_run(experiment_id=experiment):
        warnings.simplefilter("ignore")
        mlflow.log_param("optimal_threshold", THRESHOLDS[SLOW])
        info = mlflow.pyfunc.log_model(name="model", python_model=str(SLOW_MODEL_FILE),
                                       artifacts={"booster": str(booster_file)}, registered_model_name=MODEL_NAME,
                                       signature=infer_signature(frame, references[SLOW]))
    assert str(info.registered_model_version) == SLOW
    assert not np.array_equal(references[FAST], references[SLOW])
    client.set_registered_model_alias(MODEL_NAME, "production", FAST)

    tracking = MlflowServer(uri, root / "served-artifacts", root / "mlflow-server.log")
    selected = request.session.items
    if any(item.get_closest_marker("mlflow_server") and item.module is request.module for item in selected):
        tracking.start()
    try:
        yield Registry(uri, tracking, references)
    finally:
        tracking.stop()


def _slow_load(seconds: float) -> dict[str, str]:
    """The server environment that makes the slow version's load sleep `seconds`."""
    return {"SLOW_LOAD_SECONDS": str(seconds)}


def _settings(tracking_uri: str, cache_dir: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {"allow_pyfunc": True, "predict_threads": 1, "registry_timeout_seconds": 5.0}
    values.update(overrides)
    return server_settings(tracking_uri, cache_dir, **values)


@pytest.fixture(scope="module")
def slow_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose load of version 2 takes SLOW_LOAD seconds; starts on the alias (version 1)."""
    server = Server(_settings(registry.uri, tmp_path_factory.mktemp("slow-server-cache")), _slow_load(SLOW_LOAD))
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
    answers: list[tuple[int, bool, bool, dict[str, int]]] = []  # load state, ServerReady, ModelReady, health
    errors: list[str] = []
    watched: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        with grpc.insecure_channel(server.target) as channel:
            v2 = v2_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            while not stop.is_set():
                try:
                    state = server.status().load_state
                    server_ready = v2.ServerReady(v2_pb.ServerReadyRequest(), timeout=5).ready
                    model_ready = v2.ModelReady(v2_pb.ModelReadyRequest(name=MODEL_NAME), timeout=5).ready
                    statuses = {
                        service: health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                        for service in ("", "tabserve.scoring.v1.Scoring", "inference.GRPCInferenceService")
                    }
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code()}: {exc.details()}")
                else:
                    answers.append((state, server_ready, model_ready, statuses))
                stop.wait(0.02)

    watch_channel = grpc.insecure_channel(server.target)
    stream = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)

    def watch() -> None:
        try:
            for response in stream:
                watched.append(response.status)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"Watch: {exc.code()}: {exc.details()}")

    prober = threading.Thread(target=probe, daemon=True)
    watcher = threading.Thread(target=watch, daemon=True)
    prober.start()
    watcher.start()
    try:
        wait_for(lambda: answers and watched, timeout=20, what="first probes")
        server.state(SLOW)
        wait_for(lambda: server.serving() == SLOW, timeout=SLOW_LOAD + 30, interval=0.1, what="version 2")
        time.sleep(0.3)
    finally:
        stop.set()
        stream.cancel()
        prober.join(15)
        watcher.join(15)
        watch_channel.close()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert not errors, errors[:5]
    during_load = [a for a in answers if a[0] == control_pb2.LOAD_STATE_LOADING]
    print(f"{len(answers)} probe rounds, {len(during_load)} while LOADING; Watch saw {watched}")
    assert len(during_load) >= 5, "too few probes while the server was loading"
    for _, server_ready, model_ready, statuses in answers:
        assert server_ready and model_ready
        assert set(statuses.values()) == {serving}, statuses
    assert watched and set(watched) == {serving}, watched


def test_restarted_server_pinned_to_an_old_version_converges(registry: Registry, tmp_path: Path) -> None:
    registry.promote(SLOW)
    public, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    restart_load = 1.0  # version 2 loads in ~1 s in these servers

    def settings(model_uri: str) -> ServerSettings:
        return _settings(registry.uri, tmp_path / "cache", model_uri=model_uri, address=public,
                         control_address=control)

    first = Server(settings(f"models:/{MODEL_NAME}@production"), _slow_load(restart_load))
    try:
        with Monitor(registry.uri, public, control) as monitor:
            wait_for(lambda: monitor.converged_on(SLOW), timeout=60, interval=0.2, what="monitor on version 2")
            assert first.close() == 0
            wait_for(lambda: monitor.metric("tabserve_monitor_control_up") == 0.0, timeout=15, interval=0.2,
                     what="monitor notices the server is gone")
            second = Server(settings(f"models:/{MODEL_NAME}/1"), _slow_load(restart_load))
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
    server = Server(_settings(tracking.url, tmp_path / "cache"), _slow_load(0.0))
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
