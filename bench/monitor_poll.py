"""Monitor per-poll cost with 500 registered versions against 1 (issue 4 target: <= 1.5x); and, on the same
registries, `tabserve-admin registry check` in metadata mode (bench/registry_check.py).

Two SQLite registries are built: a small one (1 run, 1 version, a small artifact) and a large one (many
runs, 500 versions, one large artifact inside the model directory every version points at). Versions are
created cheaply with `MlflowClient.create_model_version` on one shared model artifact. Then
`RegistryWatcher.resolve()` (what one poll asks the registry) is timed for alias mode and legacy-stage
mode, through SQLite directly, through PostgreSQL directly (the same two registries built in a throwaway
PostgreSQL cluster, tabserve_demo.stores: the production registry's backend store) and, in the full run,
through a real `mlflow server` child process on loopback per SQLite registry (tabserve_demo.processes). Polls of
the two registries are interleaved so machine noise hits both alike.

Besides wall time, each figure has a count that noise cannot move: SQL statements and ORM rows the
MLflow store handles per poll (in-process SQLite; the same store code runs behind `mlflow server`).
`get_registered_model` (what stage mode used before) is measured alongside as the baseline, and so is stage
mode's full read (`search_registered_models` with a name filter: what a stage poll cost before its change check,
and what it still costs when the check sees a change); the stage audit (listing all versions, every
`audit_interval_seconds`) is reported with its amortized cost.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import registry_check
from bench.report import SectionResult, Target, percentile_ms, ratio
from tabserve_demo.processes import MlflowServer

log = logging.getLogger(__name__)

MODEL_NAME = "poll-bench"
TARGET = 1.5
SMALL, LARGE = "1 version", "N versions"
BEFORE = "stage, before (get_registered_model)"
FULL_READ = "stage, full read on change (search_registered_models)"
_CHUNK = 4 << 20


def _quiet() -> None:
    warnings.simplefilter("ignore")
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _model_dir(path: Path, large_bytes: int) -> Path:
    """A model directory: small metadata files, plus `weights.bin` of `large_bytes` when asked."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "MLmodel").write_text("artifact_path: model\nflavors: {}\n")
    (path / "model.lgb").write_text("tree\nversion=v4\n")
    if large_bytes:
        block = b"\0" * _CHUNK
        with (path / "weights.bin").open("wb") as out:
            remaining = large_bytes
            while remaining > 0:
                out.write(block[: min(_CHUNK, remaining)])
                remaining -= _CHUNK
    return path


def build_registry(root: Path, *, versions: int, runs: int, large_bytes: int, uri: str = "") -> str:
    """A registry with `versions` versions of MODEL_NAME, artifacts under `root`; returns its URI: `uri` (an
    empty PostgreSQL database) when given, else a SQLite file under `root`.

    The last version has alias `production` and stage Production, the one before it Staging, every
    tenth one Archived; version 1 has alias `champion`. Runs carry a param and a metric each.
    """
    from mlflow import MlflowClient

    _quiet()
    root.mkdir(parents=True, exist_ok=True)
    uri = uri or f"sqlite:///{(root / 'mlflow.db').absolute().as_posix()}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("poll-bench", artifact_location=(root / "artifacts").as_uri())
    run_ids: list[str] = []
    for i in range(max(1, runs)):
        run = client.create_run(experiment)
        client.log_param(run.info.run_id, "i", i)
        client.log_metric(run.info.run_id, "auc", 0.7 + i * 1e-4)
        client.set_terminated(run.info.run_id)
        run_ids.append(run.info.run_id)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        client.log_artifacts(run_ids[0], str(_model_dir(Path(tmp) / "model", large_bytes)), "model")
    source = f"{client.get_run(run_ids[0]).info.artifact_uri}/model"
    client.create_registered_model(MODEL_NAME)
    for i in range(versions):
        client.create_model_version(MODEL_NAME, source, run_id=run_ids[i % len(run_ids)])
    last = str(versions)
    for version in range(10, versions - 1, 10):
        client.transition_model_version_stage(MODEL_NAME, str(version), "Archived")
    if versions > 1:
        client.transition_model_version_stage(MODEL_NAME, str(versions - 1), "Staging")
    client.transition_model_version_stage(MODEL_NAME, last, "Production")
    client.set_registered_model_alias(MODEL_NAME, "production", last)
    client.set_registered_model_alias(MODEL_NAME, "champion", "1")
    return uri


def _watcher(uri: str, mode: str) -> Any:
    from tabserve_monitor.registry import RegistryWatcher

    stage = "Production" if mode == "stage" else ""
    # A huge audit interval: the audit runs on the first (warm-up) poll only; it is measured on its own.
    return RegistryWatcher(uri, MODEL_NAME, alias="production", stage=stage, audit_interval_seconds=1e9)


