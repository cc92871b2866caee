"""Legacy-stage polls read the stage in full only when the change check says something moved.

A real SQLite registry (metadata only: the watcher never reads artifacts). Each case makes one change to the
registry and checks that the very next poll, well inside the safety-net interval, answers what a full read
would, and that polls with nothing changed do not read the stage in full.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from tabserve_monitor.registry import Problem, RegistryWatcher

SOURCE = "file:///nonexistent/model"  # never read: the watcher asks metadata only


class CountingClient:
    """The real MlflowClient, counting full stage reads (`search_registered_models`)."""

    def __init__(self, uri: str) -> None:
        self._client = MlflowClient(uri, uri)
        self.full_reads = 0

    def search_registered_models(self, *args: Any, **kwargs: Any) -> Any:
        self.full_reads += 1
        return self._client.search_registered_models(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.fixture(scope="module")
def registry_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    root: Path = tmp_path_factory.mktemp("stage-changes")
    return f"sqlite:///{(root / 'mlflow.db').as_posix()}"


@pytest.fixture
def model(registry_uri: str, request: pytest.FixtureRequest) -> tuple[MlflowClient, str]:
    """A fresh registered model per case, with versions 1 to 4 in stage None."""
    client = MlflowClient(registry_uri, registry_uri)
    name = f"stage-{request.node.name}".replace("[", "-").replace("]", "")
    client.create_registered_model(name)
    for _ in range(4):
        client.create_model_version(name, SOURCE)
    return client, name


def _stage(client: MlflowClient, name: str, version: str, stage: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(name, version, stage, archive_existing_versions=False)


def _watcher(uri: str, name: str) -> tuple[RegistryWatcher, CountingClient]:
    counting = CountingClient(uri)
    # A safety-net interval no case reaches: every change below must be seen by the change check.
    return RegistryWatcher("", name, stage="Production", audit_interval_seconds=3600, client=counting), counting


def _served(watcher: RegistryWatcher) -> str | None:
    resolution = watcher.resolve()
    return resolution.target.version if resolution.target else None


def test_steady_polls_skip_the_full_read(registry_uri: str, model: tuple[MlflowClient, str]) -> None:
    client, name = model
    _stage(client, name, "2", "Production")
    watcher, counting = _watcher(registry_uri, name)
    assert _served(watcher) == "2" and counting.full_reads == 1
    for _ in range(3):
        assert _served(watcher) == "2"
    assert counting.full_reads == 1
    # An unrelated write (a description) moves the marker: one full read, same answer.
    client.update_model_version(name, "3", description="notes")
    assert _served(watcher) == "2" and counting.full_reads == 2
    assert _served(watcher) == "2" and counting.full_reads == 2


def test_safety_net_reads_in_full_after_the_interval(registry_uri: str, model: tuple[MlflowClient, str]) -> None:
    client, name = model
    _stage(client, name, "2", "Production")
    now = [1000.0]
    counting = CountingClient(registry_uri)
    watcher = RegistryWatcher("", name, stage="Production", audit_interval_seconds=60, client=counting,
                              clock=lambda: now[0])
    assert _served(watcher) == "2" and counting.full_reads == 1
    now[0] += 59
    assert _served(watcher) == "2" and counting.full_reads == 1
    now[0] += 2
    resolution = watcher.resolve()
    assert counting.full_reads == 2 and resolution.audited


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # A higher version joins the stage (no archiving): it becomes the target.
        (lambda c, n: _stage(c, n, "4", "Production"), "4"),
        # A lower version joins: the target stays, the stage is now ambiguous.
        (lambda c, n: _stage(c, n, "1", "Production"), "3"),
        # The target leaves the stage: the next one in it takes over, or none.
        (lambda c, n: _stage(c, n, "3", "Archived"), None),
        # The target is deleted (deleted versions drop out of the marker's search, which does not move).
        (lambda c, n: c.delete_model_version(n, "3"), None),
        # The model is deleted.
        (lambda c, n: c.delete_registered_model(n), None),
    ],
    ids=["higher-joins", "lower-joins", "target-archived", "target-deleted",
         "model-deleted"],
)
def test_each_change_is_seen_at_the_next_poll(registry_uri: str, model: tuple[MlflowClient, str], change: Any,
                                              expected: str | None) -> None:
    client, name = model
    _stage(client, name, "3", "Production")
    watcher, counting = _watcher(registry_uri, name)
    assert _served(watcher) == "3"
    # The marker is now version 4's later write: deleting 3 below does not move it.
    client.update_model_version(name, "4", description="later")
    assert _served(watcher) == "3" and _served(watcher) == "3" and counting.full_reads == 2
    change(client, name)
    resolution = watcher.resolve()
    assert (resolution.target.version if resolution.target else None) == expected, resolution
    if expected == "3":
        assert resolution.ambiguous and resolution.audited
    if expected is None:
        assert resolution.problem in {Problem.STAGE_EMPTY, Problem.MODEL_MISSING}
