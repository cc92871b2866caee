"""`make demo`: a scripted tour of tabserve, from an empty directory to a hot reload and a refused broken version.

Bootstraps a SQLite MLflow registry with the demo model, starts the server and the monitor sidecar as child
processes on free loopback ports, scores applicants, promotes a new version (and times the switch), promotes
a broken version (and shows the server keeping the good one), rolls back, and stops both. Every wait is
bounded; any failed step ends the tour with a non-zero exit code and the tail of the process logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import grpc
from prometheus_client.parser import text_string_to_metric_families

from tabserve.control.v1 import control_pb2
from tabserve_client import ControlClient, ControlError, ScoringClient, ScoringError

MODEL_NAME: Final = "credit-default"
ALIAS: Final = "production"
POLL_INTERVAL_SECONDS: Final = 1.0
STEPS: Final = 8
# Bounded waits, generous because the tour may run on a small, busy machine.
START_TIMEOUT_S: Final = 120.0
SERVING_TIMEOUT_S: Final = 120.0
SWITCH_TIMEOUT_S: Final = 90.0
STOP_TIMEOUT_S: Final = 20.0
LOG_TAIL_LINES: Final = 20

T = TypeVar("T")


class TourError(Exception):
    """A step of the tour failed; the message says what was expected."""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(number: int, title: str) -> None:
    say(f"\n[{number}/{STEPS}] {title}")


def detail(text: str) -> None:
    say(f"      {text}")


def wait_until(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll `condition` until it returns something other than None/False; TourError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TourError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- child processes -----------------------------------------------------------------------------


@dataclass
class Child:
    """A child process whose first stdout line is a JSON 'listening' event; stderr (and later stdout) go to a log."""

    name: str
    proc: subprocess.Popen[str]
    log_path: Path
    log_file: IO[str]
    ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, module: str, env: Mapping[str, str], log_path: Path, timeout: float) -> Child:
        log_file = log_path.open("w", encoding="utf-8")
        proc = subprocess.Popen(
            [sys.executable, "-m", module], env=dict(env), stdout=subprocess.PIPE, stderr=log_file, text=True
        )
        child = cls(name, proc, log_path, log_file)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=child._pump_stdout, args=(lines,), name=f"{name}-stdout", daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise TourError(f"the {name} did not report its ports within {timeout:.0f}s (log: {log_path})") from None
        if not line:
            code = proc.wait(10)
            raise TourError(f"the {name} exited with code {code} before listening (log: {log_path})")
        event = json.loads(line)
        child.ports = {k: int(v) for k, v in event.items() if k.endswith("_port")}
        return child

    def _pump_stdout(self, lines: queue.Queue[str]) -> None:
        """Hand over the first line, then copy the rest to the log so a full pipe never blocks the child."""
        stdout = self.proc.stdout
        assert stdout is not None
        lines.put(stdout.readline())
        for line in stdout:
            if not self.log_file.closed:
                self.log_file.write(line)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> tuple[int, float, bool]:
        """SIGTERM, wait at most `timeout`, then SIGKILL; returns (exit code, seconds, killed)."""
        started = time.monotonic()
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                killed = True
        if not self.log_file.closed:
            self.log_file.flush()
        return self.proc.returncode, time.monotonic() - started, killed

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log_file.close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _child_env(prefix: str, values: Mapping[str, object]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
    env.update({prefix + key.upper(): str(value) for key, value in values.items()})
    return env


def read_metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of a process's /metrics on loopback; None when absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def _metric_or_none(port: int, name: str, **labels: str) -> float | None:
    try:
        return read_metric(port, name, **labels)
    except OSError:
        return None


# --- the tour ------------------------------------------------------------------------------------


@dataclass
class Tour:
    data_dir: Path
    children: list[Child] = field(default_factory=list)
    channels: list[grpc.Channel] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    current_step: str = ""

    def run(self) -> None:
        # Set before lightgbm is imported: OpenMP threads that spin while waiting make training many times
        # slower on a busy machine. Inherited by the server and monitor processes.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        logging.basicConfig(level=logging.WARNING, format="      %(levelname)s %(name)s: %(message)s")
        from mlflow import MlflowClient

        from tabserve_server.demo_model import make_applicants, register_demo_version

        logging.getLogger("alembic").setLevel(logging.WARNING)
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)

        # 1. registry
        self._step(1, "Bootstrap a SQLite MLflow registry with the demo model")
        started = time.monotonic()
        with self._registry_log():
            tracking_uri, good = self._bootstrap()
        registry = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        detail(f"{MODEL_NAME} version {good} @{ALIAS} in {tracking_uri} ({time.monotonic() - started:.1f}s)")

        # 2. processes
        self._step(2, "Start the server and the monitor sidecar on free loopback ports")
        server, monitor = self._start(tracking_uri)
        public = f"127.0.0.1:{server.ports['public_port']}"
        control_channel = grpc.insecure_channel(f"127.0.0.1:{server.ports['control_port']}")
        self.channels.append(control_channel)
        control = ControlClient(channel=control_channel, timeout=5)
        mport = monitor.ports["metrics_port"]

        def monitor_metric(name: str, **labels: str) -> float:
            return _metric_or_none(mport, name, **labels) or 0.0

        with ScoringClient(public, timeout=10.0) as client:
            started = time.monotonic()
            wait_until(lambda: _health(client) == "SERVING", SERVING_TIMEOUT_S, "the server to answer SERVING")
            detail(f"server SERVING after {time.monotonic() - started:.1f}s")
            wait_until(
                lambda: monitor_metric("tabserve_monitor_served_version") == float(good)
                and monitor_metric("tabserve_monitor_target_version") == float(good),
                SERVING_TIMEOUT_S, f"the monitor to see version {good} as target and served",
            )
            detail(f"monitor: target version {good} = served version {good}, registry polled every "
                   f"{POLL_INTERVAL_SECONDS:.0f}s")

            # 3. scoring
            rows = make_applicants(5, seed=2024)[0]
            self._step(3, f"Score {len(rows)} applicants with tabserve_client.ScoringClient")
            batch = _score(client, rows)
            detail(f"{'applicant':<10} {'P(default)':>10}  {'decision':<9} version")
            for i, (score, decision) in enumerate(zip(batch.scores, batch.decisions, strict=True), start=1):
                label = "decline" if decision else "approve"
                detail(f"{f'#{i}':<10} {score:>10.4f}  {label:<9} {batch.model_version}")
            detail(f"threshold {batch.threshold:g} (decline when P(default) >= threshold)")
            if batch.model_version != good:
                raise TourError(f"expected version {good} to answer, got {batch.model_version}")

            # 4. train a new version
            self._step(4, "Train and register a new version (the production alias does not move yet)")
            started = time.monotonic()
            with self._registry_log():
                new = register_demo_version(tracking_uri, MODEL_NAME, seed=int(good) + 1, alias=None)
            detail(f"registered {MODEL_NAME} version {new} in {time.monotonic() - started:.1f}s")

            # 5. promote and time the switch
            self._step(5, f"Promote version {new}: move alias {ALIAS} to it and keep scoring")
            responses, failures = 0, 0
            registry.set_registered_model_alias(MODEL_NAME, ALIAS, new)
            moved = time.monotonic()
            detail(f"alias {ALIAS} -> version {new}")
            deadline = moved + SWITCH_TIMEOUT_S
            served_after: str | None = None
            while time.monotonic() < deadline:
                try:
                    version = client.score(rows).model_version
                except ScoringError as exc:
                    failures += 1
                    detail(f"a call failed: {exc}")
                    continue
                responses += 1
                if version == new:
                    served_after = version
                    break
                if version != good:
                    raise TourError(f"version {version} answered, expected {good} or {new}")
            switch_s = time.monotonic() - moved
            if served_after is None:
                raise TourError(f"version {new} did not answer within {SWITCH_TIMEOUT_S:.0f}s of the alias move")
            load_s = _metric_or_none(server.ports["metrics_port"], "tabserve_server_model_load_duration_seconds")
            detail(f"switched: version {good} -> version {new}, first response from version {new} "
                   f"{switch_s:.2f}s after the alias move")
            detail(f"({responses} calls during the switch, {failures} failed; load + validation took "
                   f"{load_s or 0.0:.2f}s of it, the rest is the monitor's poll)")
            self.summary.append(f"hot reload: version {good} -> {new} in {switch_s:.2f}s, {failures} failed calls")
            wait_until(lambda: monitor_metric("tabserve_monitor_served_version") == float(new), SWITCH_TIMEOUT_S,
                       f"the monitor to see version {new} served")

            # 6. broken version
            self._step(6, "Promote a broken version (its model.lgb deleted from the artifact store)")
            failures_before = monitor_metric("tabserve_monitor_reloads_total", result="failure")
            started = time.monotonic()
            with self._registry_log():
                broken = register_demo_version(
                    tracking_uri, MODEL_NAME, seed=int(new) + 1, alias=ALIAS, broken="missing_artifacts"
                )
            detail(f"registered {MODEL_NAME} version {broken} ({time.monotonic() - started:.1f}s), "
                   f"alias {ALIAS} -> version {broken}")

            def failed_status() -> Any:
                status = _status(control)
                return status if status is not None and status.failed_version == broken and status.last_error \
                    else None

            status = wait_until(failed_status, SWITCH_TIMEOUT_S, f"the server to report the failed load of {broken}")
            def failures_risen() -> float | None:
                count = monitor_metric("tabserve_monitor_reloads_total", result="failure")
                return count if count > failures_before else None

            failures_after = wait_until(failures_risen, SWITCH_TIMEOUT_S, "the monitor's failure counter to rise")
            kept = _score(client, rows).model_version
            if kept != new or status.serving.version != new:
                raise TourError(f"expected version {new} to keep serving, got {kept}")
            detail(f"kept: the server still serves version {kept} (aspired {status.aspired.version}, "
                   f"state {control_pb2.LoadState.Name(status.load_state)})")
            detail(f'monitor: tabserve_monitor_reloads_total{{result="failure"}} {failures_before:g} -> '
                   f"{failures_after:g}")
            detail(f"GetStatus last_error: {status.last_error}")
            self.summary.append(f"broken version {broken} refused, version {kept} kept serving")

            # 7. roll back
            self._step(7, f"Roll back: move alias {ALIAS} back to version {new}")
            registry.set_registered_model_alias(MODEL_NAME, ALIAS, new)
            started = time.monotonic()

            def settled() -> bool:
                status = _status(control)
                return bool(status is not None and status.aspired.version == new
                            and status.load_state == control_pb2.LOAD_STATE_IDLE
                            and monitor_metric("tabserve_monitor_target_version") == float(new)
                            and monitor_metric("tabserve_monitor_served_version") == float(new))

            wait_until(settled, SWITCH_TIMEOUT_S, f"the server and monitor to settle on version {new}")
            detail(f"settled after {time.monotonic() - started:.2f}s: target = served = version {new}, "
                   "the failed load is cleared")

        # 8. stop
        self._step(8, "Stop the monitor and the server (SIGTERM)")
        for child in (monitor, server):
            code, seconds, killed = child.stop()
            if killed:
                raise TourError(f"the {child.name} did not exit within {STOP_TIMEOUT_S:.0f}s of SIGTERM")
            if code != 0:
                raise TourError(f"the {child.name} exited with code {code} (log: {child.log_path})")
            detail(f"{child.name} exited 0 after {seconds:.1f}s")

    @contextlib.contextmanager
    def _registry_log(self) -> Iterator[None]:
        """Send what mlflow prints while training and registering ("Created version ...") to logs/registry.log,
        so the terminal shows the tour's steps only."""
        with (self.data_dir / "logs" / "registry.log").open("a", encoding="utf-8") as log, \
                contextlib.redirect_stderr(log):
            yield

    def _step(self, number: int, title: str) -> None:
        self.current_step = f"{number}/{STEPS} {title}"
        step(number, title)

    def _bootstrap(self) -> tuple[str, str]:
        """Tracking URI and the (good) version behind the alias; repairs an alias left on a broken version."""
        from mlflow import MlflowClient

        from tabserve_server.demo_model import bootstrap_embedded_registry

        tracking_uri = bootstrap_embedded_registry(self.data_dir, model_name=MODEL_NAME)
        registry = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        current = registry.get_model_version_by_alias(MODEL_NAME, ALIAS)

        def is_broken(version: Any) -> bool:
            return str(registry.get_run(version.run_id).data.params.get("broken", "no")) != "no"

        if is_broken(current):  # a previous tour in this data dir stopped after promoting the broken version
            good = max((v for v in registry.search_model_versions(f"name='{MODEL_NAME}'") if not is_broken(v)),
                       key=lambda v: int(v.version))
            registry.set_registered_model_alias(MODEL_NAME, ALIAS, good.version)
            detail(f"alias {ALIAS} was on broken version {current.version}: moved back to {good.version}")
            current = good
        return tracking_uri, str(current.version)

    def _start(self, tracking_uri: str) -> tuple[Child, Child]:
        from tabserve_server.demo_model import embedded_paths

        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        server_env = _child_env("TABSERVE_SERVER_", {
            "model_uri": f"models:/{MODEL_NAME}@{ALIAS}",
            "tracking_uri": tracking_uri,
            "address": "127.0.0.1:0",
            "control_address": "127.0.0.1:0",
            "metrics_address": "127.0.0.1:0",
            "cache_dir": embedded_paths(self.data_dir).cache_dir,
            "retry_initial_seconds": 1.0,
            "retry_max_seconds": 10.0,
            "shutdown_grace_seconds": 5.0,
        })
        server = Child.start("server", "tabserve_server", server_env, logs / "server.log", START_TIMEOUT_S)
        self.children.append(server)
        p = server.ports
        detail(f"server   public 127.0.0.1:{p['public_port']}  control 127.0.0.1:{p['control_port']}  "
               f"metrics http://127.0.0.1:{p['metrics_port']}/metrics  (pid {server.proc.pid})")
        monitor_env = _child_env("TABSERVE_MONITOR_", {
            "tracking_uri": tracking_uri,
            "model_name": MODEL_NAME,
            "alias": ALIAS,
            "poll_interval_seconds": POLL_INTERVAL_SECONDS,
            "control_address": f"127.0.0.1:{p['control_port']}",
            "public_address": f"127.0.0.1:{p['public_port']}",
            "metrics_address": "127.0.0.1:0",
            "rpc_timeout_seconds": 5.0,
            "backoff_max_seconds": 5.0,
        })
        monitor = Child.start("monitor", "tabserve_monitor", monitor_env, logs / "monitor.log", START_TIMEOUT_S)
        self.children.append(monitor)
        detail(f"monitor  metrics http://127.0.0.1:{monitor.ports['metrics_port']}/metrics  "
               f"(pid {monitor.proc.pid}); logs in {logs}")
        return server, monitor

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for child in reversed(self.children):
            child.close()


