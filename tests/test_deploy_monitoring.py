"""deploy/'s custom resources: PodMonitor, PrometheusRule and Certificate valid against models generated from the
Prometheus Operator's and cert-manager's CRD schemas (unknown fields included); the PrometheusRule carries exactly
monitor/alerts/ and passes promtool; the scrape jobs are the ones the rules name; the certificate is the one the
pod mounts, for the names its clients and its monitor use; the autoscaler's metric is one the server exports; the
dashboard ConfigMap holds dashboards/tabserve.json."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from cloudcoil.models.cert_manager import v1 as cert_manager
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator
from prometheus_client import CollectorRegistry

from tabserve_server.metrics import ServerMetrics
from tests.deploy_manifests import BASE, EXAMPLE, Manifest, by_name, containers, named, one, pod_spec, render
from tests.support import required_command
from tools.gen_alert_rules import main as gen_alert_rules

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitor" / "alerts" / "tabserve.rules.yml"
DASHBOARD = ROOT / "dashboards" / "tabserve.json"
MODELS: dict[str, type[Any]] = {
    "PodMonitor": prometheus_operator.PodMonitor,
    "PrometheusRule": prometheus_operator.PrometheusRule,
    "Certificate": cert_manager.Certificate,
    "Issuer": cert_manager.Issuer,
}


@pytest.fixture(scope="module")
def base() -> list[Manifest]:
    return render(BASE)


@pytest.fixture(scope="module")
def example() -> list[Manifest]:
    return render(EXAMPLE)


def check_against_crd(manifest: Manifest) -> None:
    """Types, enums, patterns and required fields by the CRD's model; an unknown field is what the model drops."""
    model = MODELS[manifest["kind"]].model_validate(manifest)
    assert model.model_dump(mode="json", by_alias=True, exclude_unset=True) == manifest, (
        f"{manifest['kind']} has fields its CRD does not define"
    )


def test_custom_resources_match_their_crds(base: list[Manifest], example: list[Manifest]) -> None:
    custom = [m for m in base + example if m["kind"] in MODELS]
    assert sorted({m["kind"] for m in custom}) == sorted(MODELS)
    for manifest in custom:
        check_against_crd(manifest)


@pytest.mark.parametrize(
    ("kind", "name", "path", "value"),
    [
        ("PodMonitor", "tabserve", ["spec", "podMetricsEndpoints", 0, "interval"], "15 seconds"),
        ("PodMonitor", "tabserve", ["spec", "podMetricsEndpoints", 0, "relabelings", 0, "action"], "set"),
        ("PodMonitor", "tabserve", ["spec", "podMetricsEndpoints", 0, "scrapePort"], "metrics"),
        ("PrometheusRule", "tabserve", ["spec", "groups", 0, "rules", 0, "for"], "2 minutes"),
        ("Certificate", "tabserve", ["spec", "privateKey", "algorithm"], "DSA"),
        ("Certificate", "tabserve", ["spec", "usages", 0], "serverauth"),
        ("Certificate", "tabserve", ["spec", "secretNam"], "tabserve-tls"),
        ("Issuer", "tabserve-ca", ["spec", "ca"], {"secret": "tabserve-ca"}),
    ],
)
def test_a_custom_resource_off_its_crd_fails(
    example: list[Manifest], kind: str, name: str, path: list[Any], value: Any
) -> None:
    manifest = copy.deepcopy(by_name(example, kind, name))
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises((AssertionError, pydantic.ValidationError)):
        check_against_crd(manifest)


