"""`make image-test`: deploy/'s Deployment played by `podman kube play` on the built image, end to end on loopback.

A real `mlflow server` on 127.0.0.1 holds the demo model; the pod (server + monitor, read-only root filesystem,
uid 10001) runs on the host network with its Secrets and volumes as host directories (imagetest/pod.py). Scored
over mutual TLS, both /metrics scraped, a version promoted and served, then the pod is stopped while calls are in
flight: they finish, the server exits 0, and its decision log (on its volume) verifies. Needs root and a few
minutes; not part of `make test`.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from imagetest.pod import (
    MONITOR_CONTAINER,
    POD,
    SERVER_CONTAINER,
    Ports,
    inspect,
    podman_manifests,
    rendered_base,
    run_podman,
    write_kube_file,
)
from tabserve_client import ScoringClient, ScoringError, TlsOptions
from tabserve_demo.applicants import make_applicants
from tabserve_demo.processes import MlflowServer, free_port
from tabserve_demo.registration import register_demo_version
from tests.certs import ALLOWED, TestCA
from tests.support import MODEL_NAME, sample_key, score_calls, scrape, wait_for
from tools.image import IMAGE

UID = 10001
POD_NAMES = ("tabserve", "localhost", "127.0.0.1")  # the monitor checks `tabserve` (monitor.env)
ROWS = make_applicants(8, seed=13)[0]
# A drain batch, explained row by row: long on the server for its size, so calls are running when the pod stops.
DRAIN_ROWS = make_applicants(200, seed=14)[0]


@dataclass(frozen=True)
class Pod:
    ports: Ports
    client_tls: TlsOptions
    outsider_tls: TlsOptions
    registry_url: str
    host_dirs: dict[str, Path]
    grace_seconds: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports.public}"


def _issue_pod_certificates(root: Path) -> tuple[dict[str, Path], TlsOptions, TlsOptions]:
    """The pod's TLS directory (tls.crt/tls.key for both ends of mutual TLS, ca.crt) and a caller's options."""
    ca = TestCA(root / "ca", "tabserve-image-test-ca")
    pod_cert = ca.issue("pod", POD_NAMES, server=True, client=True)
    caller = ca.issue("caller", (ALLOWED,), server=False)
    stranger = TestCA(root / "other", "other-ca").issue("stranger", (ALLOWED,), server=False)
    tls = root / "tls"
    tls.mkdir()
    for source, name in ((pod_cert.cert_file, "tls.crt"), (pod_cert.key_file, "tls.key"), (ca.cert_file, "ca.crt")):
        (tls / name).write_bytes(source.read_bytes())
    control = root / "control"
    control.mkdir()
    (control / "token").write_text(os.urandom(16).hex())
    dirs = {"tls": tls, "control-token": control, "cache": root / "cache", "decisions": root / "decisions"}
    for directory in dirs.values():
        directory.mkdir(exist_ok=True)
        for path in (directory, *directory.iterdir()):
            os.chown(path, UID, UID)  # what a Secret's fsGroup and an emptyDir give the pod's user
            path.chmod(0o750 if path.is_dir() else 0o440)
    client = TlsOptions(str(ca.cert_file), str(caller.cert_file), str(caller.key_file), "tabserve")
    outsider = TlsOptions(str(ca.cert_file), str(stranger.cert_file), str(stranger.key_file), "tabserve")
    return dirs, client, outsider


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on loopback with version 1 of the demo model under alias `production`."""
    root = tmp_path_factory.mktemp("registry")
    with MlflowServer(f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log").start() as server:
        server.wait_healthy(240)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            register_demo_version(server.url, MODEL_NAME, seed=1, threshold=0.48, alias="production")
        yield server.url


@pytest.fixture(scope="module")
def pod(registry: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """deploy/'s Deployment played by podman on the built image; removed at the end."""
    assert run_podman("image", "exists", IMAGE, check=False).returncode == 0, f"{IMAGE} missing: run `make image`"
    root = tmp_path_factory.mktemp("pod")
    host_dirs, client_tls, outsider_tls = _issue_pod_certificates(root)
    ports = Ports(*(free_port() for _ in range(5)))
    rendered = rendered_base()
    manifests = podman_manifests(rendered, ports, registry, host_dirs)
    deployment = next(m for m in manifests if m["kind"] == "Deployment")
    kube_file = write_kube_file(root / "tabserve.yaml", manifests)
    run_podman("kube", "down", str(kube_file), check=False)  # a pod left by an interrupted run
    started = time.monotonic()
    run_podman("kube", "play", "--network", "host", str(kube_file))
    try:
        yield Pod(ports, client_tls, outsider_tls, registry, host_dirs,
                  deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])
    finally:
        print(f"pod up for {time.monotonic() - started:.0f} s")
        for container in (SERVER_CONTAINER, MONITOR_CONTAINER):
            logs = run_podman("logs", container, check=False)
            print(f"--- {container} ---\n{logs.stdout[-3000:]}{logs.stderr[-6000:]}")
        run_podman("kube", "down", str(kube_file), check=False)


def _served_version(pod: Pod) -> str:
    """The version a score comes from now; '' while the pod does not answer (starting, loading)."""
    with ScoringClient(pod.target, timeout=10, tls=pod.client_tls) as client:
        try:
            return client.score(ROWS).model_version
        except ScoringError:
            return ""


def test_runs_as_the_contract_says(pod: Pod) -> None:
    """Both containers run, as uid 10001, with a read-only root filesystem (the Deployment's security context)."""
    for container in (SERVER_CONTAINER, MONITOR_CONTAINER):
        assert inspect(container, "{{.State.Status}}") == "running"
        assert inspect(container, "{{.HostConfig.ReadonlyRootfs}}") == "true"
        assert inspect(container, "{{.Config.User}}").split(":")[0] == str(UID)
    assert inspect(SERVER_CONTAINER, "{{.ImageName}}") == IMAGE
    read_only = run_podman("exec", SERVER_CONTAINER, "touch", "/opt/tabserve/x", check=False)
    assert read_only.returncode != 0 and "Read-only file system" in read_only.stderr


def test_scores_over_mutual_tls(pod: Pod) -> None:
    wait_for(lambda: _served_version(pod) == "1", timeout=240, interval=1, what="version 1 served by the pod")
    with ScoringClient(pod.target, timeout=10, tls=pod.client_tls) as client:
        batch = client.score(ROWS)
        assert client.health() == "SERVING"
    assert (batch.model_name, batch.model_version, batch.threshold) == (MODEL_NAME, "1", pytest.approx(0.48))
    assert len(batch.scores) == len(ROWS) and np.all((batch.scores >= 0) & (batch.scores <= 1))
    # A certificate from another CA is refused at the handshake: the public port really is mutual TLS.
    with ScoringClient(pod.target, timeout=3, tls=pod.outsider_tls) as stranger, pytest.raises(ScoringError):
        stranger.score(ROWS)
    # The cache volume is writable for uid 10001 under the read-only root: the validated version was kept.
    assert any(pod.host_dirs["cache"].iterdir())


def test_both_metrics_endpoints(pod: Pod) -> None:
    wait_for(lambda: _served_version(pod) == "1", timeout=240, interval=1, what="version 1 served by the pod")
    server = scrape(pod.ports.metrics)
    assert server[sample_key("tabserve_server_model_info", model_name=MODEL_NAME, model_version="1",
                             loaded_from="registry")] == 1
    assert score_calls(server) >= 1
    # The monitor polls the registry, sees the server and its canary (mutual TLS with the pod's certificate).
    monitor = wait_for(lambda: _monitor_saw(pod, 1), timeout=60, interval=1, what="monitor metrics of version 1")
    assert monitor["tabserve_monitor_registry_up"] == 1
    assert monitor["tabserve_monitor_server_up"] == 1
    assert monitor["tabserve_monitor_canary_up"] == 1


def _monitor_saw(pod: Pod, version: int) -> dict[str, float] | None:
    """The monitor's samples once it targets `version` and the server reports serving it; else None."""
    samples = scrape(pod.ports.monitor_metrics)
    seen = (samples.get("tabserve_monitor_target_version"), samples.get("tabserve_monitor_served_version"))
    return samples if seen == (version, version) and samples.get("tabserve_monitor_canary_up") == 1 else None


def test_promoted_version_is_served(pod: Pod) -> None:
    wait_for(lambda: _served_version(pod) == "1", timeout=240, interval=1, what="version 1 served by the pod")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        version = register_demo_version(pod.registry_url, MODEL_NAME, seed=2, threshold=0.3, alias="production")
    assert version == "2"
    wait_for(lambda: _served_version(pod) == "2", timeout=120, interval=0.5, what="version 2 served after promotion")
    with ScoringClient(pod.target, timeout=10, tls=pod.client_tls) as client:
        assert client.score(ROWS).threshold == pytest.approx(0.3)
    wait_for(lambda: _monitor_saw(pod, 2), timeout=30, interval=1, what="monitor metrics of version 2")


@dataclass
class Call:
    started: float  # Unix time
    ended: float
    error: str | None


def _call_until(pod: Pod, stop: threading.Event, calls: list[Call]) -> None:
    """Score DRAIN_ROWS with their reasons in a loop (one connection, no retries: every failure is seen)."""
    with ScoringClient(pod.target, timeout=30, tls=pod.client_tls) as client:
        client.retry = type(client.retry)(max_attempts=1)
        while not stop.is_set():
            started = time.time()
            try:
                client.score(DRAIN_ROWS, explain=True, explain_all_rows=True)
                error = None
            except ScoringError as exc:
                error = f"{exc.code.name}: {exc}"
            calls.append(Call(started, time.time(), error))
            if error is not None:
                return  # the server is going: the next call would be refused too


def _logged_at(log: str, message: str) -> float:
    """Unix time of the server's first log line containing `message` (the image has no time zone data: UTC)."""
    line = next(line for line in log.splitlines() if message in line)
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=datetime.UTC)
    return stamp.timestamp()


