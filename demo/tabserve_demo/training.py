"""Training of the demo credit-scoring LightGBM booster on synthetic applicants, with progress in the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from tabserve_demo.applicants import FEATURE_NAMES, make_applicants

if TYPE_CHECKING:
    import lightgbm

logger = logging.getLogger(__name__)

TRAIN_ROWS: Final = 20_000
BOOST_ROUNDS: Final = 60
# Training takes tens of seconds on a busy machine: a line every this many rounds says it is moving.
PROGRESS_EVERY_ROUNDS: Final = 15


def _progress_callback(total_rounds: int, started: float) -> Callable[[Any], None]:
    def report(env: Any) -> None:
        done = env.iteration + 1
        if done % PROGRESS_EVERY_ROUNDS == 0 or done == total_rounds:
            logger.info("training: %d/%d boosting rounds (%.1f s)", done, total_rounds, time.monotonic() - started)

    return report


def train_booster(
    seed: int = 0,
    n_rows: int = TRAIN_ROWS,
    num_boost_round: int = BOOST_ROUNDS,
    feature_names: Sequence[str] = FEATURE_NAMES,
) -> lightgbm.Booster:
    """Train the demo binary classifier (probability of default) on `n_rows` synthetic applicants.

    `feature_names` other than FEATURE_NAMES give a booster whose schema does not match the demo's.
    """
    import lightgbm

    started = time.monotonic()
    logger.info("training: %d synthetic applicants, %d boosting rounds (seed %d)", n_rows, num_boost_round, seed)
    features, labels = make_applicants(n_rows, seed=seed)
    params: dict[str, Any] = {
        "objective": "binary",
        "metric": "auc",
        "learning_rate": 0.1,
        "num_leaves": 31,
        "min_data_in_leaf": 50,
        "feature_fraction": 0.8,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "seed": seed,
        "deterministic": True,
        "num_threads": 2,
        "verbose": -1,
    }
    dataset = lightgbm.Dataset(features, label=labels, feature_name=list(feature_names))
    booster: lightgbm.Booster = lightgbm.train(
        params, dataset, num_boost_round=num_boost_round, callbacks=[_progress_callback(num_boost_round, started)]
    )
    return booster
