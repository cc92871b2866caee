"""Settings of the monitor process, read once at start from flags and TABSERVE_MONITOR_* variables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from tabserve_client.channel import TlsOptions
from tabserve_common.logs import log_format_setting
from tabserve_common.secrets import read_secret
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
        "Legacy stage only: how often all versions are listed to find a stage holding several (target_ambiguous), "
        "and the longest time between full reads of the stage (polls read it in full only when their change check "
        "sees a write); the listing also runs when the registered model changes. Polls never list versions.",
        above=0,
    )
    control_address: str = setting(
        "127.0.0.1:50052", "Control listener of the server (SetAspiredVersion, GetStatus). Any address but "
        "loopback needs control_tls and a control token.",
        address=True,
    )
    control_tls: bool = setting(
        False, "Speak TLS to the control port (verified with tls_ca_file), as a server whose control address is "
        "not loopback requires."
    )
    control_token: str = setting(
        "", "Bearer token sent on control calls; empty: none. A secret: environment only.", env_only=True
    )
    control_token_file: str = setting("", "File holding the control token (e.g. a mounted Secret).")
    public_address: str = setting(
        "127.0.0.1:50051", "Public listener of the server, probed with grpc.health.v1.", address=True
    )
    tls: bool = setting(False, "Speak TLS to the public port (health probe and canary).")
    tls_ca_file: str = setting(
        "", "PEM CA certificates that verify the server's certificate (public port, and a control port off "
        "loopback); empty: the system's trusted roots."
    )
    tls_cert_file: str = setting("", "PEM client certificate for a public port with mutual TLS (with tls_key_file).")
    tls_key_file: str = setting("", "PEM private key of tls_cert_file.")
    tls_server_name: str = setting(
        "", "Name to check in the server's certificate instead of the address's host; empty: the host."
    )
    canary: bool = setting(
        True, "Each poll, score one all-missing row (NaN = missing) on the public port and record the result."
    )
    metrics_address: str = setting(
        "0.0.0.0:9101", "Prometheus /metrics listener (host:port; port 0 picks one).", address=True
    )
    metrics_cert_file: str = setting(
        "", "PEM certificate chain: serve /metrics over HTTPS (with metrics_key_file); empty: plain HTTP."
    )
    metrics_key_file: str = setting("", "PEM private key of metrics_cert_file.")
    server_metrics_url: str = setting(
        "http://127.0.0.1:9100/metrics", "The server's /metrics, read when the status page (/ on metrics_address) "
        "is shown, for its score histogram; https:// is verified with tls_ca_file; empty: no histogram."
    )
    backoff_max_seconds: float = setting(60.0, "Longest wait between polls after consecutive failures.", above=0)
    rpc_timeout_seconds: float = setting(
        5.0, "Deadline of each call to the server and of one registry HTTP request.", above=0
    )
    log_level: str = setting("INFO", "Logging level (any case).", choices=LOG_LEVELS)
    log_format: str = log_format_setting()

    def check(self) -> None:
        if not self.alias and not self.stage:
            raise self.invalid("alias", "must be non-empty unless --stage is set", self.alias)
        self.require_together("tls_cert_file", "tls_key_file")
        self.require_together("metrics_cert_file", "metrics_key_file")
        self.exclusive("control_token", "control_token_file")
        self.loopback_unless("control_address", ("control_token_file", "control_token"), ("control_tls",))

    def public_tls_options(self) -> TlsOptions | None:
        """TLS towards the public port; None: plaintext."""
        if not self.tls:
            return None
        return TlsOptions(self.tls_ca_file, self.tls_cert_file, self.tls_key_file, self.tls_server_name)

    def control_tls_options(self) -> TlsOptions | None:
        """TLS towards the control port (server authentication only: the token authenticates the monitor)."""
        if not self.control_tls:
            return None
        return TlsOptions(self.tls_ca_file, server_name=self.tls_server_name)

    def control_token_value(self) -> str:
        """The control token, from control_token_file or the environment ('' for none); SettingsError when the
        file cannot be read."""
        return read_secret(self.control_token, self.control_token_file, "control token")
