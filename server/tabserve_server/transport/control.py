"""tabserve.control.v1.ModelControl: the monitor states the aspired version; the manager does the rest."""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tabserve.control.v1 import control_pb2, control_pb2_grpc
from tabserve_server.core.loading import model_name_from_uri
from tabserve_server.core.manager import LoadState, ModelManager
from tabserve_server.core.model import AspiredVersion, LoadedModel
from tabserve_server.errors import InvalidInput, PermissionDenied, Unauthenticated
from tabserve_server.transport.admission import Limits

LOAD_STATE_MESSAGES = {
    LoadState.IDLE: control_pb2.LOAD_STATE_IDLE,
    LoadState.LOADING: control_pb2.LOAD_STATE_LOADING,
    LoadState.FAILED: control_pb2.LOAD_STATE_FAILED,
    LoadState.STAGED: control_pb2.LOAD_STATE_STAGED,
}


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def authorize(token: str, context: grpc.ServicerContext) -> None:
    """Check the bearer token of a control call (no token configured: loopback only, nothing to check)."""
    if not token:
        return
    supplied = dict(context.invocation_metadata()).get("authorization")
    if not supplied:
        raise Unauthenticated("control call without credentials: send 'authorization: Bearer <token>'")
    if not hmac.compare_digest(str(supplied).encode(), f"Bearer {token}".encode()):
        raise PermissionDenied("control token rejected")


def aspired_from_message(wanted: Any) -> AspiredVersion:
    if not wanted.model_uri:
        raise InvalidInput("aspired.model_uri is required (pinned, e.g. models:/NAME/VERSION)")
    return AspiredVersion(
        model_name=wanted.model_name or model_name_from_uri(wanted.model_uri),
        version=wanted.version,
        model_uri=wanted.model_uri,
    )


def aspired_message(aspired: AspiredVersion) -> Any:
    return control_pb2.AspiredVersion(
        model_name=aspired.model_name, version=aspired.version, model_uri=aspired.model_uri
    )


def _served_message(model: LoadedModel) -> Any:
    return control_pb2.ServedVersion(
        model_name=model.name, version=model.version, source_uri=model.source_uri,
        loaded_from=model.loaded_from.value, loaded_at=timestamp(model.loaded_at), digest=model.digest,
        backend=model.backend[0], backend_version=model.backend[1], backend_note=model.backend_note,
    )


def admission_message(limits: Limits) -> Any:
    return control_pb2.AdmissionLimits(
        max_in_flight=limits.max_in_flight, max_waiting=limits.max_waiting,
        max_queue_seconds=limits.max_queue_seconds, caller_share=limits.caller_share,
        max_concurrent_streams=limits.max_concurrent_streams,
    )


class ControlServicer(control_pb2_grpc.ModelControlServicer):
    """`limits`: the public port's admission bounds, reported by GetStatus."""

    def __init__(self, manager: ModelManager, token: str, accepting: Any, limits: Limits | None = None) -> None:
        self._manager = manager
        self._token = token
        self._accepting = accepting
        self._limits = limits

    def SetAspiredVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        authorize(self._token, context)
        aspired = aspired_from_message(request.aspired)
        already = self._manager.set_aspired(aspired, stage_only=request.stage_only)
        return control_pb2.SetAspiredVersionResponse(already_serving=already, status=self._status())

    def CommitStaged(self, request: Any, context: grpc.ServicerContext) -> Any:
        authorize(self._token, context)
        serving = self._manager.commit_staged(aspired_from_message(request.aspired))
        return control_pb2.CommitStagedResponse(serving=serving, status=self._status())

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        authorize(self._token, context)
        return self._status()

    def _status(self) -> Any:
        status = self._manager.status()
        response = control_pb2.GetStatusResponse(
            load_state=LOAD_STATE_MESSAGES[status.state],
            last_error=status.last_error,
            last_error_at=timestamp(status.last_error_at),
            next_attempt_at=timestamp(status.next_attempt_at),
            failed_attempts=status.failed_attempts,
            failed_version=status.failed_version,
            accepting_requests=bool(self._accepting()),
        )
        if self._limits is not None:
            response.admission.CopyFrom(admission_message(self._limits))
        if status.serving is not None:
            response.serving.CopyFrom(_served_message(status.serving))
        if status.staged is not None:
            response.staged.CopyFrom(_served_message(status.staged))
        if status.aspired is not None:
            response.aspired.CopyFrom(aspired_message(status.aspired))
        return response
