"""One registry for the tabserve-admin tests, seeded once: a clean model, one model per problem `registry check`
finds, a model holding broken versions of every kind the server refuses, and models to promote and roll back.

Four versions are trained and registered for real (tabserve_demo.registration: two good ones, and its two
broken kinds); every other version is a new registry version of those files (as `MlflowClient.
create_model_version` registers an existing artifact), or of a corrupted copy of them (tests/corrupt.py).
States the MLflow API cannot produce (an alias left on a deleted version, a version not READY: older MLflow
versions and failed registrations leave them) are written into the SQLite store directly.
"""

from __future__ import annotations

import shutil
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from tabserve_demo.registration import DECISION_TAGS, register_demo_version, registry_client
from tabserve_server.core.loading import DIGEST_TAG
from tests.corrupt import FAULTS, corrupted_copy

CLEAN = "clean"
SUBJECT = "subject"  # alias production -> 1 (good); then broken versions, named in Seeded.broken
ROLLING = ("rolling-sqlite", "rolling-server")  # one per backend: promotions change them
RACING = "racing"  # two promotions at once
METADATA_PROBLEMS = ("digest_tag_missing", "duplicate_digest", "alias_dangling", "alias_not_ready",
                     "stage_ambiguous", "threshold_conflict")
DEEP_PROBLEMS = ("artifact_missing", "artifact_unreadable", "digest_mismatch", "schema_change")
ALL_METADATA = "p-all"
ALL_DEEP = "d-all"


@dataclass
class Seeded:
    tracking_uri: str
    db: Path
    # kind of broken version -> its version number in SUBJECT
    broken: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Source:
    source: str
    run_id: str
    tags: dict[str, str]


def problem_model(kind: str) -> str:
    return f"p-{kind}" if kind in METADATA_PROBLEMS else f"d-{kind}"


class _Seeder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.db = root / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"
        self.client: Any = registry_client(self.uri)

    def real(self, name: str, seed: int, broken: str | None = None) -> _Source:
        version = register_demo_version(self.uri, name, seed=seed, alias=None, broken=broken)
        mv = self.client.get_model_version(name, version)
        return _Source(str(mv.source), str(mv.run_id), dict(mv.tags))

    def add(self, name: str, source: _Source, **tags: str) -> str:
        """A new version of `name` registering `source`'s files, with its tags changed by `tags` ('' drops one)."""
        if not self.client.search_registered_models(filter_string=f"name = '{name}'"):
            self.client.create_registered_model(name)
        version = str(self.client.create_model_version(name, source.source, run_id=source.run_id or None).version)
        for key, value in {**source.tags, **{k.replace("__", "."): v for k, v in tags.items()}}.items():
            if value:
                self.client.set_model_version_tag(name, version, key, value)
        return version

    def alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def stage(self, name: str, version: str, stage: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.client.transition_model_version_stage(name, version, stage)

    def sql(self, statement: str, *values: str) -> None:
        with sqlite3.connect(self.db) as db:
            db.execute(statement, values)

    def files(self, uri: str, name: str) -> Path:
        path = self.root / "files" / name
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(path)))


def seed(root: Path) -> Seeded:
    s = _Seeder(root)
    good1, good2 = s.real(CLEAN, 1), s.real(CLEAN, 2)
    s.alias(CLEAN, "production", "2")
    wrong = s.real("broken-sources", 3, broken="wrong_features")
    missing = s.real("broken-sources", 4, broken="missing_artifacts")
    seeded = Seeded(s.uri, s.db)
    _subject(s, seeded, good1, wrong, missing)
    for name in (*ROLLING, RACING):
        for source in (good1, good2, good1):
            s.add(name, source)
        s.alias(name, "production", "1")
    _metadata_problems(s, good1, good2)
    _deep_problems(s, good1, wrong, missing)
    return seeded


