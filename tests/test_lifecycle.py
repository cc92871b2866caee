"""Server processes end to end: health transitions, SIGTERM drain, deadlines, start-up from the cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import mlflow
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow.models import infer_signature

from tabserve_client import ScoringClient, ScoringError
from tabserve_demo.applicants import FEATURE_NAMES
from tabserve_demo.processes import ServerProcess
from tests.support import MODEL_NAME, server_settings, wait_for

SLOW_MODEL = "slow-model"


@pytest.fixture(scope="module")
def slow_model_uri(tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A registered pyfunc model (models-from-code) that sleeps on rows whose first value is 777."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    artifacts = tmp_path_factory.mktemp("slow-model-artifacts")
    if mlflow.get_experiment_by_name("slow-model") is None:
        mlflow.create_experiment("slow-model", artifact_location=artifacts.as_uri())
    mlflow.set_experiment("slow-model")
    frame = pd.DataFrame(np.zeros((2, len(FEATURE_NAMES))), columns=list(FEATURE_NAMES))
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).parent / "models" / "slow_model.py"),
            signature=infer_signature(frame, np.array([0.25, 0.25])), registered_model_name=SLOW_MODEL,
        )
    return f"models:/{SLOW_MODEL}/{info.registered_model_version}"


def _health_watch(target: str, seen: list[int], stop: threading.Event) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60):
                seen.append(response.status)
                if stop.is_set():
                    return
        except grpc.RpcError:
            return


def test_health_goes_serving_then_not_serving_and_sigterm_drains_in_flight_calls(
    tracking_uri: str, slow_model_uri: str, tmp_path: Path
) -> None:
    settings = server_settings(tracking_uri, tmp_path, model_uri=slow_model_uri, allow_pyfunc=True,
                               shutdown_grace_seconds=10.0)
    with ServerProcess(settings, {"SLOW_MODEL_SECONDS": "2.0"}) as server:
        seen: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=_health_watch, args=(server.target, seen, stop), daemon=True)
        watcher.start()
        with ScoringClient(server.target, timeout=20) as client:
            wait_for(lambda: client.health() == "SERVING", what="SERVING")
            slow_row = np.zeros((1, len(FEATURE_NAMES)))
            slow_row[0, 0] = 777.0
            results: list[object] = []
            caller = threading.Thread(target=lambda: results.append(client.score(slow_row)))
            caller.start()
            time.sleep(0.5)  # the slow call is now in flight
            server.proc.send_signal(15)
            wait_for(lambda: seen and seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING, what="NOT_SERVING")
            # New calls are refused while the in-flight one finishes.
            with ScoringClient(server.target, timeout=2) as late:
                with pytest.raises(ScoringError) as refused:
                    late.score(np.zeros((1, len(FEATURE_NAMES))))
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            caller.join(15)
            assert server.proc.wait(15) == 0
        stop.set()
        assert len(results) == 1 and not isinstance(results[0], Exception)
        assert results[0].scores.tolist() == [0.25]  # type: ignore[attr-defined]
        assert seen[0] in (health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING)
        assert health_pb2.HealthCheckResponse.SERVING in seen


def test_deadline_is_honoured(tracking_uri: str, slow_model_uri: str, tmp_path: Path) -> None:
    """The caller's deadline ends the call on time (the client's side; the server's own check, which refuses
    to score a call whose deadline has passed, is tested in test_scoring_api.py)."""
    settings = server_settings(tracking_uri, tmp_path, model_uri=slow_model_uri, allow_pyfunc=True)
    with ServerProcess(settings, {"SLOW_MODEL_SECONDS": "3.0"}) as server:
        with ScoringClient(server.target, timeout=10) as client:
            wait_for(lambda: client.health() == "SERVING", what="SERVING")
            slow_row = np.zeros((1, len(FEATURE_NAMES)))
            slow_row[0, 0] = 777.0
            started = time.monotonic()
            with pytest.raises(ScoringError) as caught:
                client.score(slow_row, timeout=0.5)
            assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2.5
            assert client.model_info().flavor == "python_function"
        assert server.terminate() == 0


def test_pyfunc_flavors_need_the_opt_in(tracking_uri: str, slow_model_uri: str, tmp_path: Path) -> None:
    settings = server_settings(tracking_uri, tmp_path, model_uri=slow_model_uri)
    with ServerProcess(settings) as server:
        with ScoringClient(server.target, timeout=5) as client:
            time.sleep(1.5)
            assert client.health() == "NOT_SERVING"
        assert server.terminate() == 0
        assert "allow_pyfunc" in server.stderr()


def test_restart_with_registry_down_serves_from_cache_and_says_so(tracking_uri: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with ServerProcess(server_settings(tracking_uri, cache)) as first:
        with ScoringClient(first.target) as client:
            wait_for(lambda: client.health() == "SERVING", what="SERVING")
            expected = client.score(np.zeros((3, len(FEATURE_NAMES)))).scores
        assert first.terminate() == 0
    # The registry is now an HTTP server that does not exist.
    down = server_settings("http://127.0.0.1:9", cache, registry_timeout_seconds=1.0)
    with ServerProcess(down) as second:
        with ScoringClient(second.target, timeout=10) as client:
            wait_for(lambda: client.health() == "SERVING", timeout=60, what="SERVING from cache")
            info = client.model_info()
            assert (info.loaded_from, info.version, info.name) == ("cache", "1", MODEL_NAME)
            assert info.threshold_source == "run_param:optimal_threshold"
            np.testing.assert_array_equal(client.score(np.zeros((3, len(FEATURE_NAMES)))).scores, expected)
        assert second.terminate() == 0
        assert "from the local cache" in second.stderr()


def test_no_registry_and_no_cache_stays_up_not_serving(tmp_path: Path) -> None:
    down = server_settings("http://127.0.0.1:9", tmp_path / "empty-cache", registry_timeout_seconds=1.0)
    with ServerProcess(down) as server:
        with ScoringClient(server.target, timeout=5) as client:
            time.sleep(2.0)
            assert client.health() == "NOT_SERVING"
            with pytest.raises(ScoringError) as caught:
                client.score(np.zeros((1, len(FEATURE_NAMES))), timeout=2)
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert server.proc.poll() is None  # still up, retrying
        assert server.terminate() == 0
        assert "unreachable" in server.stderr()
