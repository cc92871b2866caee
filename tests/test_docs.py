"""The README stays in sync with the code it documents."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from tabserve_common.settings import settings_table
from tabserve_server.metrics import ServerMetrics
from tabserve_server.settings import ServerSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    assert settings_table(ServerSettings) in README


def test_every_server_metric_is_listed() -> None:
    registry = CollectorRegistry()
    ServerMetrics(registry)
    names = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    listed = set(re.findall(r"`(tabserve_server_[a-z_]+)`", README))
    assert names and names == listed


def test_every_monitor_setting_and_metric_is_in_the_readme() -> None:
    from tabserve_monitor.metrics import MonitorMetrics
    from tabserve_monitor.settings import MonitorSettings

    assert settings_table(MonitorSettings) in README
    registry = CollectorRegistry()
    MonitorMetrics(registry)
    names = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    assert names and names == set(re.findall(r"`(tabserve_monitor_[a-z_]+)`", README))



# The hand-written packages whose every module the README's layout table names.
PACKAGES = ("server/tabserve_server", "monitor/tabserve_monitor", "common/tabserve_common", "demo/tabserve_demo",
            "clients/tabserve_client", "admin/tabserve_admin")


def _layout_rows() -> list[tuple[list[str], str]]:
    """(paths in the first cell, text of the row) for every row of the README's layout table."""
    layout = README.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in layout.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and "`" in cells[1]:
            rows.append((re.findall(r"`([^`]+)`", cells[1]), line))
    return rows


def test_the_layout_table_names_every_module() -> None:
    """Each module is in a row for its own path, or named in the row of a folder that holds it: by its file name,
    or for a module of a nested package (core/verify/x.py) by that package's folder (`verify/`)."""
    root = Path(__file__).resolve().parent.parent
    rows = _layout_rows()
    missing = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if path.name in {"__init__.py", "__main__.py"}:
                continue
            module = str(path.relative_to(root))
            parts = path.relative_to(root / package).parts
            named = f"{parts[-2]}/" if len(parts) >= 3 else path.name
            holds = [text for paths, text in rows if any(p.endswith("/") and module.startswith(p) for p in paths)]
            if not any(module in paths for paths, _ in rows) and not any(f"`{named}`" in text for text in holds):
                missing.append(module)
    assert not missing, f"README layout does not name: {missing}"
