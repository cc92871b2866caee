"""The two-phase rollout and the aggregate status as pure functions over plain frozen dataclasses.

No grpc, no processes, no clock: `next_step` turns the workers' answers to one round of stage-only statements
into what the supervisor does next, and `aggregate` turns their statuses into the one status of the server.
The supervisor translates protos into these types and back (servicer.py), so the invariant "every worker
serves the same version" is checked by tables of cases (tests/test_rollout.py) as well as by real processes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tabserve_server.core.manager import LoadState


@dataclass(frozen=True)
class Served:
    """A model version held by a worker (served or staged)."""

    model_name: str
    version: str
    source_uri: str = ""
    loaded_from: str = ""
    loaded_at: datetime | None = None
    digest: str = ""  # "sha256:<hex>" of the bytes the version was parsed from
    backend: str = ""  # as the worker reports it (core/model.py LoadedModel.backend), with its version and note
    backend_version: str = ""
    backend_note: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.model_name, self.version


@dataclass(frozen=True)
class Failure:
    """A worker's last failed load (its `last_error` and the fields that go with it)."""

    error: str
    version: str = ""
    attempts: int = 0
    at: datetime | None = None
    next_attempt_at: datetime | None = None


@dataclass(frozen=True)
class WorkerState:
    """One worker's own status, as its GetStatus reports it."""

    load_state: LoadState
    serving: Served | None = None
    staged: Served | None = None
    accepting: bool = False
    failure: Failure | None = None


@dataclass(frozen=True)
class Answer:
    """A worker's answer to a stage-only SetAspiredVersion: whether it serves the statement already, and its
    status after the statement (a worker keeps a staged model only if it satisfies the statement)."""

    already_serving: bool
    state: WorkerState

    @property
    def ready(self) -> Served | None:
        """What this worker would serve after a commit: its served version or its staged one; None: not ready."""
        return self.state.serving if self.already_serving else self.state.staged


# --- the next step of a rollout ------------------------------------------------------------------


class Action(enum.Enum):
    WAIT = "wait"  # a worker did not answer or has not staged the version yet: ask again next round
    COMMIT = "commit"  # every worker is ready with one version: commit it on `workers`
    NOTHING = "nothing"  # every worker serves the statement already
    REFUSE = "refuse"  # workers staged different versions (an alias moved during the load): commit none


@dataclass(frozen=True)
class Step:
    action: Action
    workers: tuple[int, ...] = ()  # COMMIT: the positions (in the answers) of the workers to commit
    version: str = ""  # COMMIT: the version they commit
    divergent: tuple[str, ...] = ()  # REFUSE: the versions they staged, sorted
    reason: str = ""


def next_step(aspired_version: str, answers: Sequence[Answer | None]) -> Step:
    """What to do after one round of stage-only statements of the version `aspired_version` ('' for a URI
    without a pinned version, such as an alias); `answers[i]` is worker i's answer, None if it did not answer.

    A version is committed only when every worker answered and every one is ready with that same version, so
    no worker ever serves a version the others cannot: a worker that is down or restarting, still loading or
    failed holds the rollout back, and the old version keeps serving everywhere.
    """
    missing = [i for i, answer in enumerate(answers) if answer is None]
    if missing:
        return Step(Action.WAIT, reason=f"workers {missing} did not answer (down or restarting)")
    present = [a for a in answers if a is not None]
    if all(a.already_serving for a in present):
        return Step(Action.NOTHING, reason="every worker serves the statement")
    ready = [a.ready for a in present]
    if any(r is None for r in ready):
        waiting = [i for i, r in enumerate(ready) if r is None]
        return Step(Action.WAIT, reason=f"workers {waiting} have not staged the version")
    versions = {r.key for r in ready if r is not None}
    if len(versions) > 1:
        return Step(Action.REFUSE, divergent=tuple(sorted(v for _, v in versions)),
                    reason="workers staged different versions (alias moved during the load?)")
    ((_, version),) = versions
    if aspired_version and version != aspired_version:  # an answer to an older statement: never commit it
        return Step(Action.WAIT, reason=f"ready with version {version}, not the aspired {aspired_version}")
    staged = tuple(i for i, a in enumerate(present) if not a.already_serving)
    return Step(Action.COMMIT, workers=staged, version=version)


# --- the aggregate status ------------------------------------------------------------------------


def agreed(previous: Served | None, states: Sequence[WorkerState | None]) -> Served | None:
    """The version every worker serves, when every worker answered and they all serve one; else `previous`
    (the last agreed version, reported while the workers differ during a swap window or a restart)."""
    if not states or any(s is None for s in states):
        return previous
    served = {s.serving.key if s.serving is not None else None for s in states if s is not None}
    if len(served) == 1 and None not in served:
        first = states[0]
        assert first is not None and first.serving is not None
        return first.serving
    return previous


@dataclass(frozen=True)
class Aggregate:
    """The server's status made of its workers' (the supervisor's GetStatus, without the worker list)."""

    load_state: LoadState
    serving: Served | None
    accepting: bool
    failure: Failure | None = None  # the first failed worker's, `error` prefixed with "worker <i>: "


def aggregate(previous: Served | None, states: Sequence[WorkerState | None], indexes: Sequence[int]) -> Aggregate:
    """The aggregate of `states` (None: worker `indexes[i]` did not answer), given the last agreed version.

    - `serving`: the version every worker serves (see `agreed`).
    - FAILED when any worker failed, with the first one's error and the most attempts of any; IDLE only when
      every worker answered, all serve one version and none has anything pending; LOADING otherwise.
    - `accepting` only when every worker answered and accepts requests.
    """
    serving = agreed(previous, states)
    complete = all(s is not None for s in states)
    answered = [(index, s) for index, s in zip(indexes, states, strict=True) if s is not None]
    failed = [(index, s) for index, s in answered if s.load_state is LoadState.FAILED]
    accepting = complete and all(s.accepting for _, s in answered)
    if failed:
        index, first = failed[0]
        error = first.failure or Failure("")
        failure = Failure(
            error=f"worker {index}: {error.error}", version=error.version, at=error.at,
            next_attempt_at=error.next_attempt_at,
            attempts=max(s.failure.attempts if s.failure is not None else 0 for _, s in failed),
        )
        return Aggregate(LoadState.FAILED, serving, accepting, failure)
    served = {s.serving.key if s.serving is not None else None for _, s in answered}
    idle = complete and len(served) == 1 and all(s.load_state is LoadState.IDLE for _, s in answered)
    return Aggregate(LoadState.IDLE if idle else LoadState.LOADING, serving, accepting)
