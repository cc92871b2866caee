"""Resolve which version of a registered model should be served, with MLflow metadata calls only.

Contract:
- One poll costs a constant number of metadata calls, each returning a bounded number of rows:
  `get_model_version_by_alias` for an alias. For a legacy stage, a change check: the model's most
  recently updated version (`search_model_versions` ordered by last-updated time, one row) and the
  chosen version itself (`get_model_version`, a primary-key read). Only when either moved (or every
  `audit_interval_seconds`, the safety net) does the poll read the stage in full with
  `search_registered_models` and an exact name filter, whose latest-version-per-stage window query
  reads every version of the model in the database.
  `get_registered_model` and `get_latest_versions` are avoided on purpose: MLflow's SQL store
  loads every version of the model to answer them, so their cost grows with the registry.
  Nothing downloads an artifact. `tests/test_monitor_poll_cost.py` proves it.
- Why the change check is enough: MLflow sets a version's last-updated time on every write to it
  (creation, stage transition, including the versions archived by one), so a version entering the
  stage becomes the most recently updated one; the chosen version leaving the stage, being deleted
  (deleted versions drop out of searches) or changing status shows in its own read. What the check
  can miss (a version other than the chosen one deleted from the stage, or a registry clock set
  back) waits for the safety-net full read.
- The result is pinned: `models:/<name>/<version>`, never the moving alias.
- A missing alias, an alias left on a deleted version, or a deleted registered model is a
  classification (`Resolution.problem`), not an error and never a target: the server keeps serving.
- A legacy stage may hold several versions, which `latest_versions` cannot show. A stage audit
  (`search_model_versions` over the model's versions, paged) runs at most every
  `audit_interval_seconds`, and at once when the registered model's last-updated time changes;
  its answer sets `Resolution.ambiguous`. The choice stays the highest version number in the stage.
- Registry outages raise `RegistryError`; the caller backs off.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from tabserve_common.mlflow_client import configure_mlflow

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
class StageAudit:
    """What the last stage audit found: every version in the followed stage, highest first."""

    versions: tuple[str, ...]
    model_updated_ms: int | None  # the registered model's last_updated_timestamp when audited
    at: float  # monotonic clock


@dataclass(frozen=True)
class Resolution:
    target: Target | None
    problem: Problem = Problem.NONE
    # True when the last stage audit found more than one version in the stage; the highest version
    # number is chosen regardless.
    ambiguous: bool = False
    detail: str = ""
    # True when this resolution ran the (slower) stage audit.
    audited: bool = False


@dataclass(frozen=True)
class StageRead:
    """The last full read of the followed stage, with the change marker read just before it."""

    marker: tuple[str, ...]  # the most recently updated version: version, last-updated ms, stage, status
    resolution: Resolution
    at: float  # monotonic clock


def _is_registry_answer(exc: BaseException) -> bool:
    """The registry answered with a refusal (as opposed to being unreachable or failing)."""
    return str(getattr(exc, "error_code", "")) in {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def name_filter(name: str) -> str:
    """An exact-name filter for MLflow's search APIs."""
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    raise RegistryError(f"model name {name!r} holds both quote characters: it cannot be searched by name")


def _target(name: str, mv: Any) -> Target:
    # With a SQLite store `.version` may be an int; the control API carries strings.
    version = str(mv.version)
    return Target(name=name, version=version, uri=f"models:/{name}/{version}", status=str(mv.status))


