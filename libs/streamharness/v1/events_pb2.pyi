from streamharness.v1 import common_pb2 as _common_pb2
from streamharness.v1 import memory_pb2 as _memory_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FrameEvent(_message.Message):
    __slots__ = ("key", "session_id", "media_ts_ms", "seq", "jpeg", "width", "height", "hops", "pace")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    session_id: str
    media_ts_ms: int
    seq: int
    jpeg: bytes
    width: int
    height: int
    hops: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopStamp]
    pace: _common_pb2.Pace
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., media_ts_ms: _Optional[int] = ..., seq: _Optional[int] = ..., jpeg: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., hops: _Optional[_Iterable[_Union[_common_pb2.HopStamp, _Mapping]]] = ..., pace: _Optional[_Union[_common_pb2.Pace, str]] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("name", "score")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("label", "score", "x", "y", "width", "height")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    x: float
    y: float
    width: float
    height: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ...) -> None: ...

class EncodedFrameEvent(_message.Message):
    __slots__ = ("key", "session_id", "media_ts_ms", "seq", "embedding", "embedding_model", "labels", "detections", "person_count", "caption", "hops", "pace")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    PERSON_COUNT_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    PACE_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    session_id: str
    media_ts_ms: int
    seq: int
    embedding: _containers.RepeatedScalarFieldContainer[float]
    embedding_model: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    person_count: int
    caption: str
    hops: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopStamp]
    pace: _common_pb2.Pace
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., media_ts_ms: _Optional[int] = ..., seq: _Optional[int] = ..., embedding: _Optional[_Iterable[float]] = ..., embedding_model: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., person_count: _Optional[int] = ..., caption: _Optional[str] = ..., hops: _Optional[_Iterable[_Union[_common_pb2.HopStamp, _Mapping]]] = ..., pace: _Optional[_Union[_common_pb2.Pace, str]] = ...) -> None: ...

class QueryEvent(_message.Message):
    __slots__ = ("key", "session_id", "kind", "media_ts_ms", "question_id", "instruction_id", "text", "decision_fps", "instructions", "reply_to", "hops")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[QueryEvent.Kind]
        KIND_SESSION_START: _ClassVar[QueryEvent.Kind]
        KIND_QUESTION: _ClassVar[QueryEvent.Kind]
        KIND_INSTRUCTION_ADD: _ClassVar[QueryEvent.Kind]
        KIND_INSTRUCTION_REMOVE: _ClassVar[QueryEvent.Kind]
        KIND_SESSION_END: _ClassVar[QueryEvent.Kind]
        KIND_SESSION_RESUME: _ClassVar[QueryEvent.Kind]
        KIND_SESSION_AWAY: _ClassVar[QueryEvent.Kind]
    KIND_UNSPECIFIED: QueryEvent.Kind
    KIND_SESSION_START: QueryEvent.Kind
    KIND_QUESTION: QueryEvent.Kind
    KIND_INSTRUCTION_ADD: QueryEvent.Kind
    KIND_INSTRUCTION_REMOVE: QueryEvent.Kind
    KIND_SESSION_END: QueryEvent.Kind
    KIND_SESSION_RESUME: QueryEvent.Kind
    KIND_SESSION_AWAY: QueryEvent.Kind
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DECISION_FPS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    session_id: str
    kind: QueryEvent.Kind
    media_ts_ms: int
    question_id: str
    instruction_id: str
    text: str
    decision_fps: float
    instructions: _containers.RepeatedCompositeFieldContainer[_common_pb2.StandingInstruction]
    reply_to: str
    hops: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopStamp]
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., kind: _Optional[_Union[QueryEvent.Kind, str]] = ..., media_ts_ms: _Optional[int] = ..., question_id: _Optional[str] = ..., instruction_id: _Optional[str] = ..., text: _Optional[str] = ..., decision_fps: _Optional[float] = ..., instructions: _Optional[_Iterable[_Union[_common_pb2.StandingInstruction, _Mapping]]] = ..., reply_to: _Optional[str] = ..., hops: _Optional[_Iterable[_Union[_common_pb2.HopStamp, _Mapping]]] = ...) -> None: ...

class DecisionEvent(_message.Message):
    __slots__ = ("key", "session_id", "media_ts_ms", "action", "trigger", "question_id", "instruction_id", "prompt_text", "reason", "score", "policy", "reply_to", "decision_id", "hops", "answered")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ACTION_UNSPECIFIED: _ClassVar[DecisionEvent.Action]
        ACTION_SILENT: _ClassVar[DecisionEvent.Action]
        ACTION_RESPOND: _ClassVar[DecisionEvent.Action]
    ACTION_UNSPECIFIED: DecisionEvent.Action
    ACTION_SILENT: DecisionEvent.Action
    ACTION_RESPOND: DecisionEvent.Action
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    session_id: str
    media_ts_ms: int
    action: DecisionEvent.Action
    trigger: _common_pb2.Trigger
    question_id: str
    instruction_id: str
    prompt_text: str
    reason: str
    score: float
    policy: str
    reply_to: str
    decision_id: str
    hops: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopStamp]
    answered: bool
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., media_ts_ms: _Optional[int] = ..., action: _Optional[_Union[DecisionEvent.Action, str]] = ..., trigger: _Optional[_Union[_common_pb2.Trigger, str]] = ..., question_id: _Optional[str] = ..., instruction_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., reason: _Optional[str] = ..., score: _Optional[float] = ..., policy: _Optional[str] = ..., reply_to: _Optional[str] = ..., decision_id: _Optional[str] = ..., hops: _Optional[_Iterable[_Union[_common_pb2.HopStamp, _Mapping]]] = ..., answered: _Optional[bool] = ...) -> None: ...

