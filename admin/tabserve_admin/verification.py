"""Would the server load this version? Asked of the server's own loader, verifier and validation, with its settings.

`VersionGate.load()` resolves, downloads and reads a registry version exactly as the server does
(core/loading.py: `ModelLoader`, which runs the out-of-process verifier `python -m tabserve_server.core.verify`
first and checks the bytes against the verified digest and the version's `tabserve.sha256` tag), into a
scratch cache directory that is removed afterwards. `VersionGate.check()` then applies the server's
validation (core/validation.py: feature schema against the version the alias points at now, unless
`allow_schema_change`; warm-up predictions). Nothing here re-implements a check.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tabserve_server.app import loader_config
from tabserve_server.core.loading import ModelLoader
from tabserve_server.core.model import AspiredVersion, LoadedModel
from tabserve_server.core.validation import validate
from tabserve_server.errors import ModelLoadError
from tabserve_server.settings import ServerSettings


@dataclass(frozen=True)
class Loaded:
    """A version as the server would hold it, and the bytes its artifact took on disk."""

    model: LoadedModel
    artifact_bytes: int

    def summary(self) -> str:
        model = self.model
        return (f"{len(model.schema)} features, threshold {model.threshold:g} ({model.threshold_source}), "
                f"labels {model.labels.positive}/{model.labels.negative}, {self.artifact_bytes} bytes, "
                f"digest {model.digest}")


class VersionGate:
    """Loads and validates registry versions as the server would; use as a context manager."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._scratch = Path(tempfile.mkdtemp(prefix="tabserve-admin-"))
        self.loader = ModelLoader(dataclasses.replace(loader_config(settings), cache_dir=self._scratch))

    def load(self, name: str, version: str) -> Loaded:
        """`models:/name/version` downloaded, verified out of process and read; raises ModelLoadError."""
        uri = f"models:/{name}/{version}"
        candidate = self.loader.load(AspiredVersion(model_name=name, version=version, model_uri=uri))
        try:
            size = sum(p.stat().st_size for p in self._scratch.rglob("*") if p.is_file())
            return Loaded(candidate.model, size)
        finally:
            candidate.discard()

    def check(self, loaded: Loaded, current: Loaded | None, *, allow_schema_change: bool | None = None) -> None:
        """Raise ModelLoadError unless the server would swap `loaded` in while `current` serves (with
        `allow_schema_change` given: as a server with that setting would)."""
        allowed = self.settings.allow_schema_change if allow_schema_change is None else allow_schema_change
        validate(loaded.model, current.model if current else None, allowed)

    def close(self) -> None:
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> VersionGate:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["Loaded", "ModelLoadError", "VersionGate"]
