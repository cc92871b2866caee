"""Promote-to-served (part of the reload section): from moving the alias in the registry to the server serving
the new version, with the monitor running at its default poll interval, as an operator promotes.

The time is the monitor's wait for its next poll, plus resolve, download, the verifier process, the load and the
swap in the server. Each promotion follows the previous one as soon as it is served, so the wait for the poll is
close to a whole interval (the worst case), not half of one on average. The target is the issue's: the slowest
promotion within the monitor's poll interval plus 3 s. The alias is put back, since the bench registry is reused.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.processes import python_env
from bench.report import SectionResult, Target
from tabserve.control.v1 import control_pb2
from tabserve_client import ControlClient
from tabserve_demo.processes import MonitorProcess
from tabserve_monitor.settings import MonitorSettings

log = logging.getLogger(__name__)

ALIAS = "production"
SLACK_SECONDS = 3.0  # the allowance beyond one poll interval
GENERATOR = "MLflow alias move + monitor"


def run(*, tracking_uri: str, model_name: str, versions: tuple[str, ...], public_target: str, control_target: str,
        workdir: Path, quick: bool) -> dict[str, Any]:
    """Move the alias to the other version and back (4 promotions; 1 with `quick`) and time each.

    A section dict (bench/report.py) with the raw seconds under the key `promote_to_served` as well."""
    result = SectionResult()
    from mlflow import MlflowClient

    poll = float(MonitorSettings().poll_interval_seconds)
    registry = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    original = str(registry.get_model_version_by_alias(model_name, ALIAS).version)
    control = ControlClient(control_target, timeout=10)
    settings = {"tracking_uri": tracking_uri, "model_name": model_name, "alias": ALIAS,
                "public_address": public_target, "control_address": control_target,
                "metrics_address": "127.0.0.1:0", "poll_interval_seconds": poll}
    seconds: list[float] = []
    try:
        with MonitorProcess(settings, {"PYTHONPATH": python_env()["PYTHONPATH"]},
                            log_file=workdir / "promote-monitor.log") as monitor:
            _wait_polled(monitor.metrics_port, 60.0 + poll)  # its start-up is no part of a promotion
            _wait_served(control, original, 60.0 + poll)
            for i in range(1 if quick else 4):
                version = next(v for v in versions if v != original) if i % 2 == 0 else original
                started = time.monotonic()
                registry.set_registered_model_alias(model_name, ALIAS, version)
                _wait_served(control, version, 60.0 + poll)
                seconds.append(time.monotonic() - started)
                log.info("promote-to-served %d: version %s in %.2f s", i + 1, version, seconds[-1])
    finally:
        registry.set_registered_model_alias(model_name, ALIAS, original)
        control.close()
    slowest = max(seconds)
    result.add("promote-to-served (alias moved to new version served), mean", "project", GENERATOR,
               sum(seconds) / len(seconds), "s", samples=len(seconds))
    result.add("promote-to-served, slowest", "project", GENERATOR, slowest, "s", samples=len(seconds))
    result.add("monitor poll interval", "monitor", GENERATOR, poll, "s")
    result.targets.append(Target(
        "promote-to-served within poll interval + 3 s", slowest / (poll + SLACK_SECONDS), 1.0, True,
        f"slowest of {len(seconds)} promotions / (poll interval {poll:g} s + {SLACK_SECONDS:g} s)",
        detail=f"slowest {slowest:.2f} s, all {[round(s, 2) for s in seconds]}",
    ))
    return {**result.as_dict(), "promote_to_served": {
        "seconds": [round(s, 3) for s in seconds], "poll_interval_seconds": poll, "limit_seconds": poll + SLACK_SECONDS,
    }}


def _wait_polled(metrics_port: int, timeout: float) -> None:
    """Until the monitor has polled the registry successfully once (tabserve_monitor_polls_total)."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        if any(s.name == "tabserve_monitor_polls_total" and s.labels.get("result") == "success" and s.value >= 1
               for family in text_string_to_metric_families(text) for s in family.samples):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the monitor did not poll the registry successfully within {timeout:g} s")


def _wait_served(control: ControlClient, version: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = control.status()
        if status.serving.version == version and status.load_state == control_pb2.LOAD_STATE_IDLE:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"version {version} not served {timeout:g} s after the alias moved: "
                               f"{status.last_error or 'no error'}")
        time.sleep(0.02)
