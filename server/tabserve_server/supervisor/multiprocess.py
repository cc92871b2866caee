"""The Supervisor: starts and stops the worker processes, runs the reconcile loop (process checks, then one
rollout round), and serves the one control address and the one /metrics address."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent import futures
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry

from tabserve.control.v1 import control_pb2_grpc
from tabserve_client.control import ControlClient, ControlError
from tabserve_common.address import join_address, split_address
from tabserve_server.core.loading import model_name_from_uri
from tabserve_server.core.model import AspiredVersion
from tabserve_server.listeners import control_tls, start_metrics_server
from tabserve_server.settings import ServerSettings
from tabserve_server.supervisor import rollout
from tabserve_server.supervisor.metrics import Scrape, WorkerMetrics
from tabserve_server.supervisor.servicer import (
    SupervisorControl,
    WorkerEntry,
    answer_from_message,
    state_from_message,
    status_message,
)
from tabserve_server.supervisor.workers import (
    RPC_TIMEOUT_SECONDS,
    START_TIMEOUT_SECONDS,
    Worker,
    reserve_port,
    stop_workers,
    worker_settings,
)
from tabserve_server.transport.admission import Limits
from tabserve_server.transport.control import aspired_message
from tabserve_server.transport.edge import Edge
from tabserve_server.transport.tls import bind

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
T = TypeVar("T")


class Supervisor:
    """A server of `workers` processes; same `start()`/`stop()` and ports as ServingApp (contract: __init__.py)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.count = settings.workers if settings.workers > 0 else (os.cpu_count() or 1)
        self._workers = [Worker(i) for i in range(self.count)]
        self._public_address = settings.address
        self._health_address = settings.health_address
        self._reservations: list[socket.socket] = []
        self._token = ""
        self._aspired = AspiredVersion(
            model_name=settings.model_name or model_name_from_uri(settings.model_uri), version="",
            model_uri=settings.model_uri,
        )
        self._agreed: rollout.Served | None = None  # the version every worker served at the last look
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pool = futures.ThreadPoolExecutor(max_workers=max(4, self.count), thread_name_prefix="fanout")
        self._thread: threading.Thread | None = None
        self._control: Any = None
        self._metrics_server: Any = None
        self.public_port = self.control_port = self.metrics_port = self.health_port = 0

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        self._token = s.control_token_value()
        try:
            self._start_workers()
        except BaseException:
            self._release()
            raise
        self._control = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="control"),
            interceptors=[Edge(None)], options=[("grpc.so_reuseport", 0)],
        )
        control_pb2_grpc.add_ModelControlServicer_to_server(  # type: ignore[no-untyped-call]
            SupervisorControl(self, self._token), self._control
        )
        self.control_port = bind(self._control, s.control_address, control_tls(s))
        registry = CollectorRegistry()
        registry.register(WorkerMetrics(self.scrape_workers, lambda: self.workers_up, lambda: self.restarts))
        self._metrics_server = start_metrics_server(s, registry)
        self.metrics_port = self._metrics_server.server_port
        self._control.start()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        log.info("supervising %d workers on public port %d", self.count, self.public_port)

    def _shared(self, address: str) -> str:
        """`address` with a concrete port the workers can all bind: port 0 is replaced by a free port held
        (reserved) as long as this server lives."""
        host, port = split_address(address)
        if port:
            return address
        reservation = reserve_port(host)
        self._reservations.append(reservation)
        return join_address(host, reservation.getsockname()[1])

    def _start_workers(self) -> None:
        self._public_address = self._shared(self.settings.address)
        if self.settings.health_address:
            self._health_address = self._shared(self.settings.health_address)
            self.health_port = split_address(self._health_address)[1]
        for worker in self._workers:
            worker.spawn(self._settings_of(worker))
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for worker in self._workers:
            worker.await_ports(deadline, self._token)
        self.public_port = self._workers[0].public_port
        self._wake.set()

    def stop(self, grace: float | None = None) -> None:
        """Drain every worker (SIGTERM; each gets `grace` seconds for in-flight calls), then stop."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._control is not None:
            self._control.stop(0).wait()
        self._release(self.settings.shutdown_grace_seconds if grace is None else grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    def _release(self, grace: float = 0.0) -> None:
        stop_workers(self._workers, grace)
        for reservation in self._reservations:
            reservation.close()
        self._reservations.clear()

    def _settings_of(self, worker: Worker) -> ServerSettings:
        return worker_settings(self.settings, worker.index, self.count, self._public_address, self._health_address)

    # --- the reconcile loop -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                now = time.monotonic()
                for worker in self._workers:
                    if worker.check(now, self._settings_of(worker), self._token):
                        self._wake.set()
                self._reconcile()
            except Exception:
                log.exception("supervisor tick failed")
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

    def _reconcile(self) -> None:
        """One rollout round: state the aspired version to every worker (stage-only), then do the next step."""
        aspired = self.aspired()
        message = aspired_message(aspired)
        workers = list(self._workers)
        replies = self._fan_out(lambda control: control.set_aspired(message, stage_only=True), workers)
        if self._stopping.is_set():
            return
        answers = [None if r is None else answer_from_message(r) for r in replies]
        self._note_agreement([None if a is None else a.state for a in answers])
        step = rollout.next_step(aspired.version, answers)
        if step.action is rollout.Action.REFUSE:
            log.warning("workers staged different versions %s of %s (alias moved during the load?): not committed",
                        list(step.divergent), aspired.model_uri)
        if step.action is not rollout.Action.COMMIT:
            return
        staged = [workers[i] for i in step.workers]
        results = self._fan_out(lambda control: control.commit_staged(message), staged)
        log.info("committed %s version %s on workers %s: %s", aspired.model_name, step.version,
                 [w.index for w in staged], ["ok" if r is not None and r.serving else "not swapped" for r in results])

    def _fan_out(self, call: Callable[[ControlClient], T], workers: list[Worker]) -> list[T | None]:
        """`call(control)` on every worker in parallel; None where the worker did not answer."""

        def one(worker: Worker) -> T | None:
            control = worker.control
            if control is None:
                return None
            try:
                return call(control)
            except ControlError as exc:
                log.warning("worker %d control call failed: %s", worker.index, exc.code)
                return None

        return list(self._pool.map(one, workers))

    # --- versions and status ----------------------------------------------------------------

    def aspired(self) -> AspiredVersion:
        with self._lock:
            return self._aspired

    def set_aspired(self, aspired: AspiredVersion) -> bool:
        """Take a new statement (rolled out by the next round, started at once); True when every worker serves
        it already."""
        with self._lock:
            if aspired != self._aspired:
                log.info("aspired version: %s %s (%s)", aspired.model_name, aspired.version or "-", aspired.model_uri)
            self._aspired = aspired
            agreed = self._agreed
        self._wake.set()
        return bool(agreed is not None and aspired.version and agreed.key == (aspired.model_name, aspired.version))

    def status(self) -> Any:
        """The aggregate GetStatusResponse (see rollout.aggregate), with every worker's own status."""
        workers = list(self._workers)
        statuses = self._fan_out(lambda control: control.status(), workers)
        states = [None if s is None else state_from_message(s) for s in statuses]
        self._note_agreement(states)
        with self._lock:
            agreed = self._agreed
        view = rollout.aggregate(agreed, states, [w.index for w in workers])
        entries = [WorkerEntry(w.index, w.pid, w.restarts, w.metrics_port, s)
                   for w, s in zip(workers, statuses, strict=True)]
        return status_message(self.aspired(), view, entries, Limits.of(self.settings))

    def _note_agreement(self, states: list[rollout.WorkerState | None]) -> None:
        with self._lock:
            self._agreed = rollout.agreed(self._agreed, states)

    # --- metrics ----------------------------------------------------------------------------

    def scrape_workers(self) -> list[Scrape]:
        """Each worker's /metrics text (None when it did not answer), with the pid it came from."""

        def one(worker: Worker) -> Scrape:
            pid, port = worker.pid, worker.metrics_port
            if not worker.up or not port:
                return Scrape(worker.index, pid, None)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=RPC_TIMEOUT_SECONDS) as resp:
                    return Scrape(worker.index, pid, resp.read().decode())
            except OSError:
                return Scrape(worker.index, pid, None)

        return list(self._pool.map(one, list(self._workers)))

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self._workers)

    @property
    def workers_up(self) -> int:
        return sum(1 for w in self._workers if w.up)
