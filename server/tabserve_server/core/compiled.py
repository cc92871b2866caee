"""The compiled-tree backend: LightGBM's trees compiled to machine code by lleaves (LLVM), proven close to
`Booster.predict` before it serves.

Why lleaves: on the seed-sized model it predicts one row 4.3x faster than LightGBM on one thread, with no C
compiler needed at run time (LLVM ships inside the llvmlite wheel); docs/performance.md has the comparison.

How it stays safe:
- Compiling runs in the verifier process (core/verify, `--compile-to`), never in the serving process;
  `compile_checked` writes the object code and `verified.json` into a cache entry only after the object, loaded
  by `load_forest` exactly as the serving process loads it, matched `Booster.predict` on CHECK_ROWS rows.
- lleaves is not bit-exact (it sums the trees in another order): the bound is ABSOLUTE_BOUND on every check row,
  and no check row's decision may flip at the version's threshold.
- The serving process loads only object bytes whose sha256 `verified.json` names, and checks them again on a
  few rows against its own booster before swapping (core/compiling.py).
- Cache entries are keyed by the model digest, the compiler's and LLVM's versions and the host CPU (the code is
  compiled for this CPU), so a restart or a rollback to a known version loads instead of compiling.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tabserve_server.core.artifact import read_artifact, read_files
from tabserve_server.core.lgbm_fast import check_rows
from tabserve_server.core.model import LightGBMPredictor
from tabserve_server.core.schema import FloatMatrix
from tabserve_server.errors import ModelLoadError

COMPILER = "lleaves"
BACKEND_COMPILED_PREFIX = "compiled-"  # + compiler and version: how decision records name this backend
ABSOLUTE_BOUND = 1e-12  # largest |compiled - Booster.predict| accepted on a check row (measured: 9e-16)
CHECK_ROWS = 10_000  # rows the verifier compares; the serving process compares SERVING_CHECK_ROWS again
SERVING_CHECK_ROWS = 256
SINGLE_CHECK_ROWS = 64  # of those, rows also checked one by one: a single row takes its own path (`_Scratch`)
PARALLEL_MIN_ROWS = 256  # fewer rows run on the calling thread: a thread hand-off costs more than it saves
OBJECT = "forest.o"
VERIFIED = "verified.json"
_ENTRY = "forest_root"
# (double* rows, double* out, int start, int end); releases the GIL. The pointers go as plain addresses:
# `ndarray.ctypes.data_as` costs more per call than a single row's trees.
_FOREST = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)


class CompileFailed(ModelLoadError):
    """The compiled backend cannot serve this version; `reason` is a bounded label for metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def compiler_version() -> str:
    """'lleaves X, llvmlite Y' as installed; CompileFailed('missing') when either is not."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{COMPILER} {version('lleaves')}, llvmlite {version('llvmlite')}"
    except PackageNotFoundError as exc:
        raise CompileFailed(f"compiler not installed: {exc}", "missing") from None


def backend_name(compiler: str) -> str:
    """'compiled-lleaves-1.3.0' for 'lleaves 1.3.0, llvmlite ...': the decision records' backend name."""
    return BACKEND_COMPILED_PREFIX + "-".join(compiler.split(",", 1)[0].split())


def _llvm() -> Any:
    try:
        import llvmlite.binding as llvm
    except ImportError as exc:
        raise CompileFailed(f"compiler not installed: {exc}", "missing") from None
    llvm.initialize()  # per-process LLVM state; repeated calls are harmless
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    return llvm


def _cpu_features(llvm: Any) -> str:
    try:
        return str(llvm.get_host_cpu_features().flatten())
    except RuntimeError:  # LLVM cannot detect them on some hosts
        return ""


def cache_entry(cache_dir: Path, digest: str, compiler: str) -> Path:
    """The cache entry of `digest` compiled by `compiler` for this host's CPU."""
    llvm = _llvm()
    host = hashlib.sha256(f"{llvm.get_host_cpu_name()}|{_cpu_features(llvm)}".encode()).hexdigest()[:12]
    model = digest.removeprefix("sha256:")[:32]
    return cache_dir / "compiled" / f"{model}-{'-'.join(compiler.replace(',', '').split())}-{host}"


