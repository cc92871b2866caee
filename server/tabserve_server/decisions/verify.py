"""Verification of a decision log directory: every file set's chain intact, nothing missing.

`verify_directory(DIR, key)` checks each worker's file set (`DIR/<worker>/`, or DIR itself when it holds the
files) record by record: the format version, the hash (the HMAC with a key), the sequence number and the link to
the record before, across files. It stops a set at its first bad record and says why:

- edited: the hash does not match the content (with a key: also a chain rebuilt without it);
- removed: a sequence number skipped; reordered: a sequence number lower than expected;
- a torn last line (a cut file or a write that failed half-way);
- a missing file: a gap in the numbers, or a first file other than 1, not covered by a `pruned` record
  (retention removes the oldest files first and names each in a `pruned` record with its last sequence number
  and hash, so the newest file named covers every older one: pruned files are listed, not errors);
- a truncated tail: a set that no process holds (its lock is free) and that does not end in a `close` record.
A killed writer also leaves no `close` record; when it restarts, its `start` record says the stop was unclean.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabserve_server.decisions.chain import ALG_HMAC, ALG_SHA256, FORMAT_VERSION, ChainState, digest
from tabserve_server.decisions.sink import FILE_PATTERN, LOCK_NAME, file_name, numbered_files

__all__ = ["Problem", "Report", "SetReport", "Unreadable", "verify_directory"]


class Unreadable(Exception):
    """The directory or a file cannot be read, or a keyed chain was given no key: nothing can be concluded."""


@dataclass(frozen=True)
class Problem:
    """The first bad record of a file set (line 0: the file itself)."""

    file: str
    line: int
    seq: int | None
    reason: str

    def __str__(self) -> str:
        where = self.file + (f" line {self.line}" if self.line else "")
        return f"{where}{f' (seq {self.seq})' if self.seq is not None else ''}: {self.reason}"


@dataclass
class SetReport:
    worker: str
    files: int = 0
    records: int = 0
    decisions: int = 0
    live: bool = False  # a process holds the set: its tail is still being written
    pruned: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    problem: Problem | None = None


@dataclass
class Report:
    sets: list[SetReport]

    @property
    def intact(self) -> bool:
        return all(s.problem is None for s in self.sets)


class _Bad(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def verify_directory(root: Path, key: bytes | None = None, *, open_tail: bool = False) -> Report:
    """Verify every file set under `root`; raises Unreadable when a set cannot be read or needs a key.

    `open_tail`: the sets may still be growing although no process here holds them (a shipped copy of a running
    server's log): a set without a final `close` record is then a notice, not a truncated tail."""
    try:
        if any(numbered_files(root)):
            dirs = [root]
        else:
            dirs = sorted(p for p in root.iterdir() if p.is_dir() and (numbered_files(p) or (p / LOCK_NAME).exists()))
    except OSError as exc:
        raise Unreadable(f"cannot read {root}: {exc.strerror or exc}") from None
    if not dirs:
        raise Unreadable(f"no decision log files under {root}")
    try:
        return Report([_verify_set(d, key, open_tail) for d in dirs])
    except OSError as exc:
        raise Unreadable(f"cannot read {exc.filename or root}: {exc.strerror or exc}") from None


def _is_live(directory: Path) -> bool:
    lock = directory / LOCK_NAME
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases a lock taken just now
    return False


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete) of a file, streamed."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            yield number, line.rstrip(b"\n"), line.endswith(b"\n")


def _pruned_claims(files: list[tuple[int, Path]]) -> dict[str, dict[str, Any]]:
    """File name -> its entry in a `pruned` record (read before the chain, which needs them at its start)."""
    claims: dict[str, dict[str, Any]] = {}
    for _, path in files:
        for _, line, _ in _lines(path):
            if b'"kind":"pruned"' not in line:  # a cheap filter: most records are decisions
                continue
            try:
                record = json.loads(line)
                if record["kind"] == "pruned":
                    for entry in record["files"]:
                        claims[str(entry["file"])] = entry
            except (ValueError, KeyError, TypeError):
                continue  # the chain check reports this record
    return claims


