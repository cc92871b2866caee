"""The production registry end to end (issue 17): `mlflow server` on PostgreSQL with artifacts in S3 (moto's
server), in both modes of tests/production_registry.py (artifacts proxied by the tracking server, or read
straight from S3 by the model server with its own credentials), with the model server and the monitor as child
processes. PostgreSQL and the object store start once for the module; each mode's tracking server, model server
and monitor once per mode. Real processes only, no mocks.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tabserve.control.v1 import control_pb2
from tabserve_client import ScoringClient
from tabserve_demo.applicants import make_applicants
from tabserve_demo.processes import MonitorProcess
from tests.convergence_harness import Scorer
from tests.production_registry import BUCKET, MODES, Stores, Topology, start_stores, start_topology
from tests.support import Server, monitor_settings, sample_key, scrape, server_settings, wait_for

ROWS = make_applicants(4, seed=20261127)[0]
WAIT = 90.0  # bound of every wait for a reload or a convergence on a busy machine


@dataclass
class Deployment:
    """A topology with a model server and a monitor on it, and everything they said (for the secrets test)."""

    topology: Topology
    server: Server
    monitor: MonitorProcess
    root: Path
    others: list[Server] = field(default_factory=list)  # servers started by a test
    logs: list[str] = field(default_factory=list)  # their logs, kept when they stop
    errors: list[str] = field(default_factory=list)  # failed loads' messages, as GetStatus gave them

    @property
    def mode(self) -> str:
        return self.topology.mode

    def monitor_metric(self, name: str, **labels: str) -> float | None:
        return scrape(self.monitor.metrics_port).get(sample_key(name, **labels))

    def converged_on(self, version: str) -> bool:
        m = scrape(self.monitor.metrics_port)
        return (m.get("tabserve_monitor_served_version") == float(version)
                and m.get("tabserve_monitor_target_version") == float(version)
                and m.get("tabserve_monitor_registry_up") == 1.0 and m.get("tabserve_monitor_server_up") == 1.0)

    def refused(self, version: str) -> Any:
        """GetStatus once the server reports a failed load of `version` (recorded in `errors`), else None."""
        status = self.server.status()
        if status.failed_version != version or not status.last_error:
            return None
        self.errors.append(status.last_error)
        return status

    def close_fresh(self, server: Server) -> None:
        self.logs.append(server.process.stderr())
        server.close()

    def fresh_server(self, cache_dir: Path) -> Server:
        server = Server(server_settings(self.topology.url, cache_dir, registry_timeout_seconds=5.0),
                        self.topology.server_env())
        self.others.append(server)
        return server


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    started = time.monotonic()
    running = start_stores(tmp_path_factory.mktemp("prodreg-stores"))
    print(f"PostgreSQL and the S3 store up in {time.monotonic() - started:.1f}s")
    try:
        yield running
    finally:
        running.close()


@pytest.fixture(scope="module", params=MODES)
def deployment(request: pytest.FixtureRequest, stores: Stores,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp(f"prodreg-{request.param}")
    topology = start_topology(request.param, stores, root)
    server = monitor = None
    try:
        server = Server(server_settings(topology.url, root / "cache", registry_timeout_seconds=5.0),
                        topology.server_env())
        server.settle_on("1", timeout=WAIT)
        monitor = MonitorProcess(
            monitor_settings(topology.url, server.target, server.control_address, poll_interval_seconds=0.5,
                             rpc_timeout_seconds=3.0, backoff_max_seconds=2.0),
            topology.monitor_env(), log_file=root / "monitor.log")
        running = Deployment(topology, server, monitor, root)
        wait_for(lambda: running.converged_on("1"), timeout=WAIT, interval=0.2, what="monitor on version 1")
        yield running
        for other in running.others:
            if other.process.proc.poll() is None:
                running.close_fresh(other)
    finally:
        if monitor is not None:
            monitor.stop()
        if server is not None:
            server.close()
        topology.tracking.stop()


def _promote_and_switch(deployment: Deployment, version: str) -> None:
    deployment.topology.promote(version)
    wait_for(lambda: deployment.server.settled_on(version), timeout=WAIT, interval=0.1, what=f"version {version}")
    wait_for(lambda: deployment.converged_on(version), timeout=WAIT, interval=0.2, what=f"monitor on {version}")


def _refused_while_serving(deployment: Deployment, broken: str, kept: str) -> str:
    """Promote `broken`; the server refuses it and keeps `kept` (scoring never fails); then roll back."""
    failures = deployment.monitor_metric("tabserve_monitor_reloads_total", result="failure") or 0.0
    with Scorer(deployment.server.target, ROWS) as scorer:
        deployment.topology.promote(broken)
        status = wait_for(lambda: deployment.refused(broken), timeout=WAIT, interval=0.2, what=f"{broken} refused")
        wait_for(lambda: (deployment.monitor_metric("tabserve_monitor_reloads_total", result="failure") or 0)
                 > failures, timeout=WAIT, interval=0.2, what="the monitor counted the failed reload")
    assert status.serving.version == kept
    assert not scorer.failures, scorer.failures[:5]
    assert {call.version for call in scorer.calls} == {kept}
    _promote_and_switch(deployment, kept)  # the rollback: alias back, the failure cleared
    assert deployment.server.status().load_state == control_pb2.LOAD_STATE_IDLE
    return str(status.last_error)


def test_demo_story(deployment: Deployment) -> None:
    """Registration through the tracking server (the fixture), scoring, promote and switch, a version whose model
    file was deleted from S3 refused while the good one serves, rollback."""
    topology = deployment.topology
    with ScoringClient(deployment.server.target, timeout=10) as client:
        assert client.score(ROWS).model_version == "1"
    good = topology.copy_version("1")
    with Scorer(deployment.server.target, ROWS) as scorer:
        _promote_and_switch(deployment, good)
    assert not scorer.failures, scorer.failures[:5]
    versions = [call.version for call in scorer.calls]
    assert versions[0] == "1" and versions[-1] == good and versions == sorted(versions, key=int), versions

    deleted = topology.copy_version(good, model_file="deleted")
    error = _refused_while_serving(deployment, deleted, good)
    print(f"{deployment.mode}: deleted model.lgb refused: {error}")
    assert "model.lgb" in error or "missing" in error.lower() or "no such file" in error.lower(), error


def test_truncated_object_refused(deployment: Deployment) -> None:
    topology = deployment.topology
    kept = deployment.server.serving()
    truncated = topology.copy_version(kept, model_file="truncated")
    error = _refused_while_serving(deployment, truncated, kept)
    print(f"{deployment.mode}: truncated model.lgb refused: {error}")


def test_database_restart_and_startup_from_cache(deployment: Deployment, stores: Stores) -> None:
    """PostgreSQL stopped while serving: scoring unaffected, the monitor says the registry is down, a server
    started meanwhile serves the cached version; PostgreSQL back: everything converges again."""
    served = deployment.server.serving()
    wait_for(lambda: deployment.converged_on(served), timeout=WAIT, interval=0.2, what="converged before")
    cache = deployment.root / "cache-copy"
    shutil.copytree(deployment.root / "cache", cache)
    with Scorer(deployment.server.target, ROWS) as scorer:
        stores.database.stop()
        down_at = time.monotonic()
        try:
            wait_for(lambda: deployment.monitor_metric("tabserve_monitor_registry_up") == 0.0, timeout=WAIT,
                     interval=0.2, what="registry_up 0 with the database down")
            fresh = deployment.fresh_server(cache)
            status = wait_for(lambda: (s := fresh.status()).serving.version == served and s, timeout=WAIT,
                              interval=0.2, what="a server started with the database down serves the cached version")
            assert status.serving.loaded_from == "cache" and status.last_error, status
            deployment.errors.append(status.last_error)
            assert "from the local cache" in fresh.process.stderr(), fresh.process.log_tail()
            deployment.close_fresh(fresh)
        finally:
            stores.database.start()
            stores.database.wait_healthy(120)
        up_at = time.monotonic()
        wait_for(lambda: deployment.converged_on(served), timeout=WAIT, interval=0.2, what="converged after")
        converged = time.monotonic() - up_at
    assert not scorer.failures, scorer.failures[:5]
    during = [call for call in scorer.calls if down_at <= call.started and call.finished <= up_at]
    print(f"database down {up_at - down_at:.1f}s with {len(during)} calls served; monitor converged "
          f"{converged:.1f}s after it came back")
    assert len(during) >= 10


def test_object_store_outage(deployment: Deployment, stores: Stores) -> None:
    """The object store stopped and started again on the same port (its content restored: moto keeps it in
    memory): scoring unaffected; a reload that needs it fails while it is down, is retried, and succeeds."""
    topology = deployment.topology
    kept = deployment.server.serving()
    new = topology.copy_version(kept)
    content = stores.objects.snapshot(BUCKET)
    with Scorer(deployment.server.target, ROWS) as scorer:
        stores.objects.stop()
        down_at = time.monotonic()
        try:
            topology.promote(new)
            status = wait_for(lambda: deployment.refused(new), timeout=WAIT, interval=0.2,
                              what=f"{new} fails without S3")
            assert "artifact store unreachable" in status.last_error, status.last_error
            attempts = deployment.server.status().failed_attempts
            wait_for(lambda: deployment.server.status().failed_attempts > attempts, timeout=WAIT, interval=0.2,
                     what="the failed reload retried")
            assert deployment.server.serving() == kept
        finally:
            stores.objects.start()
            stores.objects.wait_healthy(120)
            stores.objects.restore(BUCKET, content)
        up_at = time.monotonic()
        wait_for(lambda: deployment.server.settled_on(new), timeout=WAIT, interval=0.1, what=f"{new} after S3")
        switched = time.monotonic() - up_at
        time.sleep(0.3)
    assert not scorer.failures, scorer.failures[:5]
    during = [call for call in scorer.calls if down_at <= call.started and call.finished <= up_at]
    assert len(during) >= 10 and {call.version for call in during} == {kept}
    print(f"{deployment.mode}: object store down {up_at - down_at:.1f}s, {len(during)} calls served; version {new} "
          f"served {switched:.1f}s after it came back; errors while down: {deployment.errors[-1]}")
    wait_for(lambda: deployment.converged_on(new), timeout=WAIT, interval=0.2, what=f"monitor on {new}")


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_credentials_never_shown(deployment: Deployment, stores: Stores) -> None:
    """Logs of every server and monitor of this mode, /metrics of both, GetStatus, failed loads' messages."""
    assert deployment.errors, "the earlier tests recorded no failed load to look into"
    shown = {
        "server log": deployment.server.process.stderr(),
        "monitor log": deployment.monitor.stderr(),
        "server /metrics": _metrics_text(deployment.server.process.metrics_port),
        "monitor /metrics": _metrics_text(deployment.monitor.metrics_port),
        "GetStatus": str(deployment.server.status()),
        "failed loads": "\n".join(deployment.errors),
        **{f"log of server {i} started by a test": log for i, log in enumerate(deployment.logs)},
    }
    assert all(shown.values())
    leaks = [(what, where) for what, secret in stores.secrets.values().items()
             for where, text in shown.items() if secret in text]
    assert not leaks, leaks