def _subject(s: _Seeder, seeded: Seeded, good: _Source, wrong: _Source, missing: _Source) -> None:
    s.alias(SUBJECT, "production", s.add(SUBJECT, good))
    seeded.broken["wrong_features"] = s.add(SUBJECT, wrong)
    seeded.broken["missing_artifacts"] = s.add(SUBJECT, missing)
    good_files = s.files(f"models:/{CLEAN}/1", "good")
    for fault in FAULTS:
        copy = corrupted_copy(good_files, fault, s.root / "files" / fault)
        seeded.broken[fault] = s.add(SUBJECT, _Source(str(copy), good.run_id, good.tags))
    seeded.broken["digest_mismatch"] = s.add(SUBJECT, good, tabserve__sha256="0" * 64)
    seeded.broken["threshold_out_of_range"] = s.add(SUBJECT, good, decision_threshold="1.7")
    seeded.broken["equal_labels"] = s.add(SUBJECT, good, **{k.replace(".", "__"): "same" for k in DECISION_TAGS})
    seeded.broken["not_ready"] = s.add(SUBJECT, good)
    s.sql("UPDATE model_versions SET status = 'PENDING_REGISTRATION' WHERE name = ? AND version = ?",
          SUBJECT, seeded.broken["not_ready"])
    seeded.broken["too_large"] = s.add(SUBJECT, good)  # refused under --max-model-bytes 100000


def _metadata_problems(s: _Seeder, good1: _Source, good2: _Source) -> None:
    """p-KIND: versions 1 and 2 (distinct, tagged), alias production -> 2, and that one problem; p-all: all of them.
    Versions a problem adds carry digest tags of their own, so that no other problem shows."""

    def digest_tag_missing(name: str) -> None:
        s.add(name, good2, tabserve__sha256="")

    def duplicate_digest(name: str) -> None:
        s.add(name, good1)

    def alias_dangling(name: str) -> None:
        doomed = s.add(name, good1, tabserve__sha256="d" * 64)
        s.alias(name, "champion", doomed)
        s.sql("UPDATE model_versions SET current_stage = 'Deleted_Internal' WHERE name = ? AND version = ?",
              name, doomed)

    def alias_not_ready(name: str) -> None:
        pending = s.add(name, good2, tabserve__sha256="a" * 64)
        s.alias(name, "staging", pending)
        s.sql("UPDATE model_versions SET status = 'FAILED_REGISTRATION' WHERE name = ? AND version = ?",
              name, pending)

    def stage_ambiguous(name: str) -> None:
        s.stage(name, "1", "Production")
        s.stage(name, "2", "Production")

    def threshold_conflict(name: str) -> None:
        s.add(name, good1, tabserve__sha256="b" * 64, decision_threshold="0.338")  # its run says 0.48

    problems = {"digest_tag_missing": digest_tag_missing, "duplicate_digest": duplicate_digest,
                "alias_dangling": alias_dangling, "alias_not_ready": alias_not_ready,
                "stage_ambiguous": stage_ambiguous, "threshold_conflict": threshold_conflict}
    assert tuple(problems) == METADATA_PROBLEMS
    for name, applied in [*((problem_model(kind), [make]) for kind, make in problems.items()),
                          (ALL_METADATA, list(problems.values()))]:
        s.add(name, good1)
        s.alias(name, "production", s.add(name, good2))
        for make in applied:
            make(name)


def _deep_problems(s: _Seeder, good: _Source, wrong: _Source, missing: _Source) -> None:
    """d-KIND: one problem a download finds (schema_change: a good version, then one with other features);
    d-all: a good version, then one of each, the one with other features last."""
    half = _Source(str(s.root / "files" / "half"), good.run_id, {**good.tags, DIGEST_TAG: "c" * 64})
    mismatch = _Source(good.source, good.run_id, {**good.tags, DIGEST_TAG: "0" * 64})
    sources = {"artifact_missing": [missing], "artifact_unreadable": [half], "digest_mismatch": [mismatch],
               "schema_change": [good, wrong]}
    assert tuple(sources) == DEEP_PROBLEMS
    for kind, versions in [*sources.items(), ("all", [good, missing, half, mismatch, wrong])]:
        for source in versions:
            s.add(ALL_DEEP if kind == "all" else problem_model(kind), source)


def copy_registry(seeded: Seeded, destination: Path) -> str:
    """A copy of the seeded SQLite store (the artifacts stay shared); returns its URI."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy(seeded.db, destination / "mlflow.db")
    return f"sqlite:///{destination / 'mlflow.db'}"
