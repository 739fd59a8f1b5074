from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ImageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_ENCODING_UNSPECIFIED: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_JPEG: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_PNG: _ClassVar[ImageEncoding]

class Trigger(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIGGER_UNSPECIFIED: _ClassVar[Trigger]
    TRIGGER_QUESTION: _ClassVar[Trigger]
    TRIGGER_INSTRUCTION: _ClassVar[Trigger]
IMAGE_ENCODING_UNSPECIFIED: ImageEncoding
IMAGE_ENCODING_JPEG: ImageEncoding
IMAGE_ENCODING_PNG: ImageEncoding
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
