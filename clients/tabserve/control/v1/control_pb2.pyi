import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOAD_STATE_UNSPECIFIED: _ClassVar[LoadState]
    LOAD_STATE_IDLE: _ClassVar[LoadState]
    LOAD_STATE_LOADING: _ClassVar[LoadState]
    LOAD_STATE_FAILED: _ClassVar[LoadState]
    LOAD_STATE_STAGED: _ClassVar[LoadState]
LOAD_STATE_UNSPECIFIED: LoadState
LOAD_STATE_IDLE: LoadState
LOAD_STATE_LOADING: LoadState
LOAD_STATE_FAILED: LoadState
LOAD_STATE_STAGED: LoadState

class AspiredVersion(_message.Message):
    __slots__ = ("model_name", "version", "model_uri")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_URI_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    model_uri: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ..., model_uri: _Optional[str] = ...) -> None: ...

class SetAspiredVersionRequest(_message.Message):
    __slots__ = ("aspired", "stage_only")
    ASPIRED_FIELD_NUMBER: _ClassVar[int]
    STAGE_ONLY_FIELD_NUMBER: _ClassVar[int]
    aspired: AspiredVersion
    stage_only: bool
    def __init__(self, aspired: _Optional[_Union[AspiredVersion, _Mapping]] = ..., stage_only: _Optional[bool] = ...) -> None: ...

class CommitStagedRequest(_message.Message):
    __slots__ = ("aspired",)
    ASPIRED_FIELD_NUMBER: _ClassVar[int]
    aspired: AspiredVersion
    def __init__(self, aspired: _Optional[_Union[AspiredVersion, _Mapping]] = ...) -> None: ...

class CommitStagedResponse(_message.Message):
    __slots__ = ("serving", "status")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    status: GetStatusResponse
    def __init__(self, serving: _Optional[bool] = ..., status: _Optional[_Union[GetStatusResponse, _Mapping]] = ...) -> None: ...

class SetAspiredVersionResponse(_message.Message):
    __slots__ = ("already_serving", "status")
    ALREADY_SERVING_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    already_serving: bool
    status: GetStatusResponse
    def __init__(self, already_serving: _Optional[bool] = ..., status: _Optional[_Union[GetStatusResponse, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServedVersion(_message.Message):
    __slots__ = ("model_name", "version", "source_uri", "loaded_from", "loaded_at", "digest", "backend", "backend_version", "backend_note")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    LOADED_FROM_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_NOTE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    source_uri: str
    loaded_from: str
    loaded_at: _timestamp_pb2.Timestamp
    digest: str
    backend: str
    backend_version: str
    backend_note: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ..., source_uri: _Optional[str] = ..., loaded_from: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., digest: _Optional[str] = ..., backend: _Optional[str] = ..., backend_version: _Optional[str] = ..., backend_note: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("serving", "aspired", "load_state", "last_error", "last_error_at", "next_attempt_at", "failed_attempts", "failed_version", "accepting_requests", "staged", "workers", "admission")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    ASPIRED_FIELD_NUMBER: _ClassVar[int]
    LOAD_STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    FAILED_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCEPTING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    serving: ServedVersion
    aspired: AspiredVersion
    load_state: LoadState
    last_error: str
    last_error_at: _timestamp_pb2.Timestamp
    next_attempt_at: _timestamp_pb2.Timestamp
    failed_attempts: int
    failed_version: str
    accepting_requests: bool
    staged: ServedVersion
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    admission: AdmissionLimits
    def __init__(self, serving: _Optional[_Union[ServedVersion, _Mapping]] = ..., aspired: _Optional[_Union[AspiredVersion, _Mapping]] = ..., load_state: _Optional[_Union[LoadState, str]] = ..., last_error: _Optional[str] = ..., last_error_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failed_attempts: _Optional[int] = ..., failed_version: _Optional[str] = ..., accepting_requests: _Optional[bool] = ..., staged: _Optional[_Union[ServedVersion, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., admission: _Optional[_Union[AdmissionLimits, _Mapping]] = ...) -> None: ...

class AdmissionLimits(_message.Message):
    __slots__ = ("max_in_flight", "max_waiting", "max_queue_seconds", "caller_share", "max_concurrent_streams")
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WAITING_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CALLER_SHARE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    max_in_flight: int
    max_waiting: int
    max_queue_seconds: float
    caller_share: float
    max_concurrent_streams: int
    def __init__(self, max_in_flight: _Optional[int] = ..., max_waiting: _Optional[int] = ..., max_queue_seconds: _Optional[float] = ..., caller_share: _Optional[float] = ..., max_concurrent_streams: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("index", "pid", "up", "restarts", "metrics_port", "status")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_PORT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    index: int
    pid: int
    up: bool
    restarts: int
    metrics_port: int
    status: GetStatusResponse
    def __init__(self, index: _Optional[int] = ..., pid: _Optional[int] = ..., up: _Optional[bool] = ..., restarts: _Optional[int] = ..., metrics_port: _Optional[int] = ..., status: _Optional[_Union[GetStatusResponse, _Mapping]] = ...) -> None: ...
