"""Helpers of the `tabserve-client` tests (test_cli.py, test_cli_input.py): the example applicants file, running the
command line in this process, and reading and writing its files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from tabserve_client.cli import main
from tabserve_demo.applicants import FEATURE_NAMES, write_example_applicants

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "clients" / "examples" / "applicants.csv"


def example_applicants(tmp_path: Path) -> Path:
    """The checked-in example file, or an equivalent one under `tmp_path` when it is not there."""
    if EXAMPLE.is_file():
        return EXAMPLE
    path = tmp_path / "applicants.csv"
    write_example_applicants(path)
    return path


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def matrix_of(rows: list[list[str]], header: list[str]) -> np.ndarray:
    positions = [header.index(f) for f in FEATURE_NAMES]
    return np.array([[float(r[p]) if r[p] else math.nan for p in positions] for r in rows], dtype=np.float64)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`tabserve-client ARGV` run in this process: (exit code, stdout, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def small_csv(applicants: Path, n: int = 3) -> tuple[list[str], list[list[str]]]:
    header, rows = read_csv(applicants)
    return header, rows[:n]
