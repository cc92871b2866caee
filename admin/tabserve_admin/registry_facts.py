"""What `registry check` knows about a registered model from metadata alone, and what it finds wrong there.

`read_model()` asks the registry with metadata calls only (the monitor's name-filtered search and paged
version listing, monitor/tabserve_monitor/registry.py, plus the runs behind the versions, searched in
batches); nothing is downloaded. `metadata_findings()` is a pure function of those facts, tested by tables.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from tabserve_monitor.registry import READY, RegistryWatcher, model_versions
from tabserve_server.core.loading import DIGEST_TAG, THRESHOLD_PARAMS, THRESHOLD_TAGS

# Legacy stages a version may share with others (the rest name one version each, or the choice is ambiguous).
SHARED_STAGES: Final = frozenset({"none", "archived"})
_RUNS_PER_SEARCH: Final = 100


@dataclass(frozen=True)
class VersionFacts:
    version: str
    status: str
    stage: str
    run_id: str
    tags: dict[str, str]


@dataclass(frozen=True)
class ModelFacts:
    name: str
    aliases: dict[str, str]
    versions: list[VersionFacts]  # in version order; deleted versions are not listed by the registry
    run_params: dict[str, dict[str, str]]  # run id -> its parameters (runs that no longer exist are absent)

    @property
    def runs(self) -> int:
        return len({v.run_id for v in self.versions if v.run_id})


@dataclass(frozen=True)
class Finding:
    """One thing wrong: its kind (a fixed word, see KINDS), the versions it concerns, and the why in words."""

    model: str
    kind: str
    versions: tuple[str, ...]
    detail: str
    problem: bool = True  # False: reported, but does not fail the check

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "kind": self.kind, "versions": list(self.versions), "detail": self.detail,
                "problem": self.problem}


# Every kind of finding, with what it means (README "Operating" lists them).
KINDS: Final = {
    "digest_tag_missing": f"versions without the {DIGEST_TAG} tag (their bytes are not pinned)",
    "duplicate_digest": "the same model file registered as several versions",
    "alias_dangling": "an alias pointing at a deleted version",
    "alias_not_ready": "an alias pointing at a version whose status is not READY",
    "stage_ambiguous": "a legacy stage held by several versions",
    "threshold_conflict": "decision thresholds that disagree between a version tag and its run's parameters",
    "artifact_missing": "(--deep) a version whose artifacts are missing",
    "artifact_unreadable": "(--deep) a version the server would refuse to load",
    "digest_mismatch": f"(--deep) a model file whose sha256 is not the one its {DIGEST_TAG} tag says",
    "schema_change": "(--deep) the feature schema changes from one version to the next",
}


@dataclass
class Report:
    """Findings and counts of one or more registered models."""

    models: list[ModelFacts] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    artifact_bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, version) -> bytes (deep)

    @property
    def ok(self) -> bool:
        return not any(f.problem for f in self.findings)


def model_names(client: Any) -> list[str]:
    """Every registered model's name (paged)."""
    names: list[str] = []
    token: str | None = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        names.extend(rm.name for rm in page)
        token = getattr(page, "token", None)
        if not token:
            return sorted(names)


def read_model(client: Any, tracking_uri: str, name: str) -> ModelFacts | None:
    """The facts of registered model `name`, or None when it does not exist."""
    registered = RegistryWatcher(tracking_uri, name, client=client).registered_model()
    if registered is None:
        return None
    versions = sorted(
        (VersionFacts(str(mv.version), str(mv.status), str(mv.current_stage or "None"), str(mv.run_id or ""),
                      dict(mv.tags or {})) for mv in model_versions(client, name)),
        key=lambda v: int(v.version),
    )
    aliases = {alias: str(version) for alias, version in (registered.aliases or {}).items()}
    return ModelFacts(name, aliases, versions, _run_params(client, {v.run_id for v in versions if v.run_id}))


