"""deploy/ rendered by kubectl kustomize: every core manifest valid for Kubernetes 1.37 (kubernetes-validate,
strict: unknown fields fail), and the properties the pod relies on (restricted security context, probes,
termination grace, Services, disruption budget, autoscaler)."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy_manifests import (
    BASE,
    EXAMPLE,
    KUBERNETES_VERSION,
    Manifest,
    containers,
    named,
    one,
    pod_spec,
    render,
)

# Custom resources: checked against their CRDs' schemas in tests/test_deploy_monitoring.py.
CUSTOM = {"monitoring.coreos.com/v1", "cert-manager.io/v1"}


@pytest.fixture(scope="module", params=[BASE, EXAMPLE], ids=["base", "example"])
def manifests(request: pytest.FixtureRequest) -> list[Manifest]:
    return render(request.param)


@pytest.fixture(scope="module")
def base() -> list[Manifest]:
    return render(BASE)


def _validate(manifest: Manifest) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_every_core_manifest_is_valid_for_kubernetes(manifests: list[Manifest]) -> None:
    core = [m for m in manifests if m["apiVersion"] not in CUSTOM]
    kinds = {m["kind"] for m in core}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "NetworkPolicy"} <= kinds
    for manifest in core:
        _validate(manifest)


def test_validation_refuses_an_unknown_field_and_a_wrong_type(base: list[Manifest]) -> None:
    # The check above would pass anything if the validator were lenient: prove it is not.
    deployment = copy.deepcopy(one(base, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    deployment = copy.deepcopy(one(base, "Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


def test_server_and_monitor_share_one_pod(base: list[Manifest]) -> None:
    assert set(containers(base)) == {"server", "monitor"}
    assert containers(base)["server"]["command"] == ["tabserve-server"]
    assert containers(base)["monitor"]["command"] == ["tabserve-monitor"]


def test_restricted_security_context(base: list[Manifest]) -> None:
    pod = pod_spec(base)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for name, container in containers(base).items():
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 10001, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert {"requests", "limits"} <= set(container["resources"]), name


def test_writable_paths_are_volumes(base: list[Manifest]) -> None:
    # The root filesystem is read-only: the cache, the decision log and /tmp must be volumes (the image's contract).
    mounts = {m["mountPath"]: m for m in containers(base)["server"]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(base)["volumes"]}
    for path in ("/var/cache/tabserve", "/var/lib/tabserve/decisions", "/tmp"):
        assert path in mounts and not mounts[path].get("readOnly"), path
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    for path, secret in (("/etc/tabserve/tls", "tabserve-tls"), ("/etc/tabserve/control", "tabserve-control")):
        assert mounts[path]["readOnly"] is True and "subPath" not in mounts[path], path
        assert volumes[mounts[path]["name"]]["secret"]["secretName"] == secret


def test_grpc_probes_and_termination_grace(base: list[Manifest]) -> None:
    server = containers(base)["server"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(server[probe]["grpc"]) <= {"port", "service"}, probe
    grace = float(named(base, "ConfigMap", "tabserve-server")["data"]["TABSERVE_SERVER_SHUTDOWN_GRACE_SECONDS"])
    assert pod_spec(base)["terminationGracePeriodSeconds"] > grace


def test_services_select_the_pod(base: list[Manifest]) -> None:
    labels = one(base, "Deployment")["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in base if s["kind"] == "Service"}
    assert services["tabserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["tabserve"]["spec"].get("clusterIP") != "None"
    selectors = [s["spec"]["selector"] for s in services.values()]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selectors.append(one(base, kind)["spec"].get("selector", one(base, kind)["spec"].get("podSelector", {}))
                         .get("matchLabels"))
    for selector in selectors:
        assert selector and selector.items() <= labels.items(), selector


def test_autoscaler_targets_the_deployment_on_cpu_and_in_flight(base: list[Manifest]) -> None:
    hpa = one(base, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tabserve"}
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "tabserve_server_requests_in_flight"
    assert hpa["minReplicas"] >= 2


def test_example_overlay_sets_namespace_and_image(tmp_path: Path) -> None:
    example = render(EXAMPLE)
    assert {m["metadata"].get("namespace") for m in example} == {"tabserve"}
    images = {c["image"] for c in containers(example).values()}
    assert len(images) == 1 and not images.pop().startswith("localhost/")
