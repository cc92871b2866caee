"""A legacy stage holding two versions: detected by the stage audit, exported as a metric, and resolved
deterministically (highest version) without ever making the server unload its model.

Real SQLite registry; versions 2 and 3 are registered cheaply on version 1's artifacts; two versions are
put in Production with archive_existing_versions=False (what `latest_versions` cannot show)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from prometheus_client import CollectorRegistry

from tabserve.control.v1 import control_pb2
from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_demo.processes import ServerProcess
from tabserve_monitor.loop import Monitor
from tabserve_monitor.metrics import MonitorMetrics
from tabserve_monitor.registry import RegistryWatcher
from tabserve_monitor.settings import MonitorSettings
from tests.support import MODEL_NAME, server_settings, wait_for


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Version 1 trained and registered; versions 2 and 3 registered on the same artifacts."""
    uri = bootstrap_embedded_registry(tmp_path_factory.mktemp("ambiguity-registry"), model_name=MODEL_NAME)
    client = MlflowClient(uri, uri)
    first = client.get_model_version(MODEL_NAME, "1")
    assert first.source
    for _ in range(2):
        client.create_model_version(MODEL_NAME, first.source, run_id=first.run_id)
    return uri


@pytest.fixture
def registry_uri(shared_registry: str) -> str:
    """The shared registry with every version back in stage None."""
    for version in ("1", "2", "3"):
        _stage(shared_registry, version, "None")
    return shared_registry


def _stage(uri: str, version: str, stage: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        MlflowClient(uri, uri).transition_model_version_stage(MODEL_NAME, version, stage,
                                                              archive_existing_versions=False)


class CountingClient:
    """The real MlflowClient, counting the calls that list versions (not the one-row change check)."""

    def __init__(self, uri: str) -> None:
        self._client = MlflowClient(uri, uri)
        self.listings = 0

    def search_model_versions(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("max_results") != 1:
            self.listings += 1
        return self._client.search_model_versions(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_stage_audit_flags_two_versions_in_production(registry_uri: str) -> None:
    client, clock = CountingClient(registry_uri), Clock()
    watcher = RegistryWatcher(registry_uri, MODEL_NAME, stage="Production", audit_interval_seconds=300,
                              client=client, clock=clock)
    _stage(registry_uri, "1", "Production")
    first = watcher.resolve()
    assert first.target is not None and first.target.version == "1"
    assert first.audited and not first.ambiguous and client.listings == 1

    # Nothing changed and the interval has not passed: polls do not list versions.
    clock.now += 100
    again = watcher.resolve()
    assert not again.audited and not again.ambiguous and client.listings == 1

    # A second version enters Production: the registered model changed, so the next poll audits.
    _stage(registry_uri, "2", "Production")
    clock.now += 1
    ambiguous = watcher.resolve()
    assert ambiguous.audited and ambiguous.ambiguous and client.listings == 2
    assert ambiguous.target is not None and ambiguous.target.version == "2"  # deterministic: the highest
    assert ambiguous.target.uri == f"models:/{MODEL_NAME}/2"
    assert "1" in ambiguous.detail and "2" in ambiguous.detail
    assert watcher.last_audit is not None and watcher.last_audit.versions == ("2", "1")

    # The flag stays up between audits, still without listing.
    clock.now += 299
    steady = watcher.resolve()
    assert steady.ambiguous and not steady.audited and client.listings == 2
    # The periodic audit runs once the interval has passed, even without a change.
    clock.now += 2
    periodic = watcher.resolve()
    assert periodic.audited and periodic.ambiguous and client.listings == 3

    # Archiving the extra version clears the flag at the next poll; the target stays deterministic.
    _stage(registry_uri, "2", "Archived")
    clock.now += 1
    cleared = watcher.resolve()
    assert cleared.audited and not cleared.ambiguous
    assert cleared.target is not None and cleared.target.version == "1"


def test_alias_mode_never_lists_versions(registry_uri: str) -> None:
    client = CountingClient(registry_uri)
    _stage(registry_uri, "2", "Production")
    _stage(registry_uri, "3", "Production")
    watcher = RegistryWatcher(registry_uri, MODEL_NAME, alias="production", client=client)
    for _ in range(3):
        resolution = watcher.resolve()
        assert resolution.target is not None and resolution.target.version == "1" and not resolution.ambiguous
    assert client.listings == 0


@pytest.fixture
def server(registry_uri: str, tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(server_settings(registry_uri, tmp_path / "cache", model_uri=f"models:/{MODEL_NAME}/1"))
    try:
        yield proc
    finally:
        proc.terminate(15)
        proc.close()


def test_ambiguity_is_exported_and_never_unloads(registry_uri: str, server: ServerProcess) -> None:
    settings = MonitorSettings(
        tracking_uri=registry_uri, stage="Production", public_address=server.target,
        control_address=f"127.0.0.1:{server.control_port}", rpc_timeout_seconds=5.0,
    )
    monitor = Monitor(settings, MonitorMetrics(CollectorRegistry()))

    def sample(name: str, **labels: str) -> float:
        return float(monitor.metrics.collector_registry.get_sample_value(name, labels or None) or 0.0)

    def serving(version: str) -> Any:
        result = monitor.poll_once()
        status = result.status
        return status is not None and status.serving.version == version and status.load_state != \
            control_pb2.LOAD_STATE_LOADING and result

    try:
        _stage(registry_uri, "1", "Production")
        _stage(registry_uri, "2", "Production")
        result = wait_for(lambda: serving("2"), timeout=60, interval=0.2, what="server on version 2")
        assert result.resolution.ambiguous
        assert sample("tabserve_monitor_target_ambiguous") == 1
        assert sample("tabserve_monitor_target_version") == 2
        assert sample("tabserve_monitor_served_version") == 2
        assert sample("tabserve_monitor_server_up") == 1

        # Polls while ambiguous keep stating the same version: nothing is unloaded or reloaded.
        reloads = sample("tabserve_monitor_reloads_total", result="success")
        for _ in range(3):
            again = monitor.poll_once()
            assert again.status.serving.version == "2" and again.status.aspired.version == "2"
        assert sample("tabserve_monitor_reloads_total", result="success") == reloads
        assert sample("tabserve_monitor_target_ambiguous") == 1

        # A third, higher version joins the stage: still ambiguous, the highest is served next.
        _stage(registry_uri, "3", "Production")
        wait_for(lambda: serving("3"), timeout=60, interval=0.2, what="server on version 3")
        assert sample("tabserve_monitor_target_ambiguous") == 1

        # Archiving the others resolves the ambiguity; the served version stays.
        _stage(registry_uri, "1", "Archived")
        _stage(registry_uri, "2", "Archived")
        cleared = monitor.poll_once()
        assert cleared.resolution is not None and not cleared.resolution.ambiguous
        assert sample("tabserve_monitor_target_ambiguous") == 0
        assert cleared.status.serving.version == "3"
    finally:
        monitor.close()
