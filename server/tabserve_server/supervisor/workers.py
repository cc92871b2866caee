"""Worker processes: the worker's entry point, its handle in the supervisor (spawn, ports, restart back-off,
stop), and the reservation of the shared public port."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from tabserve_client.control import ControlClient
from tabserve_server.app import ServingApp
from tabserve_server.logs import configure_logging
from tabserve_server.settings import ServerSettings

log = logging.getLogger(__name__)

RPC_TIMEOUT_SECONDS = 5.0
START_TIMEOUT_SECONDS = 180.0
RESTART_BACKOFF_MAX_SECONDS = 30.0
STABLE_SECONDS = 30.0  # a worker up this long resets its restart back-off


def reserve_port(host: str) -> socket.socket:
    """A socket bound to a free port of `host` with SO_REUSEPORT, not listening (after grpc's
    examples/python/multiprocessing `_reserve_port`): while it is open the port stays this server's, and the
    workers bind the same port with `grpc.so_reuseport`. The kernel hands connections to listening sockets
    only, so the reservation never takes a connection."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def restart_delay(quick_deaths: int) -> float:
    """Seconds before restarting a worker that died `quick_deaths` times in a row without staying up."""
    return min(RESTART_BACKOFF_MAX_SECONDS, 0.5 * 2.0 ** (quick_deaths - 1))


def run_worker(settings: ServerSettings, index: int, conn: Connection) -> None:
    """Entry point of one worker process: a supervised ServingApp; sends its ports, serves until SIGTERM."""
    os.dup2(2, 1)  # stdout belongs to the supervisor's 'listening' line
    configure_logging(settings, f"worker-{index}")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parent = os.getppid()
    try:
        app = ServingApp(settings, supervised=True, worker=f"worker-{index}")
        app.start()
    except Exception as exc:
        logging.getLogger(__name__).exception("worker %d cannot start", index)
        conn.send({"error": str(exc)})
        raise SystemExit(2) from exc
    conn.send({"public_port": app.public_port, "control_port": app.control_port, "metrics_port": app.metrics_port})
    while not stop.wait(0.5):
        if os.getppid() != parent:  # the supervisor is gone: do not keep the port
            break
    app.stop()


def worker_settings(
    settings: ServerSettings, index: int, count: int, public_address: str, health_address: str = ""
) -> ServerSettings:
    """The settings of worker `index` of `count`, all binding `public_address` (and `health_address`) with the
    same TLS files; control and /metrics are private, on loopback, in plaintext (the supervisor serves both)."""
    # Each worker has its own cache directory: concurrent commits to one cache would delete each other's entries.
    # The compiled backend's entries are shared instead (published by rename, compiled once under a lock file).
    # "0: number of cores" for batch prediction threads is shared out, so N workers do not oversubscribe.
    threads = settings.predict_threads or max(1, (os.cpu_count() or 1) // count)
    return dataclasses.replace(
        settings, address=public_address, health_address=health_address, control_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0", metrics_cert_file="", metrics_key_file="",
        cache_dir=str(Path(settings.cache_dir) / f"worker-{index}"), predict_threads=threads, workers=1,
        compile_cache_dir=settings.compile_cache_dir or settings.cache_dir,  # shared: one compile serves all
    )


@dataclasses.dataclass
class Worker:
    """The supervisor's handle on worker process `index` (the slot outlives the processes it restarts)."""

    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    pid: int = 0
    public_port: int = 0
    control_port: int = 0
    metrics_port: int = 0
    control: ControlClient | None = None
    restarts: int = 0
    quick_deaths: int = 0
    started_at: float = 0.0
    next_start_at: float = 0.0

    @property
    def up(self) -> bool:
        return self.control is not None and self.process is not None and self.process.is_alive()

    def spawn(self, settings: ServerSettings) -> None:
        ctx = multiprocessing.get_context("spawn")
        receiver, sender = ctx.Pipe(duplex=False)
        process = ctx.Process(target=run_worker, args=(settings, self.index, sender),
                              name=f"tabserve-worker-{self.index}", daemon=True)
        process.start()
        sender.close()
        self.process, self.conn, self.pid = process, receiver, process.pid or 0
        self.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", self.index, self.pid)

    def await_ports(self, deadline: float, token: str) -> None:
        """Wait for the worker's ports (until the monotonic `deadline`); raises when it cannot start."""
        assert self.conn is not None and self.process is not None
        while not self.conn.poll(0.2):
            if not self.process.is_alive():
                raise RuntimeError(f"worker {self.index} exited with code {self.process.exitcode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.index} did not start within {START_TIMEOUT_SECONDS:.0f} s")
        if not self.receive_ports(token):
            raise RuntimeError(f"worker {self.index} could not start; see its log")

    def receive_ports(self, token: str) -> bool:
        """Read the worker's ports message and connect to its control port; False if it failed to start."""
        assert self.conn is not None
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            return False
        if "error" in message:
            return False
        self.public_port = int(message["public_port"])
        self.control_port, self.metrics_port = int(message["control_port"]), int(message["metrics_port"])
        self.control = ControlClient(f"127.0.0.1:{self.control_port}", token=token, timeout=RPC_TIMEOUT_SECONDS)
        return True

    def check(self, now: float, settings: ServerSettings, token: str) -> bool:
        """One look at the process: restart it when due, note its death, read its ports once it sent them.
        True when the worker just came up (its ports arrived)."""
        if self.process is None:
            if now >= self.next_start_at:
                self.spawn(settings)
            return False
        if not self.process.is_alive():
            lived = now - self.started_at
            self.quick_deaths = self.quick_deaths + 1 if lived < STABLE_SECONDS else 1
            wait = restart_delay(self.quick_deaths)
            log.error("worker %d (pid %d) died with code %s after %.1f s; restarting in %.1f s", self.index,
                      self.pid, self.process.exitcode, lived, wait)
            self.forget()
            self.restarts += 1
            self.next_start_at = now + wait
            return False
        return bool(self.control is None and self.conn is not None and self.conn.poll() and self.receive_ports(token))

    def forget(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = self.control = None


def stop_workers(workers: list[Worker], grace: float) -> None:
    """SIGTERM every live worker, wait `grace` (+10 s) for them to drain, kill what is left."""
    running = [w.process for w in workers if w.process is not None and w.process.is_alive()]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + grace + 10.0
    for process in running:
        process.join(max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            log.error("worker pid %s did not stop in time: killed", process.pid)
            process.kill()
            process.join(5)
    for worker in workers:
        worker.forget()
