"""Where a model version comes from: resolved in MLflow and downloaded, a local directory, or the local cache.

Contract:
- Aliases and stages are resolved to a concrete version first; the download is pinned to
  `models:/<name>/<version>`, so the version cannot change between the check and the download.
- `load()` and `load_cached()` return a `Candidate`: read, not yet validated. The caller validates it
  (core/validation.py), then either `commit()`s it once it serves (the cache keeps it as the last good
  model) or `discard()`s it, which removes whatever the load left on disk. A load that raises leaves
  nothing behind.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tabserve_server.core.artifact import ArtifactFiles, read_artifact, read_files
from tabserve_server.core.cache import ModelCache
from tabserve_server.core.model import AspiredVersion, DecisionLabels, LoadedFrom, LoadedModel
from tabserve_server.core.reasons import adverse_is_positive
from tabserve_server.core.verify import Verifier, VerifyLimits
from tabserve_server.errors import DigestMismatch, ModelLoadError, RegistryUnavailable

log = logging.getLogger(__name__)

THRESHOLD_TAGS = ("decision_threshold",)
THRESHOLD_PARAMS = ("optimal_threshold", "decision_threshold")
# Model version tags naming what decision=true (score >= threshold) and decision=false mean.
POSITIVE_LABEL_TAG = "tabserve.decision.positive"
NEGATIVE_LABEL_TAG = "tabserve.decision.negative"
LABEL_TAGS = (POSITIVE_LABEL_TAG, NEGATIVE_LABEL_TAG)
# Names which of the two labels is the adverse decision, the one reasons explain (default: the positive one).
ADVERSE_LABEL_TAG = "tabserve.decision.adverse"
# Model version tag with the sha256 (hex) of the model file: when present, the downloaded file must match it.
DIGEST_TAG = "tabserve.sha256"

_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_MODELS_VERSION_OR_STAGE = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<ref>[^/]+)$")
_RUNS = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class LoaderConfig:
    tracking_uri: str
    registry_uri: str
    cache_dir: Path
    default_threshold: float
    allow_pyfunc: bool
    predict_threads: int
    registry_timeout_seconds: float
    load_timeout_seconds: float
    max_model_bytes: int
    verifier_nice: int = 0
    verifier_zygote: bool = False  # fork verifiers from a long-lived zygote (core/verify/zygote.py)


@dataclass(frozen=True)
class ResolvedVersion:
    """Where a URI pointed at load time: a concrete, pinned artifact location."""

    name: str
    version: str
    run_id: str
    download_uri: str
    loaded_from: LoadedFrom
    version_tags: Mapping[str, str]


def model_name_from_uri(uri: str) -> str:
    """The registered model name a models:/ URI refers to ('' for other URIs)."""
    for pattern in (_MODELS_ALIAS, _MODELS_VERSION_OR_STAGE):
        match = pattern.match(uri)
        if match:
            return match["name"]
    return ""


def _is_unreachable(exc: BaseException) -> bool:
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError):
            return True
        text = str(seen)
        if "Max retries exceeded" in text or "TEMPORARILY_UNAVAILABLE" in text or "Connection refused" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _wrap(step: str, exc: Exception, service: str = "MLflow registry") -> ModelLoadError:
    """`exc` as a failed load; RegistryUnavailable when `service` could not be reached (retried like any)."""
    if _is_unreachable(exc):
        return RegistryUnavailable(f"{step}: {service} unreachable: {exc}")
    return ModelLoadError(f"{step}: {exc}")


def _nothing() -> None:
    """A candidate with nothing to commit or clean up (a local directory, the cache's own entry)."""


@dataclass(frozen=True)
class Candidate:
    """A loaded model version that has not served yet.

    `commit` records it in the cache as the last good model; call it once it serves. `discard` cleans
    up a candidate that will never serve (failed validation, superseded); call exactly one of the two.
    """

    model: LoadedModel
    commit: Callable[[], None] = _nothing
    discard: Callable[[], None] = _nothing


class ModelLoader:
    """Loads aspired versions from MLflow, and the last validated model from the local cache."""

    def __init__(self, config: LoaderConfig) -> None:
        self.config = config
        self.cache = ModelCache(config.cache_dir)
        self.limits = VerifyLimits(config.load_timeout_seconds, config.max_model_bytes, config.allow_pyfunc,
                                   config.verifier_nice)
        self.verifier = Verifier(self.limits, zygote=config.verifier_zygote)
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.config.tracking_uri or None,
                registry_uri=(self.config.registry_uri or self.config.tracking_uri) or None,
            )
        return self._client

    # --- public -----------------------------------------------------------------------------

    def load(self, aspired: AspiredVersion) -> Candidate:
        """Resolve, download and read `aspired` into a candidate (not validated)."""
        started = time.monotonic()
        resolved = self.resolve(aspired)
        if resolved.loaded_from is LoadedFrom.LOCAL:
            return Candidate(self._build(Path(resolved.download_uri), resolved, aspired.model_uri, started))
        entry = self.cache.stage(resolved.name, resolved.version)
        try:
            self._download(resolved.download_uri, entry.directory)
            model = self._build(entry.directory, resolved, aspired.model_uri, started)
        except BaseException:
            self.cache.discard(entry)
            raise
        return Candidate(
            model,
            commit=lambda: self.cache.commit(entry, _cache_metadata(model)),
            discard=lambda: self.cache.discard(entry),
        )

    def load_cached(self, model_name: str) -> Candidate | None:
        """The last model of `model_name` that served here, as a candidate, or None.

        Committing or discarding it leaves the cache as it is: the entry is already the last good one.
        """
        entry = self.cache.current(model_name)
        if entry is None:
            return None
        started = time.monotonic()
        meta = entry.metadata
        resolved = ResolvedVersion(
            name=meta["name"], version=meta["version"], run_id=meta["run_id"],
            download_uri=meta["source_uri"], loaded_from=LoadedFrom.CACHE,
            version_tags={  # older entries: defaults
                **dict(zip(LABEL_TAGS, meta.get("labels", ()), strict=False)),
                **({ADVERSE_LABEL_TAG: meta["adverse"]} if "adverse" in meta else {}),
            },
        )
        threshold = (float(meta["threshold"]), str(meta["threshold_source"]))
        model = self._build(entry.directory, resolved, meta["requested_uri"], started, threshold=threshold,
                            cached_digest=str(meta.get("digest", "")))
        return Candidate(model)

    def resolve(self, aspired: AspiredVersion) -> ResolvedVersion:
        uri = aspired.model_uri
        alias = _MODELS_ALIAS.match(uri)
        ref = _MODELS_VERSION_OR_STAGE.match(uri)
        runs = _RUNS.match(uri)
        if alias or ref:
            name = (alias or ref)["name"]  # type: ignore[index]
            mv = self._registry_version(name, alias["alias"] if alias else None, ref["ref"] if ref else None)
            status = str(mv.status)
            if status != "READY":
                raise ModelLoadError(f"{name} version {mv.version} is {status}, not READY")
            return ResolvedVersion(
                name=name, version=str(mv.version), run_id=mv.run_id or "",
                download_uri=f"models:/{name}/{mv.version}", loaded_from=LoadedFrom.REGISTRY,
                version_tags=dict(mv.tags or {}),
            )
        if runs:
            name = aspired.model_name or "model"
            return ResolvedVersion(
                name=name, version=aspired.version or f"run-{runs['run'][:8]}", run_id=runs["run"],
                download_uri=self._run_model_uri(runs["run"], runs["path"]), loaded_from=LoadedFrom.REGISTRY,
                version_tags={},
            )
        path = Path(uri.removeprefix("file://"))
        if path.is_dir():
            return ResolvedVersion(
                name=aspired.model_name or path.name, version=aspired.version or "local", run_id="",
                download_uri=str(path.resolve()), loaded_from=LoadedFrom.LOCAL, version_tags={},
            )
        raise ModelLoadError(
            f"unsupported model URI {uri!r}: expected models:/NAME@ALIAS, models:/NAME/STAGE, "
            "models:/NAME/VERSION, runs:/RUN_ID/PATH or a local model directory"
        )

    # --- steps ------------------------------------------------------------------------------

    def _registry_version(self, name: str, alias: str | None, ref: str | None) -> Any:
        try:
            if alias is not None:
                return self.client.get_model_version_by_alias(name, alias)
            assert ref is not None
            if ref.isdigit():
                return self.client.get_model_version(name, ref)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stages are deprecated in MLflow 3 but still in use
                versions = self.client.get_latest_versions(name, stages=[ref])
            if not versions:
                raise ModelLoadError(f"no version of {name} is in stage {ref!r}")
            return max(versions, key=lambda v: int(v.version))
        except ModelLoadError:
            raise
        except Exception as exc:
            raise _wrap(f"resolving {name}@{alias}" if alias else f"resolving {name}/{ref}", exc) from exc

    def _run_model_uri(self, run_id: str, path: str) -> str:
        """MLflow 3 logs models as LoggedModels outside the run's artifacts: find the one named `path`."""
        try:
            run = self.client.get_run(run_id)
            found = self.client.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run_id}' AND name = '{path}'",
            )
        except Exception as exc:
            raise _wrap(f"resolving runs:/{run_id}/{path}", exc) from exc
        return f"models:/{found[0].model_id}" if found else f"runs:/{run_id}/{path}"

    def _download(self, uri: str, directory: Path) -> None:
        import mlflow

        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(directory), tracking_uri=self.config.tracking_uri or None
            )
        except Exception as exc:
            # The object store behind the registry (S3 read directly, or proxied by the tracking server).
            raise _wrap(f"downloading {uri}", exc, "artifact store") from exc

    def _threshold(self, resolved: ResolvedVersion) -> tuple[float, str]:
        for key in THRESHOLD_TAGS:
            if key in resolved.version_tags:
                return _parse_threshold(resolved.version_tags[key], f"model_version_tag:{key}")
        if resolved.run_id:
            try:
                params = self.client.get_run(resolved.run_id).data.params
            except Exception as exc:
                raise _wrap(f"reading run {resolved.run_id}", exc) from exc
            for key in THRESHOLD_PARAMS:
                if key in params:
                    return _parse_threshold(params[key], f"run_param:{key}")
        return self.config.default_threshold, "default"

    def _build(
        self,
        directory: Path,
        resolved: ResolvedVersion,
        requested_uri: str,
        started: float,
        *,
        threshold: tuple[float, str] | None = None,
        cached_digest: str = "",
    ) -> LoadedModel:
        label = resolved.download_uri
        verdict = self.verifier.verify(directory, label)
        files = read_files(directory, label, self.config.max_model_bytes)
        if files.digest != verdict.digest:
            raise ModelLoadError(f"{label}: the files changed after they were verified ({files.digest}, verified "
                                 f"{verdict.digest}): refused")
        _check_integrity(files, resolved.version_tags, cached_digest)
        artifact = read_artifact(files, allow_pyfunc=self.config.allow_pyfunc,
                                 predict_threads=self.config.predict_threads)
        value, source = threshold if threshold is not None else self._threshold(resolved)
        labels = _decision_labels(resolved.version_tags)
        adverse = adverse_is_positive(resolved.version_tags.get(ADVERSE_LABEL_TAG), labels.positive, labels.negative)
        return LoadedModel(
            name=resolved.name, version=resolved.version, run_id=resolved.run_id, requested_uri=requested_uri,
            source_uri=resolved.download_uri, loaded_from=resolved.loaded_from, loaded_at=datetime.now(UTC),
            load_duration_seconds=time.monotonic() - started, schema=artifact.schema, threshold=value,
            threshold_source=source, flavor=artifact.flavor, predictor=artifact.predictor,
            labels=labels, digest=files.digest, reasons=artifact.reasons, adverse_positive=adverse,
            source_dir=str(directory),
        )


