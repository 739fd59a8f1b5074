"""The memory stage: three tiers per stream and the Q&A history, ``Recall``, ``Context`` and ``Items``.

Intake (topology row ``memory``), each record one upsert with a deterministic id, so redelivery
overwrites instead of duplicating; the offset is committed after the upsert returned (durable):

* ``embeddings`` (``EncodedFrameEvent``) → a **short-term** entry per frame (caption, labels, people).
  When a stream's frames enter a new chunk, everything of that stream that ended before that chunk's
  start minus the horizon (``SH_TIERS_HORIZON_S``) is deleted: frames, summaries, blocks and answers;
  a record that arrives already past it (late, replayed) is not stored.
* ``summaries`` (``SummaryEvent``, written by the summariser stage) → a **mid-term** chunk summary or
  a **long-term** block. After a block, the stream's blocks are evicted to the newest
  ``SH_TIERS_BLOCKS_KEPT`` whose text fits ``SH_TIERS_LONG_TOKENS``; a block older than the oldest
  one kept (re-published, replayed) is not stored again.
* ``responses`` (``ResponseEvent``) → on each final record that carries ``answer_text``, a **Q&A**
  entry (the question or instruction and the answer), so "what did you tell me at 10:05?" works.

Idempotent: batches redelivered after a crash or a restart, and whole records duplicated at any
later point (a re-published summary, a replay), leave the store as if every record had come once,
each first in its partition's order as Kafka delivers it (``tests/unit/test_memory_idempotent.py``).
Ids are deterministic (one point per frame media time, per summary index, per ``response_id``: the
last final with an answer wins, e.g. a later attempt); the horizon is cut at chunk starts, so which
frame of a chunk came first does not matter; what eviction decided (the horizon's cut, the oldest
block kept) is kept per stream and, after a restart, read back from the store at the stream's first
record, so a redelivered old record is not stored again. The one exception is blocks *first*
delivered out of index order (Kafka does not do that): the token budget keeps the newest blocks that
fit side by side, and which those are depends on which blocks were there when it was applied.

API (``streamharness.v1.MemoryService``), all on media time, never past the time asked about:

* ``Recall``: the stream's entries closest in meaning to the query across tiers, within the
  request's range intersected with the time phrases read from the query ("around 10:30", "in the
  first hour", "before the van arrived": :mod:`streamharness.memory.timephrases`); runs of frames
  with the same caption come back as one item spanning the run. The response names the range
  searched, the best item's span (the answer's time) and notes on how the query was read. A phrase
  that cannot be read is ignored with a note, never an error.
* ``Context(now)``: ``prefix_text`` = the long-term blocks and the mid-term summaries visible at
  ``now`` (each becomes visible at its chunk's boundary), rendered oldest first. Its bytes change
  only when ``now`` crosses a chunk boundary (and when a summary lands after its boundary, which the
  ``memory_late_summaries`` meter counts): a prefix KV cache hits on every step of a chunk.
  ``recent`` = the short-term tier (the frames after the newest visible summary);
  ``history`` = the newest Q&A entries within ``SH_TIERS_QA_TOKENS``.
* ``Items``: one tier's entries in a range, oldest first (the summariser reads back after a restart).

Streams are per tenant: every call carries a signed internal identity token (``x-sh-identity``,
:mod:`streamharness.auth`; UNAUTHENTICATED without a valid one), a ``Recall`` for a stream memory
holds nothing of answers NOT_FOUND, and a call whose identity is another tenant than the stream
key's gets the same NOT_FOUND (never another tenant's data). ``Context`` and ``Items`` of an
unknown stream answer empty: a question may come before the first frame landed.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import grpc
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness.errors import InvalidInput, NotFound
from streamharness.keys import key_str, make_key
from streamharness.memory.store import Entry, Hit, MemoryStore, QdrantEdgeMemoryStore, QdrantServerMemoryStore, Scope, Tier
from streamharness.memory.tiers import TierSettings, estimate_tokens
from streamharness.memory.timephrases import TimeScope, clock, parse_time_scope
from streamharness.auth import AuthSettings, InternalTokens, caller
from streamharness.paths import cache_dir
from streamharness.records import ConsumedEvent
from streamharness.settings import load_settings
from streamharness.stage import Stage, StageContext, StageSpec
from streamharness.telemetry import meters
from streamharness.text_encoder import TextEncoder, TextEncoderSettings
from streamharness.v1 import common_pb2, events_pb2, memory_pb2, memory_pb2_grpc
from streamharness.v1.common_pb2 import StreamKey

log = logging.getLogger(__name__)

TIER_OF_PROTO: dict[int, Tier] = {
    memory_pb2.MEMORY_TIER_SHORT: "short", memory_pb2.MEMORY_TIER_MID: "mid",
    memory_pb2.MEMORY_TIER_LONG: "long", memory_pb2.MEMORY_TIER_QA: "qa",
}
PROTO_OF_TIER = {v: k for k, v in TIER_OF_PROTO.items()}

#: Frame hits with the same caption at most this far apart are one item spanning the run.
RUN_GAP_MS = 30_000
#: Candidates searched per item asked for (runs of equal captions collapse into one item), and the
#: most a Recall looks at when too few distinct items came back.
CANDIDATES_PER_ITEM = 5
MAX_CANDIDATES = 2000
#: How far the best item's run is followed to find the whole event's span, a window at a time.
RUN_EXTEND_MS = 600_000
RUN_STEP_MS = 60_000
#: What a Recall searches unless it names tiers: what the stream showed (the Q&A history only for
#: questions about the dialogue itself, ABOUT_DIALOGUE).
SEEN_TIERS: tuple[Tier, ...] = ("short", "mid", "long")
#: A question about the dialogue itself: searched in the Q&A history first.
ABOUT_DIALOGUE = re.compile(
    r"\b(did|have|had) (you|i) (tell|told|say|said|answer|answered|ask|asked|mention|mentioned|reply|replied|warn|warned|alert|alerted)\b"
    r"|\byou (told|said|answered|replied|mentioned|warned|alerted)\b|\bi (asked|said)\b",
    re.IGNORECASE,
)


def _default_data_dir() -> Path:
    return cache_dir() / "memory"


class MemorySettings(BaseSettings):
    """The memory service: where entries are kept and the API's limits (the tiers are ``SH_TIERS_*``)."""

    model_config = SettingsConfigDict(env_prefix="SH_MEMORY_", frozen=True, extra="forbid", case_sensitive=False)

    store: Literal["edge", "server"] = Field(
        "edge", description="edge = Qdrant's engine in this process, data in SH_MEMORY_DATA_DIR; server = a Qdrant server at SH_MEMORY_SERVER_URL."
    )
    data_dir: Path | None = Field(
        None, description="Folder of the edge store (a persistent volume in a cluster). Default: $SH_DEV_CACHE_DIR/memory, else ~/.cache/streamharness/memory."
    )
    server_url: str | None = Field(None, description="Qdrant server URL (store=server), e.g. http://qdrant:6333.")
    server_api_key: SecretStr | None = Field(None, description="Qdrant API key (store=server; a secret: mount it from a Kubernetes Secret).")
    server_collection: str = Field("streamharness_memory", min_length=1, max_length=255, description="Qdrant collection of the entries (store=server).")
    server_timeout_s: float = Field(10.0, gt=0, le=300, description="Deadline of one Qdrant server request (store=server).")
    edge_search_threads: int = Field(0, ge=0, le=64, description="Search threads of the edge store; 0 = one per CPU.")
    recent_window_s: float = Field(
        400.0, gt=0, le=86_400,
        description="Short-term tier when no summary is visible yet (or the summariser is behind): Context returns frames of the last this many media seconds.",
    )
    context_default_recent: int = Field(200, ge=1, le=100_000, description="Recent frames Context returns when the request's max_recent is 0.")
    context_max_recent: int = Field(3600, ge=1, le=100_000, description="Largest max_recent a Context request may ask for.")
    context_cache_streams: int = Field(10_000, ge=0, le=10_000_000, description="Streams whose current prefix is cached (LRU); 0 = rebuild on every Context.")
    recall_default_limit: int = Field(10, ge=1, le=10_000, description="Items Recall returns when the request's limit is 0.")
    recall_max_limit: int = Field(100, ge=1, le=10_000, description="Largest limit a Recall request may ask for.")
    recall_max_query_chars: int = Field(2000, ge=1, le=100_000, description="Longest Recall query accepted (characters).")
    items_max_limit: int = Field(5000, ge=1, le=100_000, description="Largest limit an Items request may ask for (also its default).")
    consumer_group: str = Field("memory", min_length=1, description="Kafka consumer group reading embeddings, summaries and responses (the topic prefix is added).")
    flush_interval_s: float = Field(5.0, gt=0, le=3600, description="Longest time between store flushes while consuming (the WAL covers crashes in between).")
    compact_interval_s: float = Field(
        300.0, ge=0, le=86_400,
        description="Shortest wall time between two compactions of the store after evictions (a background vacuum of deleted points; 0 = after every eviction).",
    )

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


