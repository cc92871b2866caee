"""A real Prometheus (Debian's `prometheus` package) scrapes a real server and a real monitor process.

Everything runs on loopback: the session's SQLite registry (read only here), the server and the monitor as child
processes, and Prometheus with a 1 s scrape and rule-evaluation interval, its own config and TSDB under
tmp, loading monitor/alerts/tabserve.rules.yml. All checks go through Prometheus' HTTP API, with bounded
polling, so they prove the names in the alert rules and in the Grafana dashboard (dashboards/tabserve.json) match
what the processes actually export: every panel's query, its dashboard variables substituted, must return series,
and every metric both processes export must be on a panel or in DASHBOARD_EXCLUDED, with the reason.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from tabserve_client import ScoringClient
from tabserve_demo.applicants import make_applicants
from tabserve_demo.processes import MonitorProcess, ServerProcess, free_port
from tests.support import MODEL_NAME, monitor_settings, required_command, server_settings, wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitor" / "alerts" / "tabserve.rules.yml"
DASHBOARD = ROOT / "dashboards" / "tabserve.json"
# Grafana's own variables, as Grafana would fill them for this 1 s scrape interval and a short range.
GRAFANA_BUILTINS = {"$__rate_interval": "10s", "$__interval": "5s", "$__range": "1h"}
# Exported metrics deliberately on no panel, each with its reason. A new metric lands on a panel or here.
DASHBOARD_EXCLUDED = {
    # No samples unless allowed_callers is set (mutual TLS); its label values are the deployment's callers.
    "tabserve_server_caller_requests_total": "per-caller counts exist only with an allow-list",
    # The monitor's Python runtime (prometheus_client's default collectors): memory and CPU are on a panel,
    # the rest is generic process detail that says nothing about serving.
    "process_virtual_memory_bytes": "runtime detail",
    "process_start_time_seconds": "runtime detail",
    "process_open_fds": "runtime detail",
    "process_max_fds": "runtime detail",
    "python_gc_objects_collected_total": "runtime detail",
    "python_gc_objects_uncollectable_total": "runtime detail",
    "python_gc_collections_total": "runtime detail",
    "python_info": "runtime detail",
}
SERVER_JOB = "tabserve-server"
MONITOR_JOB = "tabserve-monitor"
SCORE_METHOD = "tabserve.scoring.v1.Scoring/Score"
SCORE_CALLS = 3
TIMEOUT = 45.0  # each bounded wait; generous, the machine is shared

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return required_command("prometheus", "prometheus")


class Prometheus:
    """A Prometheus child process on a free loopback port, stopped by its own pid."""

    def __init__(self, binary: str, config: Path, data_dir: Path, log_file: Path) -> None:
        self._log = log_file.open("w")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.log_file = log_file

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as resp:
            body = json.loads(resp.read().decode())
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_file.read_text()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def write_config(path: Path, server_metrics_port: int, monitor_metrics_port: int) -> None:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": SERVER_JOB, "static_configs": [{"targets": [f"127.0.0.1:{server_metrics_port}"]}]},
            {"job_name": MONITOR_JOB, "static_configs": [{"targets": [f"127.0.0.1:{monitor_metrics_port}"]}]},
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


class Stack(NamedTuple):
    prometheus: Prometheus
    server: ServerProcess
    monitor: MonitorProcess
    version: str  # the version behind the production alias


@pytest.fixture(scope="module")
def stack(prometheus_binary: str, tracking_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server, monitor and Prometheus on the session registry, started in that order and stopped in reverse."""
    tmp = tmp_path_factory.mktemp("prometheus-scrape")
    registry_uri = tracking_uri
    version = str(MlflowClient(registry_uri, registry_uri).get_model_version_by_alias(MODEL_NAME, "production").version)
    with ServerProcess(server_settings(registry_uri, tmp / "cache")) as server:
        with ScoringClient(server.target, timeout=10) as client:
            wait_for(lambda: client.health() == "SERVING", timeout=TIMEOUT, interval=0.2, what="server SERVING")
            rows = make_applicants(4, seed=99)[0]
            for _ in range(SCORE_CALLS):
                assert client.score(rows).model_version == version
        with MonitorProcess(monitor_settings(registry_uri, server.target, server.control_target)) as monitor:
            config = tmp / "prometheus.yml"
            write_config(config, server.metrics_port, monitor.metrics_port)
            prometheus = Prometheus(prometheus_binary, config, tmp / "tsdb", tmp / "prometheus.log")
            try:
                wait_for(prometheus.ready, timeout=TIMEOUT, interval=0.2, what="prometheus /-/ready")
                yield Stack(prometheus, server, monitor, version)
            finally:
                prometheus.stop()
                print(f"--- prometheus log (tail)\n{prometheus.log()[-1500:]}")
            assert monitor.terminate(15) == 0, monitor.stderr()[-3000:]
        assert server.terminate(30) == 0, server.stderr()[-3000:]


