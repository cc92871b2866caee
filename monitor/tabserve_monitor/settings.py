"""Settings of the monitor process, read once at start from flags and TABSERVE_MONITOR_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tabserve_common.settings import LOG_LEVELS, Settings, setting

ENV_PREFIX = "TABSERVE_MONITOR_"


@dataclass(frozen=True)
class MonitorSettings(Settings):
    """tabserve monitor sidecar."""

    env_prefix: ClassVar[str] = ENV_PREFIX
    program: ClassVar[str] = "tabserve-monitor"

    tracking_uri: str = setting("", "MLflow tracking/registry URI (sqlite:///..., http://host:port); empty: default.")
    model_name: str = setting("credit-default", "Registered model to follow.", non_empty=True)
    alias: str = setting("production", "Alias whose version should be served; may be empty only when stage is set.")
    stage: str = setting("", "Legacy: follow this stage (e.g. Production) instead of the alias when set.")
    poll_interval_seconds: float = setting(5.0, "Time between registry polls.", above=0)
    audit_interval_seconds: float = setting(
        300.0,
        "Legacy stage only: how often all versions are listed to find a stage holding several (target_ambiguous); "
        "also runs when the registered model changes. Polls themselves never list versions.",
        above=0,
    )
    control_address: str = setting(
        "127.0.0.1:50052", "Control listener of the server (SetAspiredVersion, GetStatus).", address=True
    )
    control_token: str = setting("", "Bearer token sent on control calls; empty: none.")
    public_address: str = setting(
        "127.0.0.1:50051", "Public listener of the server, probed with grpc.health.v1.", address=True
    )
    canary: bool = setting(
        True, "Each poll, score one all-missing row (NaN = missing) on the public port and record the result."
    )
    metrics_address: str = setting(
        "0.0.0.0:9101", "Prometheus /metrics listener (host:port; port 0 picks one).", address=True
    )
    backoff_max_seconds: float = setting(60.0, "Longest wait between polls after consecutive failures.", above=0)
    rpc_timeout_seconds: float = setting(
        5.0, "Deadline of each call to the server and of one registry HTTP request.", above=0
    )
    log_level: str = setting("INFO", "Logging level (any case).", choices=LOG_LEVELS)

    def check(self) -> None:
        if not self.alias and not self.stage:
            raise self.invalid("alias", "must be non-empty unless --stage is set", self.alias)