# -- records → entries ----------------------------------------------------------------------------
def _check_key(key: str, msg_key: StreamKey, what: str) -> None:
    if (msg_key.tenant or msg_key.stream_id) and key_str(msg_key) != key:
        raise InvalidInput(f"{what} key {key_str(msg_key)!r} differs from the record key {key!r}")


def frame_entry(key: str, msg: events_pb2.EncodedFrameEvent) -> Entry:
    """A short-term entry from a consumed frame; InvalidInput (dead-lettered, not retried) if unusable."""
    _check_key(key, msg.key, "message")
    if msg.media_ts_ms < 0:
        raise InvalidInput(f"media_ts_ms {msg.media_ts_ms} is negative")
    return Entry(
        key=key, tier="short", start_ms=int(msg.media_ts_ms), end_ms=int(msg.media_ts_ms), text=msg.caption.strip(),
        labels=tuple(label.name for label in msg.labels if label.name), person_count=max(0, int(msg.person_count)),
        ref=msg.session_id, seq=int(msg.seq),
    )


def summary_entry(key: str, msg: events_pb2.SummaryEvent) -> Entry:
    _check_key(key, msg.key, "summary")
    tier = TIER_OF_PROTO.get(msg.tier)
    if tier not in ("mid", "long"):
        raise InvalidInput(f"summary {msg.summary_id!r} has tier {msg.tier}; want MEMORY_TIER_MID or MEMORY_TIER_LONG")
    if msg.index < 0 or msg.start_ms < 0 or msg.end_ms < msg.start_ms:
        raise InvalidInput(f"summary {msg.summary_id!r}: index {msg.index}, span {msg.start_ms}..{msg.end_ms} is not a valid chunk")
    if not msg.text.strip():
        raise InvalidInput(f"summary {msg.summary_id!r} has no text")
    return Entry(
        key=key, tier=tier, start_ms=int(msg.start_ms), end_ms=int(msg.end_ms), text=msg.text.strip(),
        labels=tuple(msg.labels), person_count=max(0, int(msg.max_people)), index=int(msg.index),
        visible_from_ms=int(msg.visible_from_ms), fallback=msg.fallback, backend=msg.backend, frames=max(1, int(msg.frames)),
    )