def _value(prometheus: Prometheus, expr: str) -> float | None:
    """The value of a query that yields one sample, None when it yields none."""
    result = prometheus.query(expr)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def test_both_targets_up(stack: Stack) -> None:
    prometheus, server, monitor, _ = stack

    def targets_up() -> dict[str, dict[str, Any]] | None:
        active = prometheus.get("/api/v1/targets", state="active")["activeTargets"]
        by_job = {t["labels"]["job"]: t for t in active}
        return by_job if all(by_job.get(job, {}).get("health") == "up" for job in (SERVER_JOB, MONITOR_JOB)) else None

    by_job = wait_for(targets_up, timeout=TIMEOUT, interval=0.5, what="both targets up in /api/v1/targets")
    assert by_job[SERVER_JOB]["labels"]["instance"] == f"127.0.0.1:{server.metrics_port}"
    assert by_job[MONITOR_JOB]["labels"]["instance"] == f"127.0.0.1:{monitor.metrics_port}"
    assert all(not by_job[job]["lastError"] for job in (SERVER_JOB, MONITOR_JOB)), by_job
    for job in (SERVER_JOB, MONITOR_JOB):
        assert _value(prometheus, f'up{{job="{job}"}}') == 1.0


def test_server_series(stack: Stack) -> None:
    prometheus, _, _, version = stack
    requests = f'sum(tabserve_server_requests_total{{job="{SERVER_JOB}",method="{SCORE_METHOD}",code="OK"}})'
    wait_for(lambda: (_value(prometheus, requests) or 0) >= SCORE_CALLS, timeout=TIMEOUT, interval=0.5,
             what=f"{SCORE_CALLS} OK Score calls in tabserve_server_requests_total")
    info = wait_for(lambda: prometheus.query("tabserve_server_model_info"), timeout=TIMEOUT, interval=0.5,
                    what="tabserve_server_model_info")
    assert len(info) == 1, info
    labels = info[0]["metric"]
    assert (labels["model_name"], labels["model_version"], labels["loaded_from"]) == (MODEL_NAME, version, "registry")
    assert float(info[0]["value"][1]) == 1.0
    assert _value(prometheus, "tabserve_server_serving") == 1.0
    assert _value(prometheus, "tabserve_server_model_load_failing") == 0.0
    assert (_value(prometheus, "tabserve_server_rows_scored_total") or 0) >= 4 * SCORE_CALLS
    assert (_value(prometheus, "tabserve_server_prediction_score_count") or 0) >= 4 * SCORE_CALLS
    assert (_value(prometheus, f'tabserve_server_request_duration_seconds_count{{method="{SCORE_METHOD}"}}')
            or 0) >= SCORE_CALLS


def test_monitor_series(stack: Stack) -> None:
    prometheus, _, _, version = stack
    converged = (
        "tabserve_monitor_registry_up == 1 and tabserve_monitor_server_up == 1 and tabserve_monitor_control_up == 1"
        " and tabserve_monitor_served_version == tabserve_monitor_target_version"
    )
    wait_for(lambda: prometheus.query(converged), timeout=TIMEOUT, interval=0.5,
             what="monitor: registry, server and control up, served == target")
    assert _value(prometheus, "tabserve_monitor_target_version") == float(version)
    assert _value(prometheus, "tabserve_monitor_served_version") == float(version)
    assert _value(prometheus, "tabserve_monitor_served_version_lag_seconds") == 0.0
    # The monitor's view and the server's own agree on the served version.
    served = prometheus.query(f'tabserve_server_model_info{{model_version="{version}"}}')
    assert served, f"the server does not export model_version {version}"
    assert (_value(prometheus, 'tabserve_monitor_polls_total{result="success"}') or 0) >= 1
    assert _value(prometheus, 'tabserve_monitor_reloads_total{result="failure"}') == 0.0
    for flag in ("target_ambiguous", "alias_dangling", "registered_model_missing", "target_not_ready"):
        assert _value(prometheus, f"tabserve_monitor_{flag}") == 0.0, flag
    assert (_value(prometheus, "tabserve_monitor_last_successful_poll_timestamp_seconds") or 0) > time.time() - 60
    assert (_value(prometheus, "tabserve_monitor_poll_duration_seconds_count") or 0) >= 1


