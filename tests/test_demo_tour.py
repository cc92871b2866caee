"""`make demo` end to end: the scripted tour as a subprocess in a tmp data dir, as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TOUR_TIMEOUT_S = 840  # registers three versions (training each) and starts two processes: slow on a busy machine

pytestmark = pytest.mark.timeout(TOUR_TIMEOUT_S + 60)


def test_demo_tour_end_to_end(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    tour = subprocess.Popen(
        [sys.executable, "-m", "tabserve_demo.tour", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = tour.communicate(timeout=TOUR_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        tour.terminate()  # the tour stops its server and monitor on SIGTERM
        try:
            out, err = tour.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            tour.kill()
            out, err = tour.communicate(timeout=10)
        pytest.fail(f"the tour did not finish within {TOUR_TIMEOUT_S}s:\n{out[-4000:]}\n{err[-4000:]}")
    print(out)
    assert tour.returncode == 0, f"tour failed ({tour.returncode}):\n{out[-4000:]}\n{err[-4000:]}"
    for number in range(1, 10):
        assert f"[{number}/9] " in out
    # The decision words come from the version's tags, as the server reports them.
    assert "(decline when P(default) >= threshold, else approve)" in out
    # One declined applicant with its coded reasons, never age.
    reasons = re.findall(r"^ {8}(R\d{3}) +.+? (\w+) = \S+ \(\+\d\.\d{3} log-odds\)$", out, re.M)
    assert re.search(r"applicant #\d+ of 200 more: P\(default\) \S+, decline; principal reasons", out), out
    assert 1 <= len(reasons) <= 4 and all(feature != "age" for _, feature in reasons), out
    # Its decision log line: the call's record with the declined row, its reasons and the chain fields.
    assert re.search(r'^ {8}backend: "lightgbm-batch"$', out, re.M), out
    assert re.search(r'^ {8}hash: "[0-9a-f]{64}"$', out, re.M), out
    shown = re.search(r"^ {8}rows\[(\d+)\] of 200 \(applicant #\d+\): (.+)$", out, re.M)
    assert shown and '"decision": true' in shown.group(2) and '"R' in shown.group(2), out
    # The hot reload: version 1 to 2, timed from the alias move, without failed calls.
    switch = re.search(r"switched: version 1 -> version 2, first response from version 2 ([\d.]+)s after", out)
    assert switch, out
    assert float(switch.group(1)) < 90
    assert re.search(r"\d+ calls during the switch, 0 failed", out), out
    # The broken version 3: refused, version 2 kept, the monitor counted the failure, the reason is shown.
    assert "kept: the server still serves version 2 (aspired 3, state LOAD_STATE_FAILED)" in out
    counted = re.search(r'tabserve_monitor_reloads_total\{result="failure"\} (\d+) -> (\d+)', out)
    assert counted and int(counted.group(2)) > int(counted.group(1)), out
    last_error = re.search(r"GetStatus last_error: (.+)", out)
    assert last_error and "missing" in last_error.group(1), out
    assert "settled after" in out
    assert "monitor exited 0" in out and "server exited 0" in out
    # The decision log verified after the stop: one set, intact, closed.
    assert re.search(r"^ {8}worker-0: 1 file\(s\), \d+ record\(s\) checked, \d+ decision\(s\), closed$", out, re.M), out
    assert "decision log: intact" in out
    # The registry check last: metadata clean (exit 0); --deep finds the broken version 3 only, which the tour expects.
    assert "$ tabserve-admin registry check credit-default --tracking-uri" in out
    assert "OK: nothing wrong (metadata only" in out
    assert re.search(r"^ {8}artifact_missing +credit-default +3 ", out, re.M), out
    assert "exit status 1, as this demo expects: the tour broke version(s) 3 on purpose" in out
    assert "registry check: metadata OK; --deep finds only the broken version(s) 3" in out
    assert out.rstrip().endswith("OK")
    # An explicit data dir is kept, with the logs of both processes.
    assert (data_dir / "mlflow.db").is_file()
    assert (data_dir / "logs" / "server.log").is_file() and (data_dir / "logs" / "monitor.log").is_file()
    # mlflow's own event messages go to a log, not between the steps.
    assert "Created version" not in out + err
    assert "Created version '3'" in (data_dir / "logs" / "registry.log").read_text()


def test_demo_tour_fails_clearly_on_an_unusable_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tabserve_demo.tour import main

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert main(["--data-dir", str(not_a_dir)]) == 2
    assert f"FAILED: cannot use {not_a_dir} as the data directory" in capsys.readouterr().out