def answer_entry(key: str, msg: events_pb2.ResponseEvent) -> Entry | None:
    """A Q&A entry from the final record of a response (None for the other records)."""
    if not msg.final or not msg.answer_text.strip() or not msg.response_id:
        return None
    _check_key(key, msg.key, "response")
    kind = "question" if msg.trigger == common_pb2.TRIGGER_QUESTION else "instruction"
    return Entry(key=key, tier="qa", start_ms=max(0, int(msg.media_ts_ms)), end_ms=max(0, int(msg.media_ts_ms)),
                 text=msg.answer_text.strip(), prompt_text=msg.prompt_text.strip(), ref=msg.response_id, labels=(kind,))


def to_item(entry: Entry, score: float = 0.0, *, end_ms: int | None = None, frames: int | None = None) -> memory_pb2.MemoryItem:
    ref = entry.start_ms if entry.tier == "short" else entry.ref if entry.tier == "qa" else entry.index
    return memory_pb2.MemoryItem(
        tier=PROTO_OF_TIER[entry.tier], start_ms=entry.start_ms, end_ms=entry.end_ms if end_ms is None else end_ms,
        text=entry.embed_text if entry.tier == "short" else entry.text, labels=list(entry.labels),
        person_count=entry.person_count, score=score, item_id=f"{entry.key}/{entry.tier}/{ref}", fallback=entry.fallback,
        prompt_text=entry.prompt_text, frames=entry.frames if frames is None else frames,
        index=entry.index if entry.tier in ("mid", "long") else 0,
    )


# -- the stable prefix -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Prefix:
    """What Context renders for one stream at one chunk: blocks and summaries visible at its start."""

    blocks: tuple[Entry, ...]
    summaries: tuple[Entry, ...]
    text: str
    version: str
    covered_end_ms: int  # the last media time the visible summaries cover (-1: none)

    @property
    def tokens(self) -> int:
        return estimate_tokens(self.text)


def _line(entry: Entry) -> str:
    mark = " (automatic digest)" if entry.fallback else ""
    return f"[{clock(entry.start_ms)}–{clock(entry.end_ms)}]{mark} {' '.join(entry.text.split())}"


def render_prefix(blocks: list[Entry], summaries: list[Entry]) -> str:
    """The memory text a prompt starts with: blocks, then chunk summaries, oldest first."""
    parts: list[str] = []
    if blocks:
        parts.append("Long-term memory of this stream (media time, oldest first):\n" + "\n".join(_line(b) for b in blocks))
    if summaries:
        parts.append("Recent chunks (media time, oldest first):\n" + "\n".join(_line(s) for s in summaries))
    return "\n\n".join(parts) + ("\n" if parts else "")


def prefix_version(prefix_text: str) -> str:
    return hashlib.sha256(prefix_text.encode()).hexdigest()[:16]


def fit_newest(entries: list[Entry], budget: int, count: int | None = None) -> list[Entry]:
    """The newest of ``entries`` (oldest first) within ``budget`` tokens and ``count``; oldest first."""
    kept: list[Entry] = []
    used = 0
    for entry in reversed(entries):
        if count is not None and len(kept) >= count:
            break
        if used + entry.tokens > budget:
            break
        kept.append(entry)
        used += entry.tokens
    return kept[::-1]


# -- the service -----------------------------------------------------------------------------------
class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    """Every call carries a verified internal identity (UNAUTHENTICATED otherwise); a stream of
    another tenant than the identity's is NOT_FOUND."""

    def __init__(self, memory: MemoryStage, tokens: InternalTokens) -> None:
        self._memory = memory
        self._tokens = tokens

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return caller(self._tokens, context, "memory").tenant

    def Recall(self, request: memory_pb2.RecallRequest, context: grpc.ServicerContext) -> memory_pb2.RecallResponse:  # noqa: N802
        tenant = self._tenant(context)
        with self._memory.in_flight():
            return self._memory.recall(request, caller_tenant=tenant)

    def Context(self, request: memory_pb2.ContextRequest, context: grpc.ServicerContext) -> memory_pb2.ContextResponse:  # noqa: N802
        tenant = self._tenant(context)
        with self._memory.in_flight():
            return self._memory.context(request, caller_tenant=tenant)

    def Items(self, request: memory_pb2.ItemsRequest, context: grpc.ServicerContext) -> memory_pb2.ItemsResponse:  # noqa: N802
        tenant = self._tenant(context)
        with self._memory.in_flight():
            return self._memory.items(request, caller_tenant=tenant)


