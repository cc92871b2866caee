"""`make demo`: a scripted tour of tabserve, from an empty directory to a hot reload and a refused broken version.

Bootstraps a SQLite MLflow registry with the demo model, starts the server and the monitor sidecar as child
processes on free loopback ports, scores applicants (and shows one declined applicant's reasons and its
decision log line), promotes
a new version (and times the switch), promotes a broken version (and shows the server keeping the good one),
rolls back, stops both, verifies the decision log's chain and ends with `tabserve-admin registry check` on the
tour's registry (tour_registry.py: which findings the deliberately broken version makes expected). Every wait is
bounded; any failed step ends the tour with a non-zero exit code and the tail of the process logs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tabserve.control.v1 import control_pb2
from tabserve_client import ControlClient, ControlError, ScoringClient, ScoringError
from tabserve_demo.processes import ChildProcess, MonitorProcess, ServerProcess
from tabserve_demo.tour_decisions import show_decision_record, verify_decision_log
from tabserve_demo.tour_output import STEPS, TourError, detail, metric_or_none, say, step, wait_until
from tabserve_demo.tour_reasons import show_declined_applicant
from tabserve_demo.tour_registry import alias_off_broken, broken_versions, check_registry

MODEL_NAME: Final = "credit-default"
ALIAS: Final = "production"
POLL_INTERVAL_SECONDS: Final = 1.0
# Bounded waits, generous because the tour may run on a small, busy machine.
START_TIMEOUT_S: Final = 120.0
SERVING_TIMEOUT_S: Final = 120.0
SWITCH_TIMEOUT_S: Final = 90.0
STOP_TIMEOUT_S: Final = 20.0
LOG_TAIL_LINES: Final = 20


@dataclass
class Tour:
    """The tour's steps, run in order by `run()`; the children and the control client are closed by `close()`."""

    data_dir: Path
    children: list[ChildProcess] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    current_step: str = ""
    tracking_uri: str = ""
    registry: Any = None
    control: ControlClient | None = None
    good: str = ""
    new: str = ""

    @property
    def decision_log(self) -> Path:
        return self.data_dir / "logs" / "decisions"

    def run(self) -> None:
        # Set before lightgbm is imported: OpenMP threads that spin while waiting make training many times
        # slower on a busy machine. Inherited by the server and monitor processes.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        logging.basicConfig(level=logging.WARNING, format="      %(levelname)s %(name)s: %(message)s")
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from tabserve_demo.applicants import make_applicants

        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        self._bootstrap_step()
        server, monitor = self._start_step()
        with ScoringClient(f"127.0.0.1:{server.public_port}", timeout=10.0) as client:
            self._wait_serving(client, monitor.metrics_port)
            rows = make_applicants(5, seed=2024)[0]
            self._score_step(client, rows)
            self._train_step()
            self._promote_step(client, rows, server.metrics_port, monitor.metrics_port)
            self._broken_step(client, rows, monitor.metrics_port)
            self._rollback_step(monitor.metrics_port)
        self._stop_step(server, monitor)
        self._step(9, f"Check the registry's health: tabserve-admin registry check {MODEL_NAME}")
        self.summary.append(check_registry(self.tracking_uri, MODEL_NAME, broken_versions(self.registry, MODEL_NAME)))

    # --- the steps -----------------------------------------------------------------------------------

    def _bootstrap_step(self) -> None:
        from mlflow import MlflowClient

        self._step(1, "Bootstrap a SQLite MLflow registry with the demo model")
        started = time.monotonic()
        with self._registry_log():
            self.tracking_uri, self.good = self._bootstrap()
        self.registry = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        detail(f"{MODEL_NAME} version {self.good} @{ALIAS} in {self.tracking_uri} "
               f"({time.monotonic() - started:.1f}s)")

    def _start_step(self) -> tuple[ServerProcess, MonitorProcess]:
        self._step(2, "Start the server and the monitor sidecar on free loopback ports")
        server, monitor = self._start(self.tracking_uri)
        self.control = ControlClient(server.control_target, timeout=5)
        return server, monitor

    def _wait_serving(self, client: ScoringClient, mport: int) -> None:
        good = self.good
        started = time.monotonic()
        wait_until(lambda: _health(client) == "SERVING", SERVING_TIMEOUT_S, "the server to answer SERVING")
        detail(f"server SERVING after {time.monotonic() - started:.1f}s")
        wait_until(
            lambda: _monitor_metric(mport, "tabserve_monitor_served_version") == float(good)
            and _monitor_metric(mport, "tabserve_monitor_target_version") == float(good),
            SERVING_TIMEOUT_S, f"the monitor to see version {good} as target and served",
        )
        detail(f"monitor: target version {good} = served version {good}, registry polled every "
               f"{POLL_INTERVAL_SECONDS:.0f}s")

    def _score_step(self, client: ScoringClient, rows: Any) -> None:
        self._step(3, f"Score {len(rows)} applicants with tabserve_client.ScoringClient, and explain a decline")
        batch = _score(client, rows)
        info = client.model_info()  # the version's words for a decision, from its tabserve.decision.* tags
        detail(f"{'applicant':<10} {'P(default)':>10}  {'decision':<9} version")
        for i, (score, decision) in enumerate(zip(batch.scores, batch.decisions, strict=True), start=1):
            detail(f"{f'#{i}':<10} {score:>10.4f}  {info.label(bool(decision)):<9} {batch.model_version}")
        detail(f"threshold {batch.threshold:g} ({info.positive_label} when P(default) >= threshold, "
               f"else {info.negative_label})")
        if batch.model_version != self.good:
            raise TourError(f"expected version {self.good} to answer, got {batch.model_version}")
        request_id, row = show_declined_applicant(client)
        show_decision_record(self.decision_log, request_id, row)

    def _train_step(self) -> None:
        from tabserve_demo.registration import register_demo_version

        self._step(4, "Train and register a new version (the production alias does not move yet)")
        started = time.monotonic()
        with self._registry_log():
            self.new = register_demo_version(self.tracking_uri, MODEL_NAME, seed=int(self.good) + 1, alias=None)
        detail(f"registered {MODEL_NAME} version {self.new} in {time.monotonic() - started:.1f}s")

    def _promote_step(self, client: ScoringClient, rows: Any, server_mport: int, mport: int) -> None:
        good, new = self.good, self.new
        self._step(5, f"Promote version {new}: move alias {ALIAS} to it and keep scoring")
        responses, failures = 0, 0
        self.registry.set_registered_model_alias(MODEL_NAME, ALIAS, new)
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
        load_s = metric_or_none(server_mport, "tabserve_server_model_load_duration_seconds")
        detail(f"switched: version {good} -> version {new}, first response from version {new} "
               f"{switch_s:.2f}s after the alias move")
        detail(f"({responses} calls during the switch, {failures} failed; load + validation took "
               f"{load_s or 0.0:.2f}s of it, the rest is the monitor's poll)")
        self.summary.append(f"hot reload: version {good} -> {new} in {switch_s:.2f}s, {failures} failed calls")
        wait_until(lambda: _monitor_metric(mport, "tabserve_monitor_served_version") == float(new),
                   SWITCH_TIMEOUT_S, f"the monitor to see version {new} served")

    def _broken_step(self, client: ScoringClient, rows: Any, mport: int) -> None:
        from tabserve_demo.registration import register_demo_version

        new = self.new
        self._step(6, "Promote a broken version (its model.lgb deleted from the artifact store)")
        failures_before = _monitor_metric(mport, "tabserve_monitor_reloads_total", result="failure")
        started = time.monotonic()
        with self._registry_log():
            broken = register_demo_version(
                self.tracking_uri, MODEL_NAME, seed=int(new) + 1, alias=ALIAS, broken="missing_artifacts"
            )
        detail(f"registered {MODEL_NAME} version {broken} ({time.monotonic() - started:.1f}s), "
               f"alias {ALIAS} -> version {broken}")

        def failed_status() -> Any:
            status = _status(self.control)
            return status if status is not None and status.failed_version == broken and status.last_error else None

        def failures_risen() -> float | None:
            count = _monitor_metric(mport, "tabserve_monitor_reloads_total", result="failure")
            return count if count > failures_before else None

        status = wait_until(failed_status, SWITCH_TIMEOUT_S, f"the server to report the failed load of {broken}")
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

    def _rollback_step(self, mport: int) -> None:
        new = self.new
        self._step(7, f"Roll back: move alias {ALIAS} back to version {new}")
        self.registry.set_registered_model_alias(MODEL_NAME, ALIAS, new)
        started = time.monotonic()

        def settled() -> bool:
            status = _status(self.control)
            return bool(status is not None and status.aspired.version == new
                        and status.load_state == control_pb2.LOAD_STATE_IDLE
                        and _monitor_metric(mport, "tabserve_monitor_target_version") == float(new)
                        and _monitor_metric(mport, "tabserve_monitor_served_version") == float(new))

        wait_until(settled, SWITCH_TIMEOUT_S, f"the server and monitor to settle on version {new}")
        detail(f"settled after {time.monotonic() - started:.2f}s: target = served = version {new}, "
               "the failed load is cleared")

    def _stop_step(self, server: ChildProcess, monitor: ChildProcess) -> None:
        self._step(8, "Stop the monitor and the server (SIGTERM), verify the decision log")
        for child in (monitor, server):
            started = time.monotonic()
            try:
                code = child.terminate(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                raise TourError(f"the {child.name} did not exit within {STOP_TIMEOUT_S:.0f}s of SIGTERM") from None
            if code != 0:
                raise TourError(f"the {child.name} exited with code {code} (log: {child.log_file})")
            detail(f"{child.name} exited 0 after {time.monotonic() - started:.1f}s")
        self.summary.append(f"decision log: {verify_decision_log(self.decision_log)}")

    # --- helpers -------------------------------------------------------------------------------------

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

        from tabserve_demo.embedded import bootstrap_embedded_registry

        tracking_uri = bootstrap_embedded_registry(self.data_dir, model_name=MODEL_NAME)
        registry = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return tracking_uri, alias_off_broken(registry, MODEL_NAME, ALIAS)

    def _start(self, tracking_uri: str) -> tuple[ServerProcess, MonitorProcess]:
        from tabserve_demo.embedded import embedded_paths

        logs = self.data_dir / "logs"
        shutil.rmtree(self.decision_log, ignore_errors=True)  # each tour verifies the log of its own server
        server = ServerProcess({
            "model_uri": f"models:/{MODEL_NAME}@{ALIAS}",
            "tracking_uri": tracking_uri,
            "address": "127.0.0.1:0",
            "control_address": "127.0.0.1:0",
            "metrics_address": "127.0.0.1:0",
            "cache_dir": embedded_paths(self.data_dir).cache_dir,
            "retry_initial_seconds": 1.0,
            "retry_max_seconds": 10.0,
            "shutdown_grace_seconds": 5.0,
            "decision_log_dir": str(self.decision_log),
        }, log_file=logs / "server.log", start_timeout=START_TIMEOUT_S)
        self.children.append(server)
        detail(f"server   public {server.target}  control {server.control_target}  "
               f"metrics http://127.0.0.1:{server.metrics_port}/metrics  (pid {server.pid})")
        monitor = MonitorProcess({
            "tracking_uri": tracking_uri,
            "model_name": MODEL_NAME,
            "alias": ALIAS,
            "poll_interval_seconds": POLL_INTERVAL_SECONDS,
            "control_address": server.control_target,
            "public_address": server.target,
            "metrics_address": "127.0.0.1:0",
            "rpc_timeout_seconds": 5.0,
            "backoff_max_seconds": 5.0,
        }, log_file=logs / "monitor.log", start_timeout=START_TIMEOUT_S)
        self.children.append(monitor)
        detail(f"monitor  metrics http://127.0.0.1:{monitor.metrics_port}/metrics  "
               f"(pid {monitor.pid}); logs in {logs}")
        return server, monitor

    def log_tail(self, child: ChildProcess, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(child.stderr().splitlines()[-lines:])

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for child in reversed(self.children):
            child.stop(STOP_TIMEOUT_S)


def _monitor_metric(port: int, name: str, **labels: str) -> float:
    return metric_or_none(port, name, **labels) or 0.0


def _health(client: ScoringClient) -> str | None:
    try:
        return client.health(timeout=5.0)
    except ScoringError:
        return None


def _status(control: ControlClient | None) -> Any:
    """The server's GetStatus, or None when the call fails (polled again)."""
    assert control is not None, "started in step 2"
    try:
        return control.status()
    except ControlError:
        return None


def _score(client: ScoringClient, rows: Any) -> Any:
    try:
        return client.score(rows)
    except ScoringError as exc:
        raise TourError(f"scoring failed: {exc}") from exc


def _data_dir(given: Path | None) -> Path:
    return Path(tempfile.mkdtemp(prefix="tabserve-demo-")) if given is None else given.absolute()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tabserve_demo.tour", description=__doc__)
    parser.add_argument("--data-dir", type=Path, help="registry, artifacts, cache and logs (default: a fresh "
                        "temporary directory, removed after a successful tour)")
    args = parser.parse_args(argv)
    temporary = args.data_dir is None
    data_dir = _data_dir(args.data_dir)
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
                say(f"\n--- last lines of the {child.name} log ({child.log_file})\n{tour.log_tail(child)}")
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
