"""The summariser stage: writes each stream's mid-term chunk summaries and long-term blocks.

Topology row ``summariser``: consumes ``embeddings`` (captions, labels, people counts) and, when its
backend sees images, ``frames`` (a few sampled JPEGs per chunk); publishes ``SummaryEvent`` records on
``summaries``, which the memory stage keeps. Nothing on the decision or responder path waits for it:
it is its own consumer group, and memory shows a summary from its chunk's boundary on.

When it starts a summary. Chunk ``k`` spans media time ``[k*C, (k+1)*C)`` (``SH_TIERS_CHUNK_S``); its
summary starts ``SH_SUMMARISER_LEAD_FRAMES`` frames *before* the boundary ``(k+1)*C``, at the cut
``(k+1)*C - lead``, so that it is written while the last frames of the chunk still arrive. A chunk's
summary covers the frames from the previous cut up to its own cut: the frames after the cut carry
into the next chunk's summary. When the summary of the last chunk of a block (every
``SH_TIERS_SUMMARIES_PER_BLOCK`` chunks) is written, the block's summaries are compressed into a
long-term block the same way.

Delivery: a summary is written inside the handler of the frame that starts it and published
(acknowledged) before that frame's offset is committed, so a crash redelivers the frame and the
summary is written again under the same id (``<key>/mid/<k>``): overwritten, never duplicated. The
frames of a chunk that this process did not see (it started mid-chunk) are read back from memory
(``Items``); after a restart, chunks memory has no summary of are caught up from memory's frames
(``SH_SUMMARISER_CATCH_UP_CHUNKS``).

Backends (:mod:`streamharness.summariser.backends`): a model that fails, or takes longer than
``SH_SUMMARISER_TIMEOUT_S``, after ``SH_SUMMARISER_ATTEMPTS`` tries, is replaced for that summary by
the deterministic digest, marked ``fallback`` (and "(automatic digest)" in prompts).
"""

from __future__ import annotations

import concurrent.futures
import logging
import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from streamharness import topics
from streamharness.errors import InvalidInput
from streamharness.generation import GenerationSettings
from streamharness.generation.base import GenerationError
from streamharness.keys import parse_key
from streamharness.memory.tiers import TierSettings, summary_id
from streamharness.records import ConsumedEvent
from streamharness.memory.client import MemoryClient
from streamharness.settings import load_settings
from streamharness.stage import Outbox, Stage, StageContext, StageSpec
from streamharness.summariser.backends import (
    BlockInput,
    ChunkFrame,
    ChunkInput,
    DigestSummariser,
    SummariserBackend,
    SummaryPiece,
    make_backend,
)
from streamharness.summariser.prompts import label_frames
from streamharness.summariser.settings import SummariserSettings
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2, events_pb2, memory_pb2

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 1000  # a stream's frame interval until a few frames were seen
MAX_STREAMS = 100_000  # per-process stream states kept (LRU); an evicted stream reads back from memory
TOP_LABELS = 5  # salient labels a chunk summary carries


@dataclass
class _Stream:
    """What the summariser holds of one stream: the frames since the last cut and this block's summaries."""

    frames: dict[int, ChunkFrame] = field(default_factory=dict)  # media ts -> frame, not yet summarised
    images: dict[int, bytes] = field(default_factory=dict)  # media ts -> JPEG (sampled, for VLM backends)
    last_image_ms: int = -(10**15)
    deltas: deque[int] = field(default_factory=lambda: deque(maxlen=16))
    last_ms: int = -1
    next_chunk: int | None = None  # the chunk whose cut comes next (None: not seen since start)
    seen_from_ms: int = 0  # the first frame this process saw (older frames are read back from memory)
    pieces: dict[int, SummaryPiece] = field(default_factory=dict)  # chunk index -> summary written here

    def interval_ms(self) -> int:
        return int(statistics.median(self.deltas)) if self.deltas else DEFAULT_INTERVAL_MS


