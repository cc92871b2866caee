"""The worker-process helpers of the supervisor without starting workers: the reservation of the shared public
port (after grpc's multiprocessing example), the restart back-off, and the settings each worker gets."""

from __future__ import annotations

import socket
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tabserve_server.supervisor.workers import (
    RESTART_BACKOFF_MAX_SECONDS,
    reserve_port,
    restart_delay,
    worker_settings,
)
from tests.support import server_settings


def _bind(port: int, reuseport: int) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[("grpc.so_reuseport", reuseport)])
    try:
        return server.add_insecure_port(f"127.0.0.1:{port}")
    except RuntimeError:  # grpcio raises when it cannot bind
        return 0
    finally:
        server.stop(0)


def test_reserved_port_is_shared_by_workers_and_held_from_others() -> None:
    sock = reserve_port("127.0.0.1")
    try:
        port = sock.getsockname()[1]
        assert port > 0
        assert _bind(port, reuseport=1) == port  # a worker (grpc.so_reuseport=1) joins the reserved port
        assert _bind(port, reuseport=0) == 0  # anyone else is refused while the supervisor holds it
    finally:
        sock.close()


def test_reservation_never_accepts_connections() -> None:
    """Bound, not listening: a connection to the reserved port with no worker on it is refused."""
    sock = reserve_port("127.0.0.1")
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=2)
    finally:
        sock.close()


@pytest.mark.parametrize(("quick_deaths", "delay"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0)])
def test_restart_back_off_doubles_up_to_the_bound(quick_deaths: int, delay: float) -> None:
    assert restart_delay(quick_deaths) == delay <= RESTART_BACKOFF_MAX_SECONDS


def test_each_worker_gets_its_own_cache_and_loopback_ports(tmp_path: Path) -> None:
    settings = server_settings("sqlite:///x.db", tmp_path, workers=4, predict_threads=0)
    one = worker_settings(settings, 1, 4, "127.0.0.1:4321")
    assert (one.address, one.control_address, one.metrics_address) == ("127.0.0.1:4321", "127.0.0.1:0", "127.0.0.1:0")
    assert one.cache_dir == str(tmp_path / "worker-1") and one.workers == 1 and one.predict_threads >= 1
