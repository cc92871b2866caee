"""How the scoring client retries: every UNAVAILABLE (overloaded, no model yet, shutting down, connection refused)
until the call's own deadline, waiting the server's pushback (gRFC A6 `grpc-retry-pushback-ms`) or a jittered
exponential back-off, with one `x-request-id` on every attempt of one logical call.

Retrying is safe because scoring is idempotent: a Score (or GetModelInfo) call changes nothing on the server, so
a call the server did run and whose answer was lost costs only the work. Health checks make one attempt
(`max_attempts=1`): they report the state now. gRPC's own service-config
retries stop at 5 attempts, too few for a burst that outlasts them, so the library loops itself.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

PUSHBACK_KEY = "grpc-retry-pushback-ms"
REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off between attempts: full jitter over `initial_seconds` x `multiplier` ** attempt, at most
    `max_seconds`; a server's pushback is waited instead, with up to `pushback_jitter` more, so callers refused
    together do not come back together. `max_attempts`: 0 retries until the deadline; 1 never retries."""

    initial_seconds: float = 0.05
    max_seconds: float = 1.0
    multiplier: float = 2.0
    pushback_jitter: float = 0.5
    max_attempts: int = 0

    def delay(self, attempt: int, pushback_ms: int | None, rng: random.Random) -> float:
        if pushback_ms is not None:
            return pushback_ms / 1000 * (1 + rng.uniform(0, self.pushback_jitter))
        return rng.uniform(0, min(self.max_seconds, self.initial_seconds * self.multiplier**attempt))


def pushback_ms(error: grpc.RpcError) -> int | None:
    """The server's pushback in ms from the trailers of a failed call; None when it sent none (or a bad value)."""
    trailers: Any = getattr(error, "trailing_metadata", lambda: None)() or ()
    for key, value in trailers:
        if key == PUSHBACK_KEY:
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None


def returned_request_id(call: Any) -> str:
    """The request id the server returned for `call` (a finished call, or its RpcError): from the trailing
    metadata, where the server sends it on every outcome, else from the initial metadata (servers before
    2026-11-28 sent it there); '' when neither holds one."""
    for part in ("trailing_metadata", "initial_metadata"):
        metadata: Any = getattr(call, part, lambda: None)() or ()
        for key, value in metadata:
            if key == REQUEST_ID_KEY:
                return str(value)
    return ""


def new_request_id() -> str:
    return uuid.uuid4().hex


def call_with_retries(
    method: Callable[..., Any], request: Any, timeout: float, policy: RetryPolicy, *,
    rng: random.Random | None = None, sleep: Callable[[float], None] = time.sleep, request_id: str = "",
) -> Any:
    """`method(request)` retried on UNAVAILABLE until `timeout` seconds from now; the last error is raised.
    Every attempt carries `request_id` (a new one when empty) as `x-request-id`."""
    rng = rng or random.Random()
    deadline = time.monotonic() + timeout
    metadata = ((REQUEST_ID_KEY, request_id or new_request_id()),)
    attempt = 0
    while True:
        try:
            return method(request, timeout=max(0.001, deadline - time.monotonic()), metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 == policy.max_attempts:
                raise
            wait = policy.delay(attempt, pushback_ms(exc), rng)
            if time.monotonic() + wait >= deadline:
                raise
            sleep(wait)
            attempt += 1