def test_prometheus_rule_is_monitor_alerts(base: list[Manifest], tmp_path: Path) -> None:
    groups = one(base, "PrometheusRule")["spec"]["groups"]
    assert groups == yaml.safe_load(RULES.read_text())["groups"]
    extracted = tmp_path / "groups.yml"
    extracted.write_text(yaml.safe_dump({"groups": groups}))
    promtool = required_command("promtool", "prometheus")
    done = subprocess.run([promtool, "check", "rules", str(extracted)], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"promtool check rules failed:\n{done.stdout}\n{done.stderr}"


def test_an_overlay_points_the_alerts_at_another_runbook(tmp_path: Path) -> None:
    # The recipe of docs/deployment.md: `make alerts ... ALERTS_OUT=<overlay>/alerts`, then patch the base's rule.
    url = "https://wiki.example.com/ml/tabserve/runbook"
    shutil.copytree(BASE, tmp_path / "base")
    overlay = tmp_path / "overlay"
    checked_in = (BASE / "prometheusrule.yaml").read_text()
    assert gen_alert_rules(["--runbook-url", url, "--out", str(overlay / "alerts")]) == 0
    (overlay / "kustomization.yaml").write_text("resources: [../base]\npatches: [{path: alerts/prometheusrule.yaml}]\n")
    groups = one(render(overlay), "PrometheusRule")["spec"]["groups"]
    assert groups == yaml.safe_load((overlay / "alerts" / RULES.name).read_text())["groups"]
    urls = [rule["annotations"]["runbook_url"] for group in groups for rule in group["rules"]]
    assert urls and all(u.startswith(url + "#") for u in urls)
    # Written beside the overlay's rules, not over the checked-in one.
    assert (BASE / "prometheusrule.yaml").read_text() == checked_in


def test_scrape_jobs_are_the_jobs_the_rules_name(base: list[Manifest]) -> None:
    endpoints = one(base, "PodMonitor")["spec"]["podMetricsEndpoints"]
    jobs = {}
    for endpoint in endpoints:
        (relabel,) = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        jobs[endpoint["port"]] = relabel["replacement"]
    assert jobs == {"metrics": "tabserve-server", "monitor-metrics": "tabserve-monitor"}
    named_in_rules = set(re.findall(r'job="([^"]+)"', RULES.read_text()))
    assert named_in_rules and named_in_rules <= set(jobs.values())


def test_certificate_is_the_mounted_secret_for_the_names_in_use(example: list[Manifest]) -> None:
    certificate = by_name(example, "Certificate", "tabserve")["spec"]
    volumes = {v["name"]: v for v in pod_spec(example)["volumes"]}
    assert certificate["secretName"] == volumes["tls"]["secret"]["secretName"]
    assert {"server auth", "client auth"} <= set(certificate["usages"])  # the monitor's canary is a mTLS client
    names = set(certificate["dnsNames"])
    namespace = one(example, "Deployment")["metadata"]["namespace"]
    for service in (m for m in example if m["kind"] == "Service"):
        assert f"{service['metadata']['name']}.{namespace}.svc" in names, service["metadata"]["name"]
    monitor_env = named(example, "ConfigMap", "tabserve-monitor")["data"]
    assert monitor_env["TABSERVE_MONITOR_TLS_SERVER_NAME"] in names
    # A CA issuer puts ca.crt in the Secret: the server's client CA and the monitor's trust root.
    assert "ca" in by_name(example, "Issuer", certificate["issuerRef"]["name"])["spec"]
    client = by_name(example, "Certificate", "tabserve-first-client")["spec"]
    assert client["issuerRef"] == certificate["issuerRef"] and "client auth" in client["usages"]


def test_autoscaler_metric_is_a_server_gauge(base: list[Manifest]) -> None:
    hpa = one(base, "HorizontalPodAutoscaler")["spec"]
    (pods,) = [m["pods"] for m in hpa["metrics"] if m["type"] == "Pods"]
    registry = CollectorRegistry()
    ServerMetrics(registry)
    gauges = {family.name for family in registry.collect() if family.type == "gauge"}
    assert pods["metric"]["name"] in gauges
    # At most the server's threads per pod: a target above max_workers could never be reached.
    max_workers = int(named(base, "ConfigMap", "tabserve-server")["data"]["TABSERVE_SERVER_MAX_WORKERS"])
    assert 0 < float(pods["target"]["averageValue"]) < max_workers
    assert containers(base)["server"]["resources"]["requests"]["cpu"]  # Utilization is relative to the request


def test_the_dashboard_configmap_holds_the_dashboard(example: list[Manifest]) -> None:
    dashboard = named(example, "ConfigMap", "tabserve-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    assert dashboard["data"] == {"tabserve.json": DASHBOARD.read_text()}
