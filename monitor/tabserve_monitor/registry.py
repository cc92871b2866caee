"""Resolve which version of a registered model should be served, with MLflow metadata calls only.

Contract:
- One poll costs a constant number of metadata calls: `get_model_version_by_alias` for an alias, or
  `get_registered_model` (its `latest_versions`) for a legacy stage. Nothing searches over all
  versions or runs and nothing downloads an artifact, so cost does not grow with the registry.
- The result is pinned: `models:/<name>/<version>`, never the moving alias.
- A missing alias, an alias left on a deleted version, or a deleted registered model is a
  classification (`Resolution.problem`), not an error and never a target: the server keeps serving.
- Registry outages raise `RegistryError`; the caller backs off.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

READY = "READY"


class Problem(Enum):
    NONE = "none"
    # The alias does not exist, or it pointed at a version that was deleted.
    ALIAS_DANGLING = "alias_dangling"
    # The registered model itself does not exist (deleted or never created).
    MODEL_MISSING = "model_missing"
    # No version is in the followed stage.
    STAGE_EMPTY = "stage_empty"


class RegistryError(Exception):
    """The registry could not be asked (unreachable, timeout, unexpected error)."""


@dataclass(frozen=True)
class Target:
    """A concrete version that should be served."""

    name: str
    version: str
    uri: str
    status: str

    @property
    def ready(self) -> bool:
        return self.status == READY


@dataclass(frozen=True)
class Resolution:
    target: Target | None
    problem: Problem = Problem.NONE
    # True when the stage held more than one version; the highest version number was chosen.
    ambiguous: bool = False
    detail: str = ""


def _is_not_found(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or "RESOURCE_DOES_NOT_EXIST" in str(code)


def _is_registry_answer(exc: BaseException) -> bool:
    """The registry answered with a refusal (as opposed to being unreachable or failing)."""
    return str(getattr(exc, "error_code", "")) in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def _target(name: str, mv: Any) -> Target:
    # With a SQLite store `.version` may be an int; the control API carries strings.
    version = str(mv.version)
    return Target(name=name, version=version, uri=f"models:/{name}/{version}", status=str(mv.status))


class RegistryWatcher:
    """Answers "which version of `model_name` should be live?" from the alias (or the legacy stage)."""

    def __init__(
        self, tracking_uri: str, model_name: str, *, alias: str = "production", stage: str = "",
        timeout_seconds: float = 5.0, client: Any = None,
    ) -> None:
        self.model_name = model_name
        self.alias = alias
        self.stage = stage
        self._tracking_uri = tracking_uri
        self._timeout = timeout_seconds
        self._client = client

    @property
    def follows(self) -> str:
        return f"stage {self.stage}" if self.stage else f"alias {self.alias}"

    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            from tabserve_server.core.loading import LoaderConfig, configure_mlflow

            # Bounds MLflow's HTTP retries the way the server does, so an unreachable registry fails fast.
            configure_mlflow(
                LoaderConfig(
                    tracking_uri=self._tracking_uri, registry_uri=self._tracking_uri, cache_dir=Path(),
                    default_threshold=0.5, allow_pyfunc=False, predict_threads=0,
                    registry_timeout_seconds=self._timeout,
                )
            )
            uri = self._tracking_uri or None
            self._client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return self._client

    def resolve(self) -> Resolution:
        try:
            return self._resolve_stage() if self.stage else self._resolve_alias()
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(f"{type(exc).__name__}: {exc}") from exc

    def _resolve_alias(self) -> Resolution:
        client = self.client()
        try:
            mv = client.get_model_version_by_alias(self.model_name, self.alias)
        except Exception as exc:
            if not _is_registry_answer(exc):
                raise
            return self._classify_missing(exc)
        return Resolution(target=_target(self.model_name, mv))

    def _classify_missing(self, lookup_error: Exception) -> Resolution:
        """The alias lookup was refused: tell a deleted model from a missing or dangling alias."""
        try:
            registered = self.client().get_registered_model(self.model_name)
        except Exception as exc:
            if _is_not_found(exc):
                return Resolution(None, Problem.MODEL_MISSING, detail=f"registered model {self.model_name!r} not found")
            raise
        aliases = registered.aliases or {}
        if self.alias not in aliases:
            detail = f"{self.model_name!r} has no alias {self.alias!r}"
        else:
            version = aliases[self.alias]
            detail = f"alias {self.alias!r} points at version {version}, which cannot be read ({lookup_error})"
        return Resolution(None, Problem.ALIAS_DANGLING, detail=detail)

    def _resolve_stage(self) -> Resolution:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated since MLflow 2.9
                registered = self.client().get_registered_model(self.model_name)
        except Exception as exc:
            if _is_not_found(exc):
                return Resolution(None, Problem.MODEL_MISSING, detail=f"registered model {self.model_name!r} not found")
            raise
        wanted = self.stage.lower()
        in_stage = [mv for mv in (registered.latest_versions or []) if str(mv.current_stage).lower() == wanted]
        if not in_stage:
            return Resolution(None, Problem.STAGE_EMPTY, detail=f"no version of {self.model_name!r} in {self.stage}")
        chosen = max(in_stage, key=lambda mv: int(mv.version))
        return Resolution(target=_target(self.model_name, chosen), ambiguous=len(in_stage) > 1)
