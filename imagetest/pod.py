"""deploy/'s rendered Deployment made playable by `podman kube play` on this machine, and the podman calls of
`make image-test`.

The podman patch (`podman_manifests`): one replica on the host network (no port mappings), the local image never
pulled, every listen address on 127.0.0.1 at free ports, the registry on loopback, the Secrets and the cache and
decision-log volumes as host directories. Everything else of the Deployment (commands, settings, the security
context with its read-only root filesystem and uid 10001, the grace period) is played as rendered.
"""

from __future__ import annotations

import copy
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy_manifests import BASE, Manifest, render, walk
from tools.image import podman, podman_env

POD = "tabserve-pod-0"  # podman 4.3 names a Deployment's pod <name>-pod-0, its containers <pod>-<container>
SERVER_CONTAINER = f"{POD}-server"
MONITOR_CONTAINER = f"{POD}-monitor"
# Kept from the rendered Secret and emptyDir volumes of the same names: host directories instead.
HOST_VOLUMES = ("tls", "control-token", "cache", "decisions")
# The optional MLflow credentials Secret: this registry needs none.
DROPPED_VOLUMES = ("mlflow-credentials",)


@dataclass(frozen=True)
class Ports:
    """Loopback ports of the played pod (host network: the manifests' fixed ports could be taken here)."""

    public: int
    health: int
    control: int
    metrics: int
    monitor_metrics: int

    def remap(self) -> dict[int, int]:
        """The manifests' container ports -> ours."""
        return {50051: self.public, 50052: self.health, 9100: self.metrics, 9101: self.monitor_metrics}


def settings_overrides(ports: Ports, tracking_uri: str) -> dict[str, dict[str, str]]:
    """The ConfigMaps' values this machine needs (by ConfigMap name prefix): loopback addresses, our registry."""
    return {
        "tabserve-server": {
            "TABSERVE_SERVER_TRACKING_URI": tracking_uri,
            "TABSERVE_SERVER_ADDRESS": f"127.0.0.1:{ports.public}",
            "TABSERVE_SERVER_HEALTH_ADDRESS": f"127.0.0.1:{ports.health}",
            "TABSERVE_SERVER_CONTROL_ADDRESS": f"127.0.0.1:{ports.control}",
            "TABSERVE_SERVER_METRICS_ADDRESS": f"127.0.0.1:{ports.metrics}",
        },
        "tabserve-monitor": {
            "TABSERVE_MONITOR_TRACKING_URI": tracking_uri,
            "TABSERVE_MONITOR_CONTROL_ADDRESS": f"127.0.0.1:{ports.control}",
            "TABSERVE_MONITOR_PUBLIC_ADDRESS": f"127.0.0.1:{ports.public}",
            "TABSERVE_MONITOR_METRICS_ADDRESS": f"127.0.0.1:{ports.monitor_metrics}",
            "TABSERVE_MONITOR_POLL_INTERVAL_SECONDS": "1",
        },
    }


def podman_manifests(
    rendered: list[Manifest], ports: Ports, tracking_uri: str, host_dirs: dict[str, Path],
    extra_settings: dict[str, dict[str, str]] | None = None,
) -> list[Manifest]:
    """The ConfigMaps and the Deployment of `rendered`, patched for podman on this machine (see the docstring)."""
    overrides = settings_overrides(ports, tracking_uri)
    for prefix, values in (extra_settings or {}).items():
        overrides[prefix].update(values)
    played: list[Manifest] = []
    for manifest in copy.deepcopy(rendered):
        if manifest["kind"] == "ConfigMap":
            prefix = next(p for p in overrides if manifest["metadata"]["name"].startswith(p))
            manifest["data"].update(overrides[prefix])
        elif manifest["kind"] == "Deployment":
            _patch_deployment(manifest, ports, host_dirs)
        else:
            continue  # Services, autoscaler, budget, policies, monitoring: nothing podman plays
        played.append(manifest)
    return played


def _patch_deployment(deployment: Manifest, ports: Ports, host_dirs: dict[str, Path]) -> None:
    deployment["spec"]["replicas"] = 1
    pod = deployment["spec"]["template"]["spec"]
    pod["hostNetwork"] = True
    remap = ports.remap()
    for node in walk(pod):
        if isinstance(node, dict):
            for key in ("port", "containerPort"):
                if node.get(key) in remap:
                    node[key] = remap[node[key]]
    for container in pod["containers"]:
        container["imagePullPolicy"] = "Never"
        # podman publishes container ports, which the host network refuses (and does not need)
        container.pop("ports", None)
        container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] not in DROPPED_VOLUMES]
    pod["volumes"] = [
        {"name": v["name"], "hostPath": {"path": str(host_dirs[v["name"]]), "type": "Directory"}}
        if v["name"] in HOST_VOLUMES else v
        for v in pod["volumes"] if v["name"] not in DROPPED_VOLUMES
    ]


def write_kube_file(path: Path, manifests: list[Manifest]) -> Path:
    path.write_text(yaml.safe_dump_all(manifests, sort_keys=False))
    return path


def rendered_base() -> list[Manifest]:
    """deploy/base as `kubectl kustomize` renders it (the venv's kubectl, as deploy's tests use)."""
    return render(BASE)


def run_podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman with the project's containers.conf; output captured."""
    done = subprocess.run([podman(), *args], env=podman_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def inspect(container: str, template: str) -> Any:
    return run_podman("inspect", "--format", template, container).stdout.strip()
