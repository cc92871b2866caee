"""The supervisor's control servicer, and the translation between control protos and the rollout's dataclasses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import grpc

from tabserve.control.v1 import control_pb2, control_pb2_grpc
from tabserve_server.core.manager import LoadState
from tabserve_server.core.model import AspiredVersion
from tabserve_server.supervisor.rollout import Aggregate, Answer, Failure, Served, WorkerState
from tabserve_server.transport.admission import Limits
from tabserve_server.transport.control import (
    LOAD_STATE_MESSAGES,
    admission_message,
    aspired_from_message,
    aspired_message,
    authorize,
    timestamp,
)

_STATE = {message: state for state, message in LOAD_STATE_MESSAGES.items()}


def _time(message: Any, name: str) -> datetime | None:
    return getattr(message, name).ToDatetime(tzinfo=UTC) if message.HasField(name) else None


def served_from_message(message: Any) -> Served | None:
    if not message.model_name:
        return None
    return Served(message.model_name, message.version, message.source_uri, message.loaded_from,
                  _time(message, "loaded_at"), message.digest, message.backend, message.backend_version,
                  message.backend_note)


def served_message(served: Served) -> Any:
    return control_pb2.ServedVersion(model_name=served.model_name, version=served.version,
                                     source_uri=served.source_uri, loaded_from=served.loaded_from,
                                     loaded_at=timestamp(served.loaded_at), digest=served.digest,
                                     backend=served.backend, backend_version=served.backend_version,
                                     backend_note=served.backend_note)


def state_from_message(status: Any) -> WorkerState:
    """A worker's GetStatusResponse as the rollout sees it."""
    failure = Failure(status.last_error, status.failed_version, int(status.failed_attempts),
                      _time(status, "last_error_at"), _time(status, "next_attempt_at"))
    return WorkerState(
        load_state=_STATE.get(status.load_state, LoadState.LOADING), serving=served_from_message(status.serving),
        staged=served_from_message(status.staged), accepting=status.accepting_requests,
        failure=failure if failure != Failure("") else None,
    )


def answer_from_message(response: Any) -> Answer:
    return Answer(already_serving=response.already_serving, state=state_from_message(response.status))


@dataclass(frozen=True)
class WorkerEntry:
    """What the supervisor knows of one worker slot for the `workers` list of its status."""

    index: int
    pid: int
    restarts: int
    metrics_port: int
    status: Any  # the worker's own GetStatusResponse; None when it did not answer


def status_message(
    aspired: AspiredVersion, view: Aggregate, workers: Sequence[WorkerEntry], limits: Limits | None = None
) -> Any:
    """The supervisor's GetStatusResponse: the aggregate (with `limits`, the bounds of each worker), then each
    worker with its own status."""
    response = control_pb2.GetStatusResponse(
        aspired=aspired_message(aspired), load_state=LOAD_STATE_MESSAGES[view.load_state],
        accepting_requests=view.accepting,
    )
    if limits is not None:
        response.admission.CopyFrom(admission_message(limits))
    if view.serving is not None:
        response.serving.CopyFrom(served_message(view.serving))
    if view.failure is not None:
        failure = view.failure
        response.last_error, response.failed_version = failure.error, failure.version
        response.failed_attempts = failure.attempts
        for name, value in (("last_error_at", failure.at), ("next_attempt_at", failure.next_attempt_at)):
            stamp = timestamp(value)
            if stamp is not None:
                getattr(response, name).CopyFrom(stamp)
    for worker in workers:
        entry = response.workers.add(index=worker.index, pid=worker.pid, up=worker.status is not None,
                                     restarts=worker.restarts, metrics_port=worker.metrics_port)
        if worker.status is not None:
            entry.status.CopyFrom(worker.status)
    return response


class Supervised(Protocol):
    """What the servicer needs of the supervisor."""

    def set_aspired(self, aspired: AspiredVersion) -> bool: ...

    def status(self) -> Any: ...


class SupervisorControl(control_pb2_grpc.ModelControlServicer):
    """The one control address of a multi-worker server: statements fan out, status aggregates."""

    def __init__(self, supervisor: Supervised, token: str) -> None:
        self._supervisor = supervisor
        self._token = token

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
