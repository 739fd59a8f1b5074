"""The memory stage: keeps every encoded frame of every stream, answers ``Recall`` and ``Context``.

Intake: consumes ``embeddings`` (``EncodedFrameEvent``); each record
becomes one point in the :class:`MemoryStore` (id from stream key + media time, so a redelivered
record overwrites itself), embedded with the MiniLM :class:`TextEncoder` from its caption. The
offset is committed after the upsert returned, which is when the write survives a crash (edge:
write-ahead log; server: ``wait=True``); the store is also flushed every ``SH_MEMORY_FLUSH_INTERVAL_S``
and at stop so that restarts do not replay a long log.

API (``streamharness.v1.MemoryService``), all on media time, never past the time asked about:

* ``Recall(key, query, from_ms, to_ms, limit)``: frames of the stream whose captions are closest in
  meaning to ``query`` (cosine of MiniLM embeddings), within ``[from_ms, to_ms]`` (0 = open), best
  first; each item is one frame (``start_ms == end_ms``), tier SHORT, ``score`` = similarity.
* ``Context(key, now_ms, max_recent)``:

  - ``recent``: the short-term tier: frames with ``now - T_s < media_ts_ms <= now``
    (``SH_MEMORY_RECENT_WINDOW_S``, default 200 s), the newest ``max_recent`` of them, oldest first;
  - ``summaries``: this issue's stand-in for the mid-term tier: a deterministic digest of each
    completed chunk (``[k*C, (k+1)*C)`` of ``SH_MEMORY_CHUNK_S``, ending at or before ``now``): its
    most frequent captions with counts and the most people seen, no model involved; the
    summariser-written mid-term summaries and long-term ``blocks`` come with a later issue
    (``blocks`` is empty);
  - ``prefix_text``: the digests rendered one line per chunk; ``prefix_version``: a hash of it, so
    it changes only when a chunk completes (or a late frame lands in a completed chunk).

  A completed chunk also overlaps the recent window (the chunk ending at the last boundary is both
  digested and partly shown frame by frame): nothing falls between the two tiers.

Unknown streams are not an error: ``Recall`` and ``Context`` answer with nothing (a question may come
before the first frame was remembered, and memory cannot tell "no such stream" from "nothing yet").
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import grpc
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness.errors import InvalidInput
from streamharness.keys import key_str, make_key
from streamharness.memory.store import FrameRecord, MemoryStore, QdrantEdgeMemoryStore, QdrantServerMemoryStore
from streamharness.paths import cache_dir
from streamharness.records import ConsumedEvent
from streamharness.settings import load_settings
from streamharness.stage import Stage, StageContext, StageSpec
from streamharness.text_encoder import TextEncoder, TextEncoderSettings
from streamharness.v1 import events_pb2, memory_pb2, memory_pb2_grpc
from streamharness.v1.common_pb2 import StreamKey

log = logging.getLogger(__name__)


def _default_data_dir() -> Path:
    return cache_dir() / "memory"


class MemorySettings(BaseSettings):
    """The memory service: where frames are kept, the tiers' sizes, API limits."""

    model_config = SettingsConfigDict(env_prefix="SH_MEMORY_", frozen=True, extra="forbid", case_sensitive=False)

    store: Literal["edge", "server"] = Field(
        "edge", description="edge = Qdrant's engine in this process, data in SH_MEMORY_DATA_DIR; server = a Qdrant server at SH_MEMORY_SERVER_URL."
    )
    data_dir: Path | None = Field(
        None, description="Folder of the edge store (a persistent volume in a cluster). Default: $SH_DEV_CACHE_DIR/memory, else ~/.cache/streamharness/memory."
    )
    server_url: str | None = Field(None, description="Qdrant server URL (store=server), e.g. http://qdrant:6333.")
    server_api_key: SecretStr | None = Field(None, description="Qdrant API key (store=server; a secret: mount it from a Kubernetes Secret).")
    server_collection: str = Field("streamharness_frames", min_length=1, max_length=255, description="Qdrant collection of the frames (store=server).")
    server_timeout_s: float = Field(10.0, gt=0, le=300, description="Deadline of one Qdrant server request (store=server).")
    edge_search_threads: int = Field(0, ge=0, le=64, description="Search threads of the edge store; 0 = one per CPU.")
    recent_window_s: float = Field(200.0, gt=0, le=86_400, description="Short-term tier T_s: Context returns frames of the last this many media seconds.")
    chunk_s: float = Field(200.0, gt=0, le=86_400, description="Length of the chunks that Context digests into the prefix (media seconds).")
    prefix_max_chunks: int = Field(216, ge=0, le=100_000, description="Newest completed chunks rendered into the prefix (216 x 200 s = 12 h).")
    digest_cache_chunks: int = Field(100_000, ge=0, le=10_000_000, description="Chunk digests kept in memory (LRU) so Context does not rescan old frames.")
    context_default_recent: int = Field(200, ge=1, le=100_000, description="Recent frames Context returns when the request's max_recent is 0.")
    context_max_recent: int = Field(3600, ge=1, le=100_000, description="Largest max_recent a Context request may ask for.")
    recall_default_limit: int = Field(10, ge=1, le=10_000, description="Items Recall returns when the request's limit is 0.")
    recall_max_limit: int = Field(100, ge=1, le=10_000, description="Largest limit a Recall request may ask for.")
    recall_max_query_chars: int = Field(2000, ge=1, le=100_000, description="Longest Recall query accepted (characters).")
    consumer_group: str = Field("memory", min_length=1, description="Kafka consumer group reading the embeddings topic (the topic prefix is added).")
    flush_interval_s: float = Field(5.0, gt=0, le=3600, description="Longest time between store flushes while consuming (the WAL covers crashes in between).")

    @model_validator(mode="after")
    def _server_needs_url(self) -> MemorySettings:
        if self.store == "server" and not self.server_url:
            raise ValueError("SH_MEMORY_STORE=server needs SH_MEMORY_SERVER_URL")
        if self.context_default_recent > self.context_max_recent:
            raise ValueError("SH_MEMORY_CONTEXT_DEFAULT_RECENT must not exceed SH_MEMORY_CONTEXT_MAX_RECENT")
        if self.recall_default_limit > self.recall_max_limit:
            raise ValueError("SH_MEMORY_RECALL_DEFAULT_LIMIT must not exceed SH_MEMORY_RECALL_MAX_LIMIT")
        return self

    @property
    def recent_window_ms(self) -> int:
        return int(round(self.recent_window_s * 1000))

    @property
    def chunk_ms(self) -> int:
        return int(round(self.chunk_s * 1000))

    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else _default_data_dir()