class MemoryStage(Stage):
    """The ``memory`` row of the topology. See the module docstring."""

    name = "memory"

    def __init__(
        self,
        settings: MemorySettings | None = None,
        tiers: TierSettings | None = None,
        text: TextEncoderSettings | None = None,
        auth: AuthSettings | None = None,
        *,
        text_encoder: TextEncoder | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        """``text_encoder`` / ``store``: use these (loaded or opened at ``open``) instead of new ones."""
        self.settings = settings or load_settings(MemorySettings)
        self.auth = auth
        self.tiers = tiers or load_settings(TierSettings)
        self.text = text
        self.text_encoder = text_encoder
        self.store = store
        self._last_flush = time.monotonic()
        self._calls = 0  # RPCs running now: the store stays open until they finished (or the deadline)
        self._calls_done = threading.Condition()
        self._lock = threading.Lock()
        self._chunk_seen: dict[str, int] = {}  # stream -> newest chunk index whose frames were seen (eviction)
        self._cutoffs: dict[str, int] = {}  # stream -> media time before which everything was deleted
        self._block_floor: dict[str, int] = {}  # stream -> index of the oldest long-term block kept (older: evicted)
        self._restored: set[str] = set()  # streams whose eviction state was read back from the store (restart)
        self._evicted = False  # something was deleted since the last compaction
        self._last_compact = time.monotonic()
        self._compacting: threading.Thread | None = None
        self._versions: dict[str, int] = {}  # stream -> summary writes (invalidates cached prefixes)
        self._prefixes: OrderedDict[str, tuple[int, int, Prefix]] = OrderedDict()  # stream -> (chunk, version, prefix)

    def configure(self, spec: StageSpec) -> StageSpec:
        return replace(spec, group=self.settings.consumer_group)

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.text_encoder = (self.text_encoder or TextEncoder(self.text or load_settings(TextEncoderSettings))).load()
        if self.store is None:
            self.store = open_store(self.settings)

    def register(self, server: grpc.aio.Server) -> None:
        # Serving the API needs the identity secret (the local host calls the methods directly).
        tokens = InternalTokens(self.auth or load_settings(AuthSettings), "memory")
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(MemoryServicer(self, tokens), server)

    def healthy(self) -> bool:
        return (self.store is not None and self.store.is_open
                and self.text_encoder is not None and self.text_encoder.loaded)

    def close(self, deadline: float) -> None:
        """Intake has stopped; let running RPCs answer, then flush and close the store."""
        with self._calls_done:
            self._calls_done.wait_for(lambda: self._calls == 0, timeout=max(0.0, deadline - time.monotonic()))
        if self._compacting is not None:
            self._compacting.join(timeout=max(0.0, deadline - time.monotonic()))
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
    def handle(self, event: ConsumedEvent) -> None:
        msg = event.message
        if isinstance(msg, events_pb2.EncodedFrameEvent):
            entry = frame_entry(event.key, msg)
            self._restore(entry.key)
            self._evict_past_horizon(entry)
            self._write(entry)
        elif isinstance(msg, events_pb2.SummaryEvent):
            entry = summary_entry(event.key, msg)
            self._restore(entry.key)
            self._write(entry)
            if entry.tier == "long":
                self._evict_blocks(entry.key)
            with self._lock:
                self._versions[entry.key] = self._versions.get(entry.key, 0) + 1
            self._count_late(entry, msg)
        elif isinstance(msg, events_pb2.ResponseEvent):
            entry = answer_entry(event.key, msg)
            if entry is not None:
                self._restore(entry.key)
                self._write(entry)
        else:
            raise InvalidInput(f"memory does not keep {type(msg).__name__} records")
        now = time.monotonic()
        if now - self._last_flush >= self.settings.flush_interval_s:
            self.store.flush()  # type: ignore[union-attr]
            self._last_flush = now
        if self._evicted and now - self._last_compact >= self.settings.compact_interval_s:
            self.compact_in_background()

    def compact_in_background(self) -> threading.Thread | None:
        """Vacuum deleted points off the consumer's thread (one compaction at a time)."""
        if self._compacting is not None and self._compacting.is_alive():
            return None
        self._evicted = False
        self._last_compact = time.monotonic()

        def run() -> None:
            started = time.monotonic()
            try:
                self.store.compact()  # type: ignore[union-attr]
                log.info("memory: store compacted in %.1f s", time.monotonic() - started)
            except Exception:  # noqa: BLE001 - a failed vacuum is retried after the next eviction
                log.exception("memory: compacting the store failed")
                self._evicted = True

        self._compacting = threading.Thread(target=run, name="memory-compact", daemon=True)
        self._compacting.start()
        return self._compacting

    def _restore(self, key: str) -> None:
        """At a stream's first record in this process: what earlier processes' evictions decided, read
        back from the store, so that a record redelivered after a restart is not stored again past
        them: the horizon's cut from the newest frame's chunk, and the oldest block stored as the
        oldest kept (a block older than it that comes again was stored once and evicted since: the
        summariser first publishes a stream's blocks in index order)."""
        assert self.store is not None
        with self._lock:
            if key in self._restored:
                return
        newest = self.store.newest(Scope(key, ("short",)), 1)
        blocks = list(self.store.scan(Scope(key, ("long",))))  # at most SH_TIERS_BLOCKS_KEPT
        with self._lock:
            if key in self._restored:
                return
            self._restored.add(key)
            if newest:
                chunk = self.tiers.chunk_index(newest[-1].start_ms)
                self._chunk_seen[key] = max(chunk, self._chunk_seen.get(key, chunk))
                cutoff = self._horizon_cut(chunk)
                if cutoff > 0:
                    self._cutoffs[key] = max(cutoff, self._cutoffs.get(key, 0))
            if blocks:
                self._block_floor[key] = max(min(b.index for b in blocks), self._block_floor.get(key, 0))

    def _horizon_cut(self, chunk: int) -> int:
        """What ends before this is deleted once a stream's frames reach ``chunk``: a function of the
        chunk alone, not of which of its frames came first (redelivery, reordering)."""
        return chunk * self.tiers.chunk_ms - self.tiers.horizon_ms

    def _write(self, entry: Entry) -> None:
        assert self.store is not None and self.text_encoder is not None
        with self._lock:
            cutoff = self._cutoffs.get(entry.key, 0)
            floor = self._block_floor.get(entry.key, 0)
        if entry.end_ms < cutoff:
            # Already past the horizon (a late or replayed record): storing it would only grow memory.
            meters.memory_past_horizon().add(1, {"tier": entry.tier})
            return
        if entry.tier == "long" and entry.index < floor:
            # Older than the oldest block kept (a re-published or replayed block): it was evicted;
            # stored again, it could slip back into the room the budget leaves.
            log.debug("memory %s: block %d is older than the oldest kept (%d); not stored", entry.key, entry.index, floor)
            return
        self.store.upsert([entry], self.text_encoder.encode([entry.embed_text]))  # durable on return

    def _count_late(self, entry: Entry, msg: events_pb2.SummaryEvent) -> None:
        with self._lock:
            seen = self._chunk_seen.get(entry.key)
        if seen is not None and msg.visible_from_ms and seen * self.tiers.chunk_ms > msg.visible_from_ms:
            # The stream is already past this summary's boundary: the prefix changes mid-chunk.
            meters.memory_late_summaries().add(1, {"tier": entry.tier})

    def _evict_past_horizon(self, frame: Entry) -> None:
        """When a stream's frames enter a new chunk: delete what ended before the chunk's start minus
        the horizon. The chunk counts as seen only once that is done (a failed delete is retried)."""
        assert self.store is not None
        chunk = self.tiers.chunk_index(frame.start_ms)
        with self._lock:
            previous = self._chunk_seen.get(frame.key)
            if previous is not None and chunk <= previous:
                return
        cutoff = self._horizon_cut(chunk)
        if cutoff > 0:
            self.store.delete_ended_before(frame.key, cutoff)
            self._evicted = True
            with self._lock:
                self._cutoffs[frame.key] = max(cutoff, self._cutoffs.get(frame.key, 0))
                self._versions[frame.key] = self._versions.get(frame.key, 0) + 1
        with self._lock:
            self._chunk_seen[frame.key] = max(chunk, self._chunk_seen.get(frame.key, chunk))

    def _evict_blocks(self, key: str) -> None:
        """Keep the newest ``blocks_kept`` blocks whose text fits ``long_tokens``; delete the older ones."""
        assert self.store is not None
        blocks = list(self.store.scan(Scope(key, ("long",))))
        kept = fit_newest(blocks, self.tiers.long_tokens, self.tiers.blocks_kept) or blocks[-1:]
        if len(kept) < len(blocks):
            # Cut by the count or the budget: an older block that comes again later (re-published,
            # replayed, reordered) stays out, as it would have had it come in order.
            with self._lock:
                self._block_floor[key] = max(kept[0].index, self._block_floor.get(key, 0))
            self.store.delete_ended_before(key, kept[0].start_ms, ("long",))
            self._evicted = True
            log.info("memory %s: evicted %d long-term blocks (kept %d)", key, len(blocks) - len(kept), len(kept))

    # -- API -------------------------------------------------------------------------------------
    def recall(self, request: memory_pb2.RecallRequest, *, caller_tenant: str | None = None) -> memory_pb2.RecallResponse:
        assert self.store is not None and self.text_encoder is not None
        s = self.settings
        key = _key(request.key, caller_tenant)
        query = request.query.strip()
        if not query:
            raise InvalidInput("query is empty: say what to look for, e.g. 'a person with a red bag'")
        if len(query) > s.recall_max_query_chars:
            raise InvalidInput(f"query has {len(query)} characters; at most {s.recall_max_query_chars} (SH_MEMORY_RECALL_MAX_QUERY_CHARS)")
        if request.from_ms < 0 or request.to_ms < 0 or request.now_ms < 0:
            raise InvalidInput(f"from_ms ({request.from_ms}), to_ms ({request.to_ms}) and now_ms ({request.now_ms}) must be >= 0 (0 = open)")
        if request.to_ms and request.from_ms > request.to_ms:
            raise InvalidInput(f"from_ms ({request.from_ms}) is after to_ms ({request.to_ms})")
        limit = request.limit or s.recall_default_limit
        if limit > s.recall_max_limit:
            raise InvalidInput(f"limit {limit} is above {s.recall_max_limit} (SH_MEMORY_RECALL_MAX_LIMIT)")
        tiers = self._tiers(request.tiers)
        newest = self.store.edge(key, newest=True)
        if newest is None:
            raise NotFound(f"memory holds nothing of stream {request.key.stream_id!r}")
        first = self.store.edge(key, newest=False)
        now = int(request.now_ms) or newest.end_ms
        scope = TimeScope(query=query) if request.literal else parse_time_scope(query, now_ms=now, stream_start_ms=first.start_ms if first else 0)
        notes = list(scope.notes)
        lo = max([v for v in (request.from_ms or None, scope.from_ms) if v is not None], default=None)
        hi = min([v for v in (request.to_ms or None, scope.to_ms, now) if v is not None])
        if scope.anchor:
            anchor = self._best(Scope(key, ("short", "mid"), lo, hi, now), scope.anchor, 1)
            if anchor:
                at = anchor[0]
                notes.append(f"found '{scope.anchor}' at {clock(at.entry.start_ms)} (similarity {at.score:.2f})")
                if scope.anchor_side == "before":
                    hi = min(hi, at.entry.start_ms - 1)
                else:
                    lo = max(lo or 0, at.entry.end_ms + 1)
            else:
                notes.append(f"did not find '{scope.anchor}' in memory; searched without it")
        items: list[memory_pb2.MemoryItem] = []
        about_dialogue = not tiers and ABOUT_DIALOGUE.search(query) is not None
        if (scope.from_ms is not None or scope.to_ms is not None) and not tiers and not about_dialogue \
                and _says_nothing(scope.query) and (lo is None or lo <= hi):
            # "What happened around 10:30?": nothing to search by meaning, the time is the question.
            notes.append("the question names no subject: what memory holds of that time, nearest first")
            return self._answer(scope, notes, lo, hi, self._around(key, lo or 0, hi, limit))
        if lo is None or lo <= hi:
            candidates = min(limit * CANDIDATES_PER_ITEM, 1000)
            hits: list[Hit] = []
            if about_dialogue:
                # "What did you tell me at 10:05?" is about the dialogue, not about what the camera showed.
                hits = self._best(Scope(key, ("qa",), lo, hi, now), scope.query, candidates)
                notes.append("searched what was asked and answered (the Q&A history)" if hits
                             else "nothing was asked or answered in that time; searched everything")
                if hits and scope.from_ms is not None and scope.to_ms is not None:
                    # "... at 10:05": the exchange nearest that time is the one meant.
                    centre = (scope.from_ms + scope.to_ms) / 2
                    nearest = min(hits, key=lambda h: abs(h.entry.start_ms - centre))
                    return self._answer(scope, notes, lo, hi, _collapse_runs([nearest]) + [
                        i for i in _collapse_runs(hits) if i.item_id != to_item(nearest.entry).item_id][:limit - 1])
            if not hits:
                # What was seen, not what was said (an earlier answer to the same question would
                # match best by meaning, right or wrong), unless the Q&A tier is asked for by name.
                # Nothing that ends after now: a summary written ahead of its boundary covers
                # frames past a question asked before them.
                tiers = tiers or SEEN_TIERS
                hits = self._best(Scope(key, tiers, lo, hi, now), scope.query, candidates)
                # Runs of equal captions collapse into one item each: look further while too few
                # distinct items came back and there may be more.
                while len(_collapse_runs(hits)) < limit and len(hits) == candidates and candidates < MAX_CANDIDATES:
                    candidates = min(candidates * 4, MAX_CANDIDATES)
                    hits = self._best(Scope(key, tiers, lo, hi, now), scope.query, candidates)
            if scope.anchor and scope.anchor_side == "before":
                hits = [h for h in hits if h.entry.end_ms <= hi]  # wholly before the event
            items = _collapse_runs(hits)[:limit]
            if items and items[0].tier == memory_pb2.MEMORY_TIER_SHORT:
                self._extend_run(key, items[0], lo, hi)
        else:
            notes.append("the time range read from the query is empty; nothing searched")
        return self._answer(scope, notes, lo, hi, items)

    @staticmethod
    def _answer(scope: TimeScope, notes: list[str], lo: int | None, hi: int, items: list[memory_pb2.MemoryItem]) -> memory_pb2.RecallResponse:
        best = items[0] if items else None
        return memory_pb2.RecallResponse(
            items=items, from_ms=lo or 0, to_ms=hi, notes=notes, searched_text=scope.query,
            span_start_ms=best.start_ms if best else 0, span_end_ms=best.end_ms if best else 0,
        )

    def _around(self, key: str, lo: int, hi: int, limit: int) -> list[memory_pb2.MemoryItem]:
        """What memory holds of ``[lo, hi]``: for a window of more than four chunks ("in the last
        hour") its chunk summaries in time order; for a shorter one ("around 10:30", +-5 min) the
        summary holding its middle and the runs of frames nearest the middle. ``score`` is nearness
        in time."""
        assert self.store is not None
        summaries = [to_item(e) for e in self.store.scan(Scope(key, ("mid",), lo, hi, hi))]
        if hi - lo > 4 * self.tiers.chunk_ms and summaries:
            for item in summaries:
                item.score = 1.0
            return summaries[-limit:]
        centre = (lo + hi) // 2
        half = max(1, (hi - lo) // 2)
        items = summaries
        runs: list[list[Entry]] = []
        for frame in self.store.scan(Scope(key, ("short",), lo, hi)):
            if runs and runs[-1][-1].embed_text == frame.embed_text and frame.start_ms - runs[-1][-1].end_ms <= RUN_GAP_MS:
                runs[-1].append(frame)
            else:
                runs.append([frame])
        items += [to_item(run[0], end_ms=run[-1].end_ms, frames=len(run)) for run in runs]

        def distance(item: memory_pb2.MemoryItem) -> int:
            return 0 if item.start_ms <= centre <= item.end_ms else min(abs(item.start_ms - centre), abs(item.end_ms - centre))

        # A summary that holds the middle first (it tells the whole time), then the nearest moments.
        items.sort(key=lambda i: (distance(i), i.tier != memory_pb2.MEMORY_TIER_MID, i.start_ms))
        for item in items:
            item.score = max(0.0, 1.0 - distance(item) / half)
        return items[:limit]

    def _extend_run(self, key: str, item: memory_pb2.MemoryItem, lo: int | None, hi: int) -> None:
        """Widen the best item's span to the whole run of its caption (up to RUN_EXTEND_MS each way,
        within the range searched): the answer's time span is the event's, not only the frames that
        were hits. Reads outwards a window at a time, only as far as the run goes."""
        assert self.store is not None
        start, end, frames = item.start_ms, item.end_ms, item.frames
        for direction in (-1, 1):
            edge = start if direction < 0 else end
            limit = max(lo or 0, start - RUN_EXTEND_MS) if direction < 0 else min(hi, end + RUN_EXTEND_MS)
            while (edge > limit) if direction < 0 else (edge < limit):
                a, b = (max(limit, edge - RUN_STEP_MS), edge) if direction < 0 else (edge, min(limit, edge + RUN_STEP_MS))
                same = sorted((e.start_ms for e in self.store.scan(Scope(key, ("short",), a, b)) if e.embed_text == item.text),
                              reverse=direction < 0)
                moved = False
                for t in same:
                    if abs(t - edge) > RUN_GAP_MS:
                        break
                    edge, moved = t, moved or t != edge
                if not moved or abs(edge - (b if direction > 0 else a)) > RUN_GAP_MS:
                    break  # the run ended inside this window
            if direction < 0:
                start = edge
            else:
                end = edge
        if (start, end) != (item.start_ms, item.end_ms):
            frames = sum(1 for e in self.store.scan(Scope(key, ("short",), start, end)) if e.embed_text == item.text)
        item.start_ms, item.end_ms, item.frames = start, end, frames

    def _best(self, scope: Scope, text: str, limit: int) -> list[Hit]:
        assert self.store is not None and self.text_encoder is not None
        return self.store.search(scope, self.text_encoder.encode([text])[0], limit)

    def context(self, request: memory_pb2.ContextRequest, *, caller_tenant: str | None = None) -> memory_pb2.ContextResponse:
        assert self.store is not None
        s, t = self.settings, self.tiers
        key = _key(request.key, caller_tenant)
        now = int(request.now_ms)
        if now < 0:
            raise InvalidInput(f"now_ms {now} is negative")
        max_recent = request.max_recent or s.context_default_recent
        if max_recent > s.context_max_recent:
            raise InvalidInput(f"max_recent {max_recent} is above {s.context_max_recent} (SH_MEMORY_CONTEXT_MAX_RECENT)")
        chunk_start = t.chunk_index(now) * t.chunk_ms
        prefix = self._prefix(key, chunk_start)
        after = prefix.covered_end_ms if prefix.covered_end_ms >= 0 else now - s.recent_window_ms
        after = max(after, now - s.recent_window_ms - t.chunk_ms)  # a stalled summariser never unbounds it
        recent = self.store.newest(Scope(key, ("short",), after + 1 if after >= 0 else None, now), max_recent)
        answers = self.store.newest(Scope(key, ("qa",), None, now), t.qa_history) if t.qa_history else []
        history = fit_newest(answers, t.qa_tokens)
        return memory_pb2.ContextResponse(
            recent=[to_item(e) for e in recent if e.start_ms <= now],
            summaries=[to_item(e) for e in prefix.summaries],
            blocks=[to_item(e) for e in prefix.blocks],
            history=[to_item(e) for e in history],
            prefix_text=prefix.text,
            prefix_version=prefix.version,
            chunk_start_ms=chunk_start,
            prefix_tokens=prefix.tokens,
        )

    def _prefix(self, key: str, chunk_start: int) -> Prefix:
        """Blocks and summaries visible from ``chunk_start`` (cached per stream until a summary lands)."""
        assert self.store is not None
        with self._lock:
            version = self._versions.get(key, 0)
            cached = self._prefixes.get(key)
            if cached is not None and cached[0] == chunk_start and cached[1] == version:
                self._prefixes.move_to_end(key)
                return cached[2]
        t = self.tiers
        blocks = [b for b in self.store.scan(Scope(key, ("long",), None, chunk_start)) if b.visible_from_ms <= chunk_start]
        blocks = fit_newest(blocks, t.long_tokens, t.blocks_kept)
        covered = {c for b in blocks for c in t.block_chunks(b.index)}
        candidates = self.store.newest(Scope(key, ("mid",), None, chunk_start), 4 * t.summaries_per_block + 8)
        summaries = [m for m in candidates if m.visible_from_ms <= chunk_start and m.index not in covered
                     and (not blocks or m.start_ms >= blocks[-1].start_ms)]
        summaries = fit_newest(summaries, t.mid_tokens)
        text = render_prefix(blocks, summaries)
        covered_end = max([e.end_ms for e in (*blocks, *summaries)], default=-1)
        prefix = Prefix(tuple(blocks), tuple(summaries), text, prefix_version(text), covered_end)
        if self.settings.context_cache_streams:
            with self._lock:
                if self._versions.get(key, 0) == version:
                    self._prefixes[key] = (chunk_start, version, prefix)
                    self._prefixes.move_to_end(key)
                    while len(self._prefixes) > self.settings.context_cache_streams:
                        self._prefixes.popitem(last=False)
        return prefix

    def items(self, request: memory_pb2.ItemsRequest, *, caller_tenant: str | None = None) -> memory_pb2.ItemsResponse:
        assert self.store is not None
        key = _key(request.key, caller_tenant)
        tier = TIER_OF_PROTO.get(request.tier)
        if tier is None:
            raise InvalidInput("tier is required: MEMORY_TIER_SHORT, _MID, _LONG or _QA")
        if request.from_ms < 0 or request.to_ms < 0 or (request.to_ms and request.from_ms > request.to_ms):
            raise InvalidInput(f"from_ms ({request.from_ms}) .. to_ms ({request.to_ms}) is not a range (0 = open)")
        limit = request.limit or self.settings.items_max_limit
        if limit > self.settings.items_max_limit:
            raise InvalidInput(f"limit {limit} is above {self.settings.items_max_limit} (SH_MEMORY_ITEMS_MAX_LIMIT)")
        out: list[memory_pb2.MemoryItem] = []
        for entry in self.store.scan(Scope(key, (tier,), request.from_ms or None, request.to_ms or None)):
            out.append(to_item(entry))
            if len(out) >= limit:
                break
        return memory_pb2.ItemsResponse(items=out)

    @staticmethod
    def _tiers(requested: object) -> tuple[Tier, ...]:
        tiers: list[Tier] = []
        for value in requested:  # type: ignore[attr-defined]
            tier = TIER_OF_PROTO.get(int(value))
            if tier is None:
                raise InvalidInput(f"unknown memory tier {value}")
            tiers.append(tier)
        return tuple(tiers)


#: Words that do not say what to look for ("what happened", "what did you see", "anything").
_EMPTY_WORDS = frozenset(
    "what whats what's happened happen happening happens was were is are be been there going go on did do does you your "
    "see saw seen show shown showing anything something everything tell me describe the a an any screen camera video stream "
    "in at then it that this of how about notice noticed going has have had".split()
)


def _says_nothing(query: str) -> bool:
    words = re.findall(r"[a-z']+", query.lower())
    return all(w in _EMPTY_WORDS for w in words)


def _collapse_runs(hits: list[Hit]) -> list[memory_pb2.MemoryItem]:
    """Frames with the same caption within RUN_GAP_MS of each other become one item spanning them
    (scored by the run's best frame); summaries, blocks and answers stay one item each. Best first;
    among equal scores the earlier first, so answers are stable."""
    runs: list[list[Hit]] = []
    by_text: dict[str, list[list[Hit]]] = {}
    for hit in sorted(hits, key=lambda h: h.entry.start_ms):
        if hit.entry.tier != "short":
            runs.append([hit])
            continue
        groups = by_text.setdefault(hit.entry.embed_text, [])
        if groups and hit.entry.start_ms - groups[-1][-1].entry.end_ms <= RUN_GAP_MS:
            groups[-1].append(hit)
        else:
            group = [hit]
            groups.append(group)
            runs.append(group)
    items = []
    for run in runs:
        top = max(run, key=lambda h: h.score)
        items.append(to_item(run[0].entry, top.score, end_ms=run[-1].entry.end_ms, frames=len(run) if run[0].entry.tier == "short" else None))
    items.sort(key=lambda i: (-round(i.score, 6), i.start_ms))
    return items


def _key(key: StreamKey, caller_tenant: str | None = None) -> str:
    if caller_tenant is not None and caller_tenant != key.tenant:
        # Never say that another tenant's stream exists.
        raise NotFound(f"memory holds nothing of stream {key.stream_id!r}")
    return key_str(make_key(key.tenant, key.stream_id))  # InvalidInput names the bad part


__all__ = ["MemorySettings", "MemoryStage", "Prefix", "open_store", "prefix_version", "render_prefix"]
