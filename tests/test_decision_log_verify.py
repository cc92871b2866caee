"""Verification of real decision log files: every tamper kind is caught and named, retention is told from deletion,
a keyed chain resists re-chaining, and `tabserve-admin decisions verify` exits 0 / 1 / 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tabserve_server.decisions.chain import ChainState, seal
from tabserve_server.decisions.log import open_decision_log
from tabserve_server.decisions.sink import file_name, numbered_files
from tabserve_server.decisions.verify import Unreadable, verify_directory
from tabserve_server.settings import ServerSettings

WORKER = "worker-0"
KEY = b"k" * 40


def write_log(directory: Path, count: int = 120, key_file: Path | None = None, **overrides: Any) -> Path:
    """A closed log of `count` decisions in files of about 4 KiB (several files)."""
    values: dict[str, Any] = {"decision_log_dir": str(directory), "decision_log_max_file_bytes": 4096,
                              "decision_log_retention_bytes": 0, "decision_log_key_file": str(key_file or "")}
    settings = ServerSettings(**{**values, **overrides})
    log = open_decision_log(settings, WORKER)
    assert log is not None
    for i in range(count):
        log.submit({"i": i, "score": i / count, "decision": "approve"})
    log.close()
    return directory / WORKER


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_log(tmp_path_factory.mktemp("pristine")).parent


@pytest.fixture
def logdir(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the pristine log to tamper with."""
    return Path(shutil.copytree(pristine, tmp_path / "log"))


def files(logdir: Path) -> list[Path]:
    return [path for _, path in numbered_files(logdir / WORKER)]


def edit_lines(path: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in change(path.read_bytes().splitlines())))


def problem(logdir: Path, key: bytes | None = None) -> str:
    report = verify_directory(logdir, key)
    assert not report.intact
    (bad,) = [s.problem for s in report.sets if s.problem]
    return str(bad)


def test_an_untouched_log_is_intact(logdir: Path) -> None:
    report = verify_directory(logdir)
    assert report.intact, report
    (s,) = report.sets
    assert (s.decisions, s.files > 3, s.pruned, s.notices) == (120, True, [], [])
    # Either the top directory or one worker's directory can be given.
    assert verify_directory(logdir / WORKER).intact


def test_an_edited_field_is_named(logdir: Path) -> None:
    second = files(logdir)[1]

    def approve_to_decline(lines: list[bytes]) -> list[bytes]:
        lines[2] = lines[2].replace(b'"decision":"approve"', b'"decision":"decline"')
        return lines

    edit_lines(second, approve_to_decline)
    assert problem(logdir).startswith(f"{WORKER}/{second.name} line 3 (seq ")
    assert "hash does not match the content: the record was edited" in problem(logdir)


def test_a_deleted_record_is_caught(logdir: Path) -> None:
    edit_lines(files(logdir)[1], lambda lines: lines[:3] + lines[4:])
    assert "1 record(s) before this one are missing (deleted)" in problem(logdir)


def test_a_swapped_pair_is_caught(logdir: Path) -> None:
    edit_lines(files(logdir)[1], lambda lines: [lines[0], lines[2], lines[1], *lines[3:]])
    assert "this record and the next are swapped" in problem(logdir)


def test_a_cut_line_at_the_tail_is_caught(logdir: Path) -> None:
    last = files(logdir)[-1]
    last.write_bytes(last.read_bytes()[:-20])
    assert f"{last.name} line" in problem(logdir) and "incomplete" in problem(logdir)


def test_whole_records_cut_from_the_tail_are_caught(logdir: Path) -> None:
    edit_lines(files(logdir)[-1], lambda lines: lines[:-2])
    assert "does not end in a close record" in problem(logdir)


def test_a_missing_file_is_caught(logdir: Path) -> None:
    files(logdir)[2].unlink()
    assert f"{file_name(3)} is missing and no pruned record names it: it was deleted" in problem(logdir)


def test_a_missing_first_file_is_caught(logdir: Path) -> None:
    files(logdir)[0].unlink()
    assert f"{file_name(1)} is missing" in problem(logdir)


def test_a_missing_newest_file_is_caught(logdir: Path) -> None:
    files(logdir)[-1].unlink()
    assert "does not end in a close record" in problem(logdir)


def test_pruned_files_are_told_from_deleted_ones(tmp_path: Path) -> None:
    logdir = write_log(tmp_path, count=400, decision_log_retention_bytes=12288).parent
    report = verify_directory(logdir)
    assert report.intact, report
    (s,) = report.sets
    first_left = numbered_files(logdir / WORKER)[0][0]
    assert first_left > 1 and s.pruned == [file_name(n) for n in range(1, first_left)]
    files(logdir)[0].unlink()  # the oldest file left: deleted, not pruned
    assert f"{file_name(first_left)} is missing and no pruned record names it" in problem(logdir)