def open_store(settings: MemorySettings) -> MemoryStore:
    if settings.store == "server":
        return QdrantServerMemoryStore(
            settings.server_url,
            collection=settings.server_collection,
            api_key=settings.server_api_key.get_secret_value() if settings.server_api_key else None,
            timeout_s=settings.server_timeout_s,
        )
    return QdrantEdgeMemoryStore(settings.resolved_data_dir(), search_threads=settings.edge_search_threads or None)


# -- frames ---------------------------------------------------------------------------------------
def frame_text(record: FrameRecord) -> str:
    """What a frame's embedding is computed from: its caption, else its labels."""
    return record.caption.strip() or ", ".join(record.labels)


def record_from_event(key: str, msg: events_pb2.EncodedFrameEvent) -> FrameRecord:
    """A frame record from a consumed event; InvalidInput (dead-lettered, not retried) if it is unusable."""
    if msg.HasField("key") and (msg.key.tenant or msg.key.stream_id) and key_str(msg.key) != key:
        raise InvalidInput(f"message key {key_str(msg.key)!r} differs from the record key {key!r}")
    if msg.media_ts_ms < 0:
        raise InvalidInput(f"media_ts_ms {msg.media_ts_ms} is negative")
    return FrameRecord(
        key=key,
        media_ts_ms=int(msg.media_ts_ms),
        caption=msg.caption.strip(),
        labels=tuple(label.name for label in msg.labels if label.name),
        person_count=max(0, int(msg.person_count)),
        session_id=msg.session_id,
        seq=int(msg.seq),
    )


