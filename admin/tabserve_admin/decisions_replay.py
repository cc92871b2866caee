"""`tabserve-admin decisions replay DIR`: re-score the logged full-input rows of a decision log with the same
registry version (checked against the logged model digest) and the same prediction backend, and report every
score that differs by a single bit and every reason that differs.

Only records written with `decision_log_inputs=full` carry their rows; the others are counted and skipped.
Each version is loaded as the server loads it (verified in a separate process, LightGBM's own text format),
from the registry named by --tracking-uri / --registry-uri or, like the server, TABSERVE_SERVER_TRACKING_URI /
TABSERVE_SERVER_REGISTRY_URI. Exit 0: every replayed score and reason is identical; 1: something differs (or a
logged version cannot be loaded, or its files are not the ones logged); 2: bad usage or an unreadable log.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tabserve_admin.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from tabserve_server.core.compiled import BACKEND_COMPILED_PREFIX
from tabserve_server.core.compiling import compiled_predictor
from tabserve_server.core.dataplane import explain_chosen
from tabserve_server.core.loading import LoaderConfig, ModelLoader
from tabserve_server.core.model import (
    BACKEND_LIGHTGBM_BATCH,
    BACKEND_LIGHTGBM_SINGLE_ROW,
    AspiredVersion,
    LightGBMPredictor,
    LoadedModel,
)
from tabserve_server.core.reasons import rows_to_explain
from tabserve_server.decisions.record import INPUT_FULL, Record, decision_records
from tabserve_server.errors import ModelLoadError

ENV_PREFIX = "TABSERVE_SERVER_"  # the server's: an auditor points replay at the registry the server used
MAX_SHOWN = 20  # differences printed one by one; the rest are counted
COMPILE_TIMEOUT_SECONDS = 900.0  # the server's default compile_timeout_seconds


class ReplayError(Exception):
    """A logged version cannot be replayed here (not loadable, other files, backend unavailable)."""


def _bits(value: object) -> str:
    """A logged or replayed number as its exact bits (hex), NaN (null in the log) as 'nan'."""
    number = float("nan") if value is None else float(value)  # type: ignore[arg-type]
    return "nan" if math.isnan(number) else struct.pack("<d", number).hex()


def _same(a: object, b: object) -> bool:
    return _bits(a) == _bits(b)


def replay_scores(model: LoadedModel, backend: str, matrix: np.ndarray) -> np.ndarray:
    """The scores of `matrix` through the logged `backend` of `model` (core/model.py BACKEND_*)."""
    predictor = model.predictor
    if backend == model.predictor.backend(matrix.shape[0]):
        return predictor.predict(matrix)
    if isinstance(predictor, LightGBMPredictor):
        if backend == BACKEND_LIGHTGBM_BATCH:
            return predictor.predict_batch(matrix)
        if backend == BACKEND_LIGHTGBM_SINGLE_ROW and predictor.fast is None:
            raise ReplayError("LightGBM's single-row fast path is not available (or not proven equal) here")
    raise ReplayError(f"backend {backend!r} is not how {model.flavor} version {model.version} predicts here")


def _logged_reasons(row: Mapping[str, Any]) -> list[tuple[str, str, str, str]] | None:
    reasons = row.get("reasons")
    if reasons is None:
        return None
    return [(r["feature"], _bits(r["value"]), _bits(r["contribution"]), r["code"]) for r in reasons]


@dataclass
class Report:
    """What replay found; `differences` are one line each."""

    records: int = 0
    rows: int = 0
    skipped: int = 0
    versions: set[tuple[str, str]] = field(default_factory=set)
    differences: list[str] = field(default_factory=list)

    def differ(self, where: str, what: str) -> None:
        self.differences.append(f"{where}: {what}")


def replay_record(model: LoadedModel, record: Record, where: str, report: Report) -> None:
    """Re-score one full-input record and add what differs to `report`."""
    rows: list[dict[str, Any]] = record["rows"]  # type: ignore[assignment]
    matrix = np.array([[np.nan if v is None else v for v in row["input"]] for row in rows], dtype=np.float64)
    scores = replay_scores(model, str(record["backend"]), matrix)
    report.records += 1
    report.rows += len(rows)
    for i, (row, score) in enumerate(zip(rows, scores.tolist(), strict=True)):
        if not _same(row["score"], score):
            report.differ(f"{where} row {i}", f"score logged {row['score']!r} (bits {_bits(row['score'])}), "
                                              f"replayed {score!r} (bits {_bits(score)})")
    explain: Mapping[str, Any] | None = record.get("explain")  # type: ignore[assignment]
    if explain is None:
        return
    decisions = np.asarray([row["decision"] for row in rows], dtype=bool)
    chosen = rows_to_explain(decisions, model.adverse_positive, bool(explain["all_rows"]))
    replayed = explain_chosen(model, matrix, chosen, int(explain["top_k"]))
    if not _same(explain["expected_value"], replayed.expected_value):
        report.differ(where, f"expected value logged {explain['expected_value']!r}, "
                             f"replayed {replayed.expected_value!r}")
    by_row = {e.row: [(r.feature, _bits(r.value), _bits(r.contribution), r.code) for r in e.reasons]
              for e in replayed.rows}
    for i, row in enumerate(rows):
        logged, again = _logged_reasons(row), by_row.get(i)
        if logged != again:
            report.differ(f"{where} row {i}", f"reasons logged {logged}, replayed {again}")


class Versions:
    """The logged versions, each loaded once from the registry as the server loads it; on the compiled backend
    (core/compiling.py) too when a record was scored by it, compiled code coming from `compiled_cache` (the
    server's cache_dir: its entries are reused) or compiled by the verifier process."""

    def __init__(self, loader: ModelLoader, compiled_cache: Path | None = None) -> None:
        self._loader = loader
        self._compiled_cache = compiled_cache or loader.config.cache_dir
        self._models: dict[tuple[str, str, str, bool], LoadedModel | ReplayError] = {}

    def get(self, name: str, version: str, digest: str, backend: str = "") -> LoadedModel:
        key = (name, version, digest, backend.startswith(BACKEND_COMPILED_PREFIX))
        if key not in self._models:
            self._models[key] = self._load(*key)
        found = self._models[key]
        if isinstance(found, ReplayError):
            raise found
        return found

    def _load(self, name: str, version: str, digest: str, compiled: bool) -> LoadedModel | ReplayError:
        try:
            candidate = self._loader.load(AspiredVersion(name, version, f"models:/{name}/{version}"))
        except Exception as exc:  # any load failure is this version's, reported with the records it affects
            return ReplayError(f"{name} version {version} cannot be loaded: {exc}")
        try:
            if candidate.model.digest != digest:
                return ReplayError(f"{name} version {version} in the registry is {candidate.model.digest}, "
                                   f"the log says {digest}: not the files that decided")
            if not compiled:
                return candidate.model
            limits = replace(self._loader.limits, timeout_seconds=COMPILE_TIMEOUT_SECONDS,
                             limit_name="replay's compile limit")
            predictor, _ = compiled_predictor(candidate.model, self._compiled_cache, limits, threads=1)
            return replace(candidate.model, predictor=predictor)
        except ModelLoadError as exc:
            return ReplayError(f"{name} version {version}: the compiled backend is unavailable here: {exc}")
        finally:
            candidate.discard()  # the model stays in memory; replay keeps no downloaded files


def replay(records: Iterable[tuple[str, Record]], versions: Versions) -> Report:
    """Replay every full-input record (`where` names it in the report) against `versions`."""
    report = Report()
    for where, record in records:
        if record.get("inputs") != INPUT_FULL:
            report.skipped += 1
            continue
        name, version = str(record["model"]), str(record["version"])
        report.versions.add((name, version))
        try:
            model = versions.get(name, version, str(record["model_digest"]), str(record.get("backend", "")))
            replay_record(model, record, where, report)
        except ReplayError as exc:
            report.differ(where, str(exc))
    return report


def _print(report: Report, out: Callable[[str], None]) -> None:
    for line in report.differences[:MAX_SHOWN]:
        out(f"DIFFERS {line}")
    if len(report.differences) > MAX_SHOWN:
        out(f"... and {len(report.differences) - MAX_SHOWN} more differences")
    names = ", ".join(f"{n} version {v}" for n, v in sorted(report.versions)) or "no version"
    verdict = f"{len(report.differences)} differences" if report.differences else "every score and reason identical"
    out(f"replayed {report.records} records ({report.rows} rows) of {names}: {verdict}; "
        f"skipped {report.skipped} records without full inputs")


def run(args: argparse.Namespace) -> int:
    """The command: replay the decision log in `args.directory`."""
    directory: Path = args.directory
    if not directory.is_dir():
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    with tempfile.TemporaryDirectory(prefix="tabserve-replay-") as cache:
        loader = ModelLoader(LoaderConfig(
            tracking_uri=args.tracking_uri, registry_uri=args.registry_uri, cache_dir=Path(cache),
            default_threshold=0.5, allow_pyfunc=args.allow_pyfunc, predict_threads=0,
            registry_timeout_seconds=10.0, load_timeout_seconds=120.0, max_model_bytes=2**30,
        ))
        try:
            report = replay(decision_records(directory), Versions(loader, args.cache_dir))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: cannot read the decision log in {directory}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    _print(report, print)
    return EXIT_FAILED if report.differences else EXIT_OK


def register(subcommands: Any) -> None:
    """Adds `replay` to the `decisions` group (admin/tabserve_admin/decisions.py)."""
    parser = subcommands.add_parser(
        "replay", help="re-score logged full-input rows and report any score or reason that differs",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(parser, os.environ)
    parser.set_defaults(handler=run)


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The replay command's arguments (the registry flags default to the server's variables in `env`)."""
    parser.add_argument("directory", type=Path, metavar="DIR", help="the decision log directory")
    parser.add_argument("--tracking-uri", default=env.get(f"{ENV_PREFIX}TRACKING_URI", ""),
                        help=f"MLflow tracking URI (default: ${ENV_PREFIX}TRACKING_URI, else MLflow's default)")
    parser.add_argument("--registry-uri", default=env.get(f"{ENV_PREFIX}REGISTRY_URI", ""),
                        help=f"MLflow registry URI (default: ${ENV_PREFIX}REGISTRY_URI, else the tracking URI)")
    parser.add_argument("--cache-dir", type=Path, default=env.get(f"{ENV_PREFIX}CACHE_DIR") or None,
                        help="the server's cache_dir: records scored by the compiled backend reuse its compiled code "
                             f"(default: ${ENV_PREFIX}CACHE_DIR, else compiled again in a temporary directory)")
    parser.add_argument("--allow-pyfunc", action="store_true",
                        default=env.get(f"{ENV_PREFIX}ALLOW_PYFUNC", "").lower() in ("1", "true", "yes", "on"),
                        help="load non-LightGBM versions through MLflow pyfunc (may unpickle code)")


__all__ = ["ReplayError", "Report", "Versions", "register", "replay", "replay_record",
           "replay_scores", "run"]