class RegistryWatcher:
    """Answers "which version of `model_name` should be live?" from the alias (or the legacy stage)."""

    def __init__(
        self, tracking_uri: str, model_name: str, *, alias: str = "production", stage: str = "",
        timeout_seconds: float = 5.0, audit_interval_seconds: float = 300.0, client: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model_name = model_name
        self.alias = alias
        self.stage = stage
        self.audit_interval_seconds = audit_interval_seconds
        self._tracking_uri = tracking_uri
        self._timeout = timeout_seconds
        self._client = client
        self._clock = clock
        self._audit: StageAudit | None = None
        self._read: StageRead | None = None
        self._audit_failed = False

    @property
    def follows(self) -> str:
        return f"stage {self.stage}" if self.stage else f"alias {self.alias}"

    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # Bounds MLflow's HTTP retries the way the server does, so an unreachable registry fails fast.
            configure_mlflow(self._tracking_uri, self._tracking_uri, self._timeout)
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
        registered = self.registered_model()
        if registered is None:
            return Resolution(None, Problem.MODEL_MISSING, detail=f"registered model {self.model_name!r} not found")
        aliases = registered.aliases or {}
        if self.alias not in aliases:
            detail = f"{self.model_name!r} has no alias {self.alias!r}"
        else:
            version = aliases[self.alias]
            detail = f"alias {self.alias!r} points at version {version}, which cannot be read ({lookup_error})"
        return Resolution(None, Problem.ALIAS_DANGLING, detail=detail)

    def registered_model(self) -> Any:
        """The registered model with its latest version per stage and its aliases, or None when missing.

        A name-filtered search, not `get_registered_model`: the SQL store answers the search with
        one window query, while `get_registered_model` loads every version of the model.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated since MLflow 2.9
            found = self.client().search_registered_models(filter_string=name_filter(self.model_name), max_results=1)
        return next((rm for rm in found if rm.name == self.model_name), None)

    def _resolve_stage(self) -> Resolution:
        # The marker is read before the full read: a change landing between the two moves the marker
        # again, so the next poll reads in full rather than missing it.
        marker = self._change_marker()
        last = self._read
        if (
            last is not None
            and marker
            and marker == last.marker
            and self._clock() - last.at < self.audit_interval_seconds
            and self._target_unchanged(last.resolution.target)
        ):
            return replace(last.resolution, audited=False)
        resolution = self._read_stage()
        # A failed audit is retried by the next poll's full read, as before the change check existed.
        self._read = None if self._audit_failed else StageRead(marker, resolution, self._clock())
        return resolution

    def _change_marker(self) -> tuple[str, ...]:
        """The model's most recently updated version, as (version, last-updated ms, stage, status); () if none."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated since MLflow 2.9
            found = self.client().search_model_versions(
                filter_string=name_filter(self.model_name), max_results=1, order_by=["last_updated_timestamp DESC"]
            )
        return next((tuple(str(v) for v in (mv.version, mv.last_updated_timestamp, mv.current_stage, mv.status))
                     for mv in found), ())

    def _target_unchanged(self, target: Target | None) -> bool:
        """The version chosen at the last full read is still there, in the stage, with the same status."""
        if target is None:
            # An empty stage fills only by a transition, which moves the marker.
            return True
        try:
            mv = self.client().get_model_version(self.model_name, target.version)
        except Exception as exc:
            if not _is_registry_answer(exc):
                raise
            return False  # deleted
        return str(mv.current_stage).lower() == self.stage.lower() and str(mv.status) == target.status

    def _read_stage(self) -> Resolution:
        registered = self.registered_model()
        if registered is None:
            return Resolution(None, Problem.MODEL_MISSING, detail=f"registered model {self.model_name!r} not found")
        wanted = self.stage.lower()
        in_stage = [mv for mv in (registered.latest_versions or []) if str(mv.current_stage).lower() == wanted]
        audited = self._audit_if_due(registered)
        if not in_stage:
            return Resolution(None, Problem.STAGE_EMPTY, detail=f"no version of {self.model_name!r} in {self.stage}",
                              audited=audited)
        chosen = max(in_stage, key=lambda mv: int(mv.version))
        audit = self._audit
        ambiguous = audit is not None and len(audit.versions) > 1
        detail = ""
        if ambiguous and audit is not None:
            detail = (f"stage {self.stage} of {self.model_name!r} holds versions {', '.join(audit.versions)}; "
                      f"the highest, {chosen.version}, is the target")
        return Resolution(target=_target(self.model_name, chosen), ambiguous=ambiguous, detail=detail, audited=audited)

    # --- the stage audit ---------------------------------------------------------------------

    @property
    def last_audit(self) -> StageAudit | None:
        return self._audit

    def _audit_if_due(self, registered: Any) -> bool:
        updated = getattr(registered, "last_updated_timestamp", None)
        audit = self._audit
        if (
            audit is not None
            and audit.model_updated_ms == updated
            and self._clock() - audit.at < self.audit_interval_seconds
        ):
            return False
        try:
            self._audit = StageAudit(self.stage_versions(), updated, self._clock())
        except Exception as exc:
            # The flag keeps its last known value; the audit is retried on the next poll.
            log.warning("stage audit of %s failed: %s", self.model_name, exc)
            self._audit_failed = True
            return False
        self._audit_failed = False
        return True

    def stage_versions(self) -> tuple[str, ...]:
        """Every version of the model in the followed stage, highest first (pages through all versions)."""
        wanted = self.stage.lower()
        found = [int(mv.version) for mv in model_versions(self.client(), self.model_name)
                 if str(mv.current_stage).lower() == wanted]
        return tuple(str(v) for v in sorted(found, reverse=True))


def model_versions(client: Any, model_name: str) -> Iterator[Any]:
    """Every version of `model_name` (MLflow ModelVersion entities), paged 1000 at a time by the registry."""
    token: str | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated since MLflow 2.9
        while True:
            page = client.search_model_versions(
                filter_string=name_filter(model_name), max_results=1000, page_token=token
            )
            yield from page
            token = getattr(page, "token", None)
            if not token:
                return
