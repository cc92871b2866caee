"""DecisionLog: records handed over by the scoring fronts, written by one thread to the worker's file set.

Contract:
- Default mode: `submit` never blocks and never raises. It puts the record on a bounded queue
  (`decision_log_queue_size`); when the queue is full, or the writer cannot write (disk full, failing device,
  directory gone), the record is dropped and counted (`tabserve_server_decision_records_dropped_total{reason}`),
  and the next record written is preceded by a `dropped` record with the counts, so the gap is in the log too.
- Required mode (`decision_log_required`): `submit` returns once the record was handed to the operating system
  (its `write` returned), else raises `DecisionLogUnavailable` saying why (the fronts answer UNAVAILABLE). No
  fsync per record: that would cost a disk flush per call (milliseconds) and guards only against losing the
  machine, not the process; files are fsynced when they are closed (rotation, stop).
- `close()` writes what is queued and a `close` record (a graceful stop). A killed process loses at most what
  was queued and not yet written: `decision_log_queue_size` records plus one batch (`BATCH` records) being
  written.
- Hand-off: `submit` only appends to the queue; it wakes the writer only when the writer sleeps because the
  queue was empty (and always in required mode, and at close). While records keep coming the writer collects
  them for `FLUSH_SECONDS` between batches instead of being woken per record: a wake-up per call was a thread
  hand-off and a GIL transfer per call, which halved single-row throughput (docs/performance.md, run 10).
The caller hands the record over: it must not change the dict after `submit`. A record may also be given as a
function that builds it (decisions/record.py): the writer calls it, in submission order, so the caller's thread
does not pay for building; one that raises is dropped as `invalid` (required mode: refused saying why).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry

from tabserve_common.secrets import read_secret
from tabserve_common.settings import SettingsError
from tabserve_server.decisions.sink import ChainWriter, FileSet, Retention
from tabserve_server.metrics import DecisionLogMetrics
from tabserve_server.settings import ServerSettings

__all__ = ["BATCH", "DecisionLog", "DecisionLogUnavailable", "open_decision_log"]

log = logging.getLogger(__name__)

BATCH: Final = 256  # records written with one write() call at most
# While records keep coming, the writer wakes this often (module doc): about 10 records a batch at 2,000 calls/s,
# at the cost of records reaching the file up to this much later (a graceful stop still writes them all).
FLUSH_SECONDS: Final = 0.005
REQUIRED_WAIT_SECONDS: Final = 5.0  # required mode: longest a call waits for its record to be written
PRUNE_INTERVAL_SECONDS: Final = 60.0
MIN_KEY_BYTES: Final = 32
_STOP: Final = object()


class DecisionLogUnavailable(Exception):
    """Required mode only: the record could not be written; str() says why."""


class _Waiter:
    """A required-mode caller waiting for its record: `error` is None once written."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: str | None = "not written"

    def finish(self, error: str | None) -> None:
        self.error = error
        self.done.set()