def frame_item(record: FrameRecord, score: float = 0.0) -> memory_pb2.MemoryItem:
    return memory_pb2.MemoryItem(
        tier=memory_pb2.MEMORY_TIER_SHORT,
        start_ms=record.media_ts_ms,
        end_ms=record.media_ts_ms,
        text=frame_text(record),
        labels=list(record.labels),
        person_count=record.person_count,
        score=score,
        item_id=f"{record.key}/{record.media_ts_ms}",
    )


# -- chunk digests (the stand-in for mid-term summaries) -------------------------------------------
@dataclass(frozen=True)
class ChunkDigest:
    """A deterministic summary of one chunk's frames: no model, same frames → same text."""

    index: int
    start_ms: int
    end_ms: int  # exclusive
    frames: int
    text: str
    labels: tuple[str, ...]
    max_people: int

    def item(self, key: str) -> memory_pb2.MemoryItem:
        return memory_pb2.MemoryItem(
            tier=memory_pb2.MEMORY_TIER_MID,
            start_ms=self.start_ms,
            end_ms=self.end_ms,
            text=self.text,
            labels=list(self.labels),
            person_count=self.max_people,
            item_id=f"{key}/chunk/{self.start_ms}-{self.end_ms}",
        )


TOP_CAPTIONS = 3  # captions named per chunk line
TOP_LABELS = 5


def digest_chunk(index: int, start_ms: int, end_ms: int, records: Iterable[FrameRecord]) -> ChunkDigest | None:
    """Most frequent captions (ties: first seen first), most frequent labels, most people in one frame."""
    captions: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    frames = 0
    max_people = 0
    for record in records:
        frames += 1
        captions[frame_text(record) or "(nothing recognised)"] += 1
        labels.update(record.labels)
        max_people = max(max_people, record.person_count)
    if not frames:
        return None
    named = captions.most_common(TOP_CAPTIONS)  # Counter keeps first-seen order among equal counts
    parts = [f"{caption} ({count}x)" for caption, count in named]
    if len(captions) > len(named):
        parts.append(f"{len(captions) - len(named)} other scenes")
    text = f"{frames} frames: " + "; ".join(parts) + f"; up to {max_people} {'person' if max_people == 1 else 'people'}"
    return ChunkDigest(index, start_ms, end_ms, frames, text, tuple(n for n, _ in labels.most_common(TOP_LABELS)), max_people)


def _clock(ms: int) -> str:
    seconds = ms // 1000
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def render_prefix(digests: list[ChunkDigest]) -> str:
    """The memory text a prompt starts with: one line per digested chunk, oldest first."""
    if not digests:
        return ""
    lines = ["Earlier in this stream (media time, one line per chunk):"]
    lines += [f"[{_clock(d.start_ms)}-{_clock(d.end_ms)}] {d.text}" for d in digests]
    return "\n".join(lines) + "\n"


def prefix_version(prefix_text: str) -> str:
    return hashlib.sha256(prefix_text.encode()).hexdigest()[:16]


