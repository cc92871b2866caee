"""`tabserve-client` against a real in-process server: scoring files, info and health (bad input:
test_cli_input.py)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tabserve_client import ScoringClient
from tabserve_client.cli import EXIT_CODES_HELP, main
from tabserve_demo.applicants import FEATURE_NAMES
from tabserve_server.app import ServingApp
from tests.client_cli import REPO, matrix_of, read_csv, run, small_csv, write_lines
from tests.support import server_settings

# --- scoring ----------------------------------------------------------------------------------------


def test_scores_the_example_file(
    target: str, client: ScoringClient, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = read_csv(applicants)
    out_file = tmp_path / "scores.csv"
    code, out, err = run(
        ["score", str(applicants), "--target", target, "--output", str(out_file), "--batch-size", "7"], capsys
    )
    assert code == 0, err
    assert out == ""
    assert f"scored {len(rows)} rows with credit-default version 1" in err
    info = client.model_info()
    assert (
        f"credit-default version 1: decision=true ({info.positive_label}) means score >= 0.48; "
        f"false means {info.negative_label}\n"
    ) in err

    out_header, out_rows = read_csv(out_file)
    assert out_header == ["applicant_id", "score", "decision", "label", "threshold", "model_name", "model_version"]
    assert len(out_rows) == len(rows)
    assert [r[0] for r in out_rows] == [r[header.index("applicant_id")] for r in rows]
    expected = client.score(matrix_of(rows, header))
    scores = np.array([float(r[1]) for r in out_rows])
    assert ((scores >= 0) & (scores <= 1)).all()
    np.testing.assert_allclose(scores, expected.scores, rtol=0, atol=1e-12)
    for r, score in zip(out_rows, scores, strict=True):
        threshold = float(r[4])
        assert threshold == expected.threshold == 0.48
        assert r[2] == ("true" if score >= threshold else "false")
        assert r[3] == (info.positive_label if score >= threshold else info.negative_label)
        assert (r[5], r[6]) == ("credit-default", "1")


def test_jsonl_input_and_output(
    target: str, client: ScoringClient, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = small_csv(applicants, 5)
    records = []
    for row in rows:
        record: dict[str, object] = {"applicant_id": row[0]}
        record.update({f: (float(row[header.index(f)]) if row[header.index(f)] else None) for f in FEATURE_NAMES})
        records.append(record)
    records[1]["age"] = None  # null means missing
    source = write_lines(tmp_path / "rows.jsonl", [json.dumps(r) for r in records])

    code, out, err = run(["score", str(source), "--target", target, "--output-format", "jsonl"], capsys)
    assert code == 0, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["applicant_id"] for r in results] == [r[0] for r in rows]
    matrix = matrix_of(rows, header)
    matrix[1, FEATURE_NAMES.index("age")] = math.nan
    expected = client.score(matrix)
    np.testing.assert_allclose([r["score"] for r in results], expected.scores, rtol=0, atol=1e-12)
    assert [r["decision"] for r in results] == expected.decisions.tolist()
    info = client.model_info()
    assert [r["label"] for r in results] == [info.label(d) for d in expected.decisions.tolist()]
    assert all(r["decision"] == (r["score"] >= r["threshold"]) for r in results)
    assert {(r["model_name"], r["model_version"]) for r in results} == {("credit-default", "1")}


def test_stdin_input_with_missing_tokens(
    target: str,
    client: ScoringClient,
    applicants: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    header, rows = small_csv(applicants, 3)
    rows[0][header.index("savings_balance")] = "NA"
    rows[1][header.index("checking_balance")] = "nan"
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(buffer.getvalue().encode()), encoding="utf-8"))

    code, out, err = run(["score", "-", "--target", target], capsys)
    assert code == 0, err
    out_rows = list(csv.reader(io.StringIO(out)))[1:]
    matrix = matrix_of([[("" if c in ("NA", "nan") else c) for c in r] for r in rows], header)
    np.testing.assert_allclose([float(r[1]) for r in out_rows], client.score(matrix).scores, rtol=0, atol=1e-12)
    assert "scored 3 rows with credit-default version 1" in err


def test_without_id_column(target: str, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, rows = small_csv(applicants, 2)
    source = write_lines(tmp_path / "noid.csv", [",".join(header[1:]), *(",".join(r[1:]) for r in rows)])
    code, out, err = run(["score", str(source), "--target", target], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == "score,decision,label,threshold,model_name,model_version"
    assert len(out.splitlines()) == 3


def test_subprocess_module_entry_point(target: str, applicants: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TABSERVE_TARGET"}
    env["TABSERVE_TARGET"] = target  # the default of --target
    proc = subprocess.run(
        [sys.executable, "-m", "tabserve_client", "score", str(applicants), "--output-format", "jsonl"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    _, rows = read_csv(applicants)
    assert len(proc.stdout.splitlines()) == len(rows)
    assert "scored" in proc.stderr and "Traceback" not in proc.stderr



# --- info and health --------------------------------------------------------------------------------


def test_info_text_and_json(target: str, client: ScoringClient, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["info", "--target", target], capsys)
    assert code == 0, err
    assert "credit-default" in out and "version:" in out
    assert "0.48 (run_param:optimal_threshold)" in out
    positive, negative = client.model_info().label(True), client.model_info().label(False)
    assert f"decision:    decision=true ({positive}) means score >= 0.48; false means {negative}\n" in out
    assert f"{len(FEATURE_NAMES)}: age, annual_income" in out
    assert "registry" in out and "models:/credit-default/1" in out

    code, out, err = run(["info", "--json", "--target", target], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert (info["name"], info["version"], info["loaded_from"]) == ("credit-default", "1", "registry")
    assert info["threshold"] == 0.48 and info["threshold_source"] == "run_param:optimal_threshold"
    assert (info["positive_label"], info["negative_label"]) == (positive, negative)
    assert [f["name"] for f in info["features"]] == list(FEATURE_NAMES)
    assert info["run_id"]


def test_health(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["health", "--target", target], capsys) == (0, "SERVING\n", "")
    code, out, _ = run(["health", "--target", target, "--service", "tabserve.scoring.v1.Scoring"], capsys)
    assert (code, out) == (0, "SERVING\n")
    code, out, err = run(["health", "--target", target, "--service", "no.such.Service"], capsys)
    assert (code, out) == (1, "")
    assert err == (
        "error: unknown service 'no.such.Service'; the server reports the health of '', "
        "'inference.GRPCInferenceService', 'tabserve.scoring.v1.Scoring'\n"
    )


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["score", "--help"], ["info", "--help"], ["health", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert "exit codes:\n  0    success" in out, argv
        for code in ("1", "2", "130"):
            assert f"\n  {code} " in out, (argv, code)


def test_readme_lists_the_columns_the_cli_prints(target: str, applicants: Path, capsys) -> None:
    code, out, err = run(["score", str(applicants), "--target", target], capsys)
    assert code == 0, err
    (listed,) = re.findall(r"tabserve-client score clients/examples/applicants.csv +# CSV: (.+)$",
                           (REPO / "README.md").read_text(), flags=re.MULTILINE)
    assert listed.split(", ") == out.splitlines()[0].split(",")


def test_readme_lists_the_exit_codes_of_the_help() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Command-line client", 1)[1].split("\n#", 1)[0]
    documented = re.findall(r"^\| (\d+) \| ", section, flags=re.MULTILINE)
    assert documented == re.findall(r"^  (\d+) ", EXIT_CODES_HELP, flags=re.MULTILINE) == ["0", "1", "2", "130"]


def test_health_not_serving_is_exit_1(tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = server_settings(tracking_uri, tmp_path, model_uri="models:/no-such-model@production")
    app = ServingApp(settings, registry=CollectorRegistry())
    app.start()
    try:
        assert run(["health", "--target", f"127.0.0.1:{app.public_port}"], capsys) == (1, "NOT_SERVING\n", "")
    finally:
        app.stop(0)


def test_health_without_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = run(["health", "--target", f"127.0.0.1:{port}", "--timeout", "1"], capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: UNAVAILABLE: ") or err.startswith("error: DEADLINE_EXCEEDED: "), err
