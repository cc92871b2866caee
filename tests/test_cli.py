"""`tabserve-client` against a real in-process server: scoring files, bad input, info and health."""

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
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tabserve_client import ScoringClient
from tabserve_client.cli import EXIT_CODES_HELP, main
from tabserve_demo.applicants import FEATURE_NAMES, write_example_applicants
from tabserve_server.app import ServingApp
from tests.support import server_settings

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "clients" / "examples" / "applicants.csv"


@pytest.fixture
def applicants(tmp_path: Path) -> Path:
    """The checked-in example file, or an equivalent one when it is not there."""
    if EXAMPLE.is_file():
        return EXAMPLE
    path = tmp_path / "applicants.csv"
    write_example_applicants(path)
    return path


@pytest.fixture
def target(app: ServingApp) -> str:
    return f"127.0.0.1:{app.public_port}"


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def matrix_of(rows: list[list[str]], header: list[str]) -> np.ndarray:
    positions = [header.index(f) for f in FEATURE_NAMES]
    return np.array([[float(r[p]) if r[p] else math.nan for p in positions] for r in rows], dtype=np.float64)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_usage_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert out == ""


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def small_csv(applicants: Path, n: int = 3) -> tuple[list[str], list[list[str]]]:
    header, rows = read_csv(applicants)
    return header, rows[:n]


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


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_file(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.csv"
    code, out, err = run(["score", str(missing), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, f"error: cannot read {missing}: No such file or directory")


def test_directory_and_non_utf8_and_empty_files(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["score", str(tmp_path), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, f"cannot read {tmp_path}: ")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("applicant_id,age\nA\xe9,1\n".encode("latin-1"))
    code, out, err = run(["score", str(latin), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, f"cannot read {latin}: not UTF-8")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    code, out, err = run(["score", str(empty), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, f"cannot read {empty}: the file is empty")


def test_unknown_column(target: str, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, rows = small_csv(applicants)
    source = write_lines(
        tmp_path / "extra.csv", [",".join([*header, "shoe_size"]), *(",".join([*r, "42"]) for r in rows)]
    )
    code, out, err = run(["score", str(source), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, "unknown column 'shoe_size'")
    assert "missing" not in err


def test_missing_columns(target: str, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header, rows = small_csv(applicants)
    drop = {header.index("age"), header.index("credit_score")}
    keep = [i for i in range(len(header)) if i not in drop]
    source = write_lines(
        tmp_path / "fewer.csv", [",".join(header[i] for i in keep), *(",".join(r[i] for i in keep) for r in rows)]
    )
    code, out, err = run(["score", str(source), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, "missing columns 'age', 'credit_score'", "credit-default version 1")


def test_non_numeric_value_names_line_and_column(
    target: str, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    header, rows = small_csv(applicants, 4)
    rows[2][header.index("annual_income")] = "abc"
    source = write_lines(tmp_path / "text.csv", [",".join(header), *(",".join(r) for r in rows)])
    code, out, err = run(["score", str(source), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, "line 4, column 'annual_income': 'abc' is not a number")


def test_malformed_json_line(target: str, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = dict.fromkeys(FEATURE_NAMES, 1.0)
    source = write_lines(tmp_path / "bad.jsonl", [json.dumps(record), '{"age": 41,', json.dumps(record)])
    code, out, err = run(["score", str(source), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, f"cannot read {source}: line 2: invalid JSON")


def test_jsonl_row_with_a_missing_key(target: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = dict.fromkeys(FEATURE_NAMES, 1.0)
    partial = {k: v for k, v in record.items() if k != "age"}
    source = write_lines(tmp_path / "partial.jsonl", [json.dumps(record), json.dumps(partial)])
    code, out, err = run(["score", str(source), "--target", target], capsys)
    assert_clean_usage_error(code, out, err, "line 2: ", "missing column 'age'")


def test_server_error_names_the_input_row(
    target: str, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server rejects infinity and names the row of its request; the CLI adds the batch offset."""
    header, rows = small_csv(applicants, 6)
    rows[5][header.index("age")] = "inf"  # row 5 of the input, line 7, row 1 of the third batch of 2
    source = write_lines(tmp_path / "inf.csv", [",".join(header), *(",".join(r) for r in rows)])
    code, out, err = run(["score", str(source), "--target", target, "--batch-size", "2"], capsys)
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: row 5 (line 7): feature 'age' is inf"), err
    assert out == "" and "Traceback" not in err


def _csv_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return [",".join(header), *(",".join(r) for r in rows)]


def _json_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return [json.dumps({h: (v if h == "applicant_id" else float(v or "nan")) for h, v in zip(header, r, strict=True)})
            for r in rows]


def _with_bom(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = _csv_lines(header, rows)
    return ["\ufeff" + lines[0], *lines[1:]]


def _underscore_number(header: list[str], rows: list[list[str]]) -> list[str]:
    rows[1][header.index("age")] = "1_000"
    return _csv_lines(header, rows)


def _duplicate_column(header: list[str], rows: list[list[str]]) -> list[str]:
    return _csv_lines([*header, "age"], [[*r, "40"] for r in rows])


def _short_row(header: list[str], rows: list[list[str]]) -> list[str]:
    rows[2] = rows[2][:-1]
    return _csv_lines(header, rows)


def _blank_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = _csv_lines(header, rows)
    return [lines[0], "", lines[1], "", *lines[2:]]


def _id_in_some_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = _json_lines(header, rows)
    second = json.loads(lines[1])
    del second["applicant_id"]
    return [lines[0], json.dumps(second), *lines[2:]]


def _not_an_object(header: list[str], rows: list[list[str]]) -> list[str]:
    return [*_json_lines(header, rows)[:1], "[1, 2, 3]"]


@pytest.mark.parametrize(
    ("name", "build", "extra", "code", "needle"),
    [
        ("bom.csv", _with_bom, [], 0, "scored 3 rows"),  # Excel writes UTF-8 with a byte-order mark
        ("blank.csv", _blank_lines, [], 0, "scored 3 rows"),
        ("rows.txt", _json_lines, ["--input-format", "jsonl"], 0, "scored 3 rows"),
        ("underscore.csv", _underscore_number, [], 2, "line 3, column 'age': '1_000' is not a number"),
        ("dup.csv", _duplicate_column, [], 2, "line 1: column 'age' appears more than once"),
        ("short.csv", _short_row, [], 2, f"line 4: {len(FEATURE_NAMES)} fields, the header has "),
        ("some.jsonl", _id_in_some_lines, [], 2, "line 2: the id column 'applicant_id' must be in every line"),
        ("array.jsonl", _not_an_object, [], 2, "line 2: expected a JSON object, got list"),
    ],
)
def test_input_rules(
    target: str, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    name: str, build: Any, extra: list[str], code: int, needle: str,
) -> None:
    header, rows = small_csv(applicants, 3)
    source = write_lines(tmp_path / name, build(header, rows))
    got, out, err = run(["score", str(source), "--target", target, *extra], capsys)
    assert (got, needle in err) == (code, True), err
    if code == 0:
        assert len(out.splitlines()) == 4  # header and three rows
    else:
        assert out == ""


def test_an_output_file_that_cannot_be_written_is_exit_2(
    target: str, applicants: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "no-such-dir" / "scores.csv"
    code, out, err = run(["score", str(applicants), "--target", target, "--output", str(out_file)], capsys)
    assert_clean_usage_error(code, out, err, f"cannot write {out_file}: No such file or directory")


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
