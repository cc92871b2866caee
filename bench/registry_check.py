"""`tabserve-admin registry check` in metadata mode, timed on the monitor-poll section's registries (1 and 500
versions): wall time of one check of the model, and the SQL statements and ORM rows the MLflow store handles
for it (in-process SQLite), a count that machine noise cannot move."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.report import SectionResult

GENERATOR = "tabserve-admin registry check (metadata)"


def _check(uri: str, model_name: str) -> Any:
    from tabserve_admin.registry_check import check_registry
    from tabserve_server.settings import ServerSettings

    return check_registry(ServerSettings(tracking_uri=uri), model_name)


def measure(
    section: SectionResult, backend: str, uris: dict[str, str], model_name: str, repeats: int, *,
    count_store: Any = None,
) -> None:
    """Median wall time of `repeats` checks per registry (`uris`: label -> URI); with `count_store` (the
    monitor-poll section's SQLAlchemy counter), the store's work for one check too."""
    for label, uri in uris.items():
        report = _check(uri, model_name)  # warm: engine, metadata reflection
        versions = len(report.models[0].versions)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            _check(uri, model_name)
            seconds.append(time.perf_counter() - started)
        section.add(f"registry check, {label}, median", backend, GENERATOR, statistics.median(seconds) * 1e3, "ms",
                    samples=repeats)
        if count_store is not None:
            with count_store() as counts:
                _check(uri, model_name)
            for what, count in counts.items():
                section.add(f"registry check store {what}, {label}", backend, "SQLAlchemy events", count, "count")
        section.notes.append(f"registry check via {backend}, {label}: {versions} versions, {report.models[0].runs} "
                             f"runs, {len(report.findings)} findings (the bench's versions carry no digest tag)")
