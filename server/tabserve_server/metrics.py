"""Prometheus metrics of the server process: a public interface (alerts and dashboards use these names).

All names start with `tabserve_server_`; units are seconds; counters end in `_total`.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from tabserve_server.core.compiling import OUTCOMES as COMPILE_OUTCOMES
from tabserve_server.core.manager import LoadOutcome
from tabserve_server.core.model import LoadedModel
from tabserve_server.transport.admission import REASONS as REFUSAL_REASONS

PREFIX = "tabserve_server_"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCORE_BUCKETS = tuple(round(x, 2) for x in np.arange(0.05, 1.0001, 0.05))
_EDGES = tuple(float(edge) for edge in SCORE_BUCKETS)
# Label values created at start (value 0), so that dashboards and alerts see every series before the first event.
LOAD_RESULTS = ("success", "failure")
LOAD_FAILURE_REASONS = ("refused", "crash", "timeout", "registry_unreachable", "unexpected")
PRUNE_REASONS = ("size", "age")


class ScoreHistogram(Collector):
    """Histogram of predicted scores, updated once per request with numpy (not once per row)."""

    name = PREFIX + "prediction_score"

    def __init__(self) -> None:
        self._edges = np.asarray(SCORE_BUCKETS, dtype=np.float64)
        self._counts = np.zeros(len(SCORE_BUCKETS) + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, scores: np.ndarray) -> None:
        # Prometheus buckets are upper-inclusive: a score equal to an edge falls in that edge's bucket.
        if scores.shape[0] == 1:  # the common single-row call: bisect on a list costs less than numpy here
            score = float(scores[0])
            index = bisect.bisect_left(_EDGES, score)
            with self._lock:
                self._counts[index] += 1
                self._sum += score
            return
        counts = np.bincount(np.searchsorted(self._edges, scores, side="left"), minlength=len(self._counts))
        total = float(scores.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        buckets = [(str(edge), float(c)) for edge, c in zip(SCORE_BUCKETS, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", float(cumulative[-1])))
        yield HistogramMetricFamily(
            self.name, "Predicted probability of the positive class, per scored row.", buckets=buckets, sum_value=total
        )


class DecisionLogMetrics:
    """The decision log's metrics (decisions/log.py); one set per process, whether the log is on or not."""

    DROP_REASONS = ("queue_full", "write_error", "invalid", "closed")

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.written = Counter(
            PREFIX + "decision_records_written", "Records written to the decision log, by kind (decision, start, "
            "close, dropped, pruned).", ["kind"], registry=registry,
        )
        self.written.labels("decision")
        self.dropped = Counter(
            PREFIX + "decision_records_dropped", "Decision records not written, by reason (queue_full, "
            "write_error, invalid, closed).", ["reason"], registry=registry,
        )
        for reason in self.DROP_REASONS:
            self.dropped.labels(reason)
        self.queue_depth = Gauge(
            PREFIX + "decision_log_queue_depth", "Decision records queued for the writer thread.", registry=registry
        )
        self.write_failing = Gauge(
            PREFIX + "decision_log_write_failing", "1 while the decision log cannot write (its last write failed).",
            registry=registry,
        )
        self.files_pruned = Counter(
            PREFIX + "decision_log_files_pruned", "Decision log files removed by retention, by reason (size, age).",
            ["reason"], registry=registry,
        )
        for reason in PRUNE_REASONS:
            self.files_pruned.labels(reason)


