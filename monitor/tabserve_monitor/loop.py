"""The monitor's poll loop: resolve the target in the registry, state it to the server, verify, probe, export.

Contract:
- Every poll re-asserts the aspired version (idempotent on the server), so a restarted server or
  monitor converges without special cases. The monitor never says "reload now" and never asks
  the server to unload: with no usable target (dangling alias, deleted model, version not READY)
  it states nothing and only raises a flag.
- Reload results are inferred from status transitions: a change of the served version is a
  success; a new failed attempt on the target version (load_state FAILED) is a failure.
- Waits between polls on `stop`, so a signal ends the loop at once. Registry failures back off
  exponentially up to `backoff_max_seconds`; an unreachable server does not (it is a local sidecar
  peer and a refused connection costs nothing), so the monitor converges as soon as it is back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tabserve.control.v1 import control_pb2
from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client.channel import open_channel
from tabserve_client.client import OVERLOADED
from tabserve_client.control import RECONNECT_OPTIONS, ControlClient, ControlError, aspired_version
from tabserve_monitor.metrics import MonitorMetrics
from tabserve_monitor.registry import Problem, RegistryError, RegistryWatcher, Resolution, Target
from tabserve_monitor.settings import MonitorSettings
from tabserve_monitor.state import MonitorState

log = logging.getLogger(__name__)

def _version_number(version: str) -> float:
    return float(version) if version.isdigit() else 0.0


@dataclass
class PollResult:
    registry_ok: bool
    server_ok: bool
    resolution: Resolution | None = None
    status: Any = None


class Monitor:
    """Keeps one server on the version the registry names; see the module docstring for the contract."""

    def __init__(
        self, settings: MonitorSettings, metrics: MonitorMetrics | None = None, watcher: RegistryWatcher | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or MonitorMetrics()
        self.watcher = watcher or RegistryWatcher(
            settings.tracking_uri, settings.model_name, alias=settings.alias, stage=settings.stage,
            timeout_seconds=settings.rpc_timeout_seconds, audit_interval_seconds=settings.audit_interval_seconds,
        )
        self._control = ControlClient(settings.control_address, token=settings.control_token_value(),
                                      timeout=settings.rpc_timeout_seconds, tls=settings.control_tls_options())
        # Reconnect quickly to a (re)starting server, as the control client does.
        self._public_channel = open_channel(settings.public_address, RECONNECT_OPTIONS, settings.public_tls_options())
        self._health = health_pb2_grpc.HealthStub(self._public_channel)
        self._scoring = scoring_pb2_grpc.ScoringStub(self._public_channel)
        self._canary_request: Any = None  # sized for the version in `_canary_version`
        self._canary_version = ""
        self._target: Target | None = None
        self._served: str | None = None  # None: not observed yet
        self._mismatch_since: float | None = None
        self._failure_seen: tuple[str, int] = ("", 0)  # (failed_version, failed_attempts) already counted
        self._last_problem = Problem.NONE
        self._last_ambiguity = ""
        self.state = MonitorState(settings.model_name, self.watcher.follows, settings.canary)

    def close(self) -> None:
        self._control.close()
        self._public_channel.close()

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        log.info(
            "following %s %s in %s; server control %s", self.settings.model_name, self.watcher.follows,
            self.settings.tracking_uri or "(MLflow default)", self.settings.control_address,
        )
        failures = 0
        interval = self.settings.poll_interval_seconds
        while not stop.is_set():
            try:
                result = self.poll_once()
                registry_ok = result.registry_ok
            except Exception:
                log.exception("poll failed unexpectedly")
                registry_ok = False
            failures = 0 if registry_ok else failures + 1
            wait = interval if failures == 0 else min(self.settings.backoff_max_seconds, interval * 2**failures)
            stop.wait(wait)

    def poll_once(self) -> PollResult:
        resolution = self._resolve()
        registry_ok = resolution is not None
        if resolution is not None:
            target = resolution.target
            if target is not None and not target.ready:
                log.warning("%s version %s is %s, not READY: not stated", target.name, target.version, target.status)
                self.state.update(registry_problem="target_not_ready",
                                  registry_detail=f"version {target.version} is {target.status}, not READY")
                target = None
            self._target = target
        # On a registry failure the last resolved target is re-asserted: harmless (idempotent), and
        # a server restarted meanwhile is told what it should serve.
        target = self._target
        self.metrics.target_version.set(_version_number(target.version) if target else 0)
        self.state.update(target_version=target.version if target else "", last_poll_at=time.time())
        status = self._state_and_verify(target)
        self._probe_health()
        self._probe_canary()
        server_ok = status is not None
        if not registry_ok:
            self.metrics.polls.labels("registry_error").inc()
        elif not server_ok:
            self.metrics.polls.labels("server_error").inc()
        else:
            self.metrics.polls.labels("success").inc()
        return PollResult(registry_ok, server_ok, resolution, status)

    # --- steps -------------------------------------------------------------------------------

    def _resolve(self) -> Resolution | None:
        started = time.monotonic()
        try:
            resolution = self.watcher.resolve()
        except RegistryError as exc:
            self.metrics.registry_up.set(0)
            self.state.update(registry_up=False, registry_detail=str(exc))
            log.warning("registry poll failed: %s", exc)
            return None
        finally:
            self.metrics.poll_duration.observe(time.monotonic() - started)
        self.metrics.registry_up.set(1)
        self.metrics.last_successful_poll.set(time.time())
        self.metrics.target_ambiguous.set(1 if resolution.ambiguous else 0)
        problem = "" if resolution.problem is Problem.NONE else resolution.problem.value
        self.state.update(registry_up=True, registry_problem=problem, registry_detail=resolution.detail,
                          ambiguous=resolution.ambiguous)
        self.metrics.alias_dangling.set(1 if resolution.problem in (Problem.ALIAS_DANGLING, Problem.STAGE_EMPTY) else 0)
        self.metrics.model_missing.set(1 if resolution.problem is Problem.MODEL_MISSING else 0)
        target = resolution.target
        self.metrics.target_not_ready.set(1 if target is not None and not target.ready else 0)
        if resolution.problem is not self._last_problem:
            if resolution.problem is Problem.NONE:
                log.info("registry problem resolved")
            else:
                log.error("no target to serve (%s): %s; the server keeps its version", resolution.problem.value,
                          resolution.detail)
            self._last_problem = resolution.problem
        ambiguity = resolution.detail if resolution.ambiguous else ""
        if ambiguity != self._last_ambiguity:  # logged on change, not on every poll
            if ambiguity:
                log.warning("ambiguous target: %s", ambiguity)
            else:
                log.info("%s holds one version again", self.watcher.follows)
            self._last_ambiguity = ambiguity
        return resolution

    def _state_and_verify(self, target: Target | None) -> Any:
        try:
            if target is not None:
                self._control.set_aspired(aspired_version(target.uri, target.name, target.version))
            status = self._control.status()
        except ControlError as exc:
            self.metrics.control_up.set(0)
            self.state.update(control_up=False, load_state="", last_error="")
            log.warning("control call to %s failed: %s %s", self.settings.control_address, exc.code, exc.details)
            self._observe_served(None, target)
            return None
        self.metrics.control_up.set(1)
        self.state.update(control_up=True, last_error=status.last_error,
                          load_state=control_pb2.LoadState.Name(status.load_state).removeprefix("LOAD_STATE_"))
        self._observe_served(status.serving.version if status.serving.model_name else "", target)
        self._observe_failure(status, target)
        return status

    def _observe_served(self, served: str | None, target: Target | None) -> None:
        """`served`: None when the server could not be asked, '' when it serves nothing."""
        now = time.monotonic()
        if served is not None:
            if self._served is not None and served and served != self._served:
                log.info("server now serves version %s (was %s)", served, self._served or "nothing")
                self.metrics.reloads.labels("success").inc()
                self.state.reload("success", served, self._served)
            self._served = served
            self.metrics.served_version.set(_version_number(served))
        else:
            self.metrics.served_version.set(0)
        self.state.update(served_version=served or "")
        if target is None or (served is not None and served == target.version):
            self._mismatch_since = None
        elif self._mismatch_since is None:
            self._mismatch_since = now
        self.metrics.served_version_lag.set(0 if self._mismatch_since is None else now - self._mismatch_since)

    def _observe_failure(self, status: Any, target: Target | None) -> None:
        wanted = target.version if target is not None else status.aspired.version
        failed, attempts = status.failed_version, int(status.failed_attempts)
        if status.load_state != control_pb2.LOAD_STATE_FAILED or not failed or failed != wanted:
            return
        seen_version, seen_attempts = self._failure_seen
        new = attempts - seen_attempts if failed == seen_version and attempts >= seen_attempts else attempts
        if new > 0:
            log.error("server failed to load %s version %s (attempt %d): %s", status.aspired.model_name, failed,
                      attempts, status.last_error)
            self.metrics.reloads.labels("failure").inc(new)
            self.state.reload("failure", failed, self._served or "", status.last_error)
        self._failure_seen = (failed, attempts)

    def _probe_health(self) -> None:
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=""),
                                          timeout=self.settings.rpc_timeout_seconds)
        except grpc.RpcError:
            self.metrics.server_up.set(0)
            self.state.update(server_up=False)
            return
        up = response.status == health_pb2.HealthCheckResponse.SERVING
        self.metrics.server_up.set(1 if up else 0)
        self.state.update(server_up=up)

    def _probe_canary(self) -> None:
        """Score one row as a client would. The row is all NaN ("missing"), sized from GetModelInfo."""
        if not self.settings.canary:
            return
        timeout = self.settings.rpc_timeout_seconds
        ok, result = False, "failure"
        seconds: float | None = None
        try:
            if self._canary_request is None:
                info = self._scoring.GetModelInfo(scoring_pb2.GetModelInfoRequest(), timeout=timeout)
                request = scoring_pb2.ScoreRequest()
                request.matrix.float64_le = np.full(len(info.features), np.nan, dtype="<f8").tobytes()
                request.matrix.num_rows = 1
                self._canary_request, self._canary_version = request, info.version
            started = time.perf_counter()
            response = self._scoring.Score(self._canary_request, timeout=timeout)
            seconds = time.perf_counter() - started
            self.metrics.canary_duration.observe(seconds)
            scores = list(response.scores)
            ok = len(scores) == 1 and 0.0 <= scores[0] <= 1.0
            if not ok:
                log.warning("canary: unexpected answer from version %s: %s", response.model_version, scores)
            if response.model_version != self._canary_version:
                self._canary_request = None  # a new version may have another feature count: resize next time
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else ""
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                self._canary_request = None
            if code == grpc.StatusCode.UNAVAILABLE and (details or "").startswith(OVERLOADED):
                # Shed like any caller (no retry: the canary measures what one attempt gets); a failed probe.
                log.warning("canary Score on %s shed: %s", self.settings.public_address, details)
                result = "shed"
            else:
                log.warning("canary Score on %s failed: %s", self.settings.public_address, code)
        self.metrics.canary_up.set(1 if ok else 0)
        self.metrics.canary_requests.labels("success" if ok else result).inc()
        self.state.update(canary_result="success" if ok else result, canary_seconds=seconds)
