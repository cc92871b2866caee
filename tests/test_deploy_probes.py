"""The pod of deploy/base run as real processes on loopback (no container): the server and the monitor with the
manifests' variables, their mounted files at temporary paths and their listeners moved to free ports. The
kubelet's probes find what they ask for there: grpc.health.v1 with the probe's service on the plaintext health
port (the public port speaks TLS only), and the monitor's liveness path on its metrics port."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tabserve_common.address import split_address
from tabserve_demo.processes import MonitorProcess, ServerProcess
from tests.certs import Issued, make_pki
from tests.deploy_manifests import BASE, Manifest, containers, environment, loaded, port, render

# What the Secrets hold in the test (the pod mounts tabserve-tls, tabserve-control, tabserve-mlflow).
TOKEN = "deploy-test-token"


@dataclass
class Pod:
    manifests: list[Manifest]
    server: ServerProcess
    monitor: MonitorProcess
    # The manifests' port of each server listener → where the test's server listens.
    server_ports: dict[int, int]


def _mounts(container: Manifest, directory: Path) -> dict[str, Path]:
    """Each mount path of the container → a directory of its own under `directory`."""
    mounts = {}
    for mount in container["volumeMounts"]:
        local = directory / container["name"] / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        mounts[mount["mountPath"]] = local
    return mounts


def _in_pod(value: str, mounts: dict[str, Path]) -> str:
    """`value` with the longest mount path it starts with replaced by that mount's directory."""
    for path in sorted(mounts, key=len, reverse=True):
        if value == path or value.startswith(path + "/"):
            return str(mounts[path]) + value[len(path):]
    return value


def _secrets(mounts: dict[str, Path], tls: Issued, ca_file: Path) -> None:
    shutil.copy(tls.cert_file, mounts["/etc/tabserve/tls"] / "tls.crt")
    shutil.copy(tls.key_file, mounts["/etc/tabserve/tls"] / "tls.key")
    shutil.copy(ca_file, mounts["/etc/tabserve/tls"] / "ca.crt")
    (mounts["/etc/tabserve/control"] / "token").write_text(TOKEN + "\n")


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    directory = tmp_path_factory.mktemp("pod")
    pki = make_pki(directory / "pki")
    manifests = render(BASE)
    by_name = containers(manifests)
    server_mounts, monitor_mounts = _mounts(by_name["server"], directory), _mounts(by_name["monitor"], directory)
    # The pod has one certificate for both usages; the test CA issues one per usage.
    _secrets(server_mounts, pki.server, pki.ca.cert_file)
    _secrets(monitor_mounts, pki.allowed, pki.ca.cert_file)
    registry = f"sqlite:///{directory / 'registry.db'}"  # an empty registry: the server stays NOT_SERVING

    env = {k: _in_pod(v, server_mounts) for k, v in environment(manifests, by_name["server"]).items()}
    for name in ("ADDRESS", "HEALTH_ADDRESS", "CONTROL_ADDRESS", "METRICS_ADDRESS"):
        env[f"TABSERVE_SERVER_{name}"] = "127.0.0.1:0"
    env["TABSERVE_SERVER_TRACKING_URI"] = registry
    server_settings = loaded(manifests, by_name["server"])
    with ServerProcess({}, env, log_file=directory / "server.log") as server:
        server_ports = {
            port(server_settings.address): server.public_port,
            port(server_settings.health_address): server.health_port,
            port(server_settings.control_address): server.control_port,
            port(server_settings.metrics_address): server.metrics_port,
        }
        env = {k: _in_pod(v, monitor_mounts) for k, v in environment(manifests, by_name["monitor"]).items()}
        for name in ("TABSERVE_MONITOR_CONTROL_ADDRESS", "TABSERVE_MONITOR_PUBLIC_ADDRESS"):
            host, manifest_port = split_address(env[name])
            env[name] = f"{host}:{server_ports[manifest_port]}"
        env["TABSERVE_MONITOR_METRICS_ADDRESS"] = "127.0.0.1:0"
        env["TABSERVE_MONITOR_TRACKING_URI"] = registry
        env["TABSERVE_MONITOR_TLS_SERVER_NAME"] = "localhost"  # the test certificate's name
        with MonitorProcess({}, env, log_file=directory / "monitor.log") as monitor:
            yield Pod(manifests, server, monitor, server_ports)


def _check(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(response.status)


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_grpc_probe_finds_its_service_on_the_plaintext_health_port(pod: Pod, probe: str) -> None:
    spec = containers(pod.manifests)["server"][probe]["grpc"]
    target = f"127.0.0.1:{pod.server_ports[spec['port']]}"
    # The registry is empty, so no model is loaded: the probe's service exists and says NOT_SERVING.
    assert _check(target, spec.get("service", "")) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        _check(target, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_public_port_refuses_a_plaintext_probe(pod: Pod) -> None:
    grpc_port = containers(pod.manifests)["server"]["ports"][0]
    assert grpc_port["name"] == "grpc"
    with pytest.raises(grpc.RpcError) as refused:
        _check(f"127.0.0.1:{pod.server_ports[grpc_port['containerPort']]}", "")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_monitor_liveness_path_answers(pod: Pod) -> None:
    http = containers(pod.manifests)["monitor"]["livenessProbe"]["httpGet"]
    with urllib.request.urlopen(f"http://127.0.0.1:{pod.monitor.metrics_port}{http['path']}", timeout=10) as reply:
        assert reply.status == 200
        assert b"tabserve_monitor_" in reply.read()
