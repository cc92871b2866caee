"""The client library stays light: other teams install it into their own services."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd

from tabserve_client import ScoringClient
from tabserve_demo.applicants import FEATURE_NAMES, make_applicants

CLIENTS = Path(__file__).resolve().parent.parent / "clients"


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
    project = tomllib.loads((CLIENTS / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in project["dependencies"]}
    assert names == {"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "numpy"}


def test_dataframes_are_scored_in_the_model_feature_order(client: ScoringClient) -> None:
    matrix = make_applicants(5, seed=4)[0]
    frame = pd.DataFrame(matrix, columns=list(FEATURE_NAMES))
    shuffled = frame[list(reversed(FEATURE_NAMES))]
    np.testing.assert_array_equal(client.score(shuffled).scores, client.score(matrix).scores)