def _health(client: ScoringClient) -> str | None:
    try:
        return client.health(timeout=5.0)
    except ScoringError:
        return None


def _status(control: Any) -> Any:
    """The server's GetStatus, or None when the call fails (polled again)."""
    try:
        return control.status()
    except ControlError:
        return None


def _score(client: ScoringClient, rows: Any) -> Any:
    try:
        return client.score(rows)
    except ScoringError as exc:
        raise TourError(f"scoring failed: {exc}") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tabserve_server.demo_tour", description=__doc__)
    parser.add_argument("--data-dir", type=Path, help="registry, artifacts, cache and logs (default: a fresh "
                        "temporary directory, removed after a successful tour)")
    args = parser.parse_args(argv)
    temporary = args.data_dir is None
    data_dir: Path = Path(tempfile.mkdtemp(prefix="tabserve-demo-")) if temporary else args.data_dir.absolute()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        say(f"FAILED: cannot use {data_dir} as the data directory: {exc}")
        return 2
    say(f"tabserve demo tour: registry, server and monitor under {data_dir}")
    tour = Tour(data_dir)
    started = time.monotonic()

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: the server and monitor are stopped too

    signal.signal(signal.SIGTERM, interrupted)
    ok, code = False, 1
    try:
        tour.run()
        ok = True
    except TourError as exc:
        say(f"\nFAILED at step {tour.current_step}: {exc}")
    except KeyboardInterrupt:
        say(f"\ninterrupted at step {tour.current_step}")
        code = 130
    except Exception as exc:  # an unexpected error is a failed step too, with its type for the bug report
        say(f"\nFAILED at step {tour.current_step}: {type(exc).__name__}: {exc}")
    finally:
        if not ok:
            for child in tour.children:
                say(f"\n--- last lines of the {child.name} log ({child.log_path})\n{child.log_tail()}")
        tour.close()
    if not ok:
        say(f"\nThe tour did not finish; everything is kept in {data_dir}")
        return code
    say("\nSummary")
    for line in tour.summary:
        say(f"  - {line}")
    say(f"  - both processes stopped cleanly; the tour took {time.monotonic() - started:.0f}s")
    if temporary:
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        say(f"  - registry, cache and logs kept in {data_dir}")
    say("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