def _verify_set(directory: Path, key: bytes | None, open_tail: bool) -> SetReport:
    report = SetReport(worker=directory.name, live=_is_live(directory))
    files = numbered_files(directory)
    report.files = len(files)
    if not files:
        report.problem = Problem(directory.name, 0, None, "no decision log files in the set: they were deleted")
        return report
    claims = _pruned_claims(files)
    state: ChainState | None = None
    expected_number = 1
    last_kind = ""
    for number, path in files:
        name = f"{directory.name}/{path.name}"
        try:
            if number != expected_number or state is None:
                state = _after_gap(expected_number, number, claims, report)
        except _Bad as bad:
            report.problem = Problem(name, 0, None, bad.reason)
            return report
        expected_number = number + 1
        lines = _lines(path)
        for line_number, line, complete in lines:
            seq = None
            try:
                if not complete:
                    raise _Bad("the last line is incomplete: the file was cut (truncated tail) or a write failed")
                record = _parse(line)
                seq = record.get("seq") if isinstance(record.get("seq"), int) else None
                state = _check(record, state, directory.name, key)
            except _Bad as bad:
                reason = bad.reason
                if seq is not None and seq > state.seq + 1 and _next_seq(lines) == state.seq + 1:
                    reason = f"seq {state.seq + 1} expected, and it comes next: this record and the next are swapped"
                report.problem = Problem(name, line_number, seq, reason)
                return report
            report.records += 1
            kind = record.get("kind")
            report.decisions += kind == "decision"
            _notice(record, last_kind, name, line_number, report)
            last_kind = str(kind)
    if last_kind != "close" and (report.live or open_tail):
        report.notices.append("no close record yet: the set is still being written (records after the last one "
                              "here are not checked)")
    elif last_kind != "close":
        last = f"{directory.name}/{files[-1][1].name}"
        report.problem = Problem(last, 0, state.seq if state else None, "the set does not end in a close record and "
                                 "no process holds it: its tail was truncated (or its newest file removed), or "
                                 "the writer was killed")
    return report


def _next_seq(lines: Iterator[tuple[int, bytes, bool]]) -> int | None:
    try:
        _, line, _ = next(lines)
        seq = json.loads(line).get("seq")
    except (StopIteration, ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) else None


def _after_gap(expected: int, number: int, claims: dict[str, dict[str, Any]], report: SetReport) -> ChainState:
    """Where the chain stands before file `number`, when files `expected`..`number`-1 are absent: each must be
    named by a `pruned` record, and the last of them gives the link."""
    if number == 1:
        return ChainState()
    # Retention removes the oldest files first, so the newest file a pruned record names vouches for every
    # older one (the records naming those may have been pruned since).
    through = max((int(m[1]) for m in map(FILE_PATTERN.match, claims) if m), default=0)
    for missing in range(expected, number):
        if missing > through:
            raise _Bad(f"{file_name(missing)} is missing and no pruned record names it: it was deleted")
        report.pruned.append(file_name(missing))
    entry = claims[file_name(number - 1)]
    if not isinstance(entry.get("last_seq"), int) or not isinstance(entry.get("last_hash"), str):
        raise _Bad(f"the pruned record of {file_name(number - 1)} has no last record to link this file to")
    return ChainState(entry["last_seq"], entry["last_hash"])


def _parse(line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise _Bad(f"not a JSON record ({exc})") from None
    if not isinstance(record, dict):
        raise _Bad("not a JSON object")
    if record.get("v") != FORMAT_VERSION:
        raise _Bad(f"format version {record.get('v')!r} is not {FORMAT_VERSION}, the one this tool reads")
    return record


def _check(record: dict[str, Any], state: ChainState, worker: str, key: bytes | None) -> ChainState:
    """The state after `record`, or _Bad naming what is wrong with it."""
    alg = record.get("alg")
    if key is None and alg == ALG_HMAC:
        raise Unreadable("the chain is keyed (hmac-sha256): pass the key file (--key-file)")
    if key is not None and alg != ALG_HMAC:
        raise _Bad(f"alg is {alg!r}, not {ALG_HMAC}, although the log is keyed: written or re-chained without the key")
    if key is None and alg != ALG_SHA256:
        raise _Bad(f"unknown alg {alg!r}")
    body = {k: v for k, v in record.items() if k != "hash"}
    if digest(body, key) != record.get("hash"):
        raise _Bad("the hash does not match the content: the record was edited"
                   + (" (or hashed with another key)" if key is not None else ""))
    seq = record.get("seq")
    if not isinstance(seq, int) or seq != state.seq + 1:
        expected = state.seq + 1
        if isinstance(seq, int) and seq > expected:
            raise _Bad(f"seq {expected} expected: {seq - expected} record(s) before this one are missing (deleted)")
        raise _Bad(f"seq {expected} expected: the records are out of order (swapped or inserted)")
    if record.get("prev") != state.last_hash:
        raise _Bad("prev is not the hash of the record before: a record was replaced or the files were mixed")
    if record.get("worker") != worker:
        raise _Bad(f"worker {record.get('worker')!r} is not this file set's ({worker!r}): a file was moved here")
    return ChainState(seq, str(record["hash"]))


def _notice(record: dict[str, Any], last_kind: str, name: str, line: int, report: SetReport) -> None:
    kind = record.get("kind")
    if kind == "dropped":
        report.notices.append(f"{name} line {line}: {record.get('count')} record(s) of answered calls were not "
                              f"written ({record.get('reasons')})")
    elif kind == "start" and last_kind not in {"", "close"}:
        report.notices.append(f"{name} line {line}: the writer restarted after an unclean stop (killed?): the "
                              "records it had queued are not in the log")
