"""Typed client of tabserve.scoring.v1.Scoring, with health checks and retries of UNAVAILABLE (see retry.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client.channel import ChannelClient, Keepalive, TlsOptions, open_channel
from tabserve_client.retry import RetryPolicy, call_with_retries, new_request_id, returned_request_id

SCORING_SERVICE = "tabserve.scoring.v1.Scoring"
OVERLOADED = "server overloaded"  # how the server's refusals for load begin

# Retries are the library's own loop (retry.py): UNAVAILABLE until the call's deadline, with the server's pushback.
_SERVICE_CONFIG: dict[str, Any] = {}
# pick_first: one connection to the first address that answers (gRPC's default). round_robin: a connection to
# every address the target resolves to, calls spread over those that are up: for a `dns:///` target naming
# a Kubernetes headless Service, whose DNS answer lists every ready pod.
LOAD_BALANCING_POLICIES = ("pick_first", "round_robin")
_ONE_ATTEMPT = RetryPolicy(max_attempts=1)


def _service_config(load_balancing: str) -> str:
    if load_balancing not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"load_balancing must be one of {', '.join(LOAD_BALANCING_POLICIES)}, got {load_balancing!r}")
    return json.dumps({**_SERVICE_CONFIG, "loadBalancingConfig": [{load_balancing: {}}]})


class ScoringError(Exception):
    """The one exception type the client raises for a failed call.

    Attributes:
        code: the gRPC status code (e.g. ``grpc.StatusCode.INVALID_ARGUMENT``).
        details: the server's message; for bad input it names the offending row and feature.
        request_id: the call's request id, as the server returned it (the one the client sent when the server
            never answered); '' for errors found before sending.
    """

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.request_id = request_id

    @property
    def overloaded(self) -> bool:
        """The server refused the call for load, and kept refusing it until its deadline."""
        return self.code == grpc.StatusCode.UNAVAILABLE and self.details.startswith(OVERLOADED)


@dataclass(frozen=True)
class Reason:
    """One principal reason for a row's adverse decision (see docs/explanations.md)."""

    feature: str
    value: float  # the row's value (NaN: missing)
    contribution: float  # exact TreeSHAP, margin (log-odds) space, toward the adverse decision
    code: str  # from the version's reason table; '' when it has none for the feature
    text: str


@dataclass(frozen=True)
class ScoreBatch:
    """Scores of one request, in request order, and the model version that produced them."""

    model_name: str
    model_version: str
    threshold: float
    scores: np.ndarray  # float64, probability of the positive class
    decisions: np.ndarray  # bool, scores >= threshold: the version's positive label (see ModelInfo.label)
    # With score(explain=True): row index -> its reasons, strongest first, for every explained row.
    reasons: Mapping[int, tuple[Reason, ...]] = field(default_factory=dict)
    expected_value: float | None = None  # margin space; with explain=True only
    # The call's x-request-id (the same on every attempt): how the server's log lines and its decision record
    # of this call are found.
    request_id: str = ""

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass(frozen=True)
class Feature:
    name: str
    type: str


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    run_id: str
    requested_uri: str
    source_uri: str
    loaded_from: str  # "registry", "cache" or "local"
    loaded_at: datetime
    load_duration_seconds: float
    features: tuple[Feature, ...]
    threshold: float
    threshold_source: str
    flavor: str
    # What a decision means for this version (its tags tabserve.decision.positive / .negative):
    # decision=true, i.e. score >= threshold, is `positive_label` (e.g. "decline"); false is `negative_label`.
    positive_label: str = "positive"
    negative_label: str = "negative"
    adverse_label: str = "positive"  # the decision reasons explain (tag tabserve.decision.adverse)
    has_reason_table: bool = False  # without one, reasons carry feature names without codes
    # "sha256:<hex>" of the bytes the version was parsed from ('' from a server that does not report it).
    digest: str = ""
    # The backend scoring it ("lightgbm", "compiled", "pyfunc"; '' from an older server) and its version.
    backend: str = ""
    backend_version: str = ""

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def label(self, decision: bool) -> str:
        """The version's word for a decision: `positive_label` for True (score >= threshold), else `negative_label`."""
        return self.positive_label if decision else self.negative_label


