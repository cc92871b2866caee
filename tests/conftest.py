"""Shared fixtures: a real SQLite MLflow registry with the demo model, real servers on port 0, the example
applicants file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tabserve_client import ScoringClient
from tabserve_demo.embedded import bootstrap_embedded_registry
from tabserve_server.app import ServingApp
from tests.client_cli import example_applicants
from tests.support import MODEL_NAME, running_app, server_settings


@pytest.fixture(scope="session")
def registry_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def tracking_uri(registry_dir: Path) -> str:
    """A SQLite registry with version 1 of the demo model under alias `production`."""
    return bootstrap_embedded_registry(registry_dir, model_name=MODEL_NAME, threshold=0.48)


@pytest.fixture
def app(tracking_uri: str, tmp_path: Path) -> Iterator[ServingApp]:
    """An in-process server on the production alias, started and SERVING."""
    with running_app(server_settings(tracking_uri, tmp_path / "cache")) as serving:
        yield serving


@pytest.fixture
def client(app: ServingApp) -> Iterator[ScoringClient]:
    with ScoringClient(f"127.0.0.1:{app.public_port}") as scoring:
        yield scoring


@pytest.fixture
def target(app: ServingApp) -> str:
    """The public address of `app`."""
    return f"127.0.0.1:{app.public_port}"


@pytest.fixture
def applicants(tmp_path: Path) -> Path:
    """The example applicants file (clients/examples/applicants.csv), or an equivalent one."""
    return example_applicants(tmp_path)
