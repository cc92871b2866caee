"""`tabserve-client` against a real in-process server: bad input files and arguments end in a clean usage error
(exit 2, one line naming the file, line and column) or, for what the server refuses, exit 1 naming the input row."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tabserve_demo.applicants import FEATURE_NAMES
from tests.client_cli import run, small_csv, write_lines


def assert_clean_usage_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert out == ""



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
    assert re.search(r" \(request id [0-9a-f]{32}\)$", err.strip()), err  # finds the server's lines of the call
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
