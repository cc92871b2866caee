"""Settings of the monitor process, read once at start from flags and TABSERVE_MONITOR_* variables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tabserve_server.settings import load_settings, setting

ENV_PREFIX = "TABSERVE_MONITOR_"


@dataclass(frozen=True)
class MonitorSettings:
    """tabserve monitor sidecar."""

    tracking_uri: str = setting("", "MLflow tracking/registry URI (sqlite:///..., http://host:port); empty: default.")
    model_name: str = setting("credit-default", "Registered model to follow.")
    alias: str = setting("production", "Alias whose version should be served.")
    stage: str = setting("", "Legacy: follow this stage (e.g. Production) instead of the alias when set.")
    poll_interval_seconds: float = setting(5.0, "Time between registry polls.")
    audit_interval_seconds: float = setting(
        300.0,
        "Legacy stage only: how often all versions are listed to find a stage holding several (target_ambiguous); "
        "also runs when the registered model changes. Polls themselves never list versions.",
    )
    control_address: str = setting("127.0.0.1:50052", "Control listener of the server (SetAspiredVersion, GetStatus).")
    control_token: str = setting("", "Bearer token sent on control calls; empty: none.")
    public_address: str = setting("127.0.0.1:50051", "Public listener of the server, probed with grpc.health.v1.")
    canary: bool = setting(
        True, "Each poll, score one all-missing row (NaN = missing) on the public port and record the result."
    )
    metrics_address: str = setting("0.0.0.0:9101", "Prometheus /metrics listener (host:port; port 0 picks one).")
    backoff_max_seconds: float = setting(60.0, "Longest wait between polls after consecutive failures.")
    rpc_timeout_seconds: float = setting(5.0, "Deadline of each call to the server and of one registry HTTP request.")
    log_level: str = setting("INFO", "Logging level.")

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> MonitorSettings:
        return load_settings(cls, ENV_PREFIX, argv, environ)
