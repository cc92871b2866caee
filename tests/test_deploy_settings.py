"""Every environment variable and flag in deploy/'s containers is a real setting of that container's process (parsed
through its settings class, values included), and every port the manifests name (probes, Services, PodMonitor,
the monitor's view of the server) is the port of the setting that listens there."""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlsplit

import pytest

from tabserve_common.address import is_loopback, split_address
from tabserve_common.settings import SettingsError
from tabserve_monitor.settings import MonitorSettings
from tabserve_server.settings import ServerSettings
from tests.deploy_manifests import BASE, EXAMPLE, Manifest, containers, loaded, one, pod_spec, port, render


@pytest.fixture(scope="module", params=[BASE, EXAMPLE], ids=["base", "example"])
def manifests(request: pytest.FixtureRequest) -> list[Manifest]:
    return render(request.param)


def settings_of(manifests: list[Manifest]) -> tuple[ServerSettings, MonitorSettings]:
    by_name = containers(manifests)
    server, monitor = loaded(manifests, by_name["server"]), loaded(manifests, by_name["monitor"])
    assert isinstance(server, ServerSettings) and isinstance(monitor, MonitorSettings)
    return server, monitor


def test_every_variable_and_flag_is_a_setting(manifests: list[Manifest]) -> None:
    # Service links would add <SERVICE>_PORT... variables to the containers (a Service named tabserve-server would
    # put TABSERVE_SERVER_PORT beside the settings): off, so the manifests' variables are all there is.
    assert pod_spec(manifests)["enableServiceLinks"] is False
    server, monitor = settings_of(manifests)
    assert server.tls and server.tls_client_ca_file and server.control_token_file
    assert monitor.tls and monitor.tls_cert_file and monitor.control_token_file


@pytest.mark.parametrize(
    ("container", "variable", "value"),
    [
        ("server", "TABSERVE_SERVER_MAX_WORKER", "16"),  # a misspelt name
        ("monitor", "TABSERVE_SERVER_WORKERS", "1"),  # the other process's setting
        ("server", "TABSERVE_SERVER_WORKERS", "one"),  # a value the setting refuses
        ("server", "TABSERVE_SERVER_CONTROL_TOKEN", "secret"),  # together with the token file
    ],
)
def test_a_wrong_variable_fails(container: str, variable: str, value: str) -> None:
    manifests = copy.deepcopy(render(BASE))
    target = containers(manifests)[container]
    target.setdefault("env", []).append({"name": variable, "value": value})
    with pytest.raises((AssertionError, SettingsError)):
        loaded(manifests, target)


def test_a_wrong_flag_fails() -> None:
    manifests = copy.deepcopy(render(BASE))
    server = containers(manifests)["server"]
    for args in (["--max-threads", "4"], ["--max-worker", "4"], ["--max-workers", "many"]):
        server["args"] = args
        with pytest.raises((AssertionError, SettingsError)):
            loaded(manifests, server)
    server["args"] = ["--control-token", "secret"]  # a secret on the command line is refused
    with pytest.raises(SettingsError):
        loaded(manifests, server)


def _container_port(container: Manifest, name_or_number: Any) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name_or_number in ports, f"{container['name']} has no port named {name_or_number}"
    return int(ports[name_or_number])


def test_probes_use_the_ports_the_settings_listen_on(manifests: list[Manifest]) -> None:
    server, monitor = settings_of(manifests)
    by_name = containers(manifests)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _container_port(by_name["server"], by_name["server"][probe]["grpc"]["port"]) == port(
            server.health_address), probe
    liveness = by_name["monitor"]["livenessProbe"]["httpGet"]
    assert _container_port(by_name["monitor"], liveness["port"]) == port(monitor.metrics_address)
    assert liveness["path"] == "/metrics"


def test_named_ports_match_the_settings(manifests: list[Manifest]) -> None:
    server, monitor = settings_of(manifests)
    by_name = containers(manifests)
    assert _container_port(by_name["server"], "grpc") == port(server.address)
    assert _container_port(by_name["server"], "health") == port(server.health_address)
    assert _container_port(by_name["server"], "metrics") == port(server.metrics_address)
    assert _container_port(by_name["monitor"], "monitor-metrics") == port(monitor.metrics_address)
    for service in (m for m in manifests if m["kind"] == "Service"):
        for service_port in service["spec"]["ports"]:
            assert _container_port(by_name["server"], service_port["targetPort"]) == port(server.address)
    pod_ports = {p["name"] for c in by_name.values() for p in c.get("ports", [])}
    endpoints = one(manifests, "PodMonitor")["spec"]["podMetricsEndpoints"]
    scraped = {e["port"] for e in endpoints}
    assert scraped == {"metrics", "monitor-metrics"} and scraped <= pod_ports


def test_the_monitor_reaches_its_server_on_loopback(manifests: list[Manifest]) -> None:
    server, monitor = settings_of(manifests)
    assert monitor.control_address == server.control_address
    assert is_loopback(split_address(server.control_address)[0])
    assert port(monitor.public_address) == port(server.address)
    assert is_loopback(split_address(monitor.public_address)[0])
    assert monitor.control_token_file == server.control_token_file
    assert urlsplit(monitor.server_metrics_url).port == port(server.metrics_address)  # the status page's histogram
    # The image's contract (PROTOCOL/Containerfile): these ports and paths.
    assert [port(a) for a in (server.address, server.health_address, server.control_address)] == [50051, 50052, 50053]
    assert (port(server.metrics_address), port(monitor.metrics_address)) == (9100, 9101)
    assert server.cache_dir == "/var/cache/tabserve"


def test_every_mounted_file_a_setting_names_is_on_a_volume(manifests: list[Manifest]) -> None:
    server, monitor = settings_of(manifests)
    by_name = containers(manifests)
    for name, settings in (("server", server), ("monitor", monitor)):
        mounts = [m["mountPath"] for m in by_name[name]["volumeMounts"]]
        for field in settings.__dataclass_fields__:
            value = getattr(settings, field)
            if field.endswith("_file") and value:
                assert any(value.startswith(mount + "/") for mount in mounts), f"{name}: {field}={value}"


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_every_directory_a_setting_writes_is_a_writable_volume(manifests: list[Manifest]) -> None:
    # The root filesystem is read-only: a directory outside a volume fails at the first write.
    server, _ = settings_of(manifests)
    mounts = {m["mountPath"]: m for m in containers(manifests)["server"]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    for field in ("cache_dir", "decision_log_dir"):
        mount = mounts.get(getattr(server, field))
        assert mount is not None and not mount.get("readOnly"), f"{field}={getattr(server, field)}"
    # The decision log's retention keeps its files under the volume's limit (past it the kubelet evicts the pod).
    size_limit = volumes[mounts[server.decision_log_dir]["name"]]["emptyDir"]["sizeLimit"]
    assert 0 < server.decision_log_retention_bytes < _quantity_bytes(size_limit)


def test_network_policy_opens_the_ports_the_settings_listen_on(manifests: list[Manifest]) -> None:
    server, monitor = settings_of(manifests)
    ingress = one(manifests, "NetworkPolicy")["spec"]["ingress"]
    opened = {p["port"] for rule in ingress for p in rule["ports"]}
    assert opened == {port(server.address), port(server.metrics_address), port(monitor.metrics_address)}
    # Only the public port is open to every pod; the metrics ports to Prometheus's namespace.
    (everyone,) = [rule for rule in ingress if "from" not in rule]
    assert [p["port"] for p in everyone["ports"]] == [port(server.address)]