Fields = Mapping[str, Any] | Callable[[], Mapping[str, Any]]  # a record, or a function that builds it
Item = tuple[str, Fields, _Waiter | None]  # kind, fields, the required-mode caller waiting
Built = tuple[str, Mapping[str, Any], _Waiter | None]  # an item whose record is built


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class DecisionLog:
    """One worker's decision log: a bounded queue and a writer thread over a ChainWriter (see module doc)."""

    def __init__(
        self, writer: ChainWriter, *, queue_size: int, required: bool = False,
        metrics: DecisionLogMetrics | None = None,
    ) -> None:
        self.writer = writer
        self.required = required
        self.metrics = metrics or DecisionLogMetrics(CollectorRegistry())
        self._queue: queue.Queue[Item | object] = queue.Queue(queue_size)
        self._dropped = {reason: self.metrics.dropped.labels(reason) for reason in self.metrics.DROP_REASONS}
        self._unlogged: Counter[str] = Counter()  # drops not yet told by a `dropped` record
        self._lock = threading.Lock()
        self._closed = False
        self._opened = False
        self._failing: str | None = None
        self._wake = threading.Event()
        self._idle = False  # the writer waits for a wake-up (queue empty), not for FLUSH_SECONDS to pass
        self.metrics.queue_depth.set_function(self._queue.qsize)
        self._thread = threading.Thread(target=self._run, name=f"decision-log-{writer.worker}", daemon=True)
        self._thread.start()

    # --- callers ---------------------------------------------------------------------------

    def submit(self, record: Fields) -> None:
        """Hand a record to the log (see the module doc for the two modes)."""
        if self.required:
            self._submit_required(record)
            return
        if self._closed:
            self._drop("closed")
            return
        try:
            self._queue.put_nowait(("decision", record, None))
        except queue.Full:
            self._drop("queue_full")
            return
        if self._idle:
            self._wake.set()

    def _submit_required(self, record: Fields) -> None:
        if self._closed:
            self._dropped["closed"].inc()
            raise DecisionLogUnavailable("decision log closed: the server is stopping")
        waiter = _Waiter()
        deadline = time.monotonic() + REQUIRED_WAIT_SECONDS
        try:
            self._queue.put(("decision", record, waiter), timeout=REQUIRED_WAIT_SECONDS)
        except queue.Full:
            self._dropped["queue_full"].inc()
            raise DecisionLogUnavailable(
                f"decision log queue full for {REQUIRED_WAIT_SECONDS:.0f} s: the disk does not keep up"
            ) from None
        self._wake.set()  # the call waits for its record: no collecting
        if not waiter.done.wait(max(0.0, deadline - time.monotonic())):
            raise DecisionLogUnavailable(f"decision record not written within {REQUIRED_WAIT_SECONDS:.0f} s")
        if waiter.error is not None:
            raise DecisionLogUnavailable(waiter.error)

    def _drop(self, reason: str, count: int = 1) -> None:
        self._dropped[reason].inc(count)
        with self._lock:
            self._unlogged[reason] += count

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued and a `close` record, then release the files; waits at most `timeout` seconds
        (None: until done). Later submits are dropped (`closed`), or raise in required mode."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("decision log: the queue stayed full for %s s while closing", timeout)
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("decision log: %d queued records not written when the stop timed out", self._queue.qsize())

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        next_prune = time.monotonic()
        stopping = False
        self._write([("start", {"time": _now(), "pid": os.getpid()}, None)])
        while not stopping:
            batch, stopping = self._take()
            if batch:
                self._write(batch)
            if time.monotonic() >= next_prune:
                self._prune()
                next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
            if stopping or len(batch) == BATCH:
                continue
            if batch:
                self._sleep(FLUSH_SECONDS)  # records are coming: collect them, nobody wakes the writer
            else:
                self._sleep_until_woken(max(0.0, next_prune - time.monotonic()))
        self._write([("close", {"time": _now()}, None)])
        self.writer.close()
        self._drain_after_stop()

    def _take(self) -> tuple[list[Item], bool]:
        """Up to BATCH queued items, and whether the stop came after them."""
        batch: list[Item] = []
        while len(batch) < BATCH:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)  # type: ignore[arg-type]
        return batch, False

    def _sleep(self, seconds: float) -> None:
        """Wait `seconds` or until woken (a required-mode record, the stop)."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _sleep_until_woken(self, seconds: float) -> None:
        """The queue was empty: wait until a submit wakes the writer (module doc: hand-off), `seconds` at most."""
        # Set before looking again: a record put after the look sees the flag and wakes the writer.
        self._idle = True
        if not self._queue.qsize():
            self._wake.wait(seconds)
        self._idle = False
        self._wake.clear()

    def _drain_after_stop(self) -> None:
        """Records put after the stop (a submit racing close()): not written, counted."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):
                waiter: _Waiter | None = item[2]
                self._dropped["closed"].inc()
                if waiter is not None:
                    waiter.finish("decision log closed: the server is stopping")

    def _built(self, batch: list[Item]) -> list[Built]:
        """The items with every record built (module doc); a record that cannot be built costs only itself."""
        items: list[Built] = []
        for kind, given, waiter in batch:
            if not callable(given):
                items.append((kind, given, waiter))
                continue
            try:
                items.append((kind, given(), waiter))
            except Exception as exc:
                log.exception("decision record cannot be built")
                self._fail((kind, {}, waiter), "invalid", f"decision record cannot be built: {exc}")
        return items

    def _write(self, batch: list[Item]) -> None:
        items = self._built(batch)
        with self._lock:
            told = self._unlogged.copy()
            self._unlogged.clear()
        if told:
            items.insert(0, ("dropped", {"time": _now(), "count": told.total(), "reasons": dict(told)}, None))
        error = self._open()
        written = 0
        number = self.writer.files.number
        if error is None:
            try:
                written, os_error = self.writer.write([(kind, record) for kind, record, _ in items])
            except (ValueError, TypeError):
                self._write_one_by_one(items, told)
                return
            error = None if os_error is None else f"decision log cannot be written: {os_error}"
        self._settle(items, written, error, told)
        if self.writer.files.number != number:
            self._prune()  # a new file: the set may have passed its size limit

    def _write_one_by_one(self, items: list[Built], told: Counter[str]) -> None:
        """A record that cannot be encoded (NaN, a non-JSON value) costs only itself."""
        for index, item in enumerate(items):
            try:
                written, os_error = self.writer.write([item[:2]])
            except (ValueError, TypeError) as exc:
                self._fail(item, "invalid", f"decision record cannot be encoded: {exc}")
                continue
            error = None if os_error is None else f"decision log cannot be written: {os_error}"
            self._settle([item], written, error, told if index == 0 else Counter())

    def _settle(self, items: list[Built], written: int, error: str | None, told: Counter[str]) -> None:
        """Count and answer the first `written` items as written and the rest as failed with `error`."""
        kinds = Counter(kind for kind, _, _ in items[:written])
        for kind, count in kinds.items():
            self.metrics.written.labels(kind).inc(count)
        for _, _, waiter in items[:written]:
            if waiter is not None:
                waiter.finish(None)
        if items[written:] and items[0][0] == "dropped" and written == 0:
            items = items[1:]  # the `dropped` record itself failed: its counts wait for the next write
            with self._lock:
                self._unlogged.update(told)
        for item in items[written:]:
            self._fail(item, "write_error", error or "decision log cannot be written")
        self._set_failing(error if items[written:] else None)

    def _fail(self, item: Built, reason: str, error: str) -> None:
        kind, _, waiter = item
        if kind != "decision":
            return  # the log's own records are not counted as drops
        if waiter is not None:
            self._dropped[reason].inc()
            waiter.finish(error)
        else:
            self._drop(reason)

    def _open(self) -> str | None:
        """Open the file set on first use, and again after it failed; the reason when it cannot be opened."""
        if self._opened:
            return None
        try:
            self.writer.open()
        except OSError as exc:
            return f"decision log {self.writer.files.directory} cannot be opened: {exc}"
        self._opened = True
        return None

    def _set_failing(self, error: str | None) -> None:
        if error and self._failing is None:
            log.error("%s; records are %s until it can", error, "refused" if self.required else "dropped")
        elif error is None and self._failing is not None:
            log.info("decision log writes again")
        self._failing = error
        self.metrics.write_failing.set(1 if error else 0)

    def _prune(self) -> None:
        if not self._opened:
            return
        try:
            pruned = self.writer.prune()
        except (OSError, ValueError) as exc:
            log.error("decision log retention: %s", exc)
            return
        if pruned:
            self.metrics.written.labels("pruned").inc()
        for p in pruned:
            self.metrics.files_pruned.labels(p.reason).inc()
            log.info("decision log retention removed %s (%d bytes, by %s)", p.path, p.size, p.reason)


