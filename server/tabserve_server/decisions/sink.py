"""The decision log's files: one set per worker process, `DIR/<worker>/decisions-00000001.jsonl`, ...

A file set is written by one process at a time (an exclusive `flock` on `DIR/<worker>/.lock`, which also tells
a verifier that the set is live). A process that finds its set held by another (two servers given one directory
and the same worker name) writes the set `<worker>~2` (or `~3`, ...) instead, so each chain keeps one writer and
no record is lost to the mistake. A new file starts when the current one would pass `max_file_bytes`; its first
record's `prev` is the last hash of the file before. A restarted process continues the chain from the last
complete record of its set, in the same file (a new one when that file ends in a torn line, left as evidence).
Retention removes whole oldest files (never the current one) once the set is larger than `max_total_bytes` or a
file is older than `max_age_seconds`; before removing them `ChainWriter.prune` writes a `pruned` record naming
each file with its last sequence number and hash, so a verifier tells retention from deletion.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabserve_server.decisions.chain import ChainState, seal

__all__ = ["FILE_PATTERN", "ChainWriter", "FileSet", "Retention", "file_name", "last_line", "numbered_files"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
FILE_PATTERN = re.compile(r"^decisions-(\d{8})\.jsonl$")
_TAIL_CHUNK = 64 * 1024
MAX_SETS_PER_WORKER = 64


def file_name(number: int) -> str:
    return f"decisions-{number:08d}.jsonl"


def numbered_files(directory: Path) -> list[tuple[int, Path]]:
    """The set's files as (number, path), oldest first."""
    found = []
    for path in directory.iterdir():
        match = FILE_PATTERN.match(path.name)
        if match:
            found.append((int(match[1]), path))
    return sorted(found)


def last_line(path: Path) -> tuple[bytes | None, bool]:
    """(the last complete line of a regular file without its newline, or None; True when the file ends in a
    torn line). Reads backwards in chunks, so a large file costs one chunk or a few."""
    if not path.is_file():  # e.g. a device standing in for a failing disk: nothing to resume from
        return None, False
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None, False
        f.seek(end - 1)
        torn = f.read(1) != b"\n"
        tail = b""
        position = end
        while position > 0:
            step = min(_TAIL_CHUNK, position)
            position -= step
            f.seek(position)
            tail = f.read(step) + tail
            lines = tail.split(b"\n")
            complete = lines[:-1]  # the piece after the last newline is empty or torn
            if len(complete) >= 2 or (complete and position == 0):
                return complete[-1], torn
        return None, torn


@dataclass(frozen=True)
class Retention:
    """Size of one file; limits of one worker's file set (0: no limit)."""

    max_file_bytes: int
    max_total_bytes: int = 0
    max_age_seconds: float = 0.0


@dataclass(frozen=True)
class PrunedFile:
    number: int
    path: Path
    size: int
    reason: str  # "size" or "age"


