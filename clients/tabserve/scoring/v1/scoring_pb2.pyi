import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadedFrom(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOADED_FROM_UNSPECIFIED: _ClassVar[LoadedFrom]
    LOADED_FROM_REGISTRY: _ClassVar[LoadedFrom]
    LOADED_FROM_CACHE: _ClassVar[LoadedFrom]
    LOADED_FROM_LOCAL: _ClassVar[LoadedFrom]
LOADED_FROM_UNSPECIFIED: LoadedFrom
LOADED_FROM_REGISTRY: LoadedFrom
LOADED_FROM_CACHE: LoadedFrom
LOADED_FROM_LOCAL: LoadedFrom

class NamedRow(_message.Message):
    __slots__ = ("features",)
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.ScalarMap[str, float]
    def __init__(self, features: _Optional[_Mapping[str, float]] = ...) -> None: ...

class NamedRows(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[NamedRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[NamedRow, _Mapping]]] = ...) -> None: ...

class DenseRow(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class DenseRows(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[DenseRow]
    def __init__(self, rows: _Optional[_Iterable[_Union[DenseRow, _Mapping]]] = ...) -> None: ...

class MatrixRows(_message.Message):
    __slots__ = ("float64_le", "num_rows")
    FLOAT64_LE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    float64_le: bytes
    num_rows: int
    def __init__(self, float64_le: _Optional[bytes] = ..., num_rows: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "named", "dense", "matrix", "explain", "packed_response")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAMED_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    MATRIX_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    PACKED_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    named: NamedRows
    dense: DenseRows
    matrix: MatrixRows
    explain: ExplainOptions
    packed_response: bool
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., named: _Optional[_Union[NamedRows, _Mapping]] = ..., dense: _Optional[_Union[DenseRows, _Mapping]] = ..., matrix: _Optional[_Union[MatrixRows, _Mapping]] = ..., explain: _Optional[_Union[ExplainOptions, _Mapping]] = ..., packed_response: _Optional[bool] = ...) -> None: ...

class ExplainOptions(_message.Message):
    __slots__ = ("top_k", "all_rows")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ALL_ROWS_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    all_rows: bool
    def __init__(self, top_k: _Optional[int] = ..., all_rows: _Optional[bool] = ...) -> None: ...

class Reason(_message.Message):
    __slots__ = ("feature", "value", "contribution", "code", "text")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    feature: str
    value: float
    contribution: float
    code: str
    text: str
    def __init__(self, feature: _Optional[str] = ..., value: _Optional[float] = ..., contribution: _Optional[float] = ..., code: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class RowExplanation(_message.Message):
    __slots__ = ("row", "reasons")
    ROW_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    row: int
    reasons: _containers.RepeatedCompositeFieldContainer[Reason]
    def __init__(self, row: _Optional[int] = ..., reasons: _Optional[_Iterable[_Union[Reason, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "threshold", "scores", "decisions", "explanations", "expected_value", "packed_scores", "packed_decisions")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VALUE_FIELD_NUMBER: _ClassVar[int]
    PACKED_SCORES_FIELD_NUMBER: _ClassVar[int]
    PACKED_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    threshold: float
    scores: _containers.RepeatedScalarFieldContainer[float]
    decisions: _containers.RepeatedScalarFieldContainer[bool]
    explanations: _containers.RepeatedCompositeFieldContainer[RowExplanation]
    expected_value: float
    packed_scores: bytes
    packed_decisions: bytes
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., threshold: _Optional[float] = ..., scores: _Optional[_Iterable[float]] = ..., decisions: _Optional[_Iterable[bool]] = ..., explanations: _Optional[_Iterable[_Union[RowExplanation, _Mapping]]] = ..., expected_value: _Optional[float] = ..., packed_scores: _Optional[bytes] = ..., packed_decisions: _Optional[bytes] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Feature(_message.Message):
    __slots__ = ("name", "type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "run_id", "requested_uri", "source_uri", "loaded_from", "loaded_at", "load_duration_seconds", "features", "threshold", "threshold_source", "flavor", "positive_label", "negative_label", "adverse_label", "has_reason_table", "digest", "backend", "backend_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_URI_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    LOADED_FROM_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    LOAD_DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FLAVOR_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_LABEL_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_LABEL_FIELD_NUMBER: _ClassVar[int]
    ADVERSE_LABEL_FIELD_NUMBER: _ClassVar[int]
    HAS_REASON_TABLE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    BACKEND_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    run_id: str
    requested_uri: str
    source_uri: str
    loaded_from: LoadedFrom
    loaded_at: _timestamp_pb2.Timestamp
    load_duration_seconds: float
    features: _containers.RepeatedCompositeFieldContainer[Feature]
    threshold: float
    threshold_source: str
    flavor: str
    positive_label: str
    negative_label: str
    adverse_label: str
    has_reason_table: bool
    digest: str
    backend: str
    backend_version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., run_id: _Optional[str] = ..., requested_uri: _Optional[str] = ..., source_uri: _Optional[str] = ..., loaded_from: _Optional[_Union[LoadedFrom, str]] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., load_duration_seconds: _Optional[float] = ..., features: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ..., threshold: _Optional[float] = ..., threshold_source: _Optional[str] = ..., flavor: _Optional[str] = ..., positive_label: _Optional[str] = ..., negative_label: _Optional[str] = ..., adverse_label: _Optional[str] = ..., has_reason_table: _Optional[bool] = ..., digest: _Optional[str] = ..., backend: _Optional[str] = ..., backend_version: _Optional[str] = ...) -> None: ...
