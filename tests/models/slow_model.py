"""An MLflow model-from-code whose predict sleeps: keeps a call in flight for drain and deadline tests."""

import os
import time

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


class SlowModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        # Rows whose first feature is 777 are slow; warm-up rows are not, so loading stays fast.
        values = model_input.to_numpy(dtype=np.float64)
        if (values[:, 0] == 777.0).any():
            time.sleep(float(os.environ.get("SLOW_MODEL_SECONDS", "2.0")))
        return np.full(len(values), 0.25)


set_model(SlowModel())
