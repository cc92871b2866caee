"""Settings of the server process, read once at start from flags and TABSERVE_SERVER_* variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

S = TypeVar("S")


def setting(default: Any, help: str) -> Any:
    """A settings field with its documentation (shown by --help and in the README table)."""
    return field(default=default, metadata={"help": help})


def _parse(kind: Any, raw: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw


def _parser(kind: Any) -> Any:
    def parse(raw: str) -> Any:
        return _parse(kind, raw)

    return parse


def _base_type(annotation: Any) -> Any:
    """int | None -> int; str -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def load_settings(
    cls: type[S], prefix: str, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> S:
    """Build `cls` from defaults, then `<prefix><FIELD>` environment variables, then `--field` flags."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    parser = argparse.ArgumentParser(description=cls.__doc__)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = _base_type(hints[f.name])
        env_name = prefix + f.name.upper()
        if env_name in environ:
            try:
                values[f.name] = _parse(kind, environ[env_name])
            except ValueError as exc:
                raise SystemExit(f"invalid {env_name}: {exc}") from exc
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_parser(kind),
            default=None,
            help=f"{f.metadata.get('help', '')} [env {env_name}; default {f.default!r}]",
        )
    parsed = parser.parse_args(list(argv) if argv is not None else None)
    values.update({k: v for k, v in vars(parsed).items() if v is not None})
    return cls(**values)


def settings_table(cls: type[Any], prefix: str) -> str:
    """Markdown table of every setting (used to keep the README in sync)."""
    lines = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        lines.append(f"| `{flag}` | `{prefix}{f.name.upper()}` | `{f.default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines)


ENV_PREFIX = "TABSERVE_SERVER_"


@dataclass(frozen=True)
class ServerSettings:
    """tabserve model server."""

    model_uri: str = setting(
        "models:/credit-default@production",
        "Model to serve at start-up: models:/NAME@ALIAS, models:/NAME/STAGE, models:/NAME/VERSION, "
        "runs:/RUN_ID/PATH or a local model directory. Aliases and stages are resolved to a version.",
    )
    model_name: str = setting("", "Model name for runs:/ and local URIs (models:/ URIs carry their own).")
    tracking_uri: str = setting("", "MLflow tracking URI (sqlite:///..., http://host:port); empty: MLflow's default.")
    registry_uri: str = setting("", "MLflow registry URI; empty: same as the tracking URI.")
    address: str = setting("0.0.0.0:50051", "Public gRPC listener: scoring API, Open Inference Protocol, health.")
    control_address: str = setting(
        "127.0.0.1:50052", "Control listener used by the monitor. Must be loopback unless control_token is set."
    )
    control_token: str = setting("", "Bearer token required on control calls; empty: no token (loopback only).")
    metrics_address: str = setting("0.0.0.0:9100", "Prometheus /metrics listener (host:port; port 0 picks one).")
    cache_dir: str = setting("model-cache", "Local cache of the last model that loaded and validated.")
    default_threshold: float = setting(0.5, "Decision threshold when neither version tag nor run param gives one.")
    allow_pyfunc: bool = setting(
        False, "Serve non-LightGBM flavors through MLflow pyfunc (may unpickle code: opt-in, logged as a warning)."
    )
    allow_schema_change: bool = setting(
        False, "Accept a new version whose feature names/order differ from the served one (otherwise refused)."
    )
    max_message_bytes: int = setting(64 * 1024 * 1024, "Largest request or response message, in bytes.")
    max_rows: int = setting(100_000, "Largest number of rows in one request (RESOURCE_EXHAUSTED above).")
    max_workers: int = setting(16, "gRPC worker threads of the public listener.")
    max_concurrent_rpcs: int = setting(0, "Concurrent public RPCs before RESOURCE_EXHAUSTED; 0: unlimited.")
    workers: int = setting(1, "Worker processes sharing the public port (SO_REUSEPORT); 0: one per core.")
    predict_threads: int = setting(0, "LightGBM threads for batch prediction; 0: number of cores.")
    shutdown_grace_seconds: float = setting(10.0, "On SIGTERM, how long in-flight calls may take to finish.")
    registry_timeout_seconds: float = setting(10.0, "Timeout of one HTTP request to the MLflow server.")
    retry_initial_seconds: float = setting(1.0, "First wait before retrying a failed load of the same version.")
    retry_max_seconds: float = setting(60.0, "Longest wait between retries of a failed load.")
    log_level: str = setting("INFO", "Logging level.")

    @classmethod
    def load(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
        return load_settings(cls, ENV_PREFIX, argv, environ)
