"""The version manager's named state without processes: candidates from a scripted loader, validated for real.

The loader stands in for core/loading.ModelLoader only: it hands out candidates whose `commit` and `discard`
are recorded, so each test can say which candidate served, which was thrown away, and that none leaks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest

from tabserve_server.core.loading import Candidate
from tabserve_server.core.manager import LoadState, ModelManager
from tabserve_server.core.model import AspiredVersion, LoadedFrom, LoadedModel
from tabserve_server.core.schema import Feature, FeatureSchema
from tabserve_server.errors import RegistryUnavailable
from tests.support import wait_for

NAME = "credit-default"
GOOD, BAD = 0.25, float("nan")  # warm-up scores: NaN is not a probability, so validation refuses it


class Constant:
    """A predictor that answers `value` for every row."""

    def __init__(self, value: float) -> None:
        self.value = value

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        return np.full(matrix.shape[0], self.value)


def model(version: str, score: float = GOOD, features: tuple[str, ...] = ("income", "debt"),
          loaded_from: LoadedFrom = LoadedFrom.REGISTRY) -> LoadedModel:
    return LoadedModel(
        name=NAME, version=version, run_id="", requested_uri=f"models:/{NAME}/{version}",
        source_uri=f"models:/{NAME}/{version}", loaded_from=loaded_from, loaded_at=datetime.now(UTC),
        load_duration_seconds=0.0, schema=FeatureSchema(tuple(Feature(f, "double") for f in features)),
        threshold=0.5, threshold_source="default", flavor="test", predictor=Constant(score),
    )


def aspired(version: str) -> AspiredVersion:
    return AspiredVersion(NAME, version, f"models:/{NAME}/{version}")


class ScriptedLoader:
    """Hands out the models it is told to; records every load, commit and discard."""

    def __init__(self) -> None:
        self.models: dict[str, LoadedModel] = {}
        self.cached: LoadedModel | None = None
        self.registry_down = False
        self.gates: dict[str, threading.Event] = {}
        self.loads: list[str] = []
        self.events: list[str] = []

    def load(self, wanted: AspiredVersion) -> Candidate:
        self.loads.append(wanted.version)
        gate = self.gates.get(wanted.version)
        if gate is not None:
            assert gate.wait(10), "test never opened the gate"
        if self.registry_down:
            raise RegistryUnavailable("registry unreachable")
        return self._candidate(self.models.get(wanted.version) or model(wanted.version))

    def load_cached(self, model_name: str) -> Candidate | None:
        return None if self.cached is None else self._candidate(self.cached)

    def _candidate(self, loaded: LoadedModel) -> Candidate:
        tag = f"{loaded.loaded_from.value} {loaded.version}"
        return Candidate(loaded, commit=lambda: self.events.append(f"commit {tag}"),
                         discard=lambda: self.events.append(f"discard {tag}"))


@pytest.fixture
def loader() -> ScriptedLoader:
    return ScriptedLoader()


@pytest.fixture
def manager(loader: ScriptedLoader) -> Iterator[ModelManager]:
    managed = ModelManager(loader, retry_initial_seconds=0.05, retry_max_seconds=0.2)
    managed.start()
    try:
        yield managed
    finally:
        managed.stop()


def serving(manager: ModelManager) -> str | None:
    current = manager.current()
    return current.version if current else None


def test_a_valid_candidate_serves_and_is_committed(manager: ModelManager, loader: ScriptedLoader) -> None:
    assert not manager.set_aspired(aspired("1"))
    wait_for(lambda: serving(manager) == "1", timeout=5, what="version 1 served")
    wait_for(lambda: loader.events, timeout=5, what="the commit")
    assert loader.events == ["commit registry 1"]
    status = manager.status()
    assert (status.state, status.last_error, status.failed_attempts) == (LoadState.IDLE, "", 0)


def test_a_candidate_that_fails_validation_is_discarded_and_never_served(
    manager: ModelManager, loader: ScriptedLoader
) -> None:
    loader.models["2"] = model("2", score=BAD)
    manager.set_aspired(aspired("1"))
    wait_for(lambda: serving(manager) == "1", timeout=5, what="version 1 served")
    manager.set_aspired(aspired("2"))
    wait_for(lambda: manager.status().failed_attempts >= 2, timeout=5, what="two failed attempts")
    status = manager.status()
    assert serving(manager) == "1"
    assert status.state is LoadState.FAILED and status.failed_version == "2"
    assert "warm-up predictions not finite" in status.last_error
    assert status.next_attempt_at is not None and status.last_error_at is not None
    attempts = loader.loads.count("2")
    wait_for(lambda: loader.events.count("discard registry 2") >= attempts, timeout=5, what="every attempt discarded")
    assert "commit registry 2" not in loader.events


def test_a_new_feature_schema_is_refused_and_discarded(manager: ModelManager, loader: ScriptedLoader) -> None:
    loader.models["2"] = model("2", features=("income", "debt", "age"))
    manager.set_aspired(aspired("1"))
    wait_for(lambda: serving(manager) == "1", timeout=5, what="version 1 served")
    manager.set_aspired(aspired("2"))
    wait_for(lambda: "discard registry 2" in loader.events, timeout=5, what="version 2 discarded")
    assert serving(manager) == "1"
    assert "feature schema of version 2 differs" in manager.status().last_error


def test_a_cached_candidate_goes_through_the_same_validation(manager: ModelManager, loader: ScriptedLoader) -> None:
    loader.registry_down = True
    loader.cached = model("1", score=BAD, loaded_from=LoadedFrom.CACHE)
    manager.set_aspired(aspired("2"))
    wait_for(lambda: "discard cache 1" in loader.events, timeout=5, what="the unfit cached model discarded")
    assert manager.current() is None
    loader.cached = model("1", loaded_from=LoadedFrom.CACHE)
    wait_for(lambda: serving(manager) == "1", timeout=5, what="the fit cached model served")
    current = manager.current()
    assert current is not None and current.loaded_from is LoadedFrom.CACHE
    status = manager.status()  # the aspired version is still not loaded, and says why
    assert (status.state, status.failed_version, status.last_error) == (LoadState.FAILED, "2", "registry unreachable")


def test_a_candidate_superseded_during_its_load_is_discarded(manager: ModelManager, loader: ScriptedLoader) -> None:
    manager.set_aspired(aspired("1"))
    wait_for(lambda: serving(manager) == "1", timeout=5, what="version 1 served")
    loader.gates["2"] = threading.Event()
    manager.set_aspired(aspired("2"))
    wait_for(lambda: "2" in loader.loads, timeout=5, what="the load of version 2")
    manager.set_aspired(aspired("3"))
    loader.gates["2"].set()
    wait_for(lambda: serving(manager) == "3", timeout=5, what="version 3 served")
    assert "discard registry 2" in loader.events and "commit registry 2" not in loader.events
    assert loader.events[-1] == "commit registry 3"


def test_a_staged_candidate_a_newer_statement_does_not_want_is_discarded(
    manager: ModelManager, loader: ScriptedLoader
) -> None:
    manager.set_aspired(aspired("1"), stage_only=True)
    wait_for(lambda: manager.status().staged is not None, timeout=5, what="version 1 staged")
    assert manager.current() is None and loader.events == []
    manager.set_aspired(aspired("2"), stage_only=True)
    assert "discard registry 1" in loader.events
    assert not manager.commit_staged(aspired("1"))
    wait_for(lambda: (staged := manager.status().staged) is not None and staged.version == "2", timeout=5,
             what="version 2 staged")
    assert manager.commit_staged(aspired("2")) and serving(manager) == "2"
    assert loader.events == ["discard registry 1", "commit registry 2"]


def test_the_loader_thread_and_threads_it_starts_run_loader_nice_levels_nicer(loader: ScriptedLoader) -> None:
    """Niceness is per thread on Linux: the load's own work and the threads it starts (LightGBM's OpenMP pool for a
    parse) yield the cores to request threads, whose niceness stays the process's."""
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []
    load = loader.load

    def observed(wanted: AspiredVersion) -> Candidate:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        started = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS,
                                                                             threading.get_native_id())))
        started.start()
        started.join()
        return load(wanted)

    loader.load = observed  # type: ignore[method-assign]
    managed = ModelManager(loader, loader_nice=5)
    managed.start()
    try:
        managed.set_aspired(aspired("1"))
        wait_for(lambda: serving(managed) == "1", timeout=5, what="version 1 served")
    finally:
        managed.stop()
    assert seen == [min(19, base + 5)] * 2
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
