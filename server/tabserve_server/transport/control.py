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
from tabserve_server.core.model import AspiredVersion
from tabserve_server.errors import InvalidInput, PermissionDenied, Unauthenticated

_STATE = {
    LoadState.IDLE: control_pb2.LOAD_STATE_IDLE,
    LoadState.LOADING: control_pb2.LOAD_STATE_LOADING,
    LoadState.FAILED: control_pb2.LOAD_STATE_FAILED,
}


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


class ControlServicer(control_pb2_grpc.ModelControlServicer):
    def __init__(self, manager: ModelManager, token: str, accepting: Any) -> None:
        self._manager = manager
        self._token = token
        self._accepting = accepting

    def _authorize(self, context: grpc.ServicerContext) -> None:
        if not self._token:
            return
        supplied = dict(context.invocation_metadata()).get("authorization")
        if not supplied:
            raise Unauthenticated("control call without credentials: send 'authorization: Bearer <token>'")
        if not hmac.compare_digest(str(supplied).encode(), f"Bearer {self._token}".encode()):
            raise PermissionDenied("control token rejected")

    def SetAspiredVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        wanted = request.aspired
        if not wanted.model_uri:
            raise InvalidInput("aspired.model_uri is required (pinned, e.g. models:/NAME/VERSION)")
        aspired = AspiredVersion(
            model_name=wanted.model_name or model_name_from_uri(wanted.model_uri),
            version=wanted.version,
            model_uri=wanted.model_uri,
        )
        already = self._manager.set_aspired(aspired)
        return control_pb2.SetAspiredVersionResponse(already_serving=already, status=self._status())

    def GetStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._authorize(context)
        return self._status()

    def _status(self) -> Any:
        status = self._manager.status()
        response = control_pb2.GetStatusResponse(
            load_state=_STATE[status.state],
            last_error=status.last_error,
            last_error_at=_timestamp(status.last_error_at),
            next_attempt_at=_timestamp(status.next_attempt_at),
            failed_attempts=status.failed_attempts,
            failed_version=status.failed_version,
            accepting_requests=bool(self._accepting()),
        )
        if status.serving is not None:
            model = status.serving
            response.serving.CopyFrom(
                control_pb2.ServedVersion(
                    model_name=model.name, version=model.version, source_uri=model.source_uri,
                    loaded_from=model.loaded_from.value, loaded_at=_timestamp(model.loaded_at),
                )
            )
        if status.aspired is not None:
            response.aspired.CopyFrom(
                control_pb2.AspiredVersion(
                    model_name=status.aspired.model_name, version=status.aspired.version,
                    model_uri=status.aspired.model_uri,
                )
            )
        return response
