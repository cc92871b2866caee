"""OpenTelemetry tracing of the public gRPC calls (the `tracing` setting; off by default).

When on, the process (a single server, or each worker: workers are spawned, so each builds its own provider and
exporter thread in its own process) has one `TracerProvider` that exports in batches over OTLP/gRPC, configured by
the SDK's standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_*`, `OTEL_TRACES_SAMPLER`,
`OTEL_BSP_*`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), and the public listener gets two interceptors:

- `spans()`, before the Edge: OpenTelemetry's gRPC server instrumentation. One SERVER span per call of the public
  services (health and reflection are not traced), child of the caller's `traceparent` metadata (the global
  propagator, W3C trace context by default), with the status code the Edge answered, refusals included.
- `call_attributes()`, after the Edge: the call's request id (`tabserve.request_id`, the Edge has set it by then)
  and the model that answered (`tabserve.model.name`, `tabserve.model.version`, from the response) on that span.

When off, the server neither imports this module nor installs an interceptor: no work per call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import server_interceptor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from tabserve_server.logs import CALL_REQUEST_ID

REQUEST_ID = "tabserve.request_id"
MODEL_NAME = "tabserve.model.name"
MODEL_VERSION = "tabserve.model.version"
PROCESS = "tabserve.process"
DEFAULT_SERVICE_NAME = "tabserve-server"
# Longest a stop waits for the last spans to be exported (an unreachable collector must not hold the stop: the OTLP
# exporter alone retries for up to its 10 s timeout, measured 7.6 s against a closed port).
FLUSH_SECONDS = 5.0


def provider(process: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """The process's tracer provider, exporting to `exporter` (default: OTLP over gRPC, from the environment)."""
    resource = Resource.create({PROCESS: process})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):  # OTEL_SERVICE_NAME unset
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    traces = TracerProvider(resource=resource, shutdown_on_exit=False)  # Tracing.shutdown does it, bounded
    traces.add_span_processor(BatchSpanProcessor(exporter))
    return traces


class Tracing:
    """The interceptors that trace the calls of `services` (full gRPC service names) into `traces`."""

    def __init__(self, traces: TracerProvider, services: Sequence[str]) -> None:
        self.traces = traces
        self._prefixes = tuple(f"/{name}/" for name in services)

    def _traced(self, details: Any) -> bool:
        return str(details.method).startswith(self._prefixes)

    def spans(self) -> grpc.ServerInterceptor:
        instrumentation = server_interceptor(tracer_provider=self.traces, filter_=self._traced)  # type: ignore[no-untyped-call]
        return _KeepThreadPool(instrumentation)

    def call_attributes(self) -> grpc.ServerInterceptor:
        return _CallAttributes(self._traced)

    def shutdown(self) -> None:
        """Export what is left and stop the exporter, waiting at most FLUSH_SECONDS (then the rest is lost)."""
        stopping = threading.Thread(target=self.traces.shutdown, name="tracing-shutdown", daemon=True)
        stopping.start()
        stopping.join(FLUSH_SECONDS)


class _KeepThreadPool(grpc.ServerInterceptor):  # type: ignore[misc]
    """The instrumentation's interceptor, keeping the behaviour's `experimental_thread_pool`: grpcio runs a
    behaviour on the pool it names there (the Edge answers load refusals on gRPC's polling thread that way), and
    the instrumentation's wrapper would lose it."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        seen: list[Any] = []

        def remembered(call_details: Any) -> Any:
            seen.append(continuation(call_details))
            return seen[-1]

        handler = self._inner.intercept_service(remembered, details)
        original = seen[0] if seen else None
        if handler is None or original is None or handler is original:
            return handler
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            pool = getattr(getattr(original, kind), "experimental_thread_pool", None)
            if pool is not None:
                setattr(getattr(handler, kind), "experimental_thread_pool", pool)  # noqa: B010
        return handler


class _CallAttributes(grpc.ServerInterceptor):  # type: ignore[misc]
    """Inside the Edge: puts the call's request id and the answering model on the current (SERVER) span."""

    def __init__(self, traced: Callable[[Any], bool]) -> None:
        self._traced = traced
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or not self._traced(details):
            return handler
        # One wrapped handler per method, so the Edge's own cache (keyed by the handler it is given) keeps hitting.
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, handler._replace(unary_unary=_with_attributes(handler.unary_unary)))
            self._wrapped[details.method] = cached
        return cached[1]


def _with_attributes(inner: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        span = trace.get_current_span()
        span.set_attribute(REQUEST_ID, CALL_REQUEST_ID.get())
        response = inner(request, context)
        for attribute, field in ((MODEL_NAME, "model_name"), (MODEL_VERSION, "model_version")):
            value = getattr(response, field, "")
            if value:
                span.set_attribute(attribute, value)
        return response

    return behavior