def test_stop_drains_in_flight_calls(pod: Pod) -> None:
    """`podman pod stop` (SIGTERM, then the grace period): the calls the server was running finish after the
    SIGTERM, a call it had not taken yet is refused UNAVAILABLE (retryable elsewhere), both containers exit 0, and
    the decision log on its volume is closed and verifies."""
    wait_for(lambda: _served_version(pod) != "", timeout=240, interval=1, what="a version served by the pod")
    stop = threading.Event()
    calls: list[list[Call]] = [[] for _ in range(3)]
    callers = [threading.Thread(target=_call_until, args=(pod, stop, c), daemon=True) for c in calls]
    for caller in callers:
        caller.start()
    wait_for(lambda: all(len(c) >= 2 for c in calls), timeout=60, what="callers under way")
    run_podman("pod", "stop", "--time", str(pod.grace_seconds), POD, timeout=pod.grace_seconds + 60)
    stop.set()
    for caller in callers:
        caller.join(60)
    log = run_podman("logs", SERVER_CONTAINER).stderr
    sigterm = _logged_at(log, "shutting down: draining")
    every = [call for c in calls for call in c]
    report = "\n".join(f"{c.started - sigterm:+.3f} .. {c.ended - sigterm:+.3f} s: {c.error or 'OK'}" for c in every)
    assert all(c.error is None or c.error.startswith("UNAVAILABLE") for c in every), report
    drained = [c for c in every if c.started < sigterm < c.ended and c.error is None]
    assert drained, f"no call in flight at SIGTERM finished after it:\n{report}"
    print(f"drain: {len(drained)} in-flight call(s) finished after SIGTERM; calls relative to it:\n{report}")
    assert "stopped" in log.split("shutting down: draining", 1)[1]
    assert inspect(SERVER_CONTAINER, "{{.State.ExitCode}}") == "0"
    assert inspect(MONITOR_CONTAINER, "{{.State.ExitCode}}") == "0"
    # The decision log (deploy/ turns it on), written to its volume under the read-only root and closed by the
    # drain: every answered call is in it, and its chain verifies.
    verified = subprocess.run(
        [sys.executable, "-m", "tabserve_admin", "decisions", "verify", "--json", str(pod.host_dirs["decisions"])],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    sets = json.loads(verified.stdout)["sets"]
    assert sum(s["decisions"] for s in sets) > 0 and not any(s["live"] for s in sets), sets  # closed: a close record
