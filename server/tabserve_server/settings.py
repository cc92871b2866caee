"""Settings of the server process, read once at start from flags and TABSERVE_SERVER_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tabserve_common.address import is_loopback, split_address
from tabserve_common.settings import LOG_LEVELS, Settings, setting

ENV_PREFIX = "TABSERVE_SERVER_"


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
    control_address: str = setting(
        "127.0.0.1:50052", "Control listener used by the monitor. Must be loopback unless control_token is set.",
        address=True,
    )
    control_token: str = setting("", "Bearer token required on control calls; empty: no token (loopback only).")
    metrics_address: str = setting(
        "0.0.0.0:9100", "Prometheus /metrics listener (host:port; port 0 picks one).", address=True
    )
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
    max_workers: int = setting(16, "gRPC worker threads of the public listener.", minimum=1)
    max_concurrent_rpcs: int = setting(
        0, "Concurrent public RPCs before RESOURCE_EXHAUSTED; 0: unlimited.", minimum=0
    )
    workers: int = setting(
        1, "Worker processes sharing the public port (SO_REUSEPORT); 0: one per core.", minimum=0
    )
    predict_threads: int = setting(0, "LightGBM threads for batch prediction; 0: number of cores.", minimum=0)
    shutdown_grace_seconds: float = setting(10.0, "On SIGTERM, how long in-flight calls may take to finish.", minimum=0)
    registry_timeout_seconds: float = setting(10.0, "Timeout of one HTTP request to the MLflow server.", above=0)
    retry_initial_seconds: float = setting(
        1.0, "First wait before retrying a failed load of the same version; at most retry_max_seconds.", above=0
    )
    retry_max_seconds: float = setting(60.0, "Longest wait between retries of a failed load.", above=0)
    log_level: str = setting("INFO", "Logging level (any case).", choices=LOG_LEVELS)

    def check(self) -> None:
        if not self.control_token and not is_loopback(split_address(self.control_address)[0]):
            raise self.invalid(
                "control_address", "must be loopback unless --control-token is set", self.control_address
            )
        if self.retry_initial_seconds > self.retry_max_seconds:
            raise self.invalid(
                "retry_initial_seconds", f"must be <= --retry-max-seconds ({self.retry_max_seconds})",
                self.retry_initial_seconds,
            )
