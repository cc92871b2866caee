"""What the monitor last saw, for its status page: the poll loop writes it, the page's HTTP thread reads a copy.

State only: the page shows it, nothing acts on it. The reload history holds the last RELOAD_HISTORY events the
monitor observed (a served version that changed, a failed load attempt with the server's reason), newest last. A failed
attempt that repeats the one before it (same versions, same reason: the server retrying a bad version with
back-off) updates that entry's count and time instead of adding one, so retries cannot push the other events out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

__all__ = ["RELOAD_HISTORY", "MonitorState", "ReloadEvent", "Snapshot"]

RELOAD_HISTORY = 20


@dataclass(frozen=True)
class ReloadEvent:
    at: float  # Unix time the monitor observed it
    result: str  # "success" or "failure"
    version: str  # the version loaded, or the one that failed
    previous: str  # the version served before ("" for none)
    reason: str  # the server's error for a failure; "" for a success
    repeats: int = 1  # attempts this entry stands for (a failure retried with the same reason); `at` is the last


@dataclass(frozen=True)
class Snapshot:
    model_name: str = ""
    follows: str = ""  # "alias production" or "stage Production"
    target_version: str = ""  # "" when the registry names none
    served_version: str = ""  # "" when nothing is served or the server could not be asked
    load_state: str = ""  # the server's LoadState name, e.g. IDLE, LOADING, FAILED
    last_error: str = ""
    registry_up: bool = False
    registry_problem: str = ""  # "" when the registry names a usable target
    registry_detail: str = ""
    ambiguous: bool = False
    server_up: bool = False
    control_up: bool = False
    canary_enabled: bool = True
    canary_result: str = ""  # success, failure, shed; "" before the first canary
    canary_seconds: float | None = None
    last_poll_at: float | None = None
    reloads: tuple[ReloadEvent, ...] = field(default=())


class MonitorState:
    """The latest Snapshot, replaced field by field under a lock; `snapshot()` is a consistent copy."""

    def __init__(self, model_name: str, follows: str, canary_enabled: bool) -> None:
        self._lock = threading.Lock()
        self._now = Snapshot(model_name=model_name, follows=follows, canary_enabled=canary_enabled)
        self._reloads: deque[ReloadEvent] = deque(maxlen=RELOAD_HISTORY)

    def update(self, **fields: object) -> None:
        with self._lock:
            self._now = replace(self._now, **fields)  # type: ignore[arg-type]

    def reload(self, result: str, version: str, previous: str, reason: str = "") -> None:
        event = ReloadEvent(time.time(), result, version, previous, reason)
        with self._lock:
            last = self._reloads[-1] if self._reloads else None
            if last is not None and result == "failure" and replace(last, at=event.at, repeats=1) == event:
                self._reloads[-1] = replace(event, repeats=last.repeats + 1)
            else:
                self._reloads.append(event)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return replace(self._now, reloads=tuple(self._reloads))
