"""Wires the server process: core (loader, manager, data plane), gRPC listeners, health, metrics, shutdown.

Listeners (secured as listeners.py says): the public port (scoring API, V2, health, reflection), the
optional plaintext health port (grpc.health.v1 only), the control port and the Prometheus endpoint.
Health is NOT_SERVING until the first model is loaded, SERVING after, and NOT_SERVING again from the
moment shutdown starts; the health port answers from the same health servicer. The process's decision log
(decisions/) gets a record of every answered scoring call through the data plane, and is flushed and closed
once the public listener has drained at shutdown. Once the first model is in, every object then alive is moved out
of the cyclic garbage collector's reach (`gc.freeze`), so a full collection no longer stops the process for
hundreds of milliseconds (docs/performance.md, overload).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from tabserve.control.v1 import control_pb2_grpc
from tabserve.inference.v2 import open_inference_grpc_pb2_grpc
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_common.mlflow_client import configure_mlflow
from tabserve_server.core.compiling import CompiledBackend, CompilePolicy
from tabserve_server.core.dataplane import DataPlane
from tabserve_server.core.loading import LoaderConfig, ModelLoader, model_name_from_uri
from tabserve_server.core.manager import LoadState, ModelManager
from tabserve_server.core.model import AspiredVersion, LoadedModel
from tabserve_server.decisions.log import open_decision_log
from tabserve_server.decisions.record import DecisionRecorder, RecordBuilder
from tabserve_server.listeners import control_tls, public_tls, start_metrics_server
from tabserve_server.metrics import ServerMetrics
from tabserve_server.settings import ServerSettings
from tabserve_server.transport.admission import (
    CORE_OPTIONS,
    Admission,
    AdmissionExecutor,
    Limits,
    stream_options,
)
from tabserve_server.transport.connections import connection_options
from tabserve_server.transport.control import ControlServicer
from tabserve_server.transport.edge import Edge
from tabserve_server.transport.identity import CallerPolicy
from tabserve_server.transport.inference_v2 import SERVICE_NAME as INFERENCE_SERVICE
from tabserve_server.transport.inference_v2 import InferenceServicer
from tabserve_server.transport.scoring import ScoringServicer
from tabserve_server.transport.tls import bind

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

    from tabserve_server.tracing import Tracing

log = logging.getLogger(__name__)

SCORING_SERVICE = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"].full_name
# The file set of a process that is not one of several workers (the supervisor's workers are worker-<index>).
SINGLE_WORKER = "worker-0"
# Longest a stop waits for the decision log to write what is queued (a stuck disk must not hang the stop).
DECISION_LOG_CLOSE_SECONDS = 30.0


def loader_config(settings: ServerSettings) -> LoaderConfig:
    return LoaderConfig(
        tracking_uri=settings.tracking_uri,
        registry_uri=settings.registry_uri,
        cache_dir=Path(settings.cache_dir),
        default_threshold=settings.default_threshold,
        allow_pyfunc=settings.allow_pyfunc,
        predict_threads=settings.predict_threads,
        registry_timeout_seconds=settings.registry_timeout_seconds,
        load_timeout_seconds=settings.load_timeout_seconds,
        max_model_bytes=settings.max_model_bytes,
        verifier_nice=settings.verifier_nice,
        verifier_zygote=settings.verifier_zygote,
    )


class ServingApp:
    """One server process. `start()` binds every listener and begins loading; `stop()` drains.

    `supervised`: a worker of a multi-worker server (the supervisor package): the public port is shared
    (SO_REUSEPORT) and nothing is loaded until the supervisor states the aspired version. `worker` names the
    process's decision log file set. `span_exporter`: where the spans go when `tracing` is on (default: OTLP, as
    tracing.py says).
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        loader: ModelLoader | None = None,
        registry: CollectorRegistry | None = None,
        supervised: bool = False,
        worker: str = SINGLE_WORKER,
        span_exporter: SpanExporter | None = None,
    ) -> None:
        self.settings = settings
        self.supervised = supervised
        self.process = worker if supervised else "server"
        self._span_exporter = span_exporter
        self.tracing: Tracing | None = None
        self.metrics = ServerMetrics(registry or CollectorRegistry())
        self.loader = loader or ModelLoader(loader_config(settings))
        self.manager = ModelManager(
            self.loader,
            allow_schema_change=settings.allow_schema_change,
            retry_initial_seconds=settings.retry_initial_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            loader_nice=settings.loader_nice,
        )
        self.decisions = open_decision_log(settings, worker, self.metrics.decision_log)
        recorder = None if self.decisions is None else DecisionRecorder(
            self.decisions, RecordBuilder(settings.decision_inputs)
        )
        self.dataplane = DataPlane(self.manager, settings.max_rows, self.metrics.observe_scores, record=recorder)
        self.compiled: CompiledBackend | None = None  # with backend=compiled, from start()
        self.health = health.HealthServicer(
            experimental_non_blocking=True, experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1)
        )
        self.public_services = [SCORING_SERVICE, INFERENCE_SERVICE]
        self._accepting = False
        self._stopped = threading.Event()
        self._public: Any = None
        self._control: Any = None
        self._health_server: Any = None
        self._metrics_server: Any = None
        self.public_port = self.control_port = self.metrics_port = self.health_port = 0

    def accepting(self) -> bool:
        return self._accepting

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        config = self.loader.config
        configure_mlflow(config.tracking_uri, config.registry_uri, config.registry_timeout_seconds)
        self.loader.verifier.start()  # the zygote's imports, done before the first reload needs them
        s = self.settings
        token = s.control_token_value()
        if s.tracing:  # imported only when on: a server without tracing never loads the SDK
            from tabserve_server.tracing import Tracing, provider

            self.tracing = Tracing(provider(self.process, self._span_exporter), self.public_services)
        self._start_public()
        if s.health_address:
            self._health_server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                options=[("grpc.so_reuseport", 1 if self.supervised else 0)],
            )
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(s.health_address)

        self._control = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="control"),
            interceptors=[Edge(None)],
            options=[("grpc.so_reuseport", 0)],
        )
        control_pb2_grpc.add_ModelControlServicer_to_server(
            ControlServicer(self.manager, token, self.accepting, Limits.of(s)), self._control
        )
        self.control_port = bind(self._control, s.control_address, control_tls(s))

        self._metrics_server = start_metrics_server(s, self.metrics.registry)
        self.metrics_port = self._metrics_server.server_port

        self.manager.on_swap(self.metrics.model_swapped)
        self.manager.on_swap(self._on_swap)
        if s.compiled:
            self.compiled = self._compiled_backend()
            self.manager.on_swap(self.compiled.model_swapped)
        self.manager.on_load(self.metrics.load_finished)
        self.metrics.model_load_failing.set_function(
            lambda: float(self.manager.status().state is LoadState.FAILED)
        )
        for server in (self._public, self._health_server, self._control):
            if server is not None:
                server.start()
        self.manager.start()
        if self.supervised:
            return
        self.manager.set_aspired(
            AspiredVersion(model_name=s.model_name or model_name_from_uri(s.model_uri), version="",
                           model_uri=s.model_uri)
        )

    def _start_public(self) -> None:
        """The public listener (not yet started): scoring, V2, health and reflection, behind the Edge."""
        s = self.settings
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 1 if self.supervised else 0),
            *connection_options(s),
            *CORE_OPTIONS,
            *stream_options(s.stream_limit),
        ]
        allowed = s.allowed_caller_set()
        pool = AdmissionExecutor(s.max_workers)
        self.admission = Admission(Limits.of(s), pool.queued_now, pool.waited)
        self.metrics.waiting.set_function(pool.queued_now)
        edge = Edge(self.metrics, self.accepting, CallerPolicy(allowed) if allowed else None, self.admission,
                    identify=bool(s.tls_client_ca_file))
        tracing = self.tracing
        interceptors = [edge] if tracing is None else [tracing.spans(), edge, tracing.call_attributes()]
        self._public = grpc.server(pool, interceptors=interceptors, options=options)
        scoring_pb2_grpc.add_ScoringServicer_to_server(ScoringServicer(self.dataplane), self._public)
        open_inference_grpc_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.dataplane, self.accepting), self._public
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._public)
        names = [*self.public_services, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self._public)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.public_port = bind(self._public, s.address, public_tls(s))

    def _compiled_backend(self) -> CompiledBackend:
        config, s = self.loader.config, self.settings
        limits = replace(self.loader.limits, timeout_seconds=s.compile_timeout_seconds,
                         limit_name="compile_timeout_seconds")
        policy = CompilePolicy(s.compile_attempts, s.retry_initial_seconds, s.retry_max_seconds)
        return CompiledBackend(self.manager, Path(s.compile_cache_dir or config.cache_dir), limits,
                               config.predict_threads or (os.cpu_count() or 1),
                               lambda outcome: self.metrics.compiles.labels(outcome).inc(), policy=policy)

    def _on_swap(self, new: LoadedModel, old: LoadedModel | None) -> None:
        if self._stopped.is_set():
            return
        if old is None:
            # The imports and the first model (about 400,000 objects with mlflow, grpc and LightGBM) were walked by
            # every full collection with every thread stopped: 210-245 ms, four times in a 42 s flood. Frozen, they
            # are skipped (no full collection at all in the same flood).
            gc.freeze()
        elif gc.get_freeze_count():
            # The first model is on its way out: back into the collector's reach, so whatever cycles it holds are
            # collected (full collections walk everything again, as without the freeze).
            gc.unfreeze()
        self._accepting = True
        self.metrics.serving.set(1)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _set_health(self, status: Any) -> None:
        for name in ["", *self.public_services]:
            self.health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING and new calls UNAVAILABLE at once; in-flight calls get `grace` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("shutting down: draining for up to %.1f s", grace)
        self._accepting = False
        self.metrics.serving.set(0)
        self.health.enter_graceful_shutdown()
        if self._public is not None:
            self._public.stop(grace).wait()
        if self.decisions is not None:  # every answered call has submitted its record by now
            self.decisions.close(DECISION_LOG_CLOSE_SECONDS)
        if self.tracing is not None:
            self.tracing.shutdown()
        for server in (self._health_server, self._control):
            if server is not None:
                server.stop(0).wait()
        if self.compiled is not None:
            self.compiled.stop()
        self.manager.stop()
        self.loader.verifier.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("stopped")