def _scores(response: Any) -> tuple[np.ndarray, np.ndarray]:
    """A ScoreResponse's scores (float64) and decisions (bool): packed when the server packed them (a response
    always has a row, so empty packed bytes mean the repeated fields), else repeated."""
    if not response.packed_scores:
        return np.asarray(response.scores, dtype=np.float64), np.asarray(response.decisions, dtype=bool)
    packed, flags = response.packed_scores, response.packed_decisions
    if len(packed) % 8 or len(flags) * 8 != len(packed):
        raise ScoringError(grpc.StatusCode.INTERNAL, f"malformed response: {len(packed)} bytes of packed scores "
                           f"and {len(flags)} of packed decisions (expected 8 and 1 per row)")
    # Copied out of the immutable bytes (8 and 1 bytes a row, microseconds), so the arrays stay writable as
    # they always were.
    scores = np.frombuffer(packed, dtype="<f8").astype(np.float64)
    return scores, np.frombuffer(flags, dtype=np.uint8).astype(bool)


Rows = Mapping[str, float] | Sequence[Mapping[str, float]] | np.ndarray | Any  # Any: a pandas DataFrame


class ScoringClient(ChannelClient):
    """Client of one scoring endpoint.

    Use as a context manager (or call ``close()``)::

        with ScoringClient("localhost:50051") as client:
            batch = client.score([{"age": 41.0, ...}])
            print(batch.model_version, batch.scores, batch.decisions)

    Over mutual TLS, to every replica behind a headless Service, pinging every 10 s::

        ScoringClient("dns:///tabserve.scoring.svc.cluster.local:50051", load_balancing="round_robin",
                      tls=TlsOptions(ca_file="ca.pem", cert_file="client.pem", key_file="client.key"),
                      keepalive=Keepalive(interval_seconds=10))

    Args:
        target: ``host:port`` of the public port, or any gRPC target name (``dns:///name:port``,
            ``dns://DNS_SERVER:53/name:port``, ``ipv4:addr1:port,addr2:port``).
        timeout: default deadline of each call, in seconds.
        max_message_bytes: largest message sent or received.
        tls: connect over TLS (see `TlsOptions`; its files are read here, OSError if one cannot be); None: plaintext.
        keepalive: send HTTP/2 keepalive pings (see `Keepalive`); None: none.
        load_balancing: ``pick_first`` (one connection) or ``round_robin`` (calls spread over every address the
            target resolves to, e.g. the pods of a headless Service; the server's connection age makes the
            client resolve again, so new pods are found).
        channel: an existing channel to use instead of creating one (not closed by ``close()``); the connection
            arguments above are then ignored.

    Every call but ``health`` is retried on ``UNAVAILABLE`` (server overloaded, no model loaded yet, shutting down,
    connection refused) until its own deadline: after the server's pushback when it sent one, else a jittered
    exponential back-off (``retry``, a `RetryPolicy`), with one ``x-request-id`` on every attempt; when the deadline
    leaves no room for another attempt, the last error is raised. Safe because scoring is idempotent (a call changes
    nothing on the server).
    """

    retry: RetryPolicy = RetryPolicy()

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = 5.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        tls: TlsOptions | None = None,
        keepalive: Keepalive | None = None,
        load_balancing: str = "pick_first",
        channel: grpc.Channel | None = None,
    ) -> None:
        self.timeout = timeout
        options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", _service_config(load_balancing)),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        super().__init__(channel or open_channel(target, options, tls, keepalive=keepalive), own=channel is None)
        self._stub = scoring_pb2_grpc.ScoringStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._feature_names: tuple[str, ...] | None = None
        self._feature_version = ""

    # --- calls ------------------------------------------------------------------------------

    def score(
        self, rows: Rows, *, model_name: str = "", timeout: float | None = None, explain: bool = False,
        top_k: int = 0, explain_all_rows: bool = False,
    ) -> ScoreBatch:
        """Score rows given as one dict, a list of dicts, a 2-D numpy array in the model's feature order
        (a 1-D array is one row), or a pandas DataFrame with the model's feature names as columns.

        With `explain`, the batch also carries the reasons (`top_k`, 0: the server's default of 4) of the
        rows whose decision is adverse, or of every row with `explain_all_rows`. NaN means "missing".
        Raises ScoringError on failure.
        """
        # Packed scores: a server from before packed_response ignores the flag and answers with the repeated
        # fields, which _scores() reads as well; so no capability check (and no extra call) is needed.
        request = scoring_pb2.ScoreRequest(model_name=model_name, packed_response=True)
        if explain:
            request.explain.top_k = top_k
            request.explain.all_rows = explain_all_rows
        try:
            self._fill(request, rows)
        except (TypeError, ValueError) as exc:  # bad input found before sending: same contract as the server
            raise ScoringError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot encode rows: {exc}") from None
        request_id = new_request_id()
        response = self._call(self._stub.Score, request, timeout, request_id=request_id)
        if self._feature_names is not None and response.model_version != self._feature_version:
            self._feature_names = None  # a new version may order its features differently
        scores, decisions = _scores(response)
        return ScoreBatch(
            model_name=response.model_name,
            model_version=response.model_version,
            threshold=response.threshold,
            scores=scores,
            decisions=decisions,
            reasons={
                e.row: tuple(Reason(r.feature, r.value, r.contribution, r.code, r.text) for r in e.reasons)
                for e in response.explanations
            },
            expected_value=response.expected_value if explain else None,
            request_id=request_id,
        )

    def _fill(self, request: Any, rows: Rows) -> None:
        if isinstance(rows, np.ndarray):
            self._fill_matrix(request, rows)
        elif isinstance(rows, Mapping):
            self._fill_named(request, [rows])
        elif hasattr(rows, "columns") and hasattr(rows, "to_numpy"):  # pandas without importing it
            frame: Any = rows
            names = self.feature_names()
            columns = [str(c) for c in frame.columns]
            if sorted(columns) == sorted(names):
                self._fill_matrix(request, frame[list(names)].to_numpy(dtype=np.float64))
            else:  # let the server name the offending column
                self._fill_named(request, frame.to_dict(orient="records"))
        else:
            self._fill_named(request, rows)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Identity, provenance, feature schema and threshold of the live model version."""
        m = self._call(self._stub.GetModelInfo, scoring_pb2.GetModelInfoRequest(), timeout)
        info = ModelInfo(
            name=m.name,
            version=m.version,
            run_id=m.run_id,
            requested_uri=m.requested_uri,
            source_uri=m.source_uri,
            loaded_from=scoring_pb2.LoadedFrom.Name(m.loaded_from).removeprefix("LOADED_FROM_").lower(),
            loaded_at=m.loaded_at.ToDatetime(tzinfo=UTC),
            load_duration_seconds=m.load_duration_seconds,
            features=tuple(Feature(f.name, f.type) for f in m.features),
            threshold=m.threshold,
            threshold_source=m.threshold_source,
            flavor=m.flavor,
            # A server from before the labels existed sends none: the defaults.
            positive_label=m.positive_label or "positive",
            negative_label=m.negative_label or "negative",
            adverse_label=m.adverse_label or m.positive_label or "positive",
            has_reason_table=m.has_reason_table,
            digest=m.digest,
            backend=m.backend,
            backend_version=m.backend_version,
        )
        self._feature_names, self._feature_version = info.feature_names, info.version
        return info

    def feature_names(self) -> tuple[str, ...]:
        """The model's feature order (fetched once, then cached)."""
        if self._feature_names is None:
            self.model_info()
        assert self._feature_names is not None
        return self._feature_names

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status of `service` ('' is the whole server): SERVING, NOT_SERVING, ...

        One attempt, never retried: a health check reports the state now, so a server that cannot be reached
        (refused connection, failed TLS handshake, shutting down) is a ScoringError (UNAVAILABLE) at once, not
        after the timeout. The server never refuses health checks for load."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._call(self._health.Check, request, timeout, _ONE_ATTEMPT)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def health_services(self, *, timeout: float | None = None) -> tuple[str, ...]:
        """Service names whose health the server reports ('' first), found through server reflection."""
        # Imported here: only this call needs reflection, and the common path stays small.
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(self._channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        try:
            (response,) = stub.ServerReflectionInfo(
                iter([request]), timeout=self.timeout if timeout is None else timeout
            )
        except grpc.RpcError as exc:
            raise ScoringError(exc.code(), exc.details() or "") from None
        known = [""]
        for name in sorted(s.name for s in response.list_services_response.service):
            try:
                self.health(name, timeout=timeout)
            except ScoringError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                continue  # reflected, but health knows nothing of it (e.g. the reflection service itself)
            known.append(name)
        return tuple(known)

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _fill_matrix(request: Any, array: np.ndarray) -> None:
        matrix = np.asarray(array, dtype="<f8")
        if matrix.ndim == 1:
            matrix = matrix.reshape(1, -1)
        if matrix.ndim != 2:
            raise ValueError(f"expected a 1-D or 2-D array, got {matrix.ndim}-D")
        request.matrix.float64_le = np.ascontiguousarray(matrix).tobytes()
        request.matrix.num_rows = matrix.shape[0]

    @staticmethod
    def _fill_named(request: Any, rows: Iterable[Mapping[str, float]]) -> None:
        for row in rows:
            request.named.rows.add().features.update({str(k): float(v) for k, v in row.items()})

    def _call(self, method: Any, request: Any, timeout: float | None, retry: RetryPolicy | None = None,
              request_id: str = "") -> Any:
        try:
            return call_with_retries(
                method, request, self.timeout if timeout is None else timeout, retry or self.retry,
                request_id=request_id,
            )
        except grpc.RpcError as exc:
            raise ScoringError(exc.code(), exc.details() or "", returned_request_id(exc) or request_id) from None
