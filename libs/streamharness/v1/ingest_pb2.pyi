from streamharness.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IngestFrameRequest(_message.Message):
    __slots__ = ("key", "session_id", "media_ts_ms", "image", "encoding", "seq", "decision_fps", "hops", "source", "video", "video_last", "trace_context", "pace")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    DECISION_FPS_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    VIDEO_LAST_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    session_id: str
    media_ts_ms: int
    image: bytes
    encoding: _common_pb2.ImageEncoding
    seq: int
    decision_fps: float
    hops: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopStamp]
    source: _common_pb2.Source
    video: bytes
    video_last: bool
    trace_context: _containers.ScalarMap[str, str]
    pace: _common_pb2.Pace
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., media_ts_ms: _Optional[int] = ..., image: _Optional[bytes] = ..., encoding: _Optional[_Union[_common_pb2.ImageEncoding, str]] = ..., seq: _Optional[int] = ..., decision_fps: _Optional[float] = ..., hops: _Optional[_Iterable[_Union[_common_pb2.HopStamp, _Mapping]]] = ..., source: _Optional[_Union[_common_pb2.Source, _Mapping]] = ..., video: _Optional[bytes] = ..., video_last: _Optional[bool] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., pace: _Optional[_Union[_common_pb2.Pace, str]] = ...) -> None: ...

class IngestFrameResult(_message.Message):
    __slots__ = ("seq", "media_ts_ms", "status", "error", "source", "preview_jpeg")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[IngestFrameResult.Status]
        STATUS_PUBLISHED: _ClassVar[IngestFrameResult.Status]
        STATUS_SKIPPED: _ClassVar[IngestFrameResult.Status]
        STATUS_REJECTED: _ClassVar[IngestFrameResult.Status]
        STATUS_SHED: _ClassVar[IngestFrameResult.Status]
        STATUS_UNAVAILABLE: _ClassVar[IngestFrameResult.Status]
    STATUS_UNSPECIFIED: IngestFrameResult.Status
    STATUS_PUBLISHED: IngestFrameResult.Status
    STATUS_SKIPPED: IngestFrameResult.Status
    STATUS_REJECTED: IngestFrameResult.Status
    STATUS_SHED: IngestFrameResult.Status
    STATUS_UNAVAILABLE: IngestFrameResult.Status
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_JPEG_FIELD_NUMBER: _ClassVar[int]
    seq: int
    media_ts_ms: int
    status: IngestFrameResult.Status
    error: str
    source: _common_pb2.SourceStatus
    preview_jpeg: bytes
    def __init__(self, seq: _Optional[int] = ..., media_ts_ms: _Optional[int] = ..., status: _Optional[_Union[IngestFrameResult.Status, str]] = ..., error: _Optional[str] = ..., source: _Optional[_Union[_common_pb2.SourceStatus, _Mapping]] = ..., preview_jpeg: _Optional[bytes] = ...) -> None: ...