class FileSet:
    """One worker's numbered files: `open()` (lock, find where to continue), `append(lines)`, `rotate()`."""

    def __init__(self, root: Path, worker: str, retention: Retention) -> None:
        self.root = root
        self.worker = worker
        self.directory = root / worker  # until open(): then the set actually claimed
        self.retention = retention
        self.number = 0
        self._fd = -1
        self._lock_fd = -1
        self._size = 0

    def open(self) -> bytes | None:
        """Lock the set and open the file to continue; returns the last complete record line (None: a new set).

        Raises OSError (BlockingIOError when another process holds the set)."""
        if self._lock_fd < 0:  # kept across a failed open: a second flock by this process would conflict
            self._claim()
        files = numbered_files(self.directory)
        last, torn = None, False
        for index, (_, path) in enumerate(reversed(files)):
            last, torn_here = last_line(path)
            torn = torn or (index == 0 and torn_here)
            if last is not None:
                break
        self.number = files[-1][0] if files else 1
        if torn:
            log.error("decision log %s ends in a torn record (a write failed half-way): left as it is, "
                      "continuing in a new file", files[-1][1])
            self.number += 1
        self._open_current()
        return last

    def _claim(self) -> None:
        """Lock the worker's set, or the first free `<worker>~N` when another process holds it."""
        for n in range(1, MAX_SETS_PER_WORKER + 1):
            directory = self.root / (self.worker if n == 1 else f"{self.worker}~{n}")
            directory.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o640)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                continue
            except OSError:
                os.close(lock_fd)
                raise
            if n > 1:
                log.warning("decision log %s is held by another process (two servers share %s with the same "
                            "worker name?): writing %s instead", self.root / self.worker, self.root, directory)
            self._lock_fd, self.directory = lock_fd, directory
            return
        raise BlockingIOError(f"{MAX_SETS_PER_WORKER} file sets of {self.worker} under {self.root} are all held")

    def _open_current(self) -> None:
        path = self.directory / file_name(self.number)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def rotate(self) -> None:
        """Close the current file (synced to disk) and start the next number."""
        self._close_current()
        self.number += 1
        self._open_current()

    def room_for(self, size: int, lines: int) -> bool:
        """Whether `lines` more lines of `size` bytes fit in the current file; a single line larger than a whole
        file goes alone into an empty one."""
        return self._size + size <= self.retention.max_file_bytes or (self._size == 0 and lines == 1)

    def append(self, data: bytes) -> None:
        """Write `data` (whole lines) to the current file; on failure cut the file back to where it was, so no
        torn line stays, and raise the OSError."""
        start = self._size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass  # e.g. a character device: nothing to cut
            raise
        self._size += len(data)

    def due_for_pruning(self, now: float) -> list[PrunedFile]:
        """Oldest closed files that retention removes now, oldest first."""
        r = self.retention
        files = [(n, p, p.stat()) for n, p in numbered_files(self.directory)]
        total = sum(s.st_size for _, _, s in files)
        due = []
        for number, path, stat in files:
            if number >= self.number:
                break
            if r.max_total_bytes and total > r.max_total_bytes:
                reason = "size"
            elif r.max_age_seconds and now - stat.st_mtime > r.max_age_seconds:
                reason = "age"
            else:
                break
            due.append(PrunedFile(number, path, stat.st_size, reason))
            total -= stat.st_size
        return due

    def _close_current(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError:
                pass  # not every file can be synced (a device); the data was handed to the OS already
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self._close_current()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


class ChainWriter:
    """A file set and its chain: seals records in order, writes them, rotates, prunes. One thread uses it."""

    def __init__(self, files: FileSet, key: bytes | None) -> None:
        self.files = files
        self.key = key
        self.state = ChainState()

    @property
    def worker(self) -> str:
        """The set's name, which every record carries: the worker's, or `<worker>~N` (see FileSet)."""
        return self.files.directory.name

    def open(self) -> None:
        """Open the set and continue its chain (OSError when it cannot be opened)."""
        last = self.files.open()
        if last is None:
            return
        try:
            record = json.loads(last)
            self.state = ChainState(int(record["seq"]), str(record["hash"]))
        except (ValueError, KeyError, TypeError):
            log.error("decision log %s: the last record cannot be read; the chain restarts (verify will report "
                      "the break)", self.files.directory)

    def write(self, records: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[int, OSError | None]:
        """Seal and write `records` (kind, fields) in order; (how many were written, the error that stopped the
        rest).

        A record that cannot be encoded raises ValueError/TypeError before anything of the batch is written."""
        lines = []
        state = self.state
        worker = self.worker
        for kind, record in records:
            line, state = seal(kind, record, state, worker, self.key)
            lines.append((line, state))
        written = 0
        while written < len(lines):
            chunk: list[bytes] = []
            size = 0
            for line, _ in lines[written:]:
                if not self.files.room_for(size + len(line), len(chunk) + 1):
                    break
                chunk.append(line)
                size += len(line)
            if not chunk:
                try:
                    self.files.rotate()
                except OSError as exc:
                    return written, exc
                continue
            try:
                self.files.append(b"".join(chunk))
            except OSError as exc:
                return written, exc
            written += len(chunk)
            self.state = lines[written - 1][1]
        return written, None

    def prune(self, now: float | None = None) -> list[PrunedFile]:
        """Remove the files retention says are due, after writing a `pruned` record that names them; [] when
        none are due. Raises OSError when the record cannot be written (then nothing is removed)."""
        due = self.files.due_for_pruning(time.time() if now is None else now)
        if not due:
            return []
        entries = [_pruned_entry(p) for p in due]
        _, error = self.write([("pruned", {"files": entries})])
        if error is not None:
            raise error
        for pruned in due:
            pruned.path.unlink(missing_ok=True)
        return due

    def close(self) -> None:
        self.files.close()


def _pruned_entry(pruned: PrunedFile) -> dict[str, Any]:
    """What verification needs to link the file after a pruned one: its last sequence number and hash."""
    entry: dict[str, Any] = {"file": pruned.path.name, "bytes": pruned.size, "reason": pruned.reason,
                             "last_seq": None, "last_hash": None}
    line, _ = last_line(pruned.path)
    if line is not None:
        try:
            record = json.loads(line)
            entry.update(last_seq=record["seq"], last_hash=record["hash"])
        except (ValueError, KeyError, TypeError):
            pass
    return entry