def rechain(logdir: Path, key: bytes | None, change: Callable[[dict[str, Any]], None]) -> None:
    """What someone who can write the directory does: edit a record, then recompute every hash after it."""
    state = ChainState()
    for path in files(logdir):
        out = []
        for line in path.read_bytes().splitlines():
            record = json.loads(line)
            change(record)
            sealed, state = seal(record["kind"], record, state, WORKER, key)
            out.append(sealed)
        path.write_bytes(b"".join(out))


def decline_first(record: dict[str, Any]) -> None:
    if record.get("i") == 0:
        record["decision"] = "decline"


def test_without_a_key_a_rechained_edit_passes(logdir: Path) -> None:
    """The documented limit: an unkeyed chain detects accidents and casual edits only."""
    rechain(logdir, None, decline_first)
    assert verify_directory(logdir).intact


def test_with_a_key_a_rechained_edit_is_caught(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    logdir = write_log(tmp_path / "keyed", key_file=key_file).parent
    assert verify_directory(logdir, KEY).intact
    with pytest.raises(Unreadable, match="keyed"):
        verify_directory(logdir)
    plain = Path(shutil.copytree(logdir, tmp_path / "plain"))
    rechain(plain, None, decline_first)  # re-chained as an unkeyed log
    assert "written or re-chained without the key" in problem(plain, KEY)
    rechain(logdir, b"x" * 40, decline_first)  # re-chained with a guessed key
    assert "hash does not match the content" in problem(logdir, KEY)


def admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tabserve_admin", "decisions", "verify", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_admin_command_exit_codes(logdir: Path, tmp_path: Path) -> None:
    intact = admin(str(logdir))
    assert intact.returncode == 0, intact.stderr
    assert "chain intact" in intact.stdout and "120 decision(s)" in intact.stdout
    as_json = json.loads(admin(str(logdir), "--json").stdout)
    assert as_json["intact"] is True and as_json["sets"][0]["decisions"] == 120
    files(logdir)[1].unlink()
    broken = admin(str(logdir))
    assert broken.returncode == 1
    assert f"FAILED at {WORKER}/{file_name(3)}: {file_name(2)} is missing" in broken.stdout
    unreadable = admin(str(tmp_path / "nowhere"))
    assert unreadable.returncode == 2 and "cannot read" in unreadable.stderr
    no_key = admin(str(logdir), "--key-file", str(tmp_path / "no-such-key"))
    assert no_key.returncode == 2 and "cannot read the decision log key file" in no_key.stderr




def test_a_set_being_written_needs_no_close_record(tmp_path: Path) -> None:
    settings = ServerSettings(decision_log_dir=str(tmp_path), decision_log_required=True)
    log = open_decision_log(settings, WORKER)
    assert log is not None
    try:
        for i in range(5):
            log.submit({"i": i})  # required mode: in the file when submit returns
        report = verify_directory(tmp_path)
        assert report.intact, report
        assert report.sets[0].live and "still being written" in report.sets[0].notices[-1]
    finally:
        log.close()
    assert not verify_directory(tmp_path).sets[0].live


def test_a_copy_of_a_running_log_is_verified_with_open_tail(logdir: Path) -> None:
    """A shipped copy holds no lock: without --open-tail its missing close record is a truncated tail."""
    edit_lines(files(logdir)[-1], lambda lines: lines[:-1])  # the copy was taken before the close record
    assert "does not end in a close record" in problem(logdir)
    assert verify_directory(logdir, open_tail=True).intact
    assert admin(str(logdir), "--open-tail").returncode == 0


def test_only_the_logs_own_pruned_records_vouch_for_missing_files(tmp_path: Path) -> None:
    """A decision that merely contains what looks like a pruned record does not excuse a deleted file."""
    settings = ServerSettings(decision_log_dir=str(tmp_path), decision_log_max_file_bytes=4096,
                              decision_log_retention_bytes=0)
    log = open_decision_log(settings, WORKER)
    assert log is not None
    for i in range(100):
        log.submit({"i": i, "files": [{"file": file_name(1), "last_seq": 0, "last_hash": "0" * 64}],
                    "echo": {"kind": "pruned"}})
    log.close()
    assert verify_directory(tmp_path).intact
    files(tmp_path)[0].unlink()
    assert f"{file_name(1)} is missing and no pruned record names it" in problem(tmp_path)
