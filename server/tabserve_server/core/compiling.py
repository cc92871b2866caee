"""The compiled backend in the serving process: each LightGBM version that starts serving moves onto its compiled
predictor (core/compiled.py) once one is cached or compiled in the verifier process, and checked here again.

Contract:
- The booster serves until then; scoring never waits for a compile. The version is re-stated with a
  `backend_note` starting "compiling" while attempts remain, and "compiled backend unavailable (REASON, attempt N
  of M)" when the compiled backend cannot serve it (compiler missing, failed, past compile_timeout_seconds,
  outside the bound): the booster keeps serving.
- The swap is `ModelManager.upgrade`: it happens only while that very version still serves.
- A compile that failed, crashed or ran past its limit is tried again with back-off, like a failed load, at most
  `CompilePolicy.attempts` times per load; a missing compiler or a predictor outside the bound is final.
- One compile per cache entry among the processes sharing the cache directory (the workers of a supervisor): the
  one holding the entry's lock file compiles, the others wait for its entry (bounded, then compile themselves).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from tabserve_server.core.compiled import (
    SERVING_CHECK_ROWS,
    CompiledPredictor,
    CompileFailed,
    cache_entry,
    checked_predictor,
    compiler_version,
    read_entry,
)
from tabserve_server.core.manager import ModelManager
from tabserve_server.core.model import LightGBMPredictor, LoadedModel
from tabserve_server.core.verify import VerifyLimits, verify
from tabserve_server.errors import ModelLoadError

log = logging.getLogger(__name__)

COMPILING = "compiling"
# How each attempt ended, as the compile metric counts it (metrics.py): the first two serve compiled code.
OUTCOMES = ("compiled", "cache_hit", "missing", "failed", "timeout", "crash", "unverified")
RETRIED = ("failed", "timeout", "crash")  # may pass next time (load, memory); the others would end the same way
LOCK_POLL_SECONDS = 0.5
LOCK_SLACK_SECONDS = 60.0  # a waiter waits the holder's compile limit plus this (its verifier's start, its check)


@dataclass(frozen=True)
class CompilePolicy:
    """How often one version's compile is attempted per load, and the back-off between attempts (doubling from
    `retry_initial_seconds` up to `retry_max_seconds`, the failed-load settings)."""

    attempts: int = 1
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0

    def wait_after(self, attempt: int) -> float:
        return min(self.retry_max_seconds, self.retry_initial_seconds * 2.0 ** (attempt - 1))


class CompiledBackend:
    """Listens to the manager's swaps (`model_swapped`) and upgrades each new LightGBM version in a thread."""

    def __init__(self, manager: ModelManager, cache_dir: Path, limits: VerifyLimits, threads: int,
                 on_outcome: Callable[[str], None] = lambda _outcome: None, *,
                 policy: CompilePolicy = CompilePolicy()) -> None:
        self._manager = manager
        self._cache_dir = cache_dir
        self._limits = limits
        self._threads = threads
        self._on_outcome = on_outcome
        self._policy = policy
        self._stopping = threading.Event()

    def model_swapped(self, new: LoadedModel, old: LoadedModel | None) -> None:
        if not isinstance(new.predictor, LightGBMPredictor) or new.backend_note or not new.source_dir:
            return  # not a booster, already being handled, or nothing to compile from
        threading.Thread(target=self._upgrade, args=(new,), name="compile", daemon=True).start()

    def stop(self) -> None:
        """Ends back-off and lock waits at once (server shutdown); a compile under way is left to its limit."""
        self._stopping.set()

    def _upgrade(self, model: LoadedModel) -> None:
        served = replace(model, backend_note=COMPILING)
        if not self._manager.upgrade(model, served):
            return
        attempts = self._policy.attempts
        for attempt in range(1, attempts + 1):
            try:
                predictor, outcome = compiled_predictor(model, self._cache_dir, self._limits, self._threads,
                                                        self._stopping)
            except Exception as exc:
                if self._stopping.is_set():
                    return
                outcome = _outcome_of(exc)
                self._on_outcome(outcome)
                final = outcome not in RETRIED or attempt == attempts
                wait = self._policy.wait_after(attempt)
                log.warning("compiled backend unavailable for %s version %s (%s, attempt %d of %d): %s; LightGBM "
                            "serves%s", model.name, model.version, outcome, attempt, attempts, exc,
                            "" if final else f"; next attempt in {wait:g} s",
                            exc_info=not isinstance(exc, ModelLoadError))
                retried = "" if outcome in RETRIED else ", not retried"
                note = (f"compiled backend unavailable ({outcome}, attempt {attempt} of {attempts}{retried}): {exc}; "
                        "LightGBM serves" if final else
                        f"{COMPILING}: attempt {attempt} of {attempts} failed ({outcome}): {exc}; next attempt in "
                        f"{wait:g} s; LightGBM serves")
                failed = replace(model, backend_note=note)
                if not self._manager.upgrade(served, failed) or final or self._stopping.wait(wait):
                    return
                served = replace(model, backend_note=f"{COMPILING}: attempt {attempt + 1} of {attempts}")
                if not self._manager.upgrade(failed, served):
                    return
                continue
            self._on_outcome(outcome)
            if self._manager.upgrade(served, replace(model, predictor=predictor)):
                log.info("%s version %s now serves on the compiled backend (%s, %s)", model.name, model.version,
                         predictor.backend_version, outcome)
            return


