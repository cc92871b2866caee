"""The scoring client's retries (tabserve_client/retry.py) against a scripted server: pushback honoured, one
x-request-id per logical call, retries until the call's own deadline, the last status raised, no retry of others;
the CLI's words for overload, the monitor's canary shed with one attempt and counted as `shed`, and health checks
made once (an unreachable server answers at once)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tabserve.scoring.v1 import scoring_pb2, scoring_pb2_grpc
from tabserve_client import RetryPolicy, ScoringClient, ScoringError, cli
from tabserve_demo.processes import free_port
from tabserve_monitor.loop import Monitor
from tabserve_monitor.metrics import MonitorMetrics
from tabserve_monitor.settings import MonitorSettings
from tests.support import loopback_servicer

PUSHBACK_MS = 150


class Scripted(scoring_pb2_grpc.ScoringServicer):
    """Refuses the first `refusals` Score calls with `code` (and the pushback trailer when `pushback`), then answers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.refusals = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.pushback = True
        self.seen: list[tuple[float, str]] = []

    def Score(self, request: Any, context: grpc.ServicerContext) -> Any:
        request_id = dict(context.invocation_metadata()).get("x-request-id", "")
        with self.lock:
            self.seen.append((time.monotonic(), str(request_id)))
            refuse = self.refusals > 0
            self.refusals -= 1
        if refuse:
            if self.pushback:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(PUSHBACK_MS)),))
            context.abort(self.code, f"server overloaded: attempt {len(self.seen)}")
        return scoring_pb2.ScoreResponse(model_name="m", model_version="7", scores=[0.5], decisions=[True])

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.refusals > 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "server overloaded: 9 calls waiting, 1 over the limit of 8")
        return scoring_pb2.ModelInfo(name="m", version="7", features=[scoring_pb2.Feature(name="x")])


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted()
    with loopback_servicer(scoring_pb2_grpc.add_ScoringServicer_to_server, servicer) as port:
        yield servicer, f"127.0.0.1:{port}"


def test_overload_is_retried_after_the_pushback_with_one_request_id(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.refusals = 3
    with ScoringClient(target, timeout=10) as client:
        assert client.score({"x": 1.0}).model_version == "7"
        client.score({"x": 1.0})
    first, second = servicer.seen[:4], servicer.seen[4:]
    assert len(first) == 4 and len(second) == 1
    assert len({rid for _, rid in first}) == 1 and first[0][1] and second[0][1] != first[0][1]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(first)]
    assert all(gap >= PUSHBACK_MS / 1000 for gap in gaps), gaps


def test_retries_last_until_the_deadline_then_the_last_status(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.refusals, servicer.pushback = 10**6, False
    started = time.monotonic()
    with ScoringClient(target, timeout=2.0) as client, pytest.raises(ScoringError) as caught:
        client.score({"x": 1.0})
    elapsed = time.monotonic() - started
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "overloaded" in caught.value.details
    assert len(servicer.seen) > 5  # more than gRPC's service-config retries could make
    assert 1.0 <= elapsed <= 2.5, elapsed


def test_max_attempts_one_never_retries(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.refusals = 1
    with ScoringClient(target, timeout=5) as client, pytest.raises(ScoringError) as caught:
        client.retry = RetryPolicy(max_attempts=1)
        client.score({"x": 1.0})
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and len(servicer.seen) == 1


def test_other_codes_are_not_retried(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    servicer.refusals, servicer.code = 1, grpc.StatusCode.RESOURCE_EXHAUSTED
    with ScoringClient(target, timeout=5) as client, pytest.raises(ScoringError) as caught:
        client.score({"x": 1.0})
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(servicer.seen) == 1


def test_the_cli_says_overloaded_in_words(scripted: tuple[Scripted, str], capsys: pytest.CaptureFixture[str]) -> None:
    servicer, target = scripted
    servicer.refusals = 10**6
    assert cli.main(["info", "--target", target, "--timeout", "0.5"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("error: the server is overloaded: it refused the call until the 0.5 s timeout ran out")
    assert "UNAVAILABLE: server overloaded: 9 calls waiting" in err


def test_the_monitor_canary_is_shed_like_any_caller_and_says_so(scripted: tuple[Scripted, str]) -> None:
    servicer, target = scripted
    settings = MonitorSettings(public_address=target, control_address="127.0.0.1:1", rpc_timeout_seconds=2.0)
    monitor = Monitor(settings, MonitorMetrics(CollectorRegistry()))
    try:
        monitor._probe_canary()  # the canary alone: no registry, no control port
        servicer.refusals = 1
        monitor._probe_canary()
    finally:
        monitor.close()
    registry = monitor.metrics.collector_registry

    def canary(result: str) -> float | None:
        return registry.get_sample_value("tabserve_monitor_canary_requests_total", {"result": result})

    assert (canary("success"), canary("shed"), canary("failure")) == (1.0, 1.0, 0.0)
    assert len(servicer.seen) == 2  # one attempt each: the canary does not retry
    assert registry.get_sample_value("tabserve_monitor_canary_up") == 0.0


def test_a_health_check_is_one_attempt_and_an_unreachable_server_answers_at_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens: every attempt is UNAVAILABLE (connection refused)
    started = time.monotonic()
    with ScoringClient(target, timeout=5.0) as client, pytest.raises(ScoringError) as caught:
        client.health()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 2.5  # retried, it would take the whole 5 s timeout
    started = time.monotonic()
    assert cli.main(["health", "--target", target, "--timeout", "5"]) == cli.EXIT_FAILED
    assert time.monotonic() - started < 2.5 and "UNAVAILABLE" in capsys.readouterr().err
