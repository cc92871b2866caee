"""The version manager: holds exactly one live model and moves it to the aspired version.

Contract (after TF Serving's AspiredVersionsManager with the availability-preserving policy):
- `set_aspired()` is idempotent and the latest statement wins; it never blocks on loading.
- A new version is loaded as a candidate in a background thread, validated, then swapped in atomically;
  the old version serves until then. `current()` is a lock-free read, so a request captures one version
  and runs entirely on it, and scoring never waits for a load.
- Every candidate is validated the same way (feature schema against the served version, warm-up
  predictions), whether it came from the registry, a local directory or the cache. A candidate that
  will never serve (failed validation, superseded by a newer statement) is discarded; one that serves
  is committed, which makes it the cache's last good model.
- A failed load leaves the served version in place; the failure is kept in `status()` and the same
  version is retried with exponential back-off.
- A statement with `stage_only` (used by the multi-worker supervisor) loads and validates as usual
  but holds the model staged instead of swapping it in; `commit_staged()` swaps it. A newer
  statement discards a staged model that does not satisfy it.
- `upgrade()` swaps the served version for the same version on another backend (core/compiling.py) only
  while that version still serves, so it never undoes a newer swap.
- The loader thread runs `loader_nice` levels nicer than the request threads (so does whatever it starts), so a
  reload's CPU work yields the cores to scoring first.
- With nothing served and the aspired version failing (for any reason, for example the registry is
  down at start-up), the last validated model in the local cache is served, and status says so.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Protocol

from tabserve_server.core.loading import Candidate, model_name_from_uri
from tabserve_server.core.model import AspiredVersion, LoadedModel
from tabserve_server.core.validation import validate
from tabserve_server.errors import ModelLoadError

log = logging.getLogger(__name__)


class LoadState(Enum):
    IDLE = "idle"
    LOADING = "loading"
    FAILED = "failed"
    STAGED = "staged"


@dataclass(frozen=True)
class ManagerStatus:
    serving: LoadedModel | None
    aspired: AspiredVersion | None
    state: LoadState
    last_error: str
    last_error_at: datetime | None
    next_attempt_at: datetime | None
    failed_attempts: int
    failed_version: str
    staged: LoadedModel | None = None


@dataclass(frozen=True)
class Failure:
    """The last failed load of `aspired`: its `attempts`-th in a row; not retried before `retry_at` (monotonic)."""

    aspired: AspiredVersion
    attempts: int
    error: str
    at: datetime
    retry_at: float


@dataclass(frozen=True)
class StagedVersion:
    """A validated candidate, loaded for `aspired`, held until `commit_staged()` swaps it in."""

    aspired: AspiredVersion
    candidate: Candidate

    @property
    def model(self) -> LoadedModel:
        return self.candidate.model


class CandidateLoader(Protocol):
    """Where candidates come from (core/loading.ModelLoader)."""

    def load(self, aspired: AspiredVersion) -> Candidate: ...

    def load_cached(self, model_name: str) -> Candidate | None: ...


@dataclass(frozen=True)
class LoadOutcome:
    """One finished load attempt: `reason` is '' on success, else a bounded label (ModelLoadError.reason)."""

    aspired: AspiredVersion
    ok: bool
    seconds: float
    error: str = ""
    reason: str = ""


def _lower_this_thread(nice: int) -> None:
    """Add `nice` to the calling thread's niceness: on Linux it is per thread, and threads it starts inherit it
    (LightGBM's OpenMP threads for a parse started here), while request threads keep theirs."""
    if nice <= 0:
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice))
    except OSError as exc:
        log.warning("could not lower the loader thread's priority: %s", exc)


SwapListener = Callable[[LoadedModel, LoadedModel | None], None]
LoadListener = Callable[[LoadOutcome], None]


