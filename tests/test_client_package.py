"""The client library stays light: other teams install it into their own services.

`pip install ./clients` into a fresh virtual environment (pip's cache keeps it quick) must give a
working library and CLI with the declared dependencies only; the test then scores against a live server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tabserve_client import ScoringClient
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants
from tabserve_server.app import ServingApp

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
# Installed beside the declared dependencies: the installer's own, and what grpcio itself needs.
EXPECTED_EXTRAS = {"pip", "setuptools", "wheel", "typing-extensions"}


def _declared() -> set[str]:
    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    return {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}


def test_importing_the_client_pulls_in_no_server_dependencies() -> None:
    code = (
        "import sys, tabserve_client, tabserve_client.cli\n"
        "heavy = sorted(m for m in ('mlflow', 'lightgbm', 'pandas', 'tabserve_server', 'tabserve_common')\n"
        "               if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_client_distribution_declares_only_light_dependencies() -> None:
    assert _declared() == {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "numpy"}


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install ./clients` (from a copy: pip builds in the source folder)."""
    root = tmp_path_factory.mktemp("client-only")
    source = root / "clients"
    shutil.copytree(CLIENTS, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        check=True, timeout=600,
    )
    return root / "venv"


def test_a_fresh_venv_holds_only_the_declared_dependencies(client_venv: Path) -> None:
    listed = subprocess.run(
        [str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    )
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert installed - EXPECTED_EXTRAS == _declared() | {"tabserve-client"}


@pytest.mark.timeout(900)
def test_the_installed_client_and_cli_work_against_a_live_server(client_venv: Path, app: ServingApp) -> None:
    target = f"127.0.0.1:{app.public_port}"
    code = (
        "import sys\n"
        "from tabserve_client import ScoringClient\n"
        f"with ScoringClient({target!r}) as client:\n"
        "    batch = client.score(dict.fromkeys(client.feature_names(), float('nan')))\n"
        "print(batch.model_name, batch.model_version, len(batch), 'tabserve_server' in sys.modules)\n"
    )
    done = subprocess.run([str(client_venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, "credit-default 1 1 False\n"), done.stderr
    cli = str(client_venv / "bin" / "tabserve-client")
    example = CLIENTS / "examples" / "applicants.csv"
    done = subprocess.run([cli, "score", str(example), "--target", target], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("applicant_id,score,decision,label,")
    # An unknown health service lists the known ones through reflection, a dependency of its own.
    done = subprocess.run([cli, "health", "--service", "nope", "--target", target], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 1 and "unknown service 'nope'" in done.stderr and "Traceback" not in done.stderr


def test_dataframes_are_scored_in_the_model_feature_order(client: ScoringClient) -> None:
    matrix = make_applicants(5, seed=4)[0]
    frame = pd.DataFrame(matrix, columns=list(FEATURE_NAMES))
    shuffled = frame[list(reversed(FEATURE_NAMES))]
    np.testing.assert_array_equal(client.score(shuffled).scores, client.score(matrix).scores)