def _calls(uri: str) -> dict[str, Callable[[], Any]]:
    """What one poll does, per mode; plus the former stage calls, as baselines."""
    alias, stage = _watcher(uri, "alias"), _watcher(uri, "stage")
    client = alias.client()

    def expect(resolve: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            resolution = resolve()
            assert resolution.target is not None and not resolution.audited, resolution
            return resolution

        return call

    def before() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return client.get_registered_model(MODEL_NAME)

    stage.resolve()  # runs the first audit and the first full read
    return {
        "alias": expect(alias.resolve), "stage": expect(stage.resolve), FULL_READ: stage.registered_model,
        BEFORE: before,
    }


def _interleaved(calls: dict[str, Callable[[], Any]], polls: int, warmup: int = 3) -> dict[str, list[float]]:
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {key: [] for key in calls}
    for _ in range(polls):
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            samples[key].append(time.perf_counter() - started)
    return samples


@contextlib.contextmanager
def _store_counter() -> Iterator[dict[str, int]]:
    """Counts SQL statements and ORM rows loaded by any SQLAlchemy engine in this process."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Mapper

    counts = {"statements": 0, "rows": 0}

    def on_statement(*_: Any) -> None:
        counts["statements"] += 1

    def on_load(*_: Any) -> None:
        counts["rows"] += 1

    event.listen(Engine, "before_cursor_execute", on_statement)
    event.listen(Mapper, "load", on_load)
    try:
        yield counts
    finally:
        event.remove(Engine, "before_cursor_execute", on_statement)
        event.remove(Mapper, "load", on_load)


def store_work(uri: str) -> dict[str, dict[str, int]]:
    """SQL statements and ORM rows the MLflow store handles for one poll, per mode (deterministic)."""
    calls = _calls(uri)
    for call in calls.values():
        call()  # warm: engine, metadata reflection
    work = {}
    for key, call in calls.items():
        with _store_counter() as counts:
            call()
        work[key] = dict(counts)
    return work


def mlflow_server(uri: str, root: Path) -> MlflowServer:
    """`mlflow server` over the registry at `uri` (built under `root`), started; `stop()` ends its process group."""
    return MlflowServer(uri, root / "served-artifacts", root / "mlflow-server.log").start()


def _measure(
    section: SectionResult, backend: str, uris: dict[str, str], polls: int, versions: int, *,
    servers: dict[str, MlflowServer] | None = None,
) -> None:
    calls = {(size, key): call for size, uri in uris.items() for key, call in _calls(uri).items()}
    cpu_before = {size: s.cpu_seconds() for size, s in (servers or {}).items()}
    samples = _interleaved({f"{size}|{key}": call for (size, key), call in calls.items()}, polls)
    generator = f"RegistryWatcher.resolve() via {backend}"
    for mode in ("alias", "stage", FULL_READ, BEFORE):
        medians, p90s = {}, {}
        for size in (SMALL, LARGE):
            seconds = samples[f"{size}|{mode}"]
            label_size = _label(size, versions)
            medians[size] = section.add(f"poll {mode}, {label_size}, median", backend, generator,
                                        statistics.median(seconds) * 1e3, "ms", samples=len(seconds))
            p90s[size] = section.add(f"poll {mode}, {label_size}, p90", backend, generator,
                                     percentile_ms(seconds, 90), "ms", samples=len(seconds))
        median_ratio, p90_ratio = ratio(medians[LARGE], medians[SMALL]), ratio(p90s[LARGE], p90s[SMALL])
        detail = f"median {versions}/1 via {backend}; p90 ratio {p90_ratio:.2f}" if p90_ratio else ""
        if mode in (FULL_READ, BEFORE):
            section.notes.append(f"{backend}: {mode}, median ratio {versions}/1 = {median_ratio:.2f}x ({detail})"
                                 if median_ratio else f"{backend}: {mode}: n/a")
            continue
        section.targets.append(Target(
            name=f"monitor poll cost, {mode} mode, {backend}", ratio=median_ratio, limit=TARGET, at_most=True,
            basis=f"median resolve() with {versions} versions / with 1", detail=detail,
        ))
    if servers:
        for size, server in servers.items():
            spent = server.cpu_seconds() - cpu_before[size]
            label_size = _label(size, versions)
            section.add(f"mlflow server CPU per poll (3 calls interleaved), {label_size}", backend,
                        generator, spent / polls * 1e3, "ms", samples=polls)


def _label(size: str, versions: int) -> str:
    return "1 version" if size == SMALL else f"{versions} versions"


def _store_work_figures(section: SectionResult, backend: str, uris: dict[str, str], versions: int) -> None:
    """The store's work per poll (SQL statements, ORM rows), per registry and mode: counts noise cannot move."""
    for size, uri in uris.items():
        for mode, work in store_work(uri).items():
            label_size = _label(size, versions)
            for what, count in work.items():
                section.add(f"store {what} per poll, {mode}, {label_size}", backend, "SQLAlchemy events", count,
                            "count")


def _postgresql_leg(section: SectionResult, root: Path, versions: int, runs: int, polls: int) -> None:
    """The same two registries in PostgreSQL (a throwaway cluster on loopback), polled in-process."""
    import os
    import secrets

    from tabserve_demo.stores import PostgresCluster
    from tools.debian import ensure_command

    initdb = ensure_command("initdb", "postgresql", also_in=("/usr/lib/postgresql/*/bin",))
    cluster = PostgresCluster(Path(os.path.realpath(initdb)).parent, secrets.token_hex(12))
    try:
        cluster.start().wait_healthy(120)
        started = time.monotonic()
        uris = {
            SMALL: build_registry(root / "pg-small", versions=1, runs=1, large_bytes=0,
                                  uri=cluster.create_database("poll_small")),
            LARGE: build_registry(root / "pg-large", versions=versions, runs=runs, large_bytes=0,
                                  uri=cluster.create_database("poll_large")),
        }
        section.notes.append(f"postgresql registries built in {time.monotonic() - started:.0f} s (PostgreSQL "
                             f"{cluster.bin_dir.parent.name}, loopback TCP, fsync off)")
        _store_work_figures(section, "postgresql", uris, versions)
        _measure(section, "postgresql", uris, polls, versions)
    finally:
        cluster.remove()


def _build_registries(section: SectionResult, root: Path, versions: int, runs: int, large_bytes: int
                      ) -> dict[str, str]:
    """The small and the large SQLite registry under `root`, by size; the time it took goes in a note."""
    started = time.monotonic()
    uris = {
        SMALL: build_registry(root / "small", versions=1, runs=1, large_bytes=0),
        LARGE: build_registry(root / "large", versions=versions, runs=runs, large_bytes=large_bytes),
    }
    section.notes.append(
        f"registries built in {time.monotonic() - started:.0f} s: 1 version/1 run vs {versions} versions/"
        f"{runs} runs and a {large_bytes >> 20} MB artifact in the shared model directory"
    )
    return uris


def _stage_audit(section: SectionResult, uris: dict[str, str], versions: int) -> None:
    """The stage audit (every version listed) timed once per registry, and its cost amortized over the polls."""
    audit = {}
    for size, uri in uris.items():
        watcher = _watcher(uri, "stage")
        watcher.stage_versions()
        started = time.perf_counter()
        watcher.stage_versions()
        audit[size] = time.perf_counter() - started
        label_size = _label(size, versions)
        section.add(f"stage audit (all versions listed), {label_size}", "sqlite", "RegistryWatcher.stage_versions",
                    audit[size] * 1e3, "ms", samples=1)
    section.notes.append(
        f"stage audit with {versions} versions every 300 s at a 5 s poll: {audit[LARGE] * 1e3 * 5 / 300:.2f} ms "
        "amortized per poll (and once after each change of the registered model)"
    )


def _mlflow_server_leg(section: SectionResult, root: Path, uris: dict[str, str], labels: dict[str, str], *,
                       polls: int, versions: int, checks: int) -> None:
    """Polls and registry checks through a real `mlflow server` per SQLite registry (the full run only)."""
    servers = {size: mlflow_server(uri, root / ("small" if size == SMALL else "large"))
               for size, uri in uris.items()}
    try:
        for server in servers.values():
            server.wait_healthy()
        _measure(section, "mlflow server", {size: s.url for size, s in servers.items()}, polls, versions,
                 servers=servers)
        registry_check.measure(section, "mlflow server", {label: servers[size].url for label, size in zip(
            labels, uris, strict=True)}, MODEL_NAME, checks)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.stop()


def run(quick: bool) -> dict[str, Any]:
    """The monitor-poll section (see bench/report.py for the shape)."""
    _quiet()
    versions = 50 if quick else 500
    runs = 5 if quick else 200
    large_bytes = (20 if quick else 200) << 20
    polls = 20 if quick else 200
    section = SectionResult()
    with tempfile.TemporaryDirectory(prefix="tabserve-poll-bench-") as tmp:
        root = Path(tmp)
        uris = _build_registries(section, root, versions, runs, large_bytes)
        _store_work_figures(section, "sqlite", uris, versions)
        _measure(section, "sqlite", uris, polls, versions)
        _stage_audit(section, uris, versions)
        _postgresql_leg(section, root, versions, runs, polls)
        checks = 3 if quick else 20
        labels = {_label(size, versions): uri for size, uri in uris.items()}
        registry_check.measure(section, "sqlite", labels, MODEL_NAME, checks, count_store=_store_counter)
        if quick:
            section.notes.append("quick: the mlflow server leg is skipped")
        else:
            _mlflow_server_leg(section, root, uris, labels, polls=polls, versions=versions, checks=checks)
    return section.as_dict()


if __name__ == "__main__":
    import json

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run("--quick" in sys.argv), indent=2))
