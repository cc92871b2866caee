"""The version manager: holds exactly one live model and moves it to the aspired version.

Contract (after TF Serving's AspiredVersionsManager with the availability-preserving policy):
- `set_aspired()` is idempotent and the latest statement wins; it never blocks on loading.
- A new version is loaded and validated in a background thread, then swapped in atomically; the old
  version serves until then. `current()` is a lock-free read, so a request captures one version and
  runs entirely on it, and scoring never waits for a load.
- A failed load leaves the served version in place; the failure is kept in `status()` and the same
  version is retried with exponential back-off.
- A statement with `stage_only` (used by the multi-worker supervisor) loads and validates as usual
  but holds the model staged instead of swapping it in; `commit_staged()` swaps it. A newer
  statement discards a staged model that does not satisfy it.
- With nothing served and the aspired version failing (for example the registry is down at
  start-up), the last validated model in the local cache is served, and status says so.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum

from tabserve_server.core.loading import ModelLoader, model_name_from_uri, validate
from tabserve_server.core.model import AspiredVersion, LoadedModel
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


SwapListener = Callable[[LoadedModel, LoadedModel | None], None]
LoadListener = Callable[[AspiredVersion, bool, float, str], None]


class ModelManager:
    def __init__(
        self,
        loader: ModelLoader,
        *,
        allow_schema_change: bool = False,
        retry_initial_seconds: float = 1.0,
        retry_max_seconds: float = 60.0,
    ) -> None:
        self._loader = loader
        self._allow_schema_change = allow_schema_change
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._current: LoadedModel | None = None
        self._aspired: AspiredVersion | None = None
        self._stage_only = False
        self._staged: tuple[LoadedModel, Callable[[], None]] | None = None  # model, cache commit
        self._state = LoadState.IDLE
        self._failure: tuple[AspiredVersion, int, str, datetime, float] | None = None  # aspired, n, error, at, retry
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
        with self._lock:
            if aspired != self._aspired:
                log.info("aspired version: %s %s (%s)%s", aspired.model_name, aspired.version or "-",
                         aspired.model_uri, " staged only" if stage_only else "")
            self._aspired = aspired
            self._stage_only = stage_only
            if self._staged is not None and not self._staged[0].satisfies(aspired):
                self._staged = None
            current = self._current
        self._wake.set()
        return current is not None and current.satisfies(aspired)

    def status(self) -> ManagerStatus:
        with self._lock:
            failure = self._failure
            return ManagerStatus(
                serving=self._current,
                aspired=self._aspired,
                state=self._state,
                last_error=failure[2] if failure else "",
                last_error_at=failure[3] if failure else None,
                next_attempt_at=(
                    datetime.now(UTC) + timedelta(seconds=max(0.0, failure[4] - time.monotonic())) if failure else None
                ),
                failed_attempts=failure[1] if failure else 0,
                failed_version=(failure[0].version or failure[0].model_uri) if failure else "",
                staged=self._staged[0] if self._staged else None,
            )

    def commit_staged(self, aspired: AspiredVersion) -> bool:
        """Swap in the staged model if it satisfies `aspired`; True when `aspired` is served afterwards."""
        with self._lock:
            if self._current is not None and self._current.satisfies(aspired):
                return True
            staged = self._staged
            if staged is None or not staged[0].satisfies(aspired):
                return False
            self._staged = None
        self._swap(staged[0])
        staged[1]()
        self._wake.set()
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
        while not self._stopping.is_set():
            with self._lock:
                aspired, current, failure = self._aspired, self._current, self._failure
                staged, stage_only = self._staged, self._stage_only
            if aspired is not None and staged is not None and staged[0].satisfies(aspired):
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
            if failure is not None and failure[0] == aspired and time.monotonic() < failure[4]:
                self._wait(failure[4] - time.monotonic())
                continue
            self._attempt(aspired)

    def _wait(self, timeout: float | None) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def _settle(self, aspired: AspiredVersion | None) -> None:
        """Nothing to load: a failure of an earlier aspired version (e.g. before a rollback) is history."""
        with self._lock:
            if self._failure is not None and self._failure[0] != aspired:
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
            model, commit = self._loader.load(
                aspired, lambda m: validate(m, self._current, self._allow_schema_change)
            )
        except Exception as exc:
            self._record_failure(aspired, exc, time.monotonic() - started)
            if self._current is None:
                self._serve_from_cache(aspired)
            return
        with self._lock:
            superseded = self._aspired != aspired and self._current is not None
        if superseded:
            log.info("discarding %s %s: a newer aspired version arrived during the load", model.name, model.version)
            return
        with self._lock:
            # Under a supervisor even a first, superseded load waits for the commit: workers never diverge.
            stage = self._stage_only
            if stage:
                self._staged = (model, commit)
                self._failure = None
                self._state = LoadState.STAGED
        if stage:
            log.info("staged %s version %s: swapped in on commit", model.name, model.version)
            for listener in self._load_listeners:
                listener(aspired, True, time.monotonic() - started, "")
            return
        self._swap(model)
        commit()
        for listener in self._load_listeners:
            listener(aspired, True, time.monotonic() - started, "")

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
            attempts = self._failure[1] + 1 if self._failure and self._failure[0] == aspired else 1
            wait = min(self._retry_max, self._retry_initial * 2 ** (attempts - 1))
            self._failure = (aspired, attempts, message, datetime.now(UTC), time.monotonic() + wait)
            self._state = LoadState.FAILED
        for listener in self._load_listeners:
            listener(aspired, False, duration, message)

    def _serve_from_cache(self, aspired: AspiredVersion) -> None:
        name = aspired.model_name or model_name_from_uri(aspired.model_uri)
        try:
            cached = self._loader.load_cached(name) if name else None
            if cached is None:
                log.warning("no cached model of %r to fall back on; not serving until a load succeeds", name)
                return
            validate(cached, None, self._allow_schema_change)
        except Exception as exc:
            log.error("the cached model of %r is unusable: %s", name, exc)
            return
        log.warning("registry load failed; serving %s version %s from the local cache", cached.name, cached.version)
        with self._lock:
            failure = self._failure
        self._swap(cached)
        with self._lock:  # keep the registry failure visible: the aspired version is still not loaded
            self._failure, self._state = failure, LoadState.FAILED