class ResponseEvent(_message.Message):
    __slots__ = ("key", "session_id", "response_id", "index", "text", "final", "trigger", "question_id", "instruction_id", "media_ts_ms", "reply_to", "hops", "prompt_text", "answer_text", "refusal", "attempt", "session_finished", "pending_response_ids")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TEXT_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FINISHED_FIELD_NUMBER: _ClassVar[int]
    PENDING_RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    session_id: str
    response_id: str
    index: int
    text: str
    final: bool
    trigger: _common_pb2.Trigger
    question_id: str
    instruction_id: str
    media_ts_ms: int
    reply_to: str
    hops: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopStamp]
    prompt_text: str
    answer_text: str
    refusal: str
    attempt: str
    session_finished: bool
    pending_response_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., response_id: _Optional[str] = ..., index: _Optional[int] = ..., text: _Optional[str] = ..., final: _Optional[bool] = ..., trigger: _Optional[_Union[_common_pb2.Trigger, str]] = ..., question_id: _Optional[str] = ..., instruction_id: _Optional[str] = ..., media_ts_ms: _Optional[int] = ..., reply_to: _Optional[str] = ..., hops: _Optional[_Iterable[_Union[_common_pb2.HopStamp, _Mapping]]] = ..., prompt_text: _Optional[str] = ..., answer_text: _Optional[str] = ..., refusal: _Optional[str] = ..., attempt: _Optional[str] = ..., session_finished: _Optional[bool] = ..., pending_response_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class StreamStateRecord(_message.Message):
    __slots__ = ("key", "session_id", "reply_to", "decision_fps", "instructions", "questions", "open_questions", "last_decision_ms", "end_ms", "last_fired_ms", "updated_unix_ms", "away_since_unix_ms")
    class OpenQuestionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LastFiredMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    DECISION_FPS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTIONS_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    OPEN_QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    LAST_DECISION_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIRED_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    AWAY_SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    session_id: str
    reply_to: str
    decision_fps: float
    instructions: _containers.RepeatedCompositeFieldContainer[_common_pb2.StandingInstruction]
    questions: _containers.RepeatedCompositeFieldContainer[PendingQuestionRecord]
    open_questions: _containers.ScalarMap[str, int]
    last_decision_ms: int
    end_ms: int
    last_fired_ms: _containers.ScalarMap[str, int]
    updated_unix_ms: int
    away_since_unix_ms: int
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., session_id: _Optional[str] = ..., reply_to: _Optional[str] = ..., decision_fps: _Optional[float] = ..., instructions: _Optional[_Iterable[_Union[_common_pb2.StandingInstruction, _Mapping]]] = ..., questions: _Optional[_Iterable[_Union[PendingQuestionRecord, _Mapping]]] = ..., open_questions: _Optional[_Mapping[str, int]] = ..., last_decision_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., last_fired_ms: _Optional[_Mapping[str, int]] = ..., updated_unix_ms: _Optional[int] = ..., away_since_unix_ms: _Optional[int] = ...) -> None: ...

class PendingQuestionRecord(_message.Message):
    __slots__ = ("question_id", "text", "media_ts_ms")
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TS_MS_FIELD_NUMBER: _ClassVar[int]
    question_id: str
    text: str
    media_ts_ms: int
    def __init__(self, question_id: _Optional[str] = ..., text: _Optional[str] = ..., media_ts_ms: _Optional[int] = ...) -> None: ...

class SummaryEvent(_message.Message):
    __slots__ = ("key", "summary_id", "tier", "index", "start_ms", "end_ms", "visible_from_ms", "text", "labels", "max_people", "frames", "backend", "fallback", "hops")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    VISIBLE_FROM_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PEOPLE_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    summary_id: str
    tier: _memory_pb2.MemoryTier
    index: int
    start_ms: int
    end_ms: int
    visible_from_ms: int
    text: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    max_people: int
    frames: int
    backend: str
    fallback: bool
    hops: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopStamp]
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., summary_id: _Optional[str] = ..., tier: _Optional[_Union[_memory_pb2.MemoryTier, str]] = ..., index: _Optional[int] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., visible_from_ms: _Optional[int] = ..., text: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., max_people: _Optional[int] = ..., frames: _Optional[int] = ..., backend: _Optional[str] = ..., fallback: _Optional[bool] = ..., hops: _Optional[_Iterable[_Union[_common_pb2.HopStamp, _Mapping]]] = ...) -> None: ...
