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
