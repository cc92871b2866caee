"""The decision log's writer on real files: counts, order, rotation, restarts, failing disks, required mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tabserve_common.settings import SettingsError
from tabserve_server.decisions.chain import GENESIS
from tabserve_server.decisions.log import DecisionLog, DecisionLogUnavailable, open_decision_log
from tabserve_server.decisions.sink import file_name, numbered_files
from tabserve_server.decisions.verify import verify_directory
from tabserve_server.settings import ServerSettings

WORKER = "worker-0"


def open_log(directory: Path, **overrides: Any) -> DecisionLog:
    log = open_decision_log(ServerSettings(decision_log_dir=str(directory), **overrides), WORKER)
    assert log is not None
    return log


def records(directory: Path) -> list[dict[str, Any]]:
    """Every record of the worker's file set, oldest first."""
    out = []
    for _, path in numbered_files(directory / WORKER):
        out.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return out


def decisions(directory: Path) -> list[dict[str, Any]]:
    return [r for r in records(directory) if r["kind"] == "decision"]


def sample(log: DecisionLog, name: str, **labels: str) -> float:
    value = log.metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name} {labels}"
    return value


def assert_chained(found: list[dict[str, Any]]) -> None:
    previous = GENESIS
    for seq, record in enumerate(found, start=1):
        assert (record["seq"], record["prev"]) == (seq, previous), record
        previous = record["hash"]


