from streamharness.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientMessage(_message.Message):
    __slots__ = ("start", "frame", "question", "instruction", "end", "video")
    START_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    start: SessionStart
    frame: Frame
    question: Question
    instruction: InstructionUpdate
    end: SessionEnd
    video: VideoChunk
    def __init__(self, start: _Optional[_Union[SessionStart, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ..., question: _Optional[_Union[Question, _Mapping]] = ..., instruction: _Optional[_Union[InstructionUpdate, _Mapping]] = ..., end: _Optional[_Union[SessionEnd, _Mapping]] = ..., video: _Optional[_Union[VideoChunk, _Mapping]] = ...) -> None: ...

class SessionStart(_message.Message):
    __slots__ = ("stream_id", "decision_fps", "instructions", "labels", "resume_token", "received_response_ids", "source", "want_decisions", "pace")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FPS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    WANT_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    stream_id: str
    decision_fps: float
    instructions: _containers.RepeatedCompositeFieldContainer[_common_pb2.StandingInstruction]
    labels: _containers.ScalarMap[str, str]
    resume_token: str
    received_response_ids: _containers.RepeatedScalarFieldContainer[str]
    source: _common_pb2.Source
    want_decisions: bool
    pace: _common_pb2.Pace
    def __init__(self, stream_id: _Optional[str] = ..., decision_fps: _Optional[float] = ..., instructions: _Optional[_Iterable[_Union[_common_pb2.StandingInstruction, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., resume_token: _Optional[str] = ..., received_response_ids: _Optional[_Iterable[str]] = ..., source: _Optional[_Union[_common_pb2.Source, _Mapping]] = ..., want_decisions: _Optional[bool] = ..., pace: _Optional[_Union[_common_pb2.Pace, str]] = ...) -> None: ...

class VideoChunk(_message.Message):
    __slots__ = ("data", "last")
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    last: bool
    def __init__(self, data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("media_ts_ms", "image", "encoding", "seq")
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    media_ts_ms: int
    image: bytes
    encoding: _common_pb2.ImageEncoding
    seq: int
    def __init__(self, media_ts_ms: _Optional[int] = ..., image: _Optional[bytes] = ..., encoding: _Optional[_Union[_common_pb2.ImageEncoding, str]] = ..., seq: _Optional[int] = ...) -> None: ...

class Question(_message.Message):
    __slots__ = ("question_id", "text", "media_ts_ms")
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    question_id: str
    text: str
    media_ts_ms: int
    def __init__(self, question_id: _Optional[str] = ..., text: _Optional[str] = ..., media_ts_ms: _Optional[int] = ...) -> None: ...

class InstructionUpdate(_message.Message):
    __slots__ = ("add", "remove_instruction_id", "media_ts_ms")
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_INSTRUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    add: _common_pb2.StandingInstruction
    remove_instruction_id: str
    media_ts_ms: int
    def __init__(self, add: _Optional[_Union[_common_pb2.StandingInstruction, _Mapping]] = ..., remove_instruction_id: _Optional[str] = ..., media_ts_ms: _Optional[int] = ...) -> None: ...

class SessionEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("accepted", "ack", "response", "error", "source", "decision")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    accepted: SessionAccepted
    ack: Ack
    response: ResponseChunk
    error: SessionError
    source: _common_pb2.SourceStatus
    decision: DecisionStep
    def __init__(self, accepted: _Optional[_Union[SessionAccepted, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., response: _Optional[_Union[ResponseChunk, _Mapping]] = ..., error: _Optional[_Union[SessionError, _Mapping]] = ..., source: _Optional[_Union[_common_pb2.SourceStatus, _Mapping]] = ..., decision: _Optional[_Union[DecisionStep, _Mapping]] = ...) -> None: ...

class DecisionStep(_message.Message):
    __slots__ = ("media_ts_ms", "respond", "trigger", "question_id", "instruction_id", "prompt_text", "score", "policy", "reason")
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    RESPOND_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    media_ts_ms: int
    respond: bool
    trigger: _common_pb2.Trigger
    question_id: str
    instruction_id: str
    prompt_text: str
    score: float
    policy: str
    reason: str
    def __init__(self, media_ts_ms: _Optional[int] = ..., respond: _Optional[bool] = ..., trigger: _Optional[_Union[_common_pb2.Trigger, str]] = ..., question_id: _Optional[str] = ..., instruction_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., score: _Optional[float] = ..., policy: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SessionAccepted(_message.Message):
    __slots__ = ("session_id", "key", "decision_fps", "resume_token", "resumed", "resume_window_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DECISION_FPS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    RESUME_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    key: _common_pb2.StreamKey
    decision_fps: float
    resume_token: str
    resumed: bool
    resume_window_s: float
    def __init__(self, session_id: _Optional[str] = ..., key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., decision_fps: _Optional[float] = ..., resume_token: _Optional[str] = ..., resumed: _Optional[bool] = ..., resume_window_s: _Optional[float] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("kind", "seq", "media_ts_ms", "sampled", "shed", "id")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Ack.Kind]
        KIND_FRAME: _ClassVar[Ack.Kind]
        KIND_QUESTION: _ClassVar[Ack.Kind]
        KIND_INSTRUCTION: _ClassVar[Ack.Kind]
        KIND_END: _ClassVar[Ack.Kind]
    KIND_UNSPECIFIED: Ack.Kind
    KIND_FRAME: Ack.Kind
    KIND_QUESTION: Ack.Kind
    KIND_INSTRUCTION: Ack.Kind
    KIND_END: Ack.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SHED_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    kind: Ack.Kind
    seq: int
    media_ts_ms: int
    sampled: bool
    shed: bool
    id: str
    def __init__(self, kind: _Optional[_Union[Ack.Kind, str]] = ..., seq: _Optional[int] = ..., media_ts_ms: _Optional[int] = ..., sampled: _Optional[bool] = ..., shed: _Optional[bool] = ..., id: _Optional[str] = ...) -> None: ...

class ResponseChunk(_message.Message):
    __slots__ = ("response_id", "index", "text", "final", "trigger", "question_id", "instruction_id", "media_ts_ms", "refusal", "restart")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    index: int
    text: str
    final: bool
    trigger: _common_pb2.Trigger
    question_id: str
    instruction_id: str
    media_ts_ms: int
    refusal: str
    restart: bool
    def __init__(self, response_id: _Optional[str] = ..., index: _Optional[int] = ..., text: _Optional[str] = ..., final: _Optional[bool] = ..., trigger: _Optional[_Union[_common_pb2.Trigger, str]] = ..., question_id: _Optional[str] = ..., instruction_id: _Optional[str] = ..., media_ts_ms: _Optional[int] = ..., refusal: _Optional[str] = ..., restart: _Optional[bool] = ...) -> None: ...

class SessionError(_message.Message):
    __slots__ = ("code", "message", "seq", "media_ts_ms", "fatal", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    FATAL_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    seq: int
    media_ts_ms: int
    fatal: bool
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., seq: _Optional[int] = ..., media_ts_ms: _Optional[int] = ..., fatal: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...
