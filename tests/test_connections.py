"""Connections of the public port: the keepalive policy it enforces and the connection age (GOAWAY with grace),
which also moves one long-lived client over the SO_REUSEPORT workers.

Real servers on loopback; which TCP connections a client holds is read from the kernel (/proc/net/tcp{,6}).

The keepalive tests run time at SCALE: the client pings every 10 s x SCALE for 60 s x SCALE against a server
whose accepted ping interval is its *default* x SCALE. gRPC's ping policy compares only the time between two
pings with that interval (and counts strikes), so scaling both sides keeps every comparison's outcome, and
the same number of pings (six) is sent; a default that would refuse 10 s pings makes the scaled test fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tabserve_client import Keepalive, RetryPolicy, ScoringClient
from tabserve_client.channel import open_channel
from tabserve_server.app import ServingApp
from tabserve_server.settings import ServerSettings
from tabserve_server.transport.connections import connection_options
from tests.support import Server, score_calls, scrape, server_settings, wait_for

SCALE = 0.1
CLIENT_PING_SECONDS = 10.0
PINGING_FOR_SECONDS = 60.0


def client_ports(server_port: int) -> set[int]:
    """Local ports of this process's established TCP connections to `server_port` on loopback."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC uses IPv6 sockets with IPv4-mapped addresses
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def started(tracking_uri: str, cache_dir: Path, **overrides: Any) -> ServingApp:
    app = ServingApp(server_settings(tracking_uri, cache_dir, **overrides), registry=CollectorRegistry())
    app.start()
    wait_for(app.accepting, timeout=60, what="first model load")
    return app


@pytest.fixture
def serving(tracking_uri: str, tmp_path: Path) -> Iterator[Any]:
    """Starts servers with the given settings; stops them all at the end."""
    apps: list[ServingApp] = []

    def start(**overrides: Any) -> ServingApp:
        apps.append(started(tracking_uri, tmp_path / f"cache-{len(apps)}", **overrides))
        return apps[-1]

    yield start
    for app in apps:
        app.stop(1.0)


def test_the_defaults_become_grpc_arguments() -> None:
    options = dict(connection_options(ServerSettings()))
    assert options == {
        "grpc.http2.min_ping_interval_without_data_ms": 5000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_ping_strikes": 2,
        "grpc.max_connection_age_ms": 300_000,
        "grpc.max_connection_age_grace_ms": 30_000,
    }
    never = dict(connection_options(ServerSettings(max_connection_age_seconds=0)))
    assert "grpc.max_connection_age_ms" not in never and "grpc.max_connection_age_grace_ms" not in never


def _idle_pinging_client(target: str) -> tuple[list[str], set[int]]:
    """A client (the library's `Keepalive`) that calls, pings every 10 s x SCALE while idle for 60 s x SCALE,
    then calls again.

    Returns the channel's connectivity states after it first became READY, and the client ports it used.
    """
    keepalive = Keepalive(interval_seconds=CLIENT_PING_SECONDS * SCALE)
    port = int(target.rsplit(":", 1)[1])
    states: list[str] = []
    ready = threading.Event()

    def record(state: grpc.ChannelConnectivity) -> None:
        if ready.is_set():
            states.append(state.name)
        elif state is grpc.ChannelConnectivity.READY:
            ready.set()

    channel = open_channel(target, [("grpc.enable_retries", 0)], keepalive=keepalive)
    with channel, ScoringClient(channel=channel) as client:
        channel.subscribe(record)
        client.health()
        ports = client_ports(port)
        time.sleep(PINGING_FOR_SECONDS * SCALE)
        client.health()
        ports |= client_ports(port)
        channel.unsubscribe(record)
    return states, ports


@pytest.mark.timeout(120)
def test_a_client_pinging_every_10_s_is_never_sent_too_many_pings(serving: Any) -> None:
    default = ServerSettings().keepalive_min_ping_interval_seconds
    app = serving(keepalive_min_ping_interval_seconds=default * SCALE)
    states, ports = _idle_pinging_client(f"127.0.0.1:{app.public_port}")
    # A GOAWAY (too_many_pings) takes the channel out of READY and the next call opens a new connection.
    assert states == [] and len(ports) == 1, (states, ports)


@pytest.mark.timeout(120)
def test_the_same_client_is_sent_too_many_pings_under_grpcs_default_policy(serving: Any) -> None:
    # The control: it shows the client above does ping, and that the settings are what reach gRPC.
    app = serving(keepalive_min_ping_interval_seconds=300.0, keepalive_permit_without_calls=False)
    states, ports = _idle_pinging_client(f"127.0.0.1:{app.public_port}")
    assert "IDLE" in states and len(ports) == 2, (states, ports)


@pytest.mark.timeout(120)
def test_one_connection_keeps_scoring_through_goaways_with_no_failed_call(serving: Any) -> None:
    app = serving(max_connection_age_seconds=0.5, max_connection_age_grace_seconds=5.0)
    target = f"127.0.0.1:{app.public_port}"
    failures: list[str] = []
    ports: set[int] = set()
    calls = 0
    # Retries off (gRPC's and the library's): a call lost to a GOAWAY would fail here instead of being retried.
    with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel, \
            ScoringClient(channel=channel, timeout=10) as client:
        client.retry = RetryPolicy(max_attempts=1)
        row = np.zeros((1, len(client.feature_names())))
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            try:
                client.score(row)
                calls += 1
            except Exception as exc:
                failures.append(repr(exc))
            ports |= client_ports(app.public_port)
    print(f"{calls} calls over {len(ports)} connections")
    assert failures == []
    assert calls > 50
    # 4 s at an age of 0.5 s +/- 10 %: about 8 connections, one after the other.
    assert len(ports) >= 4, ports


@pytest.mark.timeout(300)
def test_the_connection_age_moves_one_client_over_every_worker(tracking_uri: str, tmp_path: Path) -> None:
    # SO_REUSEPORT hands each new connection to a worker by a hash of its addresses: one long-lived channel
    # stays on one worker unless the server ends the connection and the client opens another.
    server = Server(server_settings(tracking_uri, tmp_path / "cache", workers=2, max_connection_age_seconds=0.3,
                                    max_connection_age_grace_seconds=5.0))
    try:
        wait_for(lambda: server.settled_on("1"), timeout=180, interval=0.2, what="both workers serving")
        with ScoringClient(server.target, timeout=10) as client:
            row = np.zeros((1, len(client.feature_names())))
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                client.score(row)
        # About 16 connections, each to either worker: all on one has a chance of about 2**-15.
        per_worker = [score_calls(scrape(w.metrics_port)) for w in server.status().workers]
        assert len(per_worker) == 2 and min(per_worker) > 0, per_worker
    finally:
        server.close()
