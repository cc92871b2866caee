"""Admission control of the public port: which calls are served, which are refused for load, and why.

grpcio runs every call on a pool thread, so a call is *in flight* while a thread runs it (at most
`max_workers`) and *waiting* while it sits in the pool's queue. `AdmissionExecutor` is that pool, counting
both exactly (every item it queues starts, even a call its client cancelled meanwhile). `Admission` decides:

- on arrival (gRPC's polling thread, before the call is queued): refused when `max_waiting` calls wait already,
  and answered right there (`InlineExecutor`);
- on start (the call's thread, before any work): refused when it waited longer than `max_queue_seconds`, when
  its remaining deadline is shorter than the expected time to serve it, or when its caller holds more than
  `caller_share` of the in-flight budget (identities from mutual TLS only).

The bounds are per process (`Limits.of`); the control API's GetStatus reports them, a supervisor's too.

A refusal says how overloaded the server is and when to come back (`pushback_ms`, the time the queue ahead
takes to drain at the measured service time); the Edge answers it with UNAVAILABLE and gRFC A6's
`grpc-retry-pushback-ms` trailer. Nothing here imports grpc.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

from tabserve_server.settings import ServerSettings

# Bounds of the pushback: a client should come back soon enough to find the queue drained, never hammer.
MIN_PUSHBACK_MS = 10
MAX_PUSHBACK_MS = 2000
# Weight of the newest service time in the moving average (about the last 20 calls).
_EWMA_WEIGHT = 0.05
REASONS = ("queue_full", "queue_time", "deadline", "caller_share")
# gRPC core keeps calls the application has not asked for yet in its own pending queue and sheds them there with
# random early drop past `max_pending_requests` (1000; all past the hard limit, 3000) or after 30 s unrequested:
# the caller sees CANCELLED and nothing counts it. grpcio asks for the next call as soon as it has handed one to
# the pool, so that queue is only what the polling thread has not reached yet: core must never decide, this policy
# does (the int limits are C ints).
CORE_OPTIONS = (
    ("grpc.server.max_pending_requests", 2**31 - 1),
    ("grpc.server.max_pending_requests_hard_limit", 2**31 - 1),
    ("grpc.server_max_unrequested_time_in_server", 2**31 - 1),
)


def stream_options(max_concurrent_streams: int) -> list[tuple[str, int]]:
    """gRPC arguments bounding the calls one public connection may have open.

    Calls wait in gRPC core's queue, in arrival order and unseen by `Admission`, until grpcio's polling thread
    asks for them one at a time; a flood of many open streams is a long wait there for every call behind it.
    HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS bounds that queue per connection, and a gRPC client holds calls
    beyond it on its side (transport back-pressure, nothing refused). The bound counts open streams, as HTTP/2
    does: core's "overload protection" (`grpc.http.overload_protection`, on by default) counts streams still
    *allocated* instead, so a stream the client already saw closed, but whose call core has not freed yet, gets
    the client's next, legal stream reset REFUSED_STREAM (a bare HTTP/2 client such as h2load counts an error;
    no gRPC status or counter of ours sees it)."""
    return [("grpc.max_concurrent_streams", max_concurrent_streams), ("grpc.http.overload_protection", 0)]


@dataclass(frozen=True)
class Limits:
    """`max_in_flight`: the pool's threads; `max_waiting`: queued calls; `caller_share`: of max_in_flight;
    `max_concurrent_streams`: streams one connection may have open (`stream_options`; 0: not known)."""

    max_in_flight: int
    max_waiting: int
    max_queue_seconds: float
    caller_share: float = 1.0
    max_concurrent_streams: int = 0

    @classmethod
    def of(cls, settings: ServerSettings) -> Limits:
        """The bounds of one process of a server with `settings` (a multi-worker server: of each worker)."""
        return cls(settings.max_workers, settings.waiting_limit, settings.max_queue_seconds, settings.caller_share,
                   settings.stream_limit)

    @property
    def per_caller(self) -> int:
        """Calls one identified caller may hold in flight (at least one)."""
        return max(1, int(self.max_in_flight * self.caller_share))


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused for load (`reason` is the metric label), in words, and when to retry."""

    reason: str
    message: str
    pushback_ms: int


