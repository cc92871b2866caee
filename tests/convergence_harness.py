"""The harness of the convergence tests (test_convergence.py): a registry with a fast and a slow-loading version whose
exact scores are known, the monitor as a child process, and threads that score or probe a server in a loop while
it reloads (Scorer is used by test_production_registry.py too).

Version 1 of the model is a LightGBM version; version 2 is a pyfunc model-from-code
(tests/models/slow_load_model.py) wrapping another booster, whose load sleeps SLOW_LOAD_SECONDS in the
server process.
"""

from __future__ import annotations

import threading
import time
import warnings
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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow import MlflowClient
from mlflow.models import infer_signature

from tabserve.inference.v2 import open_inference_grpc_pb2 as v2_pb
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc as v2_grpc
from tabserve_client import ScoringClient, ScoringError
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants
from tabserve_demo.processes import MlflowServer, MonitorProcess
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


class ReadinessProbe:
    """While open, one thread asks in a loop for the server's load state, V2 ServerReady and ModelReady and the
    health of every service, and another follows the health Watch stream; each records what it saw, and errors."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.answers: list[tuple[int, bool, bool, dict[str, int]]] = []  # load state, ServerReady, ModelReady, health
        self.errors: list[str] = []
        self.watched: list[int] = []
        self._stop = threading.Event()
        self._watch_channel = grpc.insecure_channel(server.target)
        self._stream = health_pb2_grpc.HealthStub(self._watch_channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120
        )
        self._prober = threading.Thread(target=self._probe, daemon=True)
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ReadinessProbe:
        self._prober.start()
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._stream.cancel()
        self._prober.join(15)
        self._watcher.join(15)
        self._watch_channel.close()

    def _probe(self) -> None:
        with grpc.insecure_channel(self.server.target) as channel:
            v2 = v2_grpc.GRPCInferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                try:
                    state = self.server.status().load_state
                    server_ready = v2.ServerReady(v2_pb.ServerReadyRequest(), timeout=5).ready
                    model_ready = v2.ModelReady(v2_pb.ModelReadyRequest(name=MODEL_NAME), timeout=5).ready
                    statuses = {
                        service: health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                        for service in ("", "tabserve.scoring.v1.Scoring", "inference.GRPCInferenceService")
                    }
                except grpc.RpcError as exc:
                    self.errors.append(f"{exc.code()}: {exc.details()}")
                else:
                    self.answers.append((state, server_ready, model_ready, statuses))
                self._stop.wait(0.02)

    def _watch(self) -> None:
        try:
            for response in self._stream:
                self.watched.append(response.status)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"Watch: {exc.code()}: {exc.details()}")


# --- the registry ------------------------------------------------------------------------------


@dataclass
class Registry:
    uri: str  # sqlite:///...: the backend store, used directly
    tracking: MlflowServer  # the same store over http (started early: its start-up takes long)
    references: dict[str, np.ndarray]  # version -> exact scores of ROWS

    def promote(self, version: str) -> None:
        MlflowClient(self.uri, self.uri).set_registered_model_alias(MODEL_NAME, "production", version)


def small_booster(seed: int) -> lightgbm.Booster:
    """A small booster on the demo features (single-threaded: quick on a busy machine)."""
    features, labels = make_applicants(3000, seed=seed)
    params = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 20, "seed": seed, "deterministic": True,
              "num_threads": 1, "verbose": -1}
    booster: lightgbm.Booster = lightgbm.train(
        params, lightgbm.Dataset(features, label=labels, feature_name=list(FEATURE_NAMES)), num_boost_round=15
    )
    return booster


def two_version_registry(root: Path) -> Registry:
    """Version 1 (LightGBM) under alias `production`, version 2 (slow-loading pyfunc) without alias, in a SQLite
    registry under `root`; its `mlflow server` is created, not started."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("convergence", artifact_location=(root / "artifacts").as_uri())
    frame = pd.DataFrame(ROWS, columns=list(FEATURE_NAMES))
    references: dict[str, np.ndarray] = {}

    fast = small_booster(seed=1)
    references[FAST] = np.asarray(fast.predict(ROWS), dtype=np.float64)
    with warnings.catch_warnings(), mlflow.start_run(experiment_id=experiment):
        warnings.simplefilter("ignore")  # MLflow's own deprecation and type-hint notices
        mlflow.log_param("optimal_threshold", THRESHOLDS[FAST])
        info = mlflow.lightgbm.log_model(fast, name="model", registered_model_name=MODEL_NAME,
                                         signature=infer_signature(frame, references[FAST]))
    assert str(info.registered_model_version) == FAST

    slow = small_booster(seed=2)
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
    return Registry(uri, MlflowServer(uri, root / "served-artifacts", root / "mlflow-server.log"), references)


def slow_load_env(seconds: float) -> dict[str, str]:
    """The server environment that makes the slow version's load sleep `seconds`."""
    return {"SLOW_LOAD_SECONDS": str(seconds)}


def pyfunc_settings(tracking_uri: str, cache_dir: Path, **overrides: Any) -> ServerSettings:
    """Settings of these tests' servers: pyfunc allowed (version 2), one predict thread, a short registry timeout."""
    values: dict[str, Any] = {"allow_pyfunc": True, "predict_threads": 1, "registry_timeout_seconds": 5.0}
    values.update(overrides)
    return server_settings(tracking_uri, cache_dir, **values)