class _DigestCache:
    """Digests of completed chunks per (stream, chunk index), LRU-bounded.

    A write into a chunk drops that chunk's digest. A reader caches what it computed only for chunks
    that nobody wrote into since it started reading (write stamps per chunk), so a digest never hides
    a frame, while writes into the live chunk do not stop older chunks from being cached.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._digests: OrderedDict[tuple[str, int], ChunkDigest | None] = OrderedDict()
        self._clock = 0  # counts writes
        self._written: OrderedDict[tuple[str, int], int] = OrderedDict()  # chunk -> stamp of its last write
        self._forgotten = 0  # newest stamp dropped from _written (its chunk is unknown from then on)

    def stamp(self) -> int:
        with self._lock:
            return self._clock

    def get(self, key: str, index: int) -> tuple[bool, ChunkDigest | None]:
        with self._lock:
            if (key, index) not in self._digests:
                return False, None
            self._digests.move_to_end((key, index))
            return True, self._digests[(key, index)]

    def put_all(self, key: str, since: int, digests: dict[int, ChunkDigest | None]) -> None:
        """Cache ``digests`` computed from a read that began at stamp ``since``."""
        if not self.capacity:
            return
        with self._lock:
            if self._forgotten > since:
                return
            for index, digest in digests.items():
                if self._written.get((key, index), 0) > since:
                    continue  # written during the read: the digest may miss that frame
                self._digests[(key, index)] = digest
                self._digests.move_to_end((key, index))
            while len(self._digests) > self.capacity:
                self._digests.popitem(last=False)

    def written(self, key: str, index: int) -> None:
        with self._lock:
            self._clock += 1
            self._written[(key, index)] = self._clock
            self._written.move_to_end((key, index))
            while len(self._written) > max(self.capacity, 1):
                _, stamp = self._written.popitem(last=False)
                self._forgotten = max(self._forgotten, stamp)
            self._digests.pop((key, index), None)


# -- the service -----------------------------------------------------------------------------------
class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, memory: MemoryStage) -> None:
        self._memory = memory

    def Recall(self, request: memory_pb2.RecallRequest, context: grpc.ServicerContext) -> memory_pb2.RecallResponse:  # noqa: N802
        with self._memory.in_flight():
            return self._memory.recall(request)

    def Context(self, request: memory_pb2.ContextRequest, context: grpc.ServicerContext) -> memory_pb2.ContextResponse:  # noqa: N802
        with self._memory.in_flight():
            return self._memory.context(request)


class MemoryStage(Stage):
    """The ``memory`` row of the topology. See the module docstring."""

    name = "memory"

    def __init__(
        self,
        settings: MemorySettings | None = None,
        text: TextEncoderSettings | None = None,
        text_encoder: TextEncoder | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        """``text_encoder`` / ``store``: use these (loaded or opened at ``open``) instead of new ones."""
        self.settings = settings or load_settings(MemorySettings)
        self.text = text
        self.text_encoder = text_encoder
        self.store = store
        self._digests: _DigestCache | None = None
        self._last_flush = time.monotonic()
        self._calls = 0  # RPCs running now: the store stays open until they finished (or the deadline)
        self._calls_done = threading.Condition()

    def configure(self, spec: StageSpec) -> StageSpec:
        return replace(spec, group=self.settings.consumer_group)

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.text_encoder = (self.text_encoder or TextEncoder(self.text or load_settings(TextEncoderSettings))).load()
        self._digests = _DigestCache(self.settings.digest_cache_chunks)
        if self.store is None:
            self.store = open_store(self.settings)

    def register(self, server: grpc.Server) -> None:
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(self), server)

    def healthy(self) -> bool:
        return (self.store is not None and self.store.is_open
                and self.text_encoder is not None and self.text_encoder.loaded)

    def close(self, deadline: float) -> None:
        """Intake has stopped; let running RPCs answer, then flush and close the store."""
        with self._calls_done:
            # The runner stopped taking RPCs before stopping the host; let the running ones answer.
            self._calls_done.wait_for(lambda: self._calls == 0, timeout=max(0.0, deadline - time.monotonic()))
        if self.store is not None and self.store.is_open:
            self.store.close()

    @contextmanager
    def in_flight(self) -> Iterator[None]:
        with self._calls_done:
            self._calls += 1
        try:
            yield
        finally:
            with self._calls_done:
                self._calls -= 1
                self._calls_done.notify_all()

    # -- intake ----------------------------------------------------------------------------------
    def handle(self, event: ConsumedEvent[events_pb2.EncodedFrameEvent]) -> None:
        """Keep one encoded frame."""
        assert self.store is not None and self.text_encoder is not None and self._digests is not None and self.settings
        record = record_from_event(event.key, event.message)
        vector = self.text_encoder.encode([frame_text(record)])
        self.store.upsert([record], vector)  # durable on return (WAL / wait=True): the offset may be committed
        self._digests.written(record.key, record.media_ts_ms // self.settings.chunk_ms)
        now = time.monotonic()
        if now - self._last_flush >= self.settings.flush_interval_s:
            self.store.flush()
            self._last_flush = now

    # -- API -------------------------------------------------------------------------------------
    def recall(self, request: memory_pb2.RecallRequest) -> memory_pb2.RecallResponse:
        assert self.store is not None and self.text_encoder is not None and self.settings is not None
        key = _key(request.key)
        query = request.query.strip()
        if not query:
            raise InvalidInput("query is empty: say what to look for, e.g. 'a person with a red bag'")
        if len(query) > self.settings.recall_max_query_chars:
            raise InvalidInput(f"query has {len(query)} characters; at most {self.settings.recall_max_query_chars} (SH_MEMORY_RECALL_MAX_QUERY_CHARS)")
        if request.from_ms < 0 or request.to_ms < 0:
            raise InvalidInput(f"from_ms ({request.from_ms}) and to_ms ({request.to_ms}) must be >= 0 (0 = open end)")
        if request.to_ms and request.from_ms > request.to_ms:
            raise InvalidInput(f"from_ms ({request.from_ms}) is after to_ms ({request.to_ms})")
        limit = request.limit or self.settings.recall_default_limit
        if limit > self.settings.recall_max_limit:
            raise InvalidInput(f"limit {limit} is above {self.settings.recall_max_limit} (SH_MEMORY_RECALL_MAX_LIMIT)")
        vector = self.text_encoder.encode([query])[0]
        hits = self.store.search(key, vector, from_ms=request.from_ms or None, to_ms=request.to_ms or None, limit=limit)
        # Equal captions score equally: among them, the earlier frame first, so answers are stable.
        hits.sort(key=lambda h: (-round(h.score, 6), h.record.media_ts_ms))
        return memory_pb2.RecallResponse(items=[frame_item(h.record, h.score) for h in hits])

    def context(self, request: memory_pb2.ContextRequest) -> memory_pb2.ContextResponse:
        assert self.store is not None and self.settings is not None
        key = _key(request.key)
        now = int(request.now_ms)
        if now < 0:
            raise InvalidInput(f"now_ms {now} is negative")
        max_recent = request.max_recent or self.settings.context_default_recent
        if max_recent > self.settings.context_max_recent:
            raise InvalidInput(f"max_recent {max_recent} is above {self.settings.context_max_recent} (SH_MEMORY_CONTEXT_MAX_RECENT)")
        after = now - self.settings.recent_window_ms
        recent = self.store.window(key, after_ms=after if after >= 0 else None, until_ms=now, limit=max_recent)
        digests = self._chunk_digests(key, now)
        text = render_prefix(digests)
        return memory_pb2.ContextResponse(
            recent=[frame_item(r) for r in recent],
            summaries=[d.item(key) for d in digests],
            blocks=[],
            prefix_text=text,
            prefix_version=prefix_version(text),
        )

    def _chunk_digests(self, key: str, now_ms: int) -> list[ChunkDigest]:
        """Digests of the newest ``prefix_max_chunks`` chunks that ended at or before ``now_ms``."""
        assert self.store is not None and self.settings is not None and self._digests is not None
        chunk = self.settings.chunk_ms
        completed = now_ms // chunk  # chunks 0 .. completed-1 lie entirely at or before now
        first = max(0, completed - self.settings.prefix_max_chunks)
        found: dict[int, ChunkDigest | None] = {}
        missing: list[int] = []
        for index in range(first, completed):
            cached, digest = self._digests.get(key, index)
            if cached:
                found[index] = digest
            else:
                missing.append(index)
        if missing:
            since = self._digests.stamp()
            lo, hi = missing[0], missing[-1] + 1  # one ordered scan over the uncached span
            per_chunk: dict[int, list[FrameRecord]] = {i: [] for i in range(lo, hi)}
            for record in self.store.scan(key, from_ms=lo * chunk, before_ms=hi * chunk):
                per_chunk[record.media_ts_ms // chunk].append(record)
            computed = {i: digest_chunk(i, i * chunk, (i + 1) * chunk, per_chunk[i]) for i in missing}
            self._digests.put_all(key, since, computed)
            found.update(computed)
        return [found[i] for i in range(first, completed) if found.get(i) is not None]  # type: ignore[misc]


def _key(key: StreamKey) -> str:
    return key_str(make_key(key.tenant, key.stream_id))  # InvalidInput names the bad part


__all__ = ["ChunkDigest", "MemoryStage", "MemorySettings", "digest_chunk", "open_store", "prefix_version", "render_prefix"]