class ServerMetrics:
    """Every metric of one server process, registered in `registry` in a fixed order (the exposition's order)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._request_metrics(registry)
        self._model_metrics(registry)
        # Multi-worker servers: the supervisor's /metrics reports these itself (see supervisor/metrics.py).
        self.workers = Gauge(PREFIX + "workers", "Worker processes up (1 for a single process).", registry=registry)
        self.workers.set(1)
        self.worker_restarts = Counter(
            PREFIX + "worker_restarts", "Worker processes restarted by the supervisor after they died.",
            registry=registry,
        )
        self.decision_log = DecisionLogMetrics(registry)
        self.scores = ScoreHistogram()
        registry.register(self.scores)
        self._served_labels: tuple[str, str, str] | None = None
        self._backend_labels: tuple[str, str] | None = None

    def _request_metrics(self, registry: CollectorRegistry) -> None:
        """Public RPCs: counts by method, code and caller, durations, rows scored, in flight, queued, refused."""
        self.requests = Counter(
            PREFIX + "requests", "Public RPCs handled, by method and gRPC status code.", ["method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds", "Time spent handling a public RPC, by method.", ["method"],
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        # The caller is a label only here, and only with allowed_callers: the allow-list bounds its values.
        self.caller_requests = Counter(
            PREFIX + "caller_requests", "Public RPCs let through the allow-list, by caller identity (client "
            "certificate SAN); no samples without allowed_callers.", ["caller"], registry=registry,
        )
        self.rows_scored = Counter(PREFIX + "rows_scored", "Rows scored successfully.", registry=registry)
        self.in_flight = Gauge(PREFIX + "requests_in_flight", "Public RPCs being handled now.", registry=registry)
        self.waiting = Gauge(
            PREFIX + "requests_waiting", "Public RPCs queued for a worker thread (admitted, not yet started).",
            registry=registry,
        )
        self.refused = Counter(
            PREFIX + "requests_refused", "Public RPCs refused for load (UNAVAILABLE with pushback), by reason "
            "(queue_full, queue_time, deadline, caller_share).", ["reason"], registry=registry,
        )
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason)

    def _model_metrics(self, registry: CollectorRegistry) -> None:
        """The served version, its backend and compiles, load attempts and their outcomes, serving or not."""
        self.model_info = Gauge(
            PREFIX + "model_info", "The served model version (value 1).",
            ["model_name", "model_version", "loaded_from"], registry=registry,
        )
        self.backend_info = Gauge(
            PREFIX + "backend_info", "The backend scoring the served version (value 1): lightgbm, compiled or "
            "pyfunc, with its version.", ["backend", "version"], registry=registry,
        )
        self.compiles = Counter(
            PREFIX + "compiles", "Compiled-backend attempts (backend=compiled), by outcome: compiled, cache_hit "
            "(both serve compiled code), missing, failed, timeout, crash, unverified (the booster keeps serving).",
            ["outcome"], registry=registry,
        )
        for outcome in COMPILE_OUTCOMES:  # zero series from the start, as for the load results below
            self.compiles.labels(outcome)
        self.model_loaded = Gauge(
            PREFIX + "model_loaded_timestamp_seconds", "Unix time the served version was swapped in.",
            registry=registry,
        )
        self.model_load_duration = Gauge(
            PREFIX + "model_load_duration_seconds", "How long the served version took to load and validate.",
            registry=registry,
        )
        self.model_loads = Counter(
            PREFIX + "model_loads", "Model load attempts, by result (success, failure).", ["result"],
            registry=registry,
        )
        self.model_load_failures = Counter(
            PREFIX + "model_load_failures", "Failed load attempts, by reason (refused, crash, timeout, "
            "registry_unreachable, unexpected).", ["reason"], registry=registry,
        )
        for result in LOAD_RESULTS:
            self.model_loads.labels(result)
        for reason in LOAD_FAILURE_REASONS:
            self.model_load_failures.labels(reason)
        self.model_load_failing = Gauge(
            PREFIX + "model_load_failing", "1 while the aspired version failed to load and is not served.",
            registry=registry,
        )
        self.serving = Gauge(
            PREFIX + "serving", "1 when a model is loaded and requests are accepted.", registry=registry
        )

    def observe_scores(self, scores: np.ndarray) -> None:
        self.rows_scored.inc(scores.shape[0])
        self.scores.observe(scores)

    def model_swapped(self, new: LoadedModel, old: LoadedModel | None) -> None:
        if self._served_labels is not None:
            self.model_info.remove(*self._served_labels)
        self._served_labels = (new.name, new.version, new.loaded_from.value)
        self.model_info.labels(*self._served_labels).set(1)
        if self._backend_labels is not None:
            self.backend_info.remove(*self._backend_labels)
        self._backend_labels = new.backend
        self.backend_info.labels(*self._backend_labels).set(1)
        self.model_loaded.set(new.loaded_at.timestamp())
        self.model_load_duration.set(new.load_duration_seconds)

    def load_finished(self, outcome: LoadOutcome) -> None:
        self.model_loads.labels("success" if outcome.ok else "failure").inc()
        if not outcome.ok:
            self.model_load_failures.labels(outcome.reason).inc()
