"""Local cache of the last model that loaded and validated, so a restart with the registry down can serve.

Layout: <cache_dir>/<model name>/<entry>/ holds the downloaded artifacts and metadata.json;
<cache_dir>/<model name>/CURRENT names the last good entry and is replaced atomically, so a crash at
any moment leaves either the old or the new entry current, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METADATA = "metadata.json"
CURRENT = "CURRENT"


@dataclass(frozen=True)
class CachedEntry:
    directory: Path
    metadata: dict[str, Any] = field(default_factory=dict)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def stage(self, model_name: str, version: str) -> CachedEntry:
        """A new, empty entry to download into; not current until committed."""
        directory = self.root / _safe(model_name) / f"{_safe(version)}-{uuid.uuid4().hex[:8]}"
        directory.mkdir(parents=True)
        return CachedEntry(directory)

    def discard(self, entry: CachedEntry) -> None:
        shutil.rmtree(entry.directory, ignore_errors=True)

    def commit(self, entry: CachedEntry, metadata: dict[str, Any]) -> None:
        """Make `entry` the last good model of its name and drop older entries."""
        model_dir = entry.directory.parent
        _atomic_write(entry.directory / METADATA, json.dumps(metadata, indent=2, sort_keys=True))
        _atomic_write(model_dir / CURRENT, entry.directory.name)
        for other in model_dir.iterdir():
            if other.is_dir() and other != entry.directory:
                shutil.rmtree(other, ignore_errors=True)

    def current(self, model_name: str) -> CachedEntry | None:
        model_dir = self.root / _safe(model_name)
        try:
            directory = model_dir / (model_dir / CURRENT).read_text().strip()
            metadata = json.loads((directory / METADATA).read_text())
        except (OSError, ValueError):
            return None
        return CachedEntry(directory, metadata)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
