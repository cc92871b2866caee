"""The compiled backend in the serving process: each LightGBM version that starts serving moves onto its compiled
predictor (core/compiled.py) once one is cached or compiled in the verifier process, and checked here again.

Contract:
- The booster serves until then; scoring never waits for a compile. The version is re-stated with
  `backend_note` "compiling" while it runs, and with the reason when the compiled backend cannot serve it
  (compiler missing, failed, past compile_timeout_seconds, outside the bound): the booster keeps serving.
- The swap is `ModelManager.upgrade`: it happens only while that very version still serves.
- A version is tried once per load: a compile that failed is not retried until the version is loaded again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tabserve_server.core.compiled import (
    SERVING_CHECK_ROWS,
    CompiledPredictor,
    CompileFailed,
    cache_entry,
    checked_predictor,
    compiler_version,
    read_entry,
)
from tabserve_server.core.manager import ModelManager
from tabserve_server.core.model import LightGBMPredictor, LoadedModel
from tabserve_server.core.verify import VerifyLimits, verify
from tabserve_server.errors import ModelLoadError

log = logging.getLogger(__name__)

COMPILING = "compiling"
# How each attempt ended, as the compile metric counts it (metrics.py): the first two serve compiled code.
OUTCOMES = ("compiled", "cache_hit", "missing", "failed", "timeout", "crash", "unverified")


class CompiledBackend:
    """Listens to the manager's swaps (`model_swapped`) and upgrades each new LightGBM version in a thread."""

    def __init__(self, manager: ModelManager, cache_dir: Path, limits: VerifyLimits, threads: int,
                 on_outcome: Callable[[str], None] = lambda _outcome: None) -> None:
        self._manager = manager
        self._cache_dir = cache_dir
        self._limits = limits
        self._threads = threads
        self._on_outcome = on_outcome

    def model_swapped(self, new: LoadedModel, old: LoadedModel | None) -> None:
        if not isinstance(new.predictor, LightGBMPredictor) or new.backend_note or not new.source_dir:
            return  # not a booster, already being handled, or nothing to compile from
        threading.Thread(target=self._upgrade, args=(new,), name="compile", daemon=True).start()

    def _upgrade(self, model: LoadedModel) -> None:
        noted = replace(model, backend_note=COMPILING)
        if not self._manager.upgrade(model, noted):
            return
        try:
            predictor, outcome = compiled_predictor(model, self._cache_dir, self._limits, self._threads)
        except Exception as exc:
            outcome = getattr(exc, "reason", "failed") if isinstance(exc, ModelLoadError) else "failed"
            if outcome not in OUTCOMES:
                outcome = "failed"
            log.warning("compiled backend unavailable for %s version %s (%s): %s; LightGBM serves",
                        model.name, model.version, outcome, exc, exc_info=not isinstance(exc, ModelLoadError))
            self._on_outcome(outcome)
            note = f"compiled backend unavailable ({outcome}): {exc}; LightGBM serves"
            self._manager.upgrade(noted, replace(model, backend_note=note))
            return
        self._on_outcome(outcome)
        if self._manager.upgrade(noted, replace(model, predictor=predictor)):
            log.info("%s version %s now serves on the compiled backend (%s, %s)", model.name, model.version,
                     predictor.backend_version, outcome)


def compiled_predictor(model: LoadedModel, cache_dir: Path, limits: VerifyLimits,
                       threads: int) -> tuple[CompiledPredictor, str]:
    """The checked compiled predictor of `model` (a LightGBM version) and how it was had (`cache_hit` or
    `compiled`): from its cache entry under `cache_dir`, else compiled by the verifier process within `limits`.
    Raises ModelLoadError (CompileFailed, VerifierFailed) with the reason when it cannot serve."""
    if not isinstance(model.predictor, LightGBMPredictor) or not model.source_dir:
        raise CompileFailed(f"{model.source_uri}: only LightGBM versions read from files compile", "failed")
    compiler = compiler_version()
    entry = cache_entry(cache_dir, model.digest, compiler)
    found, outcome = read_entry(entry), "cache_hit"
    if found is None:
        verdict = verify(Path(model.source_dir), model.source_uri, limits, compile_to=entry, threshold=model.threshold)
        if verdict.digest != model.digest:
            raise CompileFailed(f"{model.source_uri}: the files changed since they were loaded", "failed")
        found, outcome = read_entry(entry), "compiled"
        if found is None:
            raise CompileFailed(f"the compiled object at {entry} is missing or not the verified one", "failed")
    code, _facts = found
    predictor, _worst = checked_predictor(model.predictor, code, compiler, model.threshold,
                                          rows=SERVING_CHECK_ROWS, threads=threads)
    return predictor, outcome