class AdmissionExecutor(futures.ThreadPoolExecutor):
    """The public port's thread pool: counts waiting and running items; `waited()` is the current item's queue time."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "public") -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._lock = threading.Lock()
        self._local = threading.local()
        self.queued = 0
        self.running = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        queued_at = time.monotonic()
        with self._lock:
            self.queued += 1

        def run() -> Any:
            with self._lock:
                self.queued -= 1
                self.running += 1
            self._local.waited = time.monotonic() - queued_at
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        try:
            return super().submit(run)
        except BaseException:
            with self._lock:
                self.queued -= 1
            raise

    def queued_now(self) -> int:
        return self.queued

    def waited(self) -> float:
        """Seconds the item running on this thread spent in the queue (0 outside the pool)."""
        return float(getattr(self._local, "waited", 0.0))


class InlineExecutor(futures.ThreadPoolExecutor):
    """Runs each item at once on the thread that submits it (never starts a thread of its own).

    grpcio hands a call to the executor named by its behavior's `experimental_thread_pool` attribute; a refusal
    on arrival carries this one, so gRPC's polling thread answers it in place: no pool item, no thread hand-off,
    no wait for the request message (the refuser never reads it). Only for behaviors that never block."""

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="inline")

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        future: futures.Future[Any] = futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the Future carries it, as a pool's would
            future.set_exception(exc)
        return future


class Admission:
    """The policy: `arrive` and `start` return a Refusal or None; `finish` records a served call."""

    def __init__(self, limits: Limits, queued: Callable[[], int], waited: Callable[[], float]) -> None:
        self.limits = limits
        self._queued = queued
        self._waited = waited
        self._lock = threading.Lock()
        self._by_caller: Counter[str] = Counter()
        self.service_seconds = 0.001  # measured as calls finish; a guess until then

    def pushback_ms(self, queued: int) -> int:
        drain = (queued + 1) / self.limits.max_in_flight * self.service_seconds * 1000
        return int(min(MAX_PUSHBACK_MS, max(MIN_PUSHBACK_MS, drain)))

    def arrive(self) -> Refusal | None:
        queued = self._queued()
        limit = self.limits.max_waiting
        if queued < limit:
            return None
        return Refusal("queue_full", f"server overloaded: {queued} calls waiting, {queued - limit + 1} over the "
                       f"limit of {limit}; retry after {self.pushback_ms(queued)} ms", self.pushback_ms(queued))

    def start(self, caller: str, remaining: float | None) -> Refusal | None:
        """Admit the call this thread starts (deadline `remaining` s away, None: none): None, or why not.

        An admitted call must be `finish`ed with the same caller."""
        queued = self._queued()
        waited = self._waited()
        limits = self.limits
        if waited > limits.max_queue_seconds:
            return Refusal("queue_time", f"server overloaded: waited {waited * 1000:.0f} ms in the queue, "
                           f"{(waited - limits.max_queue_seconds) * 1000:.0f} ms over max_queue_seconds "
                           f"({limits.max_queue_seconds * 1000:.0f} ms); retry after {self.pushback_ms(queued)} ms",
                           self.pushback_ms(queued))
        if remaining is not None and remaining < self.service_seconds:
            return Refusal("deadline", f"server overloaded: {remaining * 1000:.1f} ms left before the deadline, "
                           f"less than the {self.service_seconds * 1000:.1f} ms a call takes now; not started",
                           self.pushback_ms(queued))
        with self._lock:
            held = self._by_caller[caller] if caller else 0
            if caller and held >= limits.per_caller:
                refusal = Refusal("caller_share", f"server overloaded for caller {caller!r}: {held} calls in "
                                  f"flight, its share is {limits.per_caller} of {limits.max_in_flight}; retry after "
                                  f"{self.pushback_ms(queued)} ms", self.pushback_ms(queued))
                return refusal
            if caller:
                self._by_caller[caller] += 1
        return None

    def finish(self, caller: str, seconds: float) -> None:
        with self._lock:
            if caller:
                self._by_caller[caller] -= 1
                if self._by_caller[caller] <= 0:
                    del self._by_caller[caller]
            self.service_seconds += _EWMA_WEIGHT * (seconds - self.service_seconds)
