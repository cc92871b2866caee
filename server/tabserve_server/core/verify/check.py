"""What the verifier process checks: the artifact's bytes, their parse, the feature schema, warm-up predictions.

The same steps as the serving process (core/artifact.py, core/validation.py), so a version that passes here
meets no new code there; LightGBM's single-row fast path checks itself against `Booster.predict` as it is built.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tabserve_server.core.artifact import read_artifact, read_files
from tabserve_server.core.model import LightGBMPredictor
from tabserve_server.core.validation import warm_up

# lightgbm imports these when present, only for its scikit-learn, pandas and Dask interfaces; a LightGBM
# model read from text needs none of them, and skipping them cuts the verifier's start by about 2 s.
LIGHTGBM_OPTIONAL = ("sklearn", "pandas", "dask", "pyarrow", "datatable", "matplotlib", "graphviz", "cffi")


@dataclass(frozen=True)
class Checked:
    digest: str
    flavor: str
    features: int
    fast_path: bool


def check(directory: Path, label: str, *, allow_pyfunc: bool, max_model_bytes: int, lean: bool) -> Checked:
    """Raise ModelLoadError unless the model in `directory` reads, parses and predicts sanely.

    `lean`: a fresh process that will read nothing else may skip lightgbm's optional imports.
    """
    files = read_files(directory, label, max_model_bytes)
    if lean and files.lightgbm_file and "lightgbm" not in sys.modules:
        for name in LIGHTGBM_OPTIONAL:
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # None makes `import name` fail
    artifact = read_artifact(files, allow_pyfunc=allow_pyfunc, predict_threads=1)
    warm_up(artifact.predictor, artifact.schema)
    fast = isinstance(artifact.predictor, LightGBMPredictor) and artifact.predictor.fast is not None
    return Checked(files.digest, artifact.flavor, len(artifact.schema), fast)