def test_every_record_is_written_once_in_order_and_chained(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    for i in range(5000):
        log.submit({"i": i})
    log.close()
    found = records(tmp_path)
    assert [r["i"] for r in found if r["kind"] == "decision"] == list(range(5000))
    assert [found[0]["kind"], found[-1]["kind"]] == ["start", "close"]
    assert_chained(found)
    assert sample(log, "tabserve_server_decision_records_written_total", kind="decision") == 5000
    assert sample(log, "tabserve_server_decision_log_queue_depth") == 0


def test_rotation_keeps_files_under_the_limit_and_chains_across_them(tmp_path: Path) -> None:
    log = open_log(tmp_path, decision_log_max_file_bytes=4096, decision_log_retention_bytes=0)
    for i in range(300):
        log.submit({"i": i, "pad": "x" * 100})
    log.close()
    files = numbered_files(tmp_path / WORKER)
    assert len(files) > 5
    assert [n for n, _ in files] == list(range(1, len(files) + 1))
    assert all(path.stat().st_size <= 4096 for _, path in files)
    assert len(decisions(tmp_path)) == 300
    assert_chained(records(tmp_path))


def test_a_restarted_writer_continues_the_chain(tmp_path: Path) -> None:
    for run in range(3):
        log = open_log(tmp_path)
        for i in range(10):
            log.submit({"run": run, "i": i})
        log.close()
    found = records(tmp_path)
    assert [r["kind"] for r in found].count("start") == 3
    assert len(decisions(tmp_path)) == 30
    assert_chained(found)


def test_a_failing_device_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    """The worker's current file is /dev/full: every write fails with ENOSPC; submit stays fast."""
    (tmp_path / WORKER).mkdir()
    (tmp_path / WORKER / file_name(1)).symlink_to("/dev/full")
    log = open_log(tmp_path)
    started = time.monotonic()
    for i in range(2000):
        log.submit({"i": i})
    submit_seconds = time.monotonic() - started
    log.close(timeout=10)
    dropped = sample(log, "tabserve_server_decision_records_dropped_total", reason="write_error") + sample(
        log, "tabserve_server_decision_records_dropped_total", reason="queue_full")
    assert dropped == 2000
    assert sample(log, "tabserve_server_decision_records_written_total", kind="decision") == 0
    assert sample(log, "tabserve_server_decision_log_write_failing") == 1
    assert submit_seconds < 1.0


def test_a_full_queue_drops_and_the_log_says_how_many(tmp_path: Path) -> None:
    log = open_log(tmp_path, decision_log_queue_size=1)
    for i in range(20000):
        log.submit({"i": i})
    log.close()
    full = sample(log, "tabserve_server_decision_records_dropped_total", reason="queue_full")
    assert full > 0
    found = records(tmp_path)
    assert len([r for r in found if r["kind"] == "decision"]) + full == 20000
    assert sum(r["count"] for r in found if r["kind"] == "dropped") == full
    assert_chained(found)


def test_an_unencodable_record_costs_only_itself(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.submit({"i": 0})
    log.submit({"i": float("nan")})
    log.submit({"i": 2})
    log.close()
    assert [r["i"] for r in decisions(tmp_path)] == [0, 2]
    assert sample(log, "tabserve_server_decision_records_dropped_total", reason="invalid") == 1


def test_a_record_that_cannot_be_built_costs_only_itself(tmp_path: Path) -> None:
    """Records given as functions are built by the writer (decisions/record.py hands its pieces over)."""
    log = open_log(tmp_path)
    log.submit(lambda: {"i": 0})
    log.submit(lambda: {"i": 1 // 0})
    log.submit({"i": 2})
    log.close()
    assert [r["i"] for r in decisions(tmp_path)] == [0, 2]
    assert sample(log, "tabserve_server_decision_records_dropped_total", reason="invalid") == 1


def test_records_that_keep_coming_are_collected_not_handed_over_one_by_one(tmp_path: Path) -> None:
    """While records keep coming the writer wakes every FLUSH_SECONDS, not per record: a wake-up per call cost
    a thread hand-off per call (docs/performance.md, run 10)."""
    log = open_log(tmp_path)
    writes: list[int] = []
    write = log.writer.write

    def counted(records: Any) -> Any:
        writes.append(len(records))
        return write(records)

    log.writer.write = counted  # type: ignore[method-assign]
    log.submit({"i": -1})
    time.sleep(0.2)  # the writer has written it and sleeps until woken
    submitted = 0
    ends = time.monotonic() + 0.5
    while time.monotonic() < ends:  # about one record per 0.5 ms, like a busy server's calls
        log.submit({"i": submitted})
        submitted += 1
        time.sleep(0.0005)
    log.close()
    assert [r["i"] for r in decisions(tmp_path)] == [-1, *range(submitted)]
    assert len(writes) <= submitted / 4, (len(writes), submitted)


def test_required_mode_returns_once_the_record_is_in_the_file(tmp_path: Path) -> None:
    log = open_log(tmp_path, decision_log_required=True)
    try:
        for i in range(20):
            log.submit({"i": i})
            assert decisions(tmp_path)[-1]["i"] == i  # before close(): handed to the OS already
    finally:
        log.close()


def test_required_mode_raises_with_the_reason_when_the_disk_fails(tmp_path: Path) -> None:
    (tmp_path / WORKER).mkdir()
    (tmp_path / WORKER / file_name(1)).symlink_to("/dev/full")
    log = open_log(tmp_path, decision_log_required=True)
    try:
        with pytest.raises(DecisionLogUnavailable, match="No space left on device"):
            log.submit({"i": 1})
    finally:
        log.close()
    assert sample(log, "tabserve_server_decision_records_dropped_total", reason="write_error") == 1
    with pytest.raises(DecisionLogUnavailable, match="closed"):
        log.submit({"i": 2})


def test_a_second_process_on_the_same_set_writes_a_set_of_its_own(tmp_path: Path) -> None:
    """Two writers given one directory and one worker name: each chain keeps one writer, nothing is dropped."""
    first = open_log(tmp_path)
    second = open_log(tmp_path, decision_log_required=True)
    try:
        first.submit({"i": 1})
        second.submit({"i": 2})
    finally:
        first.close()
        second.close()
    # Whichever writer thread opened first has the worker's set; the other has `~2`.
    found = {(r["worker"], r["i"]) for name in (WORKER, f"{WORKER}~2") for _, path in numbered_files(tmp_path / name)
             for r in map(json.loads, path.read_bytes().splitlines()) if r["kind"] == "decision"}
    assert found in ({(WORKER, 1), (f"{WORKER}~2", 2)}, {(WORKER, 2), (f"{WORKER}~2", 1)})
    assert verify_directory(tmp_path).intact


def test_close_writes_everything_queued(tmp_path: Path) -> None:
    """A big queue filled faster than the writer drains it: close() still writes every record."""
    log = open_log(tmp_path, decision_log_queue_size=50000)
    for i in range(30000):
        log.submit({"i": i, "pad": "y" * 50})
    log.close()
    assert len(decisions(tmp_path)) == 30000
    assert os.listdir(tmp_path / WORKER)


def test_an_empty_directory_setting_turns_the_log_off() -> None:
    assert open_decision_log(ServerSettings(decision_log_dir=""), WORKER) is None


def test_retention_by_age_prunes_old_files_and_says_so(tmp_path: Path) -> None:
    small = {"decision_log_max_file_bytes": 4096, "decision_log_retention_bytes": 0}
    log = open_log(tmp_path, **small)
    for i in range(200):
        log.submit({"i": i, "pad": "z" * 50})
    log.close()
    old = numbered_files(tmp_path / WORKER)
    assert len(old) > 3
    for _, path in old[:-1]:  # all but the newest, which the next writer continues in
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    log = open_log(tmp_path, decision_log_retention_seconds=3600, **small)
    log.submit({"i": "after"})
    log.close()
    left = [n for n, _ in numbered_files(tmp_path / WORKER)]
    assert left[0] == old[-1][0]
    assert sample(log, "tabserve_server_decision_log_files_pruned_total", reason="age") == len(old) - 1
    (pruned,) = [r for r in records(tmp_path) if r["kind"] == "pruned"]
    assert [f["file"] for f in pruned["files"]] == [path.name for _, path in old[:-1]]
    assert pruned["files"][-1]["last_seq"] == records(tmp_path)[0]["seq"] - 1


def test_a_torn_last_line_is_left_and_the_next_writer_starts_a_new_file(tmp_path: Path) -> None:
    log = open_log(tmp_path)
    log.submit({"i": 1})
    log.close()
    path = tmp_path / WORKER / file_name(1)
    path.write_bytes(path.read_bytes()[:-10])  # a write that failed half-way, as after a power loss
    log = open_log(tmp_path)
    log.submit({"i": 2})
    log.close()
    assert [n for n, _ in numbered_files(tmp_path / WORKER)] == [1, 2]
    assert path.read_bytes()[-1:] != b"\n"  # left as evidence
    first = json.loads((tmp_path / WORKER / file_name(2)).read_bytes().splitlines()[0])
    assert first["kind"] == "start" and first["seq"] == 3  # continues after the last complete record (seq 2)


def test_a_short_key_is_refused_at_start(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("short\n")
    with pytest.raises(SettingsError, match="holds 5 bytes; at least 32"):
        open_log(tmp_path, decision_log_key_file=str(key))


FILLING_DISK = """
import json, resource, signal, sys
from tabserve_server.decisions.log import open_decision_log
from tabserve_server.settings import ServerSettings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # a disk that fills after 20 kB
log = open_decision_log(ServerSettings(decision_log_dir=sys.argv[1]), "worker-0")
for i in range(2000):
    log.submit({"i": i, "pad": "p" * 40})
log.close()
print(json.dumps({r: log.metrics.registry.get_sample_value(
    "tabserve_server_decision_records_dropped_total", {"reason": r}) for r in ("write_error", "queue_full")}))
"""


def test_a_disk_filling_mid_file_leaves_no_torn_line(tmp_path: Path) -> None:
    """write() stops part-way (EFBIG at a file size limit, as ENOSPC on a full disk): the file is cut back to the
    end of the last batch written, the failed batches are dropped and counted, and what was written chains."""
    done = subprocess.run([sys.executable, "-c", FILLING_DISK, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=True)
    dropped = json.loads(done.stdout.splitlines()[-1])
    path = tmp_path / WORKER / file_name(1)
    assert path.stat().st_size <= 20000 and path.read_bytes().endswith(b"\n")
    found = records(tmp_path)
    assert len([r for r in found if r["kind"] == "decision"]) + dropped["write_error"] + dropped["queue_full"] == 2000
    assert dropped["write_error"] > 0
    assert_chained(found)
    assert "File too large" in done.stderr  # logged once, with the OS error


def test_a_submitted_record_is_always_a_decision(tmp_path: Path) -> None:
    """The log's own kinds (pruned, close, ...) cannot be forged through submit; the log's fields win."""
    log = open_log(tmp_path)
    log.submit({"kind": "pruned", "seq": 99, "worker": "other", "hash": "x", "i": 1})
    log.close()
    (record,) = decisions(tmp_path)
    assert (record["i"], record["seq"], record["worker"]) == (1, 2, WORKER)
    assert [r["kind"] for r in records(tmp_path)] == ["start", "decision", "close"]


def test_a_directory_that_cannot_be_made_drops_and_keeps_trying(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    log = open_log(blocker / "decisions")  # mkdir fails: NotADirectoryError, at every write until it works
    for i in range(10):
        log.submit({"i": i})
    log.close()
    assert sample(log, "tabserve_server_decision_records_dropped_total", reason="write_error") == 10
    assert sample(log, "tabserve_server_decision_log_write_failing") == 1


KILLED_WRITER = """
import sys, time
from tabserve_server.decisions.log import open_decision_log
from tabserve_server.settings import ServerSettings
log = open_decision_log(ServerSettings(decision_log_dir=sys.argv[1], decision_log_required=True), "worker-0")
for i in range(50):
    log.submit({"i": i})
print("written", flush=True)
time.sleep(60)
"""


def test_after_a_kill_the_next_writer_continues_and_says_the_stop_was_unclean(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "written"
    finally:
        child.kill()
        child.wait(timeout=30)
    report = verify_directory(tmp_path)
    assert "does not end in a close record" in str(report.sets[0].problem)  # no process holds it any more
    log = open_log(tmp_path)
    log.submit({"i": "after"})
    log.close()
    report = verify_directory(tmp_path)
    assert report.intact, report
    assert any("restarted after an unclean stop" in notice for notice in report.sets[0].notices)
    assert [r["i"] for r in decisions(tmp_path)] == [*range(50), "after"]