def open_decision_log(
    settings: ServerSettings, worker: str, metrics: DecisionLogMetrics | None = None
) -> DecisionLog | None:
    """The worker's decision log as the settings say (None when `decision_log_dir` is empty). Raises
    SettingsError when the key file cannot be read or is too short; disk problems never raise here: they are
    drops (or refusals in required mode) until the disk works."""
    if not settings.decision_log_dir:
        return None
    key = None
    if settings.decision_log_key_file:
        text = read_secret("", settings.decision_log_key_file, "decision log key")
        key = text.encode()
        if len(key) < MIN_KEY_BYTES:
            raise SettingsError(
                f"the decision log key file {settings.decision_log_key_file} holds {len(key)} bytes; at least "
                f"{MIN_KEY_BYTES} are needed (e.g. `openssl rand -hex 32`)"
            )
    retention = Retention(
        max_file_bytes=settings.decision_log_max_file_bytes,
        max_total_bytes=settings.decision_log_retention_bytes,
        max_age_seconds=settings.decision_log_retention_seconds,
    )
    files = FileSet(Path(settings.decision_log_dir), worker, retention)
    return DecisionLog(
        ChainWriter(files, key), queue_size=settings.decision_log_queue_size,
        required=settings.decision_log_required, metrics=metrics,
    )