def _outcome_of(exc: Exception) -> str:
    outcome = getattr(exc, "reason", "failed") if isinstance(exc, ModelLoadError) else "failed"
    return outcome if outcome in OUTCOMES else "failed"


def compiled_predictor(model: LoadedModel, cache_dir: Path, limits: VerifyLimits, threads: int,
                       stopping: threading.Event | None = None) -> tuple[CompiledPredictor, str]:
    """The checked compiled predictor of `model` (a LightGBM version) and how it was had (`cache_hit` or
    `compiled`): from its cache entry under `cache_dir`, else compiled by the verifier process within `limits`
    (or by another process sharing `cache_dir`, waited for under the entry's lock).
    Raises ModelLoadError (CompileFailed, VerifierFailed) with the reason when it cannot serve."""
    if not isinstance(model.predictor, LightGBMPredictor) or not model.source_dir:
        raise CompileFailed(f"{model.source_uri}: only LightGBM versions read from files compile", "failed")
    compiler = compiler_version()
    entry = cache_entry(cache_dir, model.digest, compiler)
    found, outcome = read_entry(entry), "cache_hit"
    if found is None:
        with compile_lock(entry, limits.timeout_seconds + LOCK_SLACK_SECONDS, stopping or threading.Event()):
            found = read_entry(entry)  # published by the process that held the lock before this one
            if found is None:
                verdict = verify(Path(model.source_dir), model.source_uri, limits, compile_to=entry,
                                 threshold=model.threshold)
                if verdict.digest != model.digest:
                    raise CompileFailed(f"{model.source_uri}: the files changed since they were loaded", "failed")
                found, outcome = read_entry(entry), "compiled"
    if found is None:
        raise CompileFailed(f"the compiled object at {entry} is missing or not the verified one", "failed")
    code, _facts = found
    predictor, _worst = checked_predictor(model.predictor, code, compiler, model.threshold,
                                          rows=SERVING_CHECK_ROWS, threads=threads)
    return predictor, outcome


@contextlib.contextmanager
def compile_lock(entry: Path, wait_seconds: float, stopping: threading.Event) -> Iterator[bool]:
    """Holds `entry`'s lock file (flock) while the caller compiles it, so processes sharing the cache compile it
    once; yields whether it was had. The kernel drops it when the holder dies. Bounded: past `wait_seconds` (or
    when `stopping`) the caller goes on without it, which at worst compiles the entry twice."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(entry.with_name(entry.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        held, deadline = _try_lock(fd), time.monotonic() + wait_seconds
        if not held:
            log.info("another process is compiling %s: waiting up to %.0f s for its entry", entry.name, wait_seconds)
        while not held and time.monotonic() < deadline and not stopping.wait(LOCK_POLL_SECONDS):
            held = _try_lock(fd)
        if not held and not stopping.is_set():
            log.warning("waited %.0f s for another process's compile of %s: compiling here", wait_seconds, entry.name)
        yield held
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
