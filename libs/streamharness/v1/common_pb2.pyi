from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_ENCODING_UNSPECIFIED: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_JPEG: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_PNG: _ClassVar[ImageEncoding]

class Pace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PACE_UNSPECIFIED: _ClassVar[Pace]
    PACE_LIVE: _ClassVar[Pace]
    PACE_REPLAY: _ClassVar[Pace]

class Trigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIGGER_UNSPECIFIED: _ClassVar[Trigger]
    TRIGGER_QUESTION: _ClassVar[Trigger]
    TRIGGER_INSTRUCTION: _ClassVar[Trigger]
IMAGE_ENCODING_UNSPECIFIED: ImageEncoding
IMAGE_ENCODING_JPEG: ImageEncoding
IMAGE_ENCODING_PNG: ImageEncoding
PACE_UNSPECIFIED: Pace
PACE_LIVE: Pace
PACE_REPLAY: Pace
TRIGGER_UNSPECIFIED: Trigger
TRIGGER_QUESTION: Trigger
TRIGGER_INSTRUCTION: Trigger

class StreamKey(_message.Message):
    __slots__ = ("tenant", "stream_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    stream_id: str
    def __init__(self, tenant: _Optional[str] = ..., stream_id: _Optional[str] = ...) -> None: ...

class HopStamp(_message.Message):
    __slots__ = ("hop", "wall_unix_ns")
    HOP_FIELD_NUMBER: _ClassVar[int]
    WALL_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    hop: str
    wall_unix_ns: int
    def __init__(self, hop: _Optional[str] = ..., wall_unix_ns: _Optional[int] = ...) -> None: ...

class StandingInstruction(_message.Message):
    __slots__ = ("instruction_id", "text")
    INSTRUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    instruction_id: str
    text: str
    def __init__(self, instruction_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("url", "rtsp_transport", "speed", "upload", "upload_bytes")
    URL_FIELD_NUMBER: _ClassVar[int]
    RTSP_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    url: str
    rtsp_transport: str
    speed: float
    upload: bool
    upload_bytes: int
    def __init__(self, url: _Optional[str] = ..., rtsp_transport: _Optional[str] = ..., speed: _Optional[float] = ..., upload: _Optional[bool] = ..., upload_bytes: _Optional[int] = ...) -> None: ...

class SourceStatus(_message.Message):
    __slots__ = ("kind", "media_ts_ms", "gap_ms", "message", "attempt", "code", "url", "frames")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[SourceStatus.Kind]
        KIND_CONNECTED: _ClassVar[SourceStatus.Kind]
        KIND_RECONNECTING: _ClassVar[SourceStatus.Kind]
        KIND_GAP: _ClassVar[SourceStatus.Kind]
        KIND_ENDED: _ClassVar[SourceStatus.Kind]
        KIND_FAILED: _ClassVar[SourceStatus.Kind]
    KIND_UNSPECIFIED: SourceStatus.Kind
    KIND_CONNECTED: SourceStatus.Kind
    KIND_RECONNECTING: SourceStatus.Kind
    KIND_GAP: SourceStatus.Kind
    KIND_ENDED: SourceStatus.Kind
    KIND_FAILED: SourceStatus.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    GAP_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    kind: SourceStatus.Kind
    media_ts_ms: int
    gap_ms: int
    message: str
    attempt: int
    code: int
    url: str
    frames: int
    def __init__(self, kind: _Optional[_Union[SourceStatus.Kind, str]] = ..., media_ts_ms: _Optional[int] = ..., gap_ms: _Optional[int] = ..., message: _Optional[str] = ..., attempt: _Optional[int] = ..., code: _Optional[int] = ..., url: _Optional[str] = ..., frames: _Optional[int] = ...) -> None: ...
