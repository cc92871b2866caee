"""The multi-worker rollout and status aggregation as tables of cases, with no processes: every combination of
staged / failed / down / already-serving workers, restarts mid-rollout, a newer statement mid-rollout
(tabserve_server.supervisor.rollout), and the translation of protos to and from it (servicer.py). The same
invariant end-to-end, with processes, is in test_workers.py."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tabserve.control.v1 import control_pb2
from tabserve_server.core.manager import LoadState
from tabserve_server.core.model import AspiredVersion
from tabserve_server.supervisor.rollout import (
    Action,
    Aggregate,
    Answer,
    Failure,
    Served,
    Step,
    WorkerState,
    aggregate,
    agreed,
    next_step,
)
from tabserve_server.supervisor.servicer import WorkerEntry, state_from_message, status_message
from tabserve_server.transport.admission import Limits

V1, V2, V3 = Served("m", "1"), Served("m", "2"), Served("m", "3")
AT = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
BOOM = Failure("boom", "2", 1, AT, AT)


def idle(version: Served | None) -> WorkerState:
    return WorkerState(LoadState.IDLE, serving=version, accepting=version is not None)


def loading(old: Served | None = V1) -> WorkerState:
    return WorkerState(LoadState.LOADING, serving=old, accepting=old is not None)


def staged(version: Served, old: Served | None = V1) -> WorkerState:
    return WorkerState(LoadState.STAGED, serving=old, staged=version, accepting=old is not None)


def failed(failure: Failure = BOOM, old: Served | None = V1) -> WorkerState:
    return WorkerState(LoadState.FAILED, serving=old, accepting=old is not None, failure=failure)


def serves(version: Served) -> Answer:
    return Answer(already_serving=True, state=idle(version))


def answer(state: WorkerState) -> Answer:
    return Answer(already_serving=False, state=state)


DOWN = None  # the worker did not answer: down, restarting, or not up yet

# (aspired version, each worker's answer, expected step)
STEPS: dict[str, tuple[str, list[Answer | None], Step]] = {
    "all staged: commit all": ("2", [answer(staged(V2)), answer(staged(V2))], Step(Action.COMMIT, (0, 1), "2")),
    "three staged: commit all three": (
        "2", [answer(staged(V2)), answer(staged(V2)), answer(staged(V2))], Step(Action.COMMIT, (0, 1, 2), "2")),
    "all serve it: nothing to do": ("2", [serves(V2), serves(V2)], Step(Action.NOTHING)),
    "one staged, one down": ("2", [answer(staged(V2)), DOWN], Step(Action.WAIT)),
    "all down": ("2", [DOWN, DOWN], Step(Action.WAIT)),
    "serving, one down": ("2", [serves(V2), DOWN], Step(Action.WAIT)),
    "one staged, one loading": ("2", [answer(staged(V2)), answer(loading())], Step(Action.WAIT)),
    "one staged, one failed": ("2", [answer(staged(V2)), answer(failed())], Step(Action.WAIT)),
    "one loading, one failed": ("2", [answer(loading()), answer(failed())], Step(Action.WAIT)),
    "all failed": ("2", [answer(failed()), answer(failed())], Step(Action.WAIT)),
    "staged, down, staged": ("2", [answer(staged(V2)), DOWN, answer(staged(V2))], Step(Action.WAIT)),
    # A worker restarted after the others committed: it starts with nothing and stages the version.
    "restarted worker staged: commit it alone": (
        "2", [serves(V2), answer(staged(V2, old=None))], Step(Action.COMMIT, (1,), "2")),
    "restarted worker (from its cache) staged: commit it alone": (
        "2", [answer(staged(V2, old=V1)), serves(V2)], Step(Action.COMMIT, (0,), "2")),
    "restarted worker still loading": ("2", [serves(V2), answer(loading(old=None))], Step(Action.WAIT)),
    "restarted worker failed": ("2", [serves(V2), answer(failed(old=None))], Step(Action.WAIT)),
    "restarted mid-rollout: staged, fresh and loading": (
        "2", [answer(staged(V2)), answer(loading(old=None))], Step(Action.WAIT)),
    "restarted mid-rollout: staged, fresh and staged": (
        "2", [answer(staged(V2)), answer(staged(V2, old=None))], Step(Action.COMMIT, (0, 1), "2")),
    "both restarted, both staged": (
        "2", [answer(staged(V2, old=None)), answer(staged(V2, old=None))], Step(Action.COMMIT, (0, 1), "2")),
    # An alias statement (no pinned version): the alias may move while the workers load.
    "alias moved during the load: refuse": (
        "", [answer(staged(V2)), answer(staged(V3))], Step(Action.REFUSE, divergent=("2", "3"))),
    "alias moved, one serves the old target: refuse": (
        "", [serves(V2), answer(staged(V3, old=V2))], Step(Action.REFUSE, divergent=("2", "3"))),
    "alias: all staged one version": ("", [answer(staged(V3)), answer(staged(V3))], Step(Action.COMMIT, (0, 1), "3")),
    "alias: all serve it": ("", [serves(V2), serves(V2)], Step(Action.NOTHING)),
    # A newer statement (3) arrived while version 2 was rolling out.
    "newer statement: answers still hold the older version": (
        "3", [answer(staged(V2)), answer(staged(V2))], Step(Action.WAIT)),
    "newer statement: one staged it, one loads it": ("3", [answer(staged(V3)), answer(loading())], Step(Action.WAIT)),
    "newer statement: one staged the old, one the new": (
        "3", [answer(staged(V2)), answer(staged(V3))], Step(Action.REFUSE, divergent=("2", "3"))),
    "newer statement: all staged it": ("3", [answer(staged(V3)), answer(staged(V3))], Step(Action.COMMIT, (0, 1), "3")),
    "newer statement back to the served version": ("1", [serves(V1), serves(V1)], Step(Action.NOTHING)),
    "newer statement, a worker committed the older one": (
        "3", [answer(staged(V3, old=V2)), answer(staged(V3, old=V1))], Step(Action.COMMIT, (0, 1), "3")),
}


@pytest.mark.parametrize(("aspired", "answers", "expected"), list(STEPS.values()), ids=list(STEPS))
def test_next_step(aspired: str, answers: list[Answer | None], expected: Step) -> None:
    step = next_step(aspired, answers)
    assert (step.action, step.workers, step.version, step.divergent) == (
        expected.action, expected.workers, expected.version, expected.divergent), step.reason


def test_a_commit_never_leaves_two_versions() -> None:
    """Every commit in the table ends with all workers on one version."""
    for name, (aspired, answers, _) in STEPS.items():
        step = next_step(aspired, answers)
        if step.action is not Action.COMMIT:
            continue
        after = {a.state.serving.version if i not in step.workers and a.state.serving is not None
                 else step.version for i, a in enumerate(answers) if a is not None}
        assert after == {step.version}, name


# (last agreed version, each worker's state, expected aggregate)
AGGREGATES: dict[str, tuple[Served | None, list[WorkerState | None], Aggregate]] = {
    "all serve one version": (None, [idle(V1), idle(V1)], Aggregate(LoadState.IDLE, V1, True)),
    "swap window: last agreed version": (V1, [idle(V1), idle(V2)], Aggregate(LoadState.LOADING, V1, True)),
    "swap window, never agreed": (None, [idle(V1), idle(V2)], Aggregate(LoadState.LOADING, None, True)),
    "agreement moves on": (V1, [idle(V2), idle(V2)], Aggregate(LoadState.IDLE, V2, True)),
    "one down": (V1, [idle(V1), None], Aggregate(LoadState.LOADING, V1, False)),
    "all down": (V1, [None, None], Aggregate(LoadState.LOADING, V1, False)),
    "one staged": (V1, [idle(V1), staged(V2)], Aggregate(LoadState.LOADING, V1, True)),
    "all staged": (V1, [staged(V2), staged(V2)], Aggregate(LoadState.LOADING, V1, True)),
    "one loading": (V1, [idle(V1), loading()], Aggregate(LoadState.LOADING, V1, True)),
    "one failed": (V1, [idle(V1), failed()], Aggregate(LoadState.FAILED, V1, True, Failure("worker 1: boom", "2", 1,
                                                                                              AT, AT))),
    "failed and down": (V1, [failed(), None], Aggregate(LoadState.FAILED, V1, False, Failure("worker 0: boom", "2", 1,
                                                                                              AT, AT))),
    "two failed: the first's error, the most attempts": (
        V1, [failed(Failure("a", "2", 2)), failed(Failure("b", "2", 5))],
        Aggregate(LoadState.FAILED, V1, True, Failure("worker 0: a", "2", 5))),
    "failed, staged and loading": (
        V1, [staged(V2), failed(), loading()], Aggregate(LoadState.FAILED, V1, True, Failure("worker 1: boom", "2", 1,
                                                                                           AT, AT))),
    "restarted worker, nothing loaded yet": (V2, [idle(V2), loading(old=None)],
                                              Aggregate(LoadState.LOADING, V2, False)),
    "restarted worker staged": (V2, [idle(V2), staged(V2, old=None)], Aggregate(LoadState.LOADING, V2, False)),
    "restarted worker serves from its cache": (V2, [idle(V2), idle(V1)], Aggregate(LoadState.LOADING, V2, True)),
    "one draining": (V1, [idle(V1), WorkerState(LoadState.IDLE, serving=V1, accepting=False)],
                     Aggregate(LoadState.IDLE, V1, False)),
    "nothing served anywhere yet": (None, [loading(old=None), loading(old=None)],
                                    Aggregate(LoadState.LOADING, None, False)),
}


@pytest.mark.parametrize(("previous", "states", "expected"), list(AGGREGATES.values()), ids=list(AGGREGATES))
def test_aggregate(previous: Served | None, states: list[WorkerState | None], expected: Aggregate) -> None:
    assert aggregate(previous, states, list(range(len(states)))) == expected


def test_aggregate_names_the_worker_by_its_index() -> None:
    view = aggregate(V1, [idle(V1), failed()], [3, 7])
    assert view.failure is not None and view.failure.error == "worker 7: boom"


@pytest.mark.parametrize(("previous", "states", "expected"), [
    (None, [idle(V1), idle(V1)], V1),
    (V1, [idle(V2), idle(V2)], V2),
    (V1, [idle(V2), None], V1),  # not every worker answered: keep the last agreement
    (V1, [idle(V1), idle(V2)], V1),
    (V1, [loading(old=None), loading(old=None)], V1),  # all restarted: nothing served is no agreement
    (None, [], None),
])
def test_agreed(previous: Served | None, states: list[WorkerState | None], expected: Served | None) -> None:
    assert agreed(previous, states) == expected


def test_protos_translate_both_ways() -> None:
    """A worker's GetStatus proto into the rollout's state and the aggregate back into the supervisor's proto:
    served version (with its load time and digest), failure (with its times) and the worker list survive."""
    loaded = Timestamp(seconds=1_800_000_000, nanos=123_000)
    digest = "sha256:" + "ab" * 32
    good = control_pb2.GetStatusResponse(
        serving=control_pb2.ServedVersion(model_name="m", version="1", source_uri="s3://b/1", loaded_from="registry",
                                          loaded_at=loaded, digest=digest),
        load_state=control_pb2.LOAD_STATE_IDLE, accepting_requests=True,
    )
    bad = control_pb2.GetStatusResponse()
    bad.CopyFrom(good)
    bad.load_state, bad.last_error = control_pb2.LOAD_STATE_FAILED, "boom"
    bad.failed_version, bad.failed_attempts = "2", 3
    bad.last_error_at.CopyFrom(loaded)
    bad.next_attempt_at.CopyFrom(Timestamp(seconds=1_800_000_060))
    states = [state_from_message(good), state_from_message(bad)]
    assert states[0] == WorkerState(LoadState.IDLE, serving=Served("m", "1", "s3://b/1", "registry",
                                                                   loaded.ToDatetime(tzinfo=UTC), digest),
                                    accepting=True)
    view = aggregate(states[0].serving, [*states, None], [0, 1, 2])  # the last agreement: version 1
    entries = [WorkerEntry(0, 10, 0, 9000, good), WorkerEntry(1, 11, 2, 9001, bad), WorkerEntry(2, 12, 5, 0, None)]
    message = status_message(AspiredVersion("m", "2", "models:/m/2"), view, entries, Limits(8, 16, 0.25, 0.5, 8))
    assert message.serving == good.serving and message.serving.digest == digest  # every ServedVersion field
    bounds = message.admission  # each worker's own
    assert (bounds.max_in_flight, bounds.max_waiting) == (8, 16)
    assert (bounds.max_queue_seconds, bounds.caller_share, bounds.max_concurrent_streams) == (0.25, 0.5, 8)
    assert message.load_state == control_pb2.LOAD_STATE_FAILED and not message.accepting_requests
    assert (message.last_error, message.failed_version, message.failed_attempts) == ("worker 1: boom", "2", 3)
    assert message.last_error_at == bad.last_error_at and message.next_attempt_at == bad.next_attempt_at
    assert message.aspired.model_uri == "models:/m/2"
    assert [(w.index, w.pid, w.up, w.restarts, w.metrics_port) for w in message.workers] == [
        (0, 10, True, 0, 9000), (1, 11, True, 2, 9001), (2, 12, False, 5, 0)]
    assert message.workers[1].status == bad and not message.workers[2].HasField("status")
    healthy = status_message(AspiredVersion("m", "1", "models:/m/1"), aggregate(None, states[:1], [0]), entries[:1])
    assert healthy.load_state == control_pb2.LOAD_STATE_IDLE and not healthy.HasField("last_error_at")