def _run_params(client: Any, run_ids: set[str]) -> dict[str, dict[str, str]]:
    """Parameters of `run_ids`, a hundred runs per search, across every experiment (a version names its run,
    not the run's experiment)."""
    if not run_ids:
        return {}
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in _all_experiments(client)]
    found: dict[str, dict[str, str]] = {}
    ordered = sorted(run_ids)
    for start in range(0, len(ordered), _RUNS_PER_SEARCH):
        chunk = ordered[start:start + _RUNS_PER_SEARCH]
        quoted = ", ".join(f"'{run_id}'" for run_id in chunk)
        for run in client.search_runs(experiments, filter_string=f"attributes.run_id IN ({quoted})",
                                      run_view_type=ViewType.ALL, max_results=len(chunk)):
            found[run.info.run_id] = dict(run.data.params)
    return found


def _all_experiments(client: Any) -> list[Any]:
    from mlflow.entities import ViewType

    experiments: list[Any] = []
    token: str | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        while True:
            page = client.search_experiments(view_type=ViewType.ALL, max_results=1000, page_token=token)
            experiments.extend(page)
            token = getattr(page, "token", None)
            if not token:
                return experiments


def metadata_findings(model: ModelFacts) -> list[Finding]:
    """What is wrong with `model` from its metadata alone."""
    return [*_digest_findings(model), *_alias_findings(model), *_stage_findings(model),
            *_threshold_findings(model)]


def _versions(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(items), key=int))


def _digest_findings(model: ModelFacts) -> list[Finding]:
    found = []
    untagged = [v.version for v in model.versions if not v.tags.get(DIGEST_TAG, "").strip()]
    if untagged:
        found.append(Finding(model.name, "digest_tag_missing", _versions(untagged),
                             f"{len(untagged)} of {len(model.versions)} versions have no {DIGEST_TAG} tag: their "
                             "model file is not checked against what was registered"))
    by_digest: dict[str, list[str]] = defaultdict(list)
    for v in model.versions:
        digest = v.tags.get(DIGEST_TAG, "").strip().lower().removeprefix("sha256:")
        if digest:
            by_digest[digest].append(v.version)
    for digest, versions in sorted(by_digest.items()):
        if len(versions) > 1:
            found.append(Finding(model.name, "duplicate_digest", _versions(versions),
                                 f"versions {', '.join(_versions(versions))} are one model file (sha256 "
                                 f"{digest[:12]}...)"))
    return found


def _alias_findings(model: ModelFacts) -> list[Finding]:
    found = []
    by_version = {v.version: v for v in model.versions}
    for alias, version in sorted(model.aliases.items()):
        target = by_version.get(version)
        if target is None:
            found.append(Finding(model.name, "alias_dangling", (version,),
                                 f"alias {alias!r} points at version {version}, which is deleted"))
        elif target.status != READY:
            found.append(Finding(model.name, "alias_not_ready", (version,),
                                 f"alias {alias!r} points at version {version}, whose status is {target.status}"))
    return found


def _stage_findings(model: ModelFacts) -> list[Finding]:
    by_stage: dict[str, list[str]] = defaultdict(list)
    for v in model.versions:
        if v.stage.lower() not in SHARED_STAGES:
            by_stage[v.stage].append(v.version)
    return [Finding(model.name, "stage_ambiguous", _versions(versions),
                    f"stage {stage} holds versions {', '.join(_versions(versions))}; a server following it serves "
                    f"the highest, {max(versions, key=int)}")
            for stage, versions in sorted(by_stage.items()) if len(versions) > 1]


def _threshold_findings(model: ModelFacts) -> list[Finding]:
    found = []
    for v in model.versions:
        params = model.run_params.get(v.run_id, {})
        stated = [(f"tag {key}", v.tags[key]) for key in THRESHOLD_TAGS if key in v.tags]
        stated += [(f"run param {key}", params[key]) for key in THRESHOLD_PARAMS if key in params]
        if len({_number(value) for _, value in stated}) > 1:
            listed = ", ".join(f"{source}={value}" for source, value in stated)
            found.append(Finding(model.name, "threshold_conflict", (v.version,),
                                 f"version {v.version} states {listed}; the server uses the first, {stated[0][1]}"))
    return found


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
