"""MLflow client set-up shared by the server and the monitor: which registry, and how long one HTTP call may take."""

from __future__ import annotations

import os

__all__ = ["configure_mlflow"]


def configure_mlflow(tracking_uri: str, registry_uri: str, timeout_seconds: float) -> None:
    """Point MLflow at the registry and bound its HTTP retries, so an unreachable registry fails fast.

    Empty URIs keep MLflow's defaults (`registry_uri` empty: the tracking URI). MLflow reads its HTTP
    limits from the environment; this is the one place either process sets them.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_seconds))))
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if registry_uri or tracking_uri:
        mlflow.set_registry_uri(registry_uri or tracking_uri)
