"""Multi-worker server (`workers` > 1): worker processes share the public port; this process serves the
one control address and the one /metrics address for all of them.

Contract:
- Every worker serves the same version. A statement is fanned out to every worker with `stage_only`:
  each loads and validates, then holds the model staged. Only when every worker has staged it (or
  serves it already) does the supervisor commit it on all of them at once (one parallel round of
  loopback calls). If any worker fails, none swaps: the old version keeps serving everywhere and
  GetStatus says which worker failed and why.
- GetStatus aggregates: `serving` is the version every worker serves (while they differ, the last
  agreed version, with load_state LOADING); FAILED with the worker's error if any failed;
  `accepting_requests` only when every worker accepts; `workers` holds each worker's own status.
- A worker that dies is restarted with bounded back-off and converges: the reconcile loop re-states
  the aspired version to it and commits its staged model once it matches what the others serve.
- `stop()` drains every worker (each drains as a single server does) before it returns.
- /metrics is aggregated at scrape time from the workers' own endpoints (see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from tabserve.control.v1 import control_pb2, control_pb2_grpc
from tabserve_client.control import ControlClient, ControlError
from tabserve_server.app import ServingApp, check_control_address, split_address
from tabserve_server.core.loading import model_name_from_uri
from tabserve_server.core.model import AspiredVersion
from tabserve_server.metrics import PREFIX
from tabserve_server.settings import ServerSettings
from tabserve_server.transport.control import aspired_from_message, aspired_message, authorize
from tabserve_server.transport.edge import Edge

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5
RPC_TIMEOUT_SECONDS = 5.0
START_TIMEOUT_SECONDS = 180.0
RESTART_BACKOFF_MAX_SECONDS = 30.0
STABLE_SECONDS = 30.0  # a worker up this long resets its restart back-off

# How each gauge of the workers combines into the server's one value; counters and histograms add up.
_GAUGE_MERGE: dict[str, Callable[[list[float]], float]] = {
    PREFIX + "requests_in_flight": sum,
    PREFIX + "serving": min,
    PREFIX + "model_load_failing": max,
}
_CUMULATIVE = {"counter", "histogram", "summary"}
_OWN = {PREFIX + "workers", PREFIX + "worker_restarts"}  # the supervisor reports these itself


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_worker(settings: ServerSettings, index: int, conn: Connection) -> None:
    """Entry point of one worker process: a supervised ServingApp; sends its ports, serves until SIGTERM."""
    os.dup2(2, 1)  # stdout belongs to the supervisor's 'listening' line
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s worker-{index} %(name)s: %(message)s",
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    parent = os.getppid()
    try:
        app = ServingApp(settings, supervised=True)
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


@dataclasses.dataclass
class _Worker:
    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    pid: int = 0
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


def _served(status: Any) -> tuple[str, str] | None:
    return (status.serving.model_name, status.serving.version) if status.serving.model_name else None


class Supervisor:
    """A server of `workers` processes; same `start()`/`stop()` and ports as ServingApp."""

    def __init__(self, settings: ServerSettings) -> None:
        check_control_address(settings)
        self.settings = settings
        self.count = settings.workers if settings.workers > 0 else (os.cpu_count() or 1)
        self._ctx = multiprocessing.get_context("spawn")
        self._workers = [_Worker(i) for i in range(self.count)]
        self._public_address = settings.address
        self._aspired = AspiredVersion(
            model_name=settings.model_name or model_name_from_uri(settings.model_uri), version="",
            model_uri=settings.model_uri,
        )
        self._agreed: Any = None  # ServedVersion that every worker served at the last look
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pool = futures.ThreadPoolExecutor(max_workers=max(4, self.count), thread_name_prefix="fanout")
        self._thread: threading.Thread | None = None
        self._control: Any = None
        self._metrics_server: Any = None
        self._scraped: dict[int, tuple[int, dict[tuple[str, str, tuple[tuple[str, str], ...]], float]]] = {}
        self._retired: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        self.public_port = self.control_port = self.metrics_port = 0

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        try:
            host, port = split_address(s.address)
            first = self._workers if port else self._workers[:1]
            for worker in first:
                self._spawn(worker)
            self._await_ports(first)
            if not port:  # the others join the port the first one got
                self._public_address = _host_port(host, self.public_port)
                for worker in self._workers[1:]:
                    self._spawn(worker)
                self._await_ports(self._workers[1:])
        except BaseException:
            self._stop_workers(0.0)
            raise
        self._control = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="control"),
            interceptors=[Edge(None)], options=[("grpc.so_reuseport", 0)],
        )
        control_pb2_grpc.add_ModelControlServicer_to_server(  # type: ignore[no-untyped-call]
            SupervisorControl(self), self._control
        )
        self.control_port = self._control.add_insecure_port(s.control_address)
        registry = CollectorRegistry()
        registry.register(WorkerMetrics(self))
        metrics_host, metrics_port = split_address(s.metrics_address)
        self._metrics_server, _ = start_http_server(metrics_port, addr=metrics_host, registry=registry)
        self.metrics_port = self._metrics_server.server_port
        self._control.start()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        log.info("supervising %d workers on public port %d", self.count, self.public_port)

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
        self._stop_workers(self.settings.shutdown_grace_seconds if grace is None else grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("stopped")

    def _stop_workers(self, grace: float) -> None:
        running = [w.process for w in self._workers if w.process is not None and w.process.is_alive()]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace + 10.0
        for process in running:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                log.error("worker pid %s did not stop in time: killed", process.pid)
                process.kill()
                process.join(5)
        for worker in self._workers:
            self._forget(worker)

    # --- worker processes -------------------------------------------------------------------

    def _worker_settings(self, index: int) -> ServerSettings:
        # Each worker has its own cache directory: concurrent commits to one cache would delete each other's entries.
        # "0: number of cores" for batch prediction threads is shared out, so N workers do not oversubscribe.
        threads = self.settings.predict_threads or max(1, (os.cpu_count() or 1) // self.count)
        return dataclasses.replace(
            self.settings, address=self._public_address, control_address="127.0.0.1:0",
            metrics_address="127.0.0.1:0", cache_dir=str(Path(self.settings.cache_dir) / f"worker-{index}"),
            predict_threads=threads, workers=1,
        )

    def _spawn(self, worker: _Worker) -> None:
        receiver, sender = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=run_worker, args=(self._worker_settings(worker.index), worker.index, sender),
            name=f"tabserve-worker-{worker.index}", daemon=True,
        )
        process.start()
        sender.close()
        worker.process, worker.conn, worker.pid = process, receiver, process.pid or 0
        worker.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.pid)

    def _await_ports(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for worker in workers:
            assert worker.conn is not None and worker.process is not None
            while not worker.conn.poll(0.2):
                if not worker.process.is_alive():
                    raise RuntimeError(f"worker {worker.index} exited with code {worker.process.exitcode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {worker.index} did not start within {START_TIMEOUT_SECONDS:.0f} s")
            if not self._receive_ports(worker):
                raise RuntimeError(f"worker {worker.index} could not start; see its log")

    def _receive_ports(self, worker: _Worker) -> bool:
        assert worker.conn is not None
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return False
        if "error" in message:
            return False
        self.public_port = self.public_port or int(message["public_port"])
        worker.control_port, worker.metrics_port = int(message["control_port"]), int(message["metrics_port"])
        worker.control = ControlClient(f"127.0.0.1:{worker.control_port}", token=self.settings.control_token,
                                       timeout=RPC_TIMEOUT_SECONDS)
        self._wake.set()
        return True

    def _forget(self, worker: _Worker) -> None:
        if worker.control is not None:
            worker.control.close()
        if worker.conn is not None:
            worker.conn.close()
        worker.process = worker.conn = worker.control = None

    def _check_processes(self) -> None:
        now = time.monotonic()
        for worker in self._workers:
            if worker.process is None:
                if now >= worker.next_start_at:
                    self._spawn(worker)
                continue
            if not worker.process.is_alive():
                lived = now - worker.started_at
                worker.quick_deaths = worker.quick_deaths + 1 if lived < STABLE_SECONDS else 1
                wait = min(RESTART_BACKOFF_MAX_SECONDS, 0.5 * 2 ** (worker.quick_deaths - 1))
                log.error("worker %d (pid %d) died with code %s after %.1f s; restarting in %.1f s", worker.index,
                          worker.pid, worker.process.exitcode, lived, wait)
                self._forget(worker)
                worker.restarts += 1
                worker.next_start_at = now + wait
                continue
            if worker.control is None and worker.conn is not None and worker.conn.poll():
                self._receive_ports(worker)

    # --- versions ---------------------------------------------------------------------------

    def aspired(self) -> AspiredVersion:
        with self._lock:
            return self._aspired

    def set_aspired(self, aspired: AspiredVersion) -> bool:
        with self._lock:
            if aspired != self._aspired:
                log.info("aspired version: %s %s (%s)", aspired.model_name, aspired.version or "-", aspired.model_uri)
            self._aspired = aspired
            agreed = self._agreed
        self._wake.set()
        return bool(agreed is not None and aspired.version and agreed.version == aspired.version
                    and agreed.model_name == aspired.model_name)

    def _fan_out(self, call: Callable[[ControlClient], Any], workers: list[_Worker]) -> list[Any]:
        """`call(control)` on every worker in parallel; None where the worker did not answer."""

        def one(worker: _Worker) -> Any:
            control = worker.control
            if control is None:
                return None
            try:
                return call(control)
            except ControlError as exc:
                log.warning("worker %d control call failed: %s", worker.index, exc.code)
                return None

        return list(self._pool.map(one, workers))

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._check_processes()
                self._reconcile()
            except Exception:
                log.exception("supervisor tick failed")
            self._wake.wait(TICK_SECONDS)
            self._wake.clear()

    def _reconcile(self) -> None:
        aspired = self.aspired()
        message = aspired_message(aspired)
        workers = list(self._workers)
        answers = self._fan_out(lambda control: control.set_aspired(message, stage_only=True), workers)
        if any(a is None for a in answers) or self._stopping.is_set():
            return  # a worker is (re)starting: a new version is swapped only when every worker can swap
        self._note_agreement([a.status for a in answers])
        # After set_aspired a worker keeps a staged model only if it satisfies the statement.
        ready = [a.status.staged.version if not a.already_serving else a.status.serving.version for a in answers
                 if a.already_serving or a.status.staged.model_name]
        if len(ready) < len(answers) or all(a.already_serving for a in answers):
            return
        if len(set(ready)) > 1:
            log.warning("workers staged different versions %s of %s (alias moved during the load?): not committed",
                        sorted(set(ready)), aspired.model_uri)
            return
        staged = [w for w, a in zip(workers, answers, strict=True) if not a.already_serving]
        results = self._fan_out(lambda control: control.commit_staged(message), staged)
        log.info("committed %s version %s on workers %s: %s", aspired.model_name, ready[0],
                 [w.index for w in staged], ["ok" if r is not None and r.serving else "not swapped" for r in results])

    # --- status -----------------------------------------------------------------------------

    def status(self) -> Any:
        workers = list(self._workers)
        statuses = self._fan_out(lambda control: control.status(), workers)
        response = control_pb2.GetStatusResponse(aspired=aspired_message(self.aspired()))
        complete = all(s is not None for s in statuses)
        served = {_served(s) for s in statuses if s is not None}
        if complete:
            self._note_agreement(statuses)
        with self._lock:
            agreed = self._agreed
        if agreed is not None:
            response.serving.CopyFrom(agreed)
        failed = [(w, s) for w, s in zip(workers, statuses, strict=True)
                  if s is not None and s.load_state == control_pb2.LOAD_STATE_FAILED]
        if failed:
            worker, first = failed[0]
            response.load_state = control_pb2.LOAD_STATE_FAILED
            response.last_error = f"worker {worker.index}: {first.last_error}"
            response.last_error_at.CopyFrom(first.last_error_at)
            response.next_attempt_at.CopyFrom(first.next_attempt_at)
            response.failed_version = first.failed_version
            response.failed_attempts = max(s.failed_attempts for _, s in failed)
        elif complete and len(served) == 1 and all(s.load_state == control_pb2.LOAD_STATE_IDLE for s in statuses):
            response.load_state = control_pb2.LOAD_STATE_IDLE
        else:
            response.load_state = control_pb2.LOAD_STATE_LOADING
        response.accepting_requests = complete and all(s.accepting_requests for s in statuses)
        for worker, status in zip(workers, statuses, strict=True):
            entry = response.workers.add(index=worker.index, pid=worker.pid, up=status is not None,
                                         restarts=worker.restarts, metrics_port=worker.metrics_port)
            if status is not None:
                entry.status.CopyFrom(status)
        return response

    def _note_agreement(self, statuses: list[Any]) -> None:
        """Remember the version when every worker serves the same one (reported during a swap window)."""
        served = {_served(s) for s in statuses}
        if len(served) == 1 and None not in served:
            with self._lock:
                self._agreed = statuses[0].serving

    # --- metrics ----------------------------------------------------------------------------

    def scrape_workers(self) -> list[tuple[_Worker, int, str | None]]:
        """Each worker's /metrics text (None when it did not answer), with the pid it came from."""

        def one(worker: _Worker) -> tuple[_Worker, int, str | None]:
            pid, port = worker.pid, worker.metrics_port
            if not worker.up or not port:
                return worker, pid, None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=RPC_TIMEOUT_SECONDS) as resp:
                    return worker, pid, resp.read().decode()
            except OSError:
                return worker, pid, None

        return list(self._pool.map(one, list(self._workers)))

    def merge_cumulative(
        self, index: int, pid: int, samples: dict[tuple[str, str, tuple[tuple[str, str], ...]], float]
    ) -> None:
        """Keep counters monotonic across restarts: a replaced worker's last scraped totals are carried over."""
        with self._lock:
            previous = self._scraped.get(index)
            if previous is not None and previous[0] != pid:
                for key, value in previous[1].items():
                    self._retired[key] = self._retired.get(key, 0.0) + value
            self._scraped[index] = (pid, samples)

    def retired(self) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
        with self._lock:
            return dict(self._retired)

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self._workers)

    @property
    def workers_up(self) -> int:
        return sum(1 for w in self._workers if w.up)


