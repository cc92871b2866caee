"""The single-row fast path equals Booster.predict exactly, and falls back when it cannot be used."""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

import lightgbm
import numpy as np
import pytest

from tabserve_demo.applicants import make_applicants
from tabserve_demo.training import train_booster
from tabserve_server.core.lgbm_fast import SingleRowFast, check_rows
from tabserve_server.core.model import LightGBMPredictor


@pytest.fixture(scope="module")
def booster() -> lightgbm.Booster:
    # Through LightGBM's text format, as the server loads models.
    return lightgbm.Booster(model_str=train_booster(n_rows=3000, num_boost_round=40).model_to_string())


def test_fast_single_row_equals_booster_predict_exactly(booster: lightgbm.Booster) -> None:
    fast = SingleRowFast.create(booster)
    assert fast is not None
    rows = np.vstack([make_applicants(300, seed=11)[0], check_rows(booster.num_feature(), 200, seed=5)])
    expected = booster.predict(rows, num_threads=1)
    got = np.array([fast.predict_one(np.ascontiguousarray(row)) for row in rows])
    assert np.array_equal(expected, got)


def test_predictor_uses_the_fast_path_for_one_row_and_booster_predict_for_batches(booster: lightgbm.Booster) -> None:
    predictor = LightGBMPredictor(booster, batch_threads=2)
    fast = predictor.fast
    assert fast is not None
    single_rows: list[np.ndarray] = []

    class Counting:
        """The real fast path, counting the rows it is given (the scores alone cannot tell the paths apart)."""

        def predict_one(self, row: np.ndarray) -> float:
            single_rows.append(row)
            return fast.predict_one(row)

    predictor.fast = Counting()  # type: ignore[assignment]
    rows = make_applicants(64, seed=12)[0]
    one_by_one = np.concatenate([predictor.predict(rows[i : i + 1]) for i in range(len(rows))])
    assert len(single_rows) == len(rows)
    assert np.array_equal(one_by_one, predictor.predict(rows))
    assert len(single_rows) == len(rows)  # the batch went through Booster.predict
    assert np.array_equal(one_by_one, booster.predict(rows, num_threads=1))
    # A column slice is not contiguous: the predictor copies it rather than reading the wrong memory.
    wide = np.asfortranarray(rows[:1])
    assert np.array_equal(predictor.predict(wide), booster.predict(rows[:1]))


def test_wrong_row_is_refused_not_read(booster: lightgbm.Booster) -> None:
    fast = SingleRowFast.create(booster)
    assert fast is not None
    with pytest.raises(ValueError, match="contiguous float64"):
        fast.predict_one(np.zeros(booster.num_feature() - 1))
    with pytest.raises(ValueError, match="contiguous float64"):
        fast.predict_one(np.zeros(booster.num_feature(), dtype=np.float32))


class _NoHandle:
    """A booster-like object without the C handle the fast path needs (as if lightgbm changed)."""

    def __init__(self, booster: lightgbm.Booster) -> None:
        self._booster = booster

    def __getattr__(self, name: str) -> Any:
        if name == "_handle":
            raise AttributeError(name)
        return getattr(self._booster, name)


def test_falls_back_to_booster_predict_and_says_why(
    booster: lightgbm.Booster, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        predictor = LightGBMPredictor(_NoHandle(booster), batch_threads=1)
    assert predictor.fast is None
    assert "fast path unavailable" in caplog.text
    row = make_applicants(1, seed=13)[0]
    assert np.array_equal(predictor.predict(row), booster.predict(row))


def test_handle_is_released_with_the_model(booster: lightgbm.Booster) -> None:
    fast = SingleRowFast.create(booster)
    assert fast is not None
    finalizer = fast._finalizer
    ref = weakref.ref(fast)
    del fast
    gc.collect()
    assert ref() is None
    assert not finalizer.alive