@dataclass(frozen=True)
class Forest:
    """Compiled object code loaded into this process; `engine` keeps it mapped while `call` may run."""

    engine: Any
    call: Callable[..., None]


def load_forest(object_code: bytes) -> Forest:
    """Load object code that lleaves compiled (same target options as its `compile`) into this process."""
    llvm = _llvm()
    target = llvm.Target.from_triple(llvm.get_process_triple())
    machine = target.create_target_machine(cpu=llvm.get_host_cpu_name(), features=_cpu_features(llvm),
                                           reloc="pic", codemodel="large")
    engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), machine)
    engine.set_object_cache(getbuffer_func=lambda _module: object_code)
    engine.finalize_object()
    engine.run_static_constructors()
    address = engine.get_function_address(_ENTRY)
    if not address:
        raise CompileFailed(f"compiled object has no {_ENTRY} function", "failed")
    return Forest(engine, _FOREST(address))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One pool for every compiled predictor of the process, made on the first batch that needs it."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="compiled-predict")


class _Scratch(threading.local):
    """One calling thread's input row and output value, allocated once with their addresses: asking an ndarray
    for its address (`.ctypes.data`) costs about 3 µs, a fifth of a single row's trees on the seed model."""

    def __init__(self, features: int) -> None:
        self.row = np.empty((1, features), dtype=np.float64)
        self.out = np.empty(1, dtype=np.float64)
        self.row_address = int(self.row.ctypes.data)
        self.out_address = int(self.out.ctypes.data)