class WorkerMetrics:
    """Collector of the supervisor's /metrics: the workers' metrics scraped and combined at scrape time."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        families: dict[str, tuple[str, str]] = {}  # name -> documentation, type
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[float]] = {}
        for worker, pid, text in self._supervisor.scrape_workers():
            if text is None:
                continue
            cumulative: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
            for family in text_string_to_metric_families(text):
                if family.name in _OWN:
                    continue
                families.setdefault(family.name, (family.documentation, family.type))
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    values.setdefault(key, []).append(sample.value)
                    if family.type in _CUMULATIVE:
                        cumulative[key] = sample.value
            self._supervisor.merge_cumulative(worker.index, pid, cumulative)
        for key, value in self._supervisor.retired().items():
            if key[0] in families:
                values.setdefault(key, []).append(value)
        metrics = {name: Metric(name, doc, typ) for name, (doc, typ) in families.items()}
        for (name, sample_name, labels), found in values.items():
            if name not in metrics:
                continue
            merge = sum if metrics[name].type in _CUMULATIVE else _GAUGE_MERGE.get(name, max)
            metrics[name].add_sample(sample_name, dict(labels), float(merge(found)))
        yield from sorted(metrics.values(), key=lambda m: m.name)
        yield GaugeMetricFamily(PREFIX + "workers", "Worker processes up (1 for a single process).",
                                value=self._supervisor.workers_up)
        yield CounterMetricFamily(PREFIX + "worker_restarts",
                                  "Worker processes restarted by the supervisor after they died.",
                                  value=self._supervisor.restarts)


class SupervisorControl(control_pb2_grpc.ModelControlServicer):
    """The one control address of a multi-worker server: statements fan out, status aggregates."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._token = supervisor.settings.control_token

    def SetAspiredVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        authorize(self._token, context)
        already = self._supervisor.set_aspired(aspired_from_message(request.aspired))
        return control_pb2.SetAspiredVersionResponse(already_serving=already, status=self._supervisor.status())

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        authorize(self._token, context)
        return self._supervisor.status()

    def CommitStaged(self, request: Any, context: grpc.ServicerContext) -> Any:
        authorize(self._token, context)
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the supervisor commits staged versions itself")