def _check_integrity(files: ArtifactFiles, tags: Mapping[str, str], cached_digest: str) -> None:
    """The bytes must match the version's `tabserve.sha256` tag, and a cache entry the digest it was cached with."""
    stated = tags.get(DIGEST_TAG, "").strip().lower().removeprefix("sha256:")
    if stated and files.lightgbm_file and files.model_file_sha256 != stated:
        raise DigestMismatch(
            f"{files.label}: {files.lightgbm_file} has sha256 {files.model_file_sha256}, but the version's tag "
            f"{DIGEST_TAG} says {stated}: refused"
        )
    if cached_digest and cached_digest != files.digest:
        raise ModelLoadError(f"{files.label}: the cached files changed since they were cached ({files.digest}, "
                             f"cached as {cached_digest}): refused")


def _decision_labels(tags: Mapping[str, str]) -> DecisionLabels:
    default = DecisionLabels()
    positive = tags.get(POSITIVE_LABEL_TAG, default.positive).strip()
    negative = tags.get(NEGATIVE_LABEL_TAG, default.negative).strip()
    if not positive or not negative or positive == negative:
        raise ModelLoadError(
            f"model version tags {POSITIVE_LABEL_TAG}={positive!r} and {NEGATIVE_LABEL_TAG}={negative!r}: "
            "the decision labels must be two different, non-empty words"
        )
    return DecisionLabels(positive, negative)


def _parse_threshold(raw: str, source: str) -> tuple[float, str]:
    try:
        value = float(raw)
    except ValueError:
        raise ModelLoadError(f"{source} is {raw!r}, not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ModelLoadError(f"{source} is {value}, outside [0, 1]")
    return value, source


def _cache_metadata(model: LoadedModel) -> dict[str, Any]:
    return {
        "name": model.name, "version": model.version, "run_id": model.run_id,
        "requested_uri": model.requested_uri, "source_uri": model.source_uri, "threshold": model.threshold,
        "threshold_source": model.threshold_source, "flavor": model.flavor,
        "labels": [model.labels.positive, model.labels.negative], "adverse": model.adverse_label,
        "digest": model.digest,
        "features": [[f.name, f.type] for f in model.schema.features],
    }


__all__ = ["Candidate", "LoaderConfig", "ModelLoader", "model_name_from_uri"]
