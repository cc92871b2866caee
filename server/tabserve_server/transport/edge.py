"""The edge every RPC passes through: request id, drain check, admission control, caller allow-list, error mapping
(one table), metrics.

Servicers only translate messages and raise the core's errors; this interceptor turns them into
status codes, logs unexpected ones with their traceback as INTERNAL, and records the call. A call refused for
load (transport/admission.py) is answered UNAVAILABLE with the refusal's words and gRFC A6's
`grpc-retry-pushback-ms` trailer, and counted by reason. A call refused on arrival is answered on gRPC's polling
thread itself, without a worker thread and without reading its request: under a flood that thread is the
bottleneck, and a refusal that went through the pool cost it as much as a served call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from tabserve_server.errors import DeadlineExceeded, ServingError
from tabserve_server.metrics import ServerMetrics
from tabserve_server.transport.admission import Admission, InlineExecutor, Refusal
from tabserve_server.transport.errors import status_of
from tabserve_server.transport.identity import CallerPolicy, caller_identity
from tabserve_server.transport.request_id import REQUEST_ID_KEY, begin_call, call_request_id, end_call

log = logging.getLogger(__name__)

_EXEMPT = ("/grpc.health.v1.", "/grpc.reflection.")
# Probes answer while not serving (that is their job), so they skip the drain check but not error mapping.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
_INLINE = InlineExecutor()
_PROBES = (
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
)


def check_deadline(context: grpc.ServicerContext) -> None:
    """Raise DeadlineExceeded when the caller's deadline has already passed (no work is wasted on it)."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("deadline exceeded before scoring")


class Edge(grpc.ServerInterceptor):  # type: ignore[misc]
    """`policy`: the allow-list of callers, checked on every call but health and reflection; `admission`: the
    load policy of every call but health, reflection and the V2 probes; `identify`: callers have identities
    (mutual TLS), so admission can hold each to its share."""

    def __init__(
        self, metrics: ServerMetrics | None, accepting: Callable[[], bool] | None = None,
        policy: CallerPolicy | None = None, admission: Admission | None = None, identify: bool = False,
    ) -> None:
        self._metrics = metrics
        self._accepting = accepting
        self._policy = policy
        self._admission = admission
        self._identify = identify
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        self._children: dict[tuple[str, str], Any] = {}
        self._callers: dict[str, Any] = {}
        self._refusals: dict[str, Any] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        method: str = details.method
        if handler is None or handler.unary_unary is None or method.startswith(_EXEMPT):
            return handler
        if self._admission is not None and method not in _PROBES:
            refusal = self._admission.arrive()
            if refusal is not None:
                # Answered on gRPC's polling thread (InlineExecutor) without reading the request: a client-streaming
                # handler does not wait for the message, and unary and client-streaming calls look the same on the
                # wire. Refusing this way costs that thread a fraction of a served call, so it keeps up with a flood.
                return grpc.stream_unary_rpc_method_handler(
                    self._refuser(method.lstrip("/"), refusal), response_serializer=handler.response_serializer
                )
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._behavior(method.lstrip("/"), handler.unary_unary, probe=method in _PROBES),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
            cached = (handler, wrapped)
            self._wrapped[method] = cached
        return cached[1]

    def _count(self, method: str, code: str, seconds: float) -> None:
        if self._metrics is None:
            return
        # Label lookups cost a lock and a tuple hash each: resolve the children once per method and code.
        children = self._children.get((method, code))
        if children is None:
            children = self._children[(method, code)] = (
                self._metrics.requests.labels(method, code),
                self._metrics.request_duration.labels(method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def _count_caller(self, caller: str) -> None:
        if self._metrics is None:
            return
        child = self._callers.get(caller)
        if child is None:
            child = self._callers[caller] = self._metrics.caller_requests.labels(caller)
        child.inc()

    def _refuse(self, method: str, refusal: Refusal, context: grpc.ServicerContext, seconds: float) -> None:
        if self._metrics is not None:
            child = self._refusals.get(refusal.reason)
            if child is None:
                child = self._refusals[refusal.reason] = self._metrics.refused.labels(refusal.reason)
            child.inc()
        self._count(method, "UNAVAILABLE", seconds)
        # Replaces the trailing metadata begin_call set: the request id goes with the pushback.
        context.set_trailing_metadata(((PUSHBACK_KEY, str(refusal.pushback_ms)), (REQUEST_ID_KEY, call_request_id())))
        context.abort(grpc.StatusCode.UNAVAILABLE, refusal.message)

    def _refuser(self, method: str, refusal: Refusal) -> Callable[..., Any]:
        def refuse(requests: Any, context: grpc.ServicerContext) -> Any:
            token = begin_call(context)
            try:
                self._refuse(method, refusal, context, 0.0)
            finally:
                end_call(token)

        setattr(refuse, "experimental_thread_pool", _INLINE)  # noqa: B010  # grpcio reads this attribute
        return refuse

    def _behavior(
        self, method: str, inner: Callable[[Any, grpc.ServicerContext], Any], probe: bool
    ) -> Callable[..., Any]:
        metrics = self._metrics
        accepting = None if probe else self._accepting
        policy = self._policy
        admission = None if probe else self._admission
        identify = self._identify or policy is not None  # the identity is read once per call, for both uses

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            token = begin_call(context)
            try:
                return handle(request, context)
            finally:
                end_call(token)

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            if accepting is not None and not accepting():
                self._count(method, "UNAVAILABLE", 0.0)
                context.abort(grpc.StatusCode.UNAVAILABLE, "server is not serving (starting or shutting down)")
            caller = caller_identity(context) if identify else ""
            if admission is not None:
                refusal = admission.start(caller, context.time_remaining())
                if refusal is not None:
                    self._refuse(method, refusal, context, time.perf_counter() - started)
            code = "OK"
            if metrics is not None:
                metrics.in_flight.inc()
            try:
                if policy is not None:
                    self._count_caller(policy.check(caller))
                return inner(request, context)
            except ServingError as exc:
                status = status_of(exc)
                code = status.name
                # A caller's mistake is no server event (INFO stays quiet); at DEBUG it helps answer "why was my
                # call refused?" from the request id the caller was given.
                log.debug("%s answered %s: %s", method, code, exc)
                context.abort(status, str(exc))
            except Exception as exc:
                code = "INTERNAL"
                log.exception("unexpected error in %s", method)
                context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server log")
            finally:
                seconds = time.perf_counter() - started
                if metrics is not None:
                    metrics.in_flight.dec()
                if admission is not None:
                    admission.finish(caller, seconds)
                self._count(method, code, seconds)

        return behavior