class ModelManager:
    def __init__(
        self,
        loader: CandidateLoader,
        *,
        allow_schema_change: bool = False,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 60.0,
        loader_nice: int = 0,
    ) -> None:
        self._loader = loader
        self._loader_nice = loader_nice
        self._allow_schema_change = allow_schema_change
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._current: LoadedModel | None = None
        self._aspired: AspiredVersion | None = None
        self._stage_only = False
        self._staged: StagedVersion | None = None
        self._state = LoadState.IDLE
        self._failure: Failure | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._swap_listeners: list[SwapListener] = []
        self._load_listeners: list[LoadListener] = []

    # --- the read path ----------------------------------------------------------------------

    def current(self) -> LoadedModel | None:
        """The live model, or None before the first successful load. Lock-free."""
        return self._current

    # --- the control path -------------------------------------------------------------------

    def set_aspired(self, aspired: AspiredVersion, stage_only: bool = False) -> bool:
        """State what should be served; returns whether it is served already.

        With `stage_only` the loaded, validated model is held until `commit_staged()`.
        """
        dropped: StagedVersion | None = None
        with self._lock:
            if aspired != self._aspired:
                log.info("aspired version: %s %s (%s)%s", aspired.model_name, aspired.version or "-",
                         aspired.model_uri, " staged only" if stage_only else "")
            self._aspired = aspired
            self._stage_only = stage_only
            if self._staged is not None and not self._staged.model.satisfies(aspired):
                dropped, self._staged = self._staged, None
            current = self._current
        if dropped is not None:
            self._discard(dropped.candidate, "a newer aspired version arrived before the commit")
        self._wake.set()
        return current is not None and current.satisfies(aspired)

    def status(self) -> ManagerStatus:
        with self._lock:
            failure = self._failure
            return ManagerStatus(
                serving=self._current,
                aspired=self._aspired,
                state=self._state,
                last_error=failure.error if failure else "",
                last_error_at=failure.at if failure else None,
                next_attempt_at=(
                    datetime.now(UTC) + timedelta(seconds=max(0.0, failure.retry_at - time.monotonic()))
                    if failure else None
                ),
                failed_attempts=failure.attempts if failure else 0,
                failed_version=(failure.aspired.version or failure.aspired.model_uri) if failure else "",
                staged=self._staged.model if self._staged else None,
            )

    def commit_staged(self, aspired: AspiredVersion) -> bool:
        """Swap in the staged model if it satisfies `aspired`; True when `aspired` is served afterwards."""
        with self._lock:
            if self._current is not None and self._current.satisfies(aspired):
                return True
            staged = self._staged
            if staged is None or not staged.model.satisfies(aspired):
                return False
            self._staged = None
        self._serve(staged.candidate)
        self._wake.set()
        return True

    def upgrade(self, served: LoadedModel, better: LoadedModel) -> bool:
        """Serve `better` (the same version with another predictor or backend note) instead of `served`, if
        `served` is still what serves; the load state is untouched. True when swapped."""
        with self._lock:
            if self._current is not served:
                return False
            self._current = better
        for listener in self._swap_listeners:
            listener(better, served)
        return True

    def on_swap(self, listener: SwapListener) -> None:
        self._swap_listeners.append(listener)

    def on_load(self, listener: LoadListener) -> None:
        self._load_listeners.append(listener)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-loader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- the loader thread ------------------------------------------------------------------

    def _run(self) -> None:
        _lower_this_thread(self._loader_nice)
        while not self._stopping.is_set():
            with self._lock:
                aspired, current, failure = self._aspired, self._current, self._failure
                staged, stage_only = self._staged, self._stage_only
            if aspired is not None and staged is not None and staged.model.satisfies(aspired):
                if stage_only:
                    self._settle(aspired)
                    self._wait(None)
                    continue
                if self.commit_staged(aspired):
                    continue
            if aspired is None or (current is not None and current.satisfies(aspired)):
                self._settle(aspired)
                self._wait(None)
                continue
            if failure is not None and failure.aspired == aspired and time.monotonic() < failure.retry_at:
                self._wait(failure.retry_at - time.monotonic())
                continue
            self._attempt(aspired)

    def _wait(self, timeout: float | None) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def _settle(self, aspired: AspiredVersion | None) -> None:
        """Nothing to load: a failure of an earlier aspired version (e.g. before a rollback) is history."""
        with self._lock:
            if self._failure is not None and self._failure.aspired != aspired:
                self._failure = None
            if self._failure is not None:
                self._state = LoadState.FAILED
            else:
                self._state = LoadState.STAGED if self._staged is not None else LoadState.IDLE

    def _attempt(self, aspired: AspiredVersion) -> None:
        with self._lock:
            self._state = LoadState.LOADING
        started = time.monotonic()
        try:
            candidate = self._validated(self._loader.load(aspired))
        except Exception as exc:
            self._record_failure(aspired, exc, time.monotonic() - started)
            if self._current is None:
                self._serve_from_cache(aspired)
            return
        replaced: StagedVersion | None = None
        with self._lock:
            superseded = self._aspired != aspired and self._current is not None
            # Under a supervisor even a first, superseded load waits for the commit: workers never diverge.
            stage = self._stage_only and not superseded
            if stage:
                replaced, self._staged = self._staged, StagedVersion(aspired, candidate)
                self._failure = None
                self._state = LoadState.STAGED
        if superseded:
            self._discard(candidate, "a newer aspired version arrived during the load")
            return
        if replaced is not None:
            self._discard(replaced.candidate, "a newer version was staged")
        if stage:
            log.info("staged %s version %s: swapped in on commit", candidate.model.name, candidate.model.version)
        else:
            self._serve(candidate)
        self._notify(LoadOutcome(aspired, True, time.monotonic() - started))

    def _validated(self, candidate: Candidate) -> Candidate:
        """The one check of every candidate, wherever it came from; a candidate that fails it is discarded."""
        try:
            validate(candidate.model, self._current, self._allow_schema_change)
        except BaseException:
            candidate.discard()
            raise
        return candidate

    def _discard(self, candidate: Candidate, why: str) -> None:
        log.info("discarding %s %s: %s", candidate.model.name, candidate.model.version, why)
        candidate.discard()

    def _serve(self, candidate: Candidate) -> None:
        self._swap(candidate.model)
        candidate.commit()

    def _swap(self, model: LoadedModel) -> None:
        with self._lock:
            old, self._current = self._current, model
            self._failure = None
            self._state = LoadState.IDLE
        log.info(
            "serving %s version %s from %s (was %s)", model.name, model.version, model.loaded_from.value,
            f"{old.name} {old.version}" if old else "nothing",
        )
        for listener in self._swap_listeners:
            listener(model, old)
        # `old` is released when the last request holding it finishes: nothing else refers to it.

    def _record_failure(self, aspired: AspiredVersion, exc: Exception, duration: float) -> None:
        if isinstance(exc, ModelLoadError):
            log.error("loading %s failed: %s", aspired.model_uri, exc)
        else:
            log.error("loading %s failed unexpectedly:\n%s", aspired.model_uri, traceback.format_exc())
        message = str(exc) or type(exc).__name__
        with self._lock:
            previous = self._failure
            attempts = previous.attempts + 1 if previous and previous.aspired == aspired else 1
            wait = min(self._retry_max, self._retry_initial * 2 ** (attempts - 1))
            self._failure = Failure(aspired, attempts, message, datetime.now(UTC), time.monotonic() + wait)
            self._state = LoadState.FAILED
        self._notify(LoadOutcome(aspired, False, duration, message, getattr(exc, "reason", "unexpected")))

    def _notify(self, outcome: LoadOutcome) -> None:
        for listener in self._load_listeners:
            listener(outcome)

    def _serve_from_cache(self, aspired: AspiredVersion) -> None:
        name = aspired.model_name or model_name_from_uri(aspired.model_uri)
        try:
            cached = self._loader.load_cached(name) if name else None
            if cached is None:
                log.warning("no cached model of %r to fall back on; not serving until a load succeeds", name)
                return
            self._validated(cached)
        except Exception as exc:
            log.error("the cached model of %r is unusable: %s", name, exc)
            return
        log.warning("loading %s failed; serving %s version %s from the local cache",
                    aspired.model_uri, cached.model.name, cached.model.version)
        with self._lock:
            failure = self._failure
        self._serve(cached)
        with self._lock:  # keep the load failure visible: the aspired version is still not loaded
            self._failure, self._state = failure, LoadState.FAILED