class SummariserStage(Stage):
    """The ``summariser`` row of the topology. See the module docstring."""

    name = "summariser"

    def __init__(
        self,
        settings: SummariserSettings | None = None,
        tiers: TierSettings | None = None,
        generation: GenerationSettings | None = None,
        *,
        backend: SummariserBackend | None = None,
        memory: Any = None,
    ) -> None:
        """``backend``: use this instead of the one ``SH_SUMMARISER_BACKEND`` selects (not closed here).
        ``memory``: an object with ``MemoryServiceStub``'s ``Items`` instead of a gRPC channel."""
        self.settings = settings or load_settings(SummariserSettings)
        self.tiers = tiers or load_settings(TierSettings)
        self._generation = generation
        self.backend = backend
        self._owns_backend = backend is None
        self._memory = memory
        self._channel: MemoryClient | None = None
        self._fallback = DigestSummariser()
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.out: Outbox | None = None
        self.written: list[events_pb2.SummaryEvent] = []  # the newest few, for tests and the bench
        self.stopping = None

    def configure(self, spec: StageSpec) -> StageSpec:
        consumes = dict(spec.consumes)
        takes_images = self.backend.takes_images if self.backend is not None else self.settings.takes_images
        if not takes_images:
            consumes.pop(topics.FRAMES, None)  # captions are all a text backend reads
        return replace(spec, group=self.settings.consumer_group, consumes=consumes)

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.out = ctx.outbox
        self.stopping = ctx.stopping
        if self.backend is None:
            generation = self._generation
            if self.settings.backend == "generator" and generation is None:
                generation = load_settings(GenerationSettings)
            self.backend = make_backend(self.settings, generation)
        self.backend.load()
        if self._memory is None and self.settings.memory_address:
            self._channel = MemoryClient(self.settings.memory_address, "summariser")
            self._memory = self._channel
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="summariser")

    def healthy(self) -> bool:
        # The fallback digest always works: a model that is down makes summaries worse, not absent.
        return self.backend is not None

    def close(self, deadline: float) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._channel is not None:
            self._channel.close()
        if self.backend is not None and self._owns_backend:
            self.backend.close()

    # -- intake ----------------------------------------------------------------------------------
    def handle(self, event: ConsumedEvent) -> None:
        msg = event.message
        if isinstance(msg, events_pb2.FrameEvent):
            self._keep_image(event.key, msg)
        elif isinstance(msg, events_pb2.EncodedFrameEvent):
            self._frame(event.key, msg)
        else:
            raise InvalidInput(f"the summariser does not read {type(msg).__name__} records")

    def _state(self, key: str) -> _Stream:
        state = self._streams.get(key)
        if state is None:
            state = self._streams[key] = _Stream()
            while len(self._streams) > MAX_STREAMS:
                self._streams.popitem(last=False)
        self._streams.move_to_end(key)
        return state

    def _keep_image(self, key: str, msg: events_pb2.FrameEvent) -> None:
        if msg.media_ts_ms < 0 or not msg.jpeg:
            return
        state = self._state(key)
        spacing = self.tiers.chunk_ms // self.settings.images_per_chunk
        if msg.media_ts_ms - state.last_image_ms >= spacing:
            state.images[int(msg.media_ts_ms)] = bytes(msg.jpeg)
            state.last_image_ms = int(msg.media_ts_ms)

    def _frame(self, key: str, msg: events_pb2.EncodedFrameEvent) -> None:
        if msg.media_ts_ms < 0:
            raise InvalidInput(f"media_ts_ms {msg.media_ts_ms} is negative")
        ts = int(msg.media_ts_ms)
        state = self._state(key)
        if state.last_ms >= 0 and ts > state.last_ms:
            state.deltas.append(ts - state.last_ms)
        state.last_ms = max(state.last_ms, ts)
        chunk = self.chunk_of(ts, state)
        if state.next_chunk is None:
            state.seen_from_ms = ts
            state.next_chunk = self._resume_from(key, chunk)
        state.frames[ts] = ChunkFrame(ts, msg.caption.strip(), tuple(lb.name for lb in msg.labels if lb.name), max(0, int(msg.person_count)))
        while state.next_chunk < chunk:
            k = state.next_chunk
            cut_at = self._summarise_chunk(key, state, k)
            state.next_chunk = k + 1
            if (k + 1) % self.tiers.summaries_per_block == 0:  # the block's last chunk (even when empty)
                self._compress_block(key, state, self.tiers.block_of(k), cut_at)
            elif self._gap_until(state, chunk):
                # Media time jumped (a paused stream): the chunks up to the current one saw nothing.
                if self.tiers.block_of(k) < self.tiers.block_of(chunk):
                    self._compress_block(key, state, self.tiers.block_of(k), cut_at)
                state.next_chunk = chunk

    def _gap_until(self, state: _Stream, chunk: int) -> bool:
        """No frame to summarise before ``chunk``'s range, and none to read back from memory."""
        lo = self.cut_ms(state.next_chunk - 1, state)
        hi = self.cut_ms(chunk - 1, state)
        return lo >= state.seen_from_ms and not any(lo <= ts < hi for ts in state.frames)

    # -- chunk arithmetic ------------------------------------------------------------------------
    def lead_ms(self, state: _Stream) -> int:
        return self.settings.lead_frames * state.interval_ms()

    def cut_ms(self, chunk: int, state: _Stream) -> int:
        """Where chunk ``chunk``'s summary starts and its frames end (exclusive); -1 → 0."""
        if chunk < 0:
            return 0
        return max(0, self.tiers.boundary_ms(chunk) - self.lead_ms(state))

    def chunk_of(self, ts: int, state: _Stream) -> int:
        """The chunk a frame at ``ts`` belongs to: the first whose cut is after it."""
        return max(0, (ts + self.lead_ms(state)) // self.tiers.chunk_ms)

    # -- writing -----------------------------------------------------------------------------------
    def _resume_from(self, key: str, chunk: int) -> int:
        """The first chunk to summarise for a stream this process has not seen: the current one, or an
        earlier one memory has no summary of (a restart between a cut and its summary's publication)."""
        catch_up = self.settings.catch_up_chunks
        if not catch_up or chunk == 0:
            return chunk
        first = max(0, chunk - catch_up)
        items = self._items(key, memory_pb2.MEMORY_TIER_MID, first * self.tiers.chunk_ms, 0)
        if items is None:
            return chunk  # memory unreachable: do not guess
        have = {int(i.index) for i in items}
        for k in range(first, chunk):
            if k not in have:
                log.info("summariser %s: chunk %d has no summary in memory; catching up", key, k)
                return k
        return chunk

    def _chunk_frames(self, key: str, state: _Stream, k: int) -> list[ChunkFrame]:
        lo, hi = self.cut_ms(k - 1, state), self.cut_ms(k, state)
        frames = {ts: f for ts, f in state.frames.items() if lo <= ts < hi}
        interval = state.interval_ms()
        if lo < state.seen_from_ms and (not frames or min(frames) > lo + 2 * interval):
            # This process did not see the chunk's start (it started or restarted inside it): read
            # those frames back from memory, once memory has caught up to where this process began.
            self._wait_for_memory(key, state.seen_from_ms)
            for item in self._items(key, memory_pb2.MEMORY_TIER_SHORT, lo, hi - 1) or ():
                if lo <= item.start_ms < hi:
                    frames.setdefault(item.start_ms, ChunkFrame(item.start_ms, item.text, tuple(item.labels), item.person_count))
        images = {ts: jpeg for ts, jpeg in state.images.items() if lo <= ts < hi}
        out = []
        for ts in sorted(frames):
            frame = frames[ts]
            out.append(replace(frame, jpeg=images[ts]) if ts in images else frame)
        for ts in [t for t in state.frames if t < hi]:
            del state.frames[ts]
        for ts in [t for t in state.images if t < hi]:
            del state.images[ts]
        return out

    def _summarise_chunk(self, key: str, state: _Stream, k: int) -> float:
        """Write chunk ``k``'s summary; returns when its cut was handled (the lag of the block after it)."""
        cut_at = time.monotonic()
        frames = self._chunk_frames(key, state, k)
        if not frames:
            return cut_at  # nothing was seen in this chunk (the stream paused): no summary
        chunk = ChunkInput(key=key, index=k, start_ms=frames[0].media_ts_ms, end_ms=frames[-1].media_ts_ms, frames=tuple(frames))
        text, backend, fallback = self._write(self.backend.summarise, self._fallback.summarise, chunk)  # type: ignore[union-attr]
        labels = [name for name, _ in label_frames(frames)[:TOP_LABELS]]
        state.pieces[k] = SummaryPiece(k, chunk.start_ms, chunk.end_ms, text, fallback)
        for old in [i for i in state.pieces if self.tiers.block_of(i) < self.tiers.block_of(k)]:
            del state.pieces[old]
        self._publish(key, cut_at, events_pb2.SummaryEvent(
            summary_id=summary_id(key, "mid", k), tier=memory_pb2.MEMORY_TIER_MID, index=k,
            start_ms=chunk.start_ms, end_ms=chunk.end_ms, visible_from_ms=self.tiers.boundary_ms(k), text=text,
            labels=labels, max_people=max(f.person_count for f in frames), frames=len(frames), backend=backend, fallback=fallback,
        ))
        return cut_at

    def _compress_block(self, key: str, state: _Stream, b: int, cut_at: float) -> None:
        chunks = self.tiers.block_chunks(b)
        pieces = {i: p for i, p in state.pieces.items() if i in chunks}
        if len(pieces) < len(chunks) and self.cut_ms(chunks[0] - 1, state) < state.seen_from_ms:
            # This process did not write all of the block's summaries: read the others back.
            lo = chunks[0] * self.tiers.chunk_ms - self.tiers.chunk_ms
            for item in self._items(key, memory_pb2.MEMORY_TIER_MID, max(0, lo), self.tiers.boundary_ms(chunks[-1])) or ():
                if item.index in chunks:
                    pieces.setdefault(int(item.index), SummaryPiece(int(item.index), item.start_ms, item.end_ms, item.text, item.fallback))
        if not pieces:
            return
        ordered = tuple(pieces[i] for i in sorted(pieces))
        block = BlockInput(key=key, index=b, start_ms=ordered[0].start_ms, end_ms=ordered[-1].end_ms, summaries=ordered)
        text, backend, fallback = self._write(self.backend.compress, self._fallback.compress, block)  # type: ignore[union-attr]
        self._publish(key, cut_at, events_pb2.SummaryEvent(
            summary_id=summary_id(key, "long", b), tier=memory_pb2.MEMORY_TIER_LONG, index=b,
            start_ms=block.start_ms, end_ms=block.end_ms, visible_from_ms=self.tiers.boundary_ms(chunks[-1]), text=text,
            frames=len(ordered), backend=backend, fallback=fallback or all(p.fallback for p in ordered),
        ))

    def _write(self, model: Any, fallback: Any, what: ChunkInput | BlockInput) -> tuple[str, str, bool]:
        """The model's text, or the fallback digest's when the model fails or is too slow."""
        s = self.settings
        deadline = time.monotonic() + s.timeout_s
        error: BaseException | None = None
        for attempt in range(1, s.attempts + 1):
            left = deadline - time.monotonic()
            if left <= 0 or (self.stopping is not None and self.stopping.is_set()):
                break
            future = self._pool.submit(model, what)  # type: ignore[union-attr]
            try:
                text = str(future.result(timeout=left)).strip()
                if text:
                    return text, self.backend.name, False  # type: ignore[union-attr]
                error = GenerationError("the model wrote an empty summary")
            except concurrent.futures.TimeoutError:
                future.cancel()
                error = TimeoutError(f"no summary within SH_SUMMARISER_TIMEOUT_S={s.timeout_s}")
                break
            except Exception as err:  # noqa: BLE001 - any failure of the model means: fall back
                error = err
            if attempt < s.attempts and s.retry_wait_s:
                time.sleep(min(s.retry_wait_s, max(0.0, deadline - time.monotonic())))
        log.warning("summariser %s %d: the %s backend failed (%r); writing the fallback digest",
                    what.key, what.index, self.backend.name, error)  # type: ignore[union-attr]
        return fallback(what), self._fallback.name, True

    def _publish(self, key: str, cut_at: float, summary: events_pb2.SummaryEvent) -> None:
        assert self.out is not None
        summary.key.CopyFrom(parse_key(key))
        summary.hops.append(common_pb2.HopStamp(hop="summariser", wall_unix_ns=time.time_ns()))
        self.out.send(topics.SUMMARIES, key, summary).get(timeout=self.settings.publish_timeout_s)
        tier = "mid" if summary.tier == memory_pb2.MEMORY_TIER_MID else "long"
        meters.summary_lag().record(time.monotonic() - cut_at, {"tier": tier})
        meters.summaries_written().add(1, {"tier": tier, "backend": summary.backend, "fallback": str(summary.fallback).lower()})
        self.written.append(summary)
        del self.written[:-256]
        log.info("summariser %s: %s %d [%d..%d] by %s%s", key, tier, summary.index, summary.start_ms, summary.end_ms,
                 summary.backend, " (fallback)" if summary.fallback else "")

    def _wait_for_memory(self, key: str, ts: int) -> None:
        """Wait (up to SH_SUMMARISER_MEMORY_WAIT_S) until memory holds a frame of the stream at or
        after ``ts``: it consumes the same frames and may be behind (both restarted), and frames it
        has not stored yet cannot be read back. Past the wait the summary goes on without them."""
        deadline = time.monotonic() + self.settings.memory_wait_s
        while True:
            found = self._items(key, memory_pb2.MEMORY_TIER_SHORT, ts, 0, limit=1)
            if found:
                return
            if time.monotonic() >= deadline or (self.stopping is not None and self.stopping.is_set()):
                log.warning("summariser %s: memory has no frame from %d ms on yet; summarising without the frames it lacks", key, ts)
                return
            time.sleep(0.5)

    def _items(self, key: str, tier: int, from_ms: int, to_ms: int, limit: int = 0) -> list[memory_pb2.MemoryItem] | None:
        if self._memory is None:
            return None
        request = memory_pb2.ItemsRequest(key=parse_key(key), tier=tier, from_ms=max(0, from_ms), to_ms=max(0, to_ms), limit=limit)
        try:
            return list(self._memory.Items(request, timeout=self.settings.memory_timeout_s).items)
        except grpc.RpcError as err:
            log.warning("summariser %s: memory Items failed (%s); going on with what this process saw", key,
                        err.code().name if hasattr(err, "code") else err)  # type: ignore[union-attr]
            return None


__all__ = ["SummariserStage"]
