"""Settings of the server process, read once at start from flags and TABSERVE_SERVER_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tabserve_common.logs import log_format_setting
from tabserve_common.secrets import read_secret
from tabserve_common.settings import LOG_LEVELS, Settings, setting

ENV_PREFIX = "TABSERVE_SERVER_"
# Durations gRPC takes as a C int of milliseconds (about 24.8 days).
_MAX_SECONDS = (2**31 - 1) // 1000
DECISION_INPUTS = ("DIGEST", "FULL", "NONE")
BACKENDS = ("LIGHTGBM", "COMPILED")


@dataclass(frozen=True)
class ServerSettings(Settings):
    """tabserve model server."""

    env_prefix: ClassVar[str] = ENV_PREFIX
    program: ClassVar[str] = "tabserve-server"

    model_uri: str = setting(
        "models:/credit-default@production",
        "Model to serve at start-up: models:/NAME@ALIAS, models:/NAME/STAGE, models:/NAME/VERSION, "
        "runs:/RUN_ID/PATH or a local model directory. Aliases and stages are resolved to a version.",
        non_empty=True,
    )
    model_name: str = setting("", "Model name for runs:/ and local URIs (models:/ URIs carry their own).")
    tracking_uri: str = setting("", "MLflow tracking URI (sqlite:///..., http://host:port); empty: MLflow's default.")
    registry_uri: str = setting("", "MLflow registry URI; empty: same as the tracking URI.")
    address: str = setting(
        "0.0.0.0:50051", "Public gRPC listener: scoring API, Open Inference Protocol, health.", address=True
    )
    tls_cert_file: str = setting(
        "", "PEM certificate chain of the public port (with tls_key_file: TLS; empty: plaintext). Re-read when "
        "it changes: new connections get the new certificate, no restart.",
    )
    tls_key_file: str = setting("", "PEM private key of tls_cert_file (re-read with it).")
    tls_client_ca_file: str = setting(
        "", "PEM CA certificates: mutual TLS, a caller without a certificate from them is refused at the "
        "handshake; its identity is the certificate's subject alternative name. Re-read when it changes.",
    )
    allowed_callers: str = setting(
        "", "Comma-separated caller identities (client certificate SANs) allowed on the public port; others get "
        "PERMISSION_DENIED. Empty: any certificate from tls_client_ca_file.",
    )
    health_address: str = setting(
        "", "Plaintext listener serving grpc.health.v1 only, for probes that do not speak TLS; empty: none.",
        address=True, allow_empty=True,
    )
    control_address: str = setting(
        "127.0.0.1:50052", "Control listener used by the monitor: plaintext on loopback; any other address needs "
        "tls_cert_file (the control port then speaks TLS with it) and a control token.",
        address=True,
    )
    control_token: str = setting(
        "", "Bearer token required on control calls; empty: none (loopback only). A secret: environment only.",
        env_only=True,
    )
    control_token_file: str = setting("", "File holding the control token (e.g. a mounted Secret).")
    metrics_address: str = setting(
        "0.0.0.0:9100", "Prometheus /metrics listener (host:port; port 0 picks one).", address=True
    )
    metrics_cert_file: str = setting(
        "", "PEM certificate chain: serve /metrics over HTTPS (with metrics_key_file); empty: plain HTTP."
    )
    metrics_key_file: str = setting("", "PEM private key of metrics_cert_file.")
    cache_dir: str = setting("model-cache", "Local cache of the last model that loaded and validated.", non_empty=True)
    default_threshold: float = setting(
        0.5, "Decision threshold when neither version tag nor run param gives one.", minimum=0, maximum=1
    )
    allow_pyfunc: bool = setting(
        False, "Serve non-LightGBM flavors through MLflow pyfunc (may unpickle code: opt-in, logged as a warning)."
    )
    allow_schema_change: bool = setting(
        False, "Accept a new version whose feature names/order differ from the served one (otherwise refused)."
    )
    # gRPC takes the message limits as a C int.
    max_message_bytes: int = setting(
        64 * 1024 * 1024, "Largest request or response message, in bytes.", minimum=1, maximum=2**31 - 1
    )
    max_rows: int = setting(100_000, "Largest number of rows in one request (RESOURCE_EXHAUSTED above).", minimum=1)
    max_workers: int = setting(
        16, "gRPC worker threads of the public listener: the bound on public calls in flight (per process).",
        minimum=1,
    )
    # Admission control (transport/admission.py): refusals for load are UNAVAILABLE with a pushback trailer.
    max_waiting: int = setting(
        0, "Public calls queued for a worker thread before new ones are refused (UNAVAILABLE, overloaded); "
        "0: 2 x max_workers.", minimum=0,
    )
    max_queue_seconds: float = setting(
        0.25, "Longest a public call may wait for a worker thread; one that waited longer is refused unstarted.",
        above=0,
    )
    caller_share: float = setting(
        1.0, "Largest share of max_workers one caller identity (mutual TLS) may hold in flight; more is refused "
        "(UNAVAILABLE, overloaded). 1: no per-caller limit (a server with one calling service uses every thread); "
        "set it below 1 when several services share a server.", above=0, maximum=1,
    )
    max_concurrent_streams: int = setting(
        0, "HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS of a public connection: calls one connection may have open at "
        "once (a gRPC client queues the rest on its side). It bounds what waits in gRPC core's queue, where admission "
        "control cannot see it (see Overload); 0: max_workers.", minimum=0, maximum=2**31 - 1,
    )
    workers: int = setting(
        1, "Worker processes sharing the public port (SO_REUSEPORT); 0: one per core.", minimum=0
    )
    predict_threads: int = setting(0, "LightGBM threads for batch prediction; 0: number of cores.", minimum=0)
    shutdown_grace_seconds: float = setting(10.0, "On SIGTERM, how long in-flight calls may take to finish.", minimum=0)
    # Connections of the public port (transport/connections.py). gRPC takes these as C int milliseconds.
    keepalive_min_ping_interval_seconds: float = setting(
        5.0, "Shortest interval between a client's keepalive pings that the public port accepts; a client pinging "
        "more often is sent GOAWAY too_many_pings after keepalive_max_ping_strikes. The default accepts a client "
        "pinging every 10 s.", minimum=0, maximum=_MAX_SECONDS,
    )
    keepalive_permit_without_calls: bool = setting(
        True, "Accept keepalive pings on a connection with no call in flight (false: gRPC's default, one such ping "
        "per 2 hours, so an idle client that pings is sent too_many_pings).",
    )
    keepalive_max_ping_strikes: int = setting(
        2, "Pings sooner than keepalive_min_ping_interval_seconds tolerated (until data flows) before GOAWAY "
        "too_many_pings; 0: unlimited.", minimum=0,
    )
    max_connection_age_seconds: float = setting(
        300.0, "Age at which a public connection is sent GOAWAY (gRPC adds +/-10 % jitter), so clients reconnect "
        "and spread over new replicas and SO_REUSEPORT workers; 0: never.", minimum=0, maximum=_MAX_SECONDS,
    )
    max_connection_age_grace_seconds: float = setting(
        30.0, "After that GOAWAY, how long calls in flight may take before the connection is closed.",
        minimum=0, maximum=_MAX_SECONDS,
    )
    registry_timeout_seconds: float = setting(10.0, "Timeout of one HTTP request to the MLflow server.", above=0)
    retry_initial_seconds: float = setting(
        1.0, "First wait before retrying a failed load of the same version; at most retry_max_seconds.", above=0
    )
    retry_max_seconds: float = setting(60.0, "Longest wait between retries of a failed load.", above=0)
    load_timeout_seconds: float = setting(
        120.0, "Wall-clock limit of verifying one model version in its own process; past it, a failed load.", above=0
    )
    backend: str = setting(
        "lightgbm", "Prediction backend of LightGBM models: lightgbm (the booster), or compiled (the trees compiled "
        "to machine code by lleaves in the verifier process while the booster serves, checked against "
        "Booster.predict, then swapped in; cached under cache_dir; any failure leaves the booster serving and "
        "status says why).", choices=BACKENDS,
    )
    compile_timeout_seconds: float = setting(
        900.0, "Wall-clock limit of compiling and checking one model version for the compiled backend in the "
        "verifier process; past it, the booster keeps serving.", above=0,
    )
    compile_attempts: int = setting(
        3, "Attempts at compiling one version for the compiled backend per load: a compile that failed, crashed or "
        "ran past compile_timeout_seconds is tried again after retry_initial_seconds, doubling up to "
        "retry_max_seconds (a missing compiler or a predictor outside the bound is not).", minimum=1, maximum=20,
    )
    compile_cache_dir: str = setting(
        "", "Directory of the compiled backend's object code; empty: cache_dir (a supervisor's workers share "
        "its cache_dir). Processes sharing it compile each version once: one compiles under the entry's lock "
        "file, the others wait for its entry (at most compile_timeout_seconds + 60 s, then compile themselves).",
    )
    verifier_nice: int = setting(
        0, "Niceness the verifier process adds to the server's (0-19), so request threads win the cores while it "
        "checks a new version; no gain measured on a loaded 2-core machine (docs/performance.md).",
        minimum=0, maximum=19,
    )
    loader_nice: int = setting(
        10, "Niceness the loader thread adds to the server's (0-19; Linux niceness is per thread): the reload's "
        "Python work and LightGBM's parse threads, which it starts, leave the cores to request threads first "
        "(docs/performance.md, reload levers).",
        minimum=0, maximum=19,
    )
    verifier_zygote: bool = setting(
        True, "Fork each verifier process from a long-lived zygote that imported lightgbm once, instead of "
        "starting a fresh interpreter per verification (docs/architecture.md#quarantine); a dead zygote is "
        "restarted, and its verification runs in a fresh process meanwhile.",
    )
    max_model_bytes: int = setting(
        2**30, "Largest model file (MLmodel, LightGBM model) accepted; a larger one is refused before parsing.",
        minimum=1,
    )
    # The decision log (decisions/): on by default, so an answered decision is never unrecorded by omission.
    decision_log_dir: str = setting(
        "decisions", "Directory of the decision log: one hash-chained file set per worker process "
        "(DIR/WORKER/decisions-NNNNNNNN.jsonl); empty: no decision log.",
    )
    decision_log_inputs: str = setting(
        "digest", "What a decision record holds of each input row: digest (SHA-256 of the row), full (the "
        "feature values: personal data, kept as long as retention keeps the files) or none.",
        choices=DECISION_INPUTS,
    )
    decision_log_required: bool = setting(
        False, "Answer a scoring call only once its record was handed to the operating system; while records "
        "cannot be written, calls get UNAVAILABLE saying why. False: records that cannot be written are "
        "dropped and counted, scoring goes on.",
    )
    decision_log_queue_size: int = setting(
        10_000, "Records waiting for the writer thread (per process): a killed process loses at most these plus "
        "the batch being written (256); past it, records are dropped (required mode: calls wait up to 5 s, then "
        "UNAVAILABLE).", minimum=1,
    )
    decision_log_max_file_bytes: int = setting(
        64 * 1024 * 1024, "Size at which the decision log starts its next numbered file.", minimum=4096,
    )
    decision_log_retention_bytes: int = setting(
        10 * 1024**3, "Largest total size of one worker's decision log files; the oldest whole files are removed "
        "beyond it (recorded in the log); 0: no limit.", minimum=0,
    )
    decision_log_retention_seconds: float = setting(
        0.0, "Age after which a decision log file is removed (recorded in the log); 0: no age limit.", minimum=0,
    )
    decision_log_key_file: str = setting(
        "", "File holding the key (at least 32 bytes) that makes the decision log's chain an HMAC: without it, "
        "anyone who can write the files can rebuild a consistent chain.",
    )
    log_level: str = setting("INFO", "Logging level (any case).", choices=LOG_LEVELS)
    log_format: str = log_format_setting()
    tracing: bool = setting(
        False, "Trace the public calls (scoring API, V2) with OpenTelemetry: one server span per call, child of the "
        "caller's traceparent, with the request id and model version, exported over OTLP/gRPC as the standard "
        "OTEL_EXPORTER_OTLP_* and OTEL_TRACES_SAMPLER variables say (README, Logs and traces). False: no "
        "interceptor, no work per call.",
    )

    def check(self) -> None:
        self.require_together("tls_cert_file", "tls_key_file")
        self.require("tls_client_ca_file", "tls_cert_file")
        self.require("allowed_callers", "tls_client_ca_file")
        self.require_together("metrics_cert_file", "metrics_key_file")
        self.exclusive("control_token", "control_token_file")
        self.loopback_unless("control_address", ("control_token_file", "control_token"), ("tls_cert_file",))
        if 0 < self.decision_log_retention_bytes < self.decision_log_max_file_bytes:
            raise self.invalid(
                "decision_log_retention_bytes",
                f"must be 0 or >= --decision-log-max-file-bytes ({self.decision_log_max_file_bytes})",
                self.decision_log_retention_bytes,
            )
        if self.retry_initial_seconds > self.retry_max_seconds:
            raise self.invalid(
                "retry_initial_seconds", f"must be <= --retry-max-seconds ({self.retry_max_seconds})",
                self.retry_initial_seconds,
            )

    @property
    def waiting_limit(self) -> int:
        return self.max_waiting or 2 * self.max_workers

    @property
    def stream_limit(self) -> int:
        """Calls one public connection may have open: `max_concurrent_streams`, 0 meaning max_workers."""
        return self.max_concurrent_streams or self.max_workers

    @property
    def compiled(self) -> bool:
        """Whether the compiled backend was asked for (`backend`, any case)."""
        return self.backend.lower() == "compiled"

    @property
    def decision_inputs(self) -> str:
        """`decision_log_inputs` in lower case: digest, full or none."""
        return self.decision_log_inputs.lower()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def allowed_caller_set(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.allowed_callers.split(",") if name.strip())

    def control_token_value(self) -> str:
        """The control token, from control_token_file or the environment ('' for none); SettingsError when the
        file cannot be read."""
        return read_secret(self.control_token, self.control_token_file, "control token")