def test_rules_loaded_and_healthy(stack: Stack) -> None:
    prometheus = stack.prometheus
    expected = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}

    def evaluated_rules() -> dict[str, dict[str, Any]] | None:
        groups = prometheus.get("/api/v1/rules")["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        return rules if set(rules) == expected and all(r["health"] != "unknown" for r in rules.values()) else None

    rules = wait_for(evaluated_rules, timeout=TIMEOUT, interval=0.5, what="every rule loaded and evaluated")
    broken = {name: (r["health"], r.get("lastError")) for name, r in rules.items() if r["health"] != "ok"}
    assert not broken, broken

    # Before the first scrape `absent(up{...})` is true, so the target-down alerts may be pending at start;
    # with both targets scraped they must go (and stay) inactive.
    down_alerts = ("TabserveServerDown", "TabserveMonitorDown")

    def down_alerts_inactive() -> bool:
        rules = {r["name"]: r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]}
        return all(rules[name]["state"] == "inactive" for name in down_alerts)

    wait_for(down_alerts_inactive, timeout=TIMEOUT, interval=0.5, what="target-down alerts inactive")
    firing = [a for a in prometheus.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing
    assert not prometheus.query('ALERTS{alertname=~"TabserveServerDown|TabserveMonitorDown"}')


# --- the Grafana dashboard ------------------------------------------------------------------------------------


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, with the dashboard's variables at their defaults."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "custom":
            values[f"${variable['name']}"] = variable["current"]["value"]
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):  # $__range before a shorter prefix of it
                expr = expr.replace(name, values[name])
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know: {expr}"
            queries.append((panel["title"], expr))
    return queries


def _exported(stack: Stack) -> set[str]:
    """Every metric name both processes expose (counters with `_total`, histograms by their base name)."""
    names = set()
    for port in (stack.server.metrics_port, stack.monitor.metrics_port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created"):  # prometheus_client's creation time of a counter or histogram
                continue
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:tabserve|process|python)_[a-z0-9_]+", expr))


def test_every_dashboard_query_returns_exported_series(stack: Stack) -> None:
    prometheus = stack.prometheus
    queries = _dashboard_queries()
    assert len(queries) >= 30, queries
    exported = _exported(stack)
    for title, expr in queries:
        # Padding would make a query answer whether or not the metric exists.
        assert not re.search(r"\b(vector|absent|absent_over_time|scalar)\s*\(|\bor\b", expr), (title, expr)
        used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in _names_in(expr)}
        assert used and used <= exported, (title, used - exported)

    def empty() -> list[tuple[str, str]]:
        return [(title, expr) for title, expr in queries if not prometheus.query(expr)]

    missing = empty()
    deadline = time.monotonic() + TIMEOUT
    while missing and time.monotonic() < deadline:  # rates need two scrapes; the monitor polls every second
        time.sleep(1.0)
        missing = empty()
    assert not missing, f"panels whose query matched nothing: {missing}"


def test_every_exported_metric_is_on_the_dashboard(stack: Stack) -> None:
    on_panels = set().union(*(_names_in(expr) for _, expr in _dashboard_queries()))
    on_panels |= {re.sub(r"_(bucket|sum|count)$", "", name) for name in on_panels}
    exported = _exported(stack)
    forgotten = sorted(exported - on_panels - set(DASHBOARD_EXCLUDED))
    assert not forgotten, f"exported but on no panel of {DASHBOARD.name} and not in DASHBOARD_EXCLUDED: {forgotten}"
    both = sorted(on_panels & set(DASHBOARD_EXCLUDED))
    assert not both, f"on a panel and excluded: {both}"
