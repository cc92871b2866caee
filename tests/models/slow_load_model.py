"""An MLflow model-from-code wrapping a LightGBM booster (artifact `booster`, LightGBM's text format) whose
load sleeps for SLOW_LOAD_SECONDS (default 0): a version that takes a while to load, for reload tests.

Its scores are exactly the booster's, so a test can tell which version answered and that it was fully loaded.
"""

import os
import time

import lightgbm
import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


class SlowLoadModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    def load_context(self, context):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ.get("SLOW_LOAD_SECONDS", "0")))
        self.booster = lightgbm.Booster(model_file=context.artifacts["booster"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        values = model_input.to_numpy(dtype=np.float64)
        return np.asarray(self.booster.predict(values, num_threads=1), dtype=np.float64)


set_model(SlowLoadModel())