class CompiledPredictor:
    """Scores through a compiled forest; explanations (TreeSHAP) still come from the LightGBM booster."""

    backend_family = "compiled"

    def __init__(self, lightgbm: LightGBMPredictor, forest: Forest, compiler: str, threads: int) -> None:
        self.lightgbm = lightgbm
        self.backend_version = compiler
        self._forest = forest
        self._call = forest.call
        self._threads = max(1, threads)
        self._name = backend_name(compiler)
        self._scratch = _Scratch(int(lightgbm.booster.num_feature()))

    def predict(self, matrix: FloatMatrix) -> np.ndarray:
        if matrix.shape[0] == 1:
            return self.predict_one(matrix)
        return self.predict_batch(matrix)

    def predict_one(self, matrix: FloatMatrix) -> np.ndarray:
        """One row ([1, features]): copied into this thread's buffer, so no address is asked of `matrix`."""
        scratch = self._scratch
        scratch.row[...] = matrix  # also the dtype conversion; a row of another width raises (broadcast)
        self._call(scratch.row_address, scratch.out_address, 0, 1)
        return scratch.out.copy()

    def predict_batch(self, matrix: FloatMatrix) -> np.ndarray:
        """Any number of rows, split over the pool from PARALLEL_MIN_ROWS rows when threads > 1."""
        rows = np.ascontiguousarray(matrix, dtype=np.float64)
        count = rows.shape[0]
        out = np.empty(count, dtype=np.float64)
        data, result = rows.ctypes.data, out.ctypes.data
        if count < PARALLEL_MIN_ROWS or self._threads == 1:
            self._call(data, result, 0, count)
            return out
        step = -(-count // self._threads)
        calls = [_pool().submit(self._call, data, result, start, min(start + step, count))
                 for start in range(0, count, step)]
        for call in calls:
            call.result()
        return out

    def backend(self, rows: int) -> str:
        return self._name

    def contributions(self, matrix: FloatMatrix) -> np.ndarray:
        return self.lightgbm.contributions(matrix)


def compare(expected: np.ndarray, got: np.ndarray, threshold: float) -> float:
    """The largest |got - expected|; CompileFailed('unverified') past ABSOLUTE_BOUND or on a decision flip."""
    if expected.shape != got.shape or not np.isfinite(got).all():
        raise CompileFailed(f"compiled predictor gave {got.shape} values (finite: {np.isfinite(got).all()}), "
                            f"Booster.predict {expected.shape}", "unverified")
    worst = float(np.max(np.abs(got - expected))) if got.size else 0.0
    if worst > ABSOLUTE_BOUND:
        raise CompileFailed(f"compiled predictor differs from Booster.predict by up to {worst:.3g} "
                            f"(bound {ABSOLUTE_BOUND:g})", "unverified")
    flipped = int(np.count_nonzero((got >= threshold) != (expected >= threshold)))
    if flipped:
        raise CompileFailed(f"compiled predictor flips {flipped} decisions at threshold {threshold:g}", "unverified")
    return worst


def checked_predictor(lightgbm: LightGBMPredictor, object_code: bytes, compiler: str, threshold: float, *,
                      rows: int, threads: int) -> tuple[CompiledPredictor, float]:
    """Load `object_code` and prove it against `lightgbm`'s booster on `rows` check rows (see `compare`): as one
    batch, and the first SINGLE_CHECK_ROWS of them one by one through the single-row path."""
    predictor = CompiledPredictor(lightgbm, load_forest(object_code), compiler, threads)
    sample = check_rows(int(lightgbm.booster.num_feature()), count=rows)
    expected = lightgbm.predict_batch(sample)
    worst = compare(expected, predictor.predict_batch(sample), threshold)
    singles = sample[:SINGLE_CHECK_ROWS]
    one_by_one = np.concatenate([predictor.predict_one(singles[i : i + 1]) for i in range(len(singles))])
    return predictor, max(worst, compare(expected[: len(singles)], one_by_one, threshold))


def read_entry(entry: Path) -> tuple[bytes, dict[str, Any]] | None:
    """A cache entry's object code and facts, or None when it is absent or its bytes are not the verified ones."""
    try:
        facts = json.loads((entry / VERIFIED).read_text())
        code = (entry / OBJECT).read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(facts, dict) or hashlib.sha256(code).hexdigest() != facts.get("object_sha256"):
        return None
    return code, facts


def compile_directory(directory: Path, label: str, digest: str, max_model_bytes: int, entry: Path, *,
                      threshold: float) -> dict[str, Any]:
    """The verifier's compile step: the LightGBM model in `directory` (the bytes of `digest`) to `entry`."""
    files = read_files(directory, label, max_model_bytes)
    if files.digest != digest or not files.lightgbm_file:
        raise CompileFailed(f"{label}: not the LightGBM model that was checked; not compiled", "failed")
    artifact = read_artifact(files, allow_pyfunc=False, predict_threads=1)
    assert isinstance(artifact.predictor, LightGBMPredictor)
    return compile_checked(artifact.predictor, files.contents[files.lightgbm_file], entry, threshold)


def compile_checked(lightgbm: LightGBMPredictor, model_text: bytes, entry: Path, threshold: float) -> dict[str, Any]:
    """Compile the model (LightGBM text) with lleaves, check it on CHECK_ROWS rows, and publish it at `entry`.

    Runs in the verifier process. Returns the facts written to `entry`/verified.json."""
    compiler = compiler_version()
    try:
        import lleaves
    except ImportError as exc:
        raise CompileFailed(f"compiler not installed: {exc}", "missing") from None
    staging = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        (staging / "model.txt").write_bytes(model_text)
        try:
            model = lleaves.Model(model_file=str(staging / "model.txt"))
            if model.num_model_per_iteration() != 1:
                raise CompileFailed("the compiled backend serves one output per row; this model has "
                                    f"{model.num_model_per_iteration()}", "failed")
            model.compile(cache=str(staging / OBJECT))
        except CompileFailed:
            raise
        except Exception as exc:
            raise CompileFailed(f"{COMPILER} failed: {type(exc).__name__}: {exc}", "failed") from exc
        code = (staging / OBJECT).read_bytes()
        _, worst = checked_predictor(lightgbm, code, compiler, threshold, rows=CHECK_ROWS, threads=1)
        facts = {"compiler": compiler, "object_sha256": hashlib.sha256(code).hexdigest(),
                 "check_rows": CHECK_ROWS, "max_abs_diff": worst, "bound": ABSOLUTE_BOUND}
        (staging / VERIFIED).write_text(json.dumps(facts, sort_keys=True))
        (staging / "model.txt").unlink()
        try:
            staging.rename(entry)
        except OSError:  # another process published the same entry first: theirs is as good
            if read_entry(entry) is None:
                raise
        return facts
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["ABSOLUTE_BOUND", "BACKEND_COMPILED_PREFIX", "CompileFailed", "CompiledPredictor", "cache_entry",
           "checked_predictor", "compile_checked", "compile_directory", "compiler_version", "read_entry"]
