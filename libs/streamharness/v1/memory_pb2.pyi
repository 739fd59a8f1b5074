from streamharness.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemoryTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_TIER_UNSPECIFIED: _ClassVar[MemoryTier]
    MEMORY_TIER_SHORT: _ClassVar[MemoryTier]
    MEMORY_TIER_MID: _ClassVar[MemoryTier]
    MEMORY_TIER_LONG: _ClassVar[MemoryTier]
    MEMORY_TIER_QA: _ClassVar[MemoryTier]
MEMORY_TIER_UNSPECIFIED: MemoryTier
MEMORY_TIER_SHORT: MemoryTier
MEMORY_TIER_MID: MemoryTier
MEMORY_TIER_LONG: MemoryTier
MEMORY_TIER_QA: MemoryTier

class RecallRequest(_message.Message):
    __slots__ = ("key", "query", "from_ms", "to_ms", "limit", "now_ms", "tiers", "literal")
    KEY_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    FROM_MS_FIELD_NUMBER: _ClassVar[int]
    TO_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    NOW_MS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LITERAL_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    query: str
    from_ms: int
    to_ms: int
    limit: int
    now_ms: int
    tiers: _containers.RepeatedScalarFieldContainer[MemoryTier]
    literal: bool
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., query: _Optional[str] = ..., from_ms: _Optional[int] = ..., to_ms: _Optional[int] = ..., limit: _Optional[int] = ..., now_ms: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[MemoryTier, str]]] = ..., literal: _Optional[bool] = ...) -> None: ...

class MemoryItem(_message.Message):
    __slots__ = ("tier", "start_ms", "end_ms", "text", "labels", "person_count", "score", "item_id", "fallback", "prompt_text", "frames", "index")
    TIER_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PERSON_COUNT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    tier: MemoryTier
    start_ms: int
    end_ms: int
    text: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    person_count: int
    score: float
    item_id: str
    fallback: bool
    prompt_text: str
    frames: int
    index: int
    def __init__(self, tier: _Optional[_Union[MemoryTier, str]] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ..., text: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., person_count: _Optional[int] = ..., score: _Optional[float] = ..., item_id: _Optional[str] = ..., fallback: _Optional[bool] = ..., prompt_text: _Optional[str] = ..., frames: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class RecallResponse(_message.Message):
    __slots__ = ("items", "from_ms", "to_ms", "notes", "span_start_ms", "span_end_ms", "searched_text")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    FROM_MS_FIELD_NUMBER: _ClassVar[int]
    TO_MS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    SPAN_START_MS_FIELD_NUMBER: _ClassVar[int]
    SPAN_END_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_TEXT_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MemoryItem]
    from_ms: int
    to_ms: int
    notes: _containers.RepeatedScalarFieldContainer[str]
    span_start_ms: int
    span_end_ms: int
    searched_text: str
    def __init__(self, items: _Optional[_Iterable[_Union[MemoryItem, _Mapping]]] = ..., from_ms: _Optional[int] = ..., to_ms: _Optional[int] = ..., notes: _Optional[_Iterable[str]] = ..., span_start_ms: _Optional[int] = ..., span_end_ms: _Optional[int] = ..., searched_text: _Optional[str] = ...) -> None: ...

class ContextRequest(_message.Message):
    __slots__ = ("key", "now_ms", "max_recent")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NOW_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_RECENT_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    now_ms: int
    max_recent: int
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., now_ms: _Optional[int] = ..., max_recent: _Optional[int] = ...) -> None: ...

class ContextResponse(_message.Message):
    __slots__ = ("recent", "summaries", "blocks", "prefix_text", "prefix_version", "history", "chunk_start_ms", "prefix_tokens")
    RECENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TEXT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_VERSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_START_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    recent: _containers.RepeatedCompositeFieldContainer[MemoryItem]
    summaries: _containers.RepeatedCompositeFieldContainer[MemoryItem]
    blocks: _containers.RepeatedCompositeFieldContainer[MemoryItem]
    prefix_text: str
    prefix_version: str
    history: _containers.RepeatedCompositeFieldContainer[MemoryItem]
    chunk_start_ms: int
    prefix_tokens: int
    def __init__(self, recent: _Optional[_Iterable[_Union[MemoryItem, _Mapping]]] = ..., summaries: _Optional[_Iterable[_Union[MemoryItem, _Mapping]]] = ..., blocks: _Optional[_Iterable[_Union[MemoryItem, _Mapping]]] = ..., prefix_text: _Optional[str] = ..., prefix_version: _Optional[str] = ..., history: _Optional[_Iterable[_Union[MemoryItem, _Mapping]]] = ..., chunk_start_ms: _Optional[int] = ..., prefix_tokens: _Optional[int] = ...) -> None: ...

class ItemsRequest(_message.Message):
    __slots__ = ("key", "tier", "from_ms", "to_ms", "limit")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    FROM_MS_FIELD_NUMBER: _ClassVar[int]
    TO_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    key: _common_pb2.StreamKey
    tier: MemoryTier
    from_ms: int
    to_ms: int
    limit: int
    def __init__(self, key: _Optional[_Union[_common_pb2.StreamKey, _Mapping]] = ..., tier: _Optional[_Union[MemoryTier, str]] = ..., from_ms: _Optional[int] = ..., to_ms: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ItemsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MemoryItem]
    def __init__(self, items: _Optional[_Iterable[_Union[MemoryItem, _Mapping]]] = ...) -> None: ...
