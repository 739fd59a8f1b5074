"""The memory and summariser stages together on the local host: Qdrant's real engine in a temporary
folder, the real MiniLM text encoder, the deterministic digest as the summariser's backend (the model
backends have their own tests), records serialised and parsed on the way as on Kafka.

Covers the tiers over long streams: recall of an event planted hours earlier, eviction exactly at the
horizon, the context prefix that changes only at chunk boundaries, the Q&A history, tenants that
cannot read each other, and summaries that are idempotent and complete across a summariser restart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamharness import topics
from streamharness.errors import InvalidInput, NotFound
from streamharness.generation.base import GenerationError
from streamharness.hosts.local import LocalHost
from streamharness.inprocess import LocalMemoryStub
from streamharness.keys import make_key
from streamharness.memory.service import MemorySettings, MemoryStage
from streamharness.memory.store import Scope
from streamharness.memory.tiers import TierSettings
from streamharness.summariser.backends import DigestSummariser
from streamharness.summariser.settings import SummariserSettings
from streamharness.summariser.stage import SummariserStage
from streamharness.text_encoder import TextEncoder
from streamharness.v1 import common_pb2, events_pb2, memory_pb2

TENANT = "acme"
KEY = make_key(TENANT, "cam-1")
SKEY = "acme/cam-1"


@pytest.fixture
def encoder(exported_text_encoder: TextEncoder) -> TextEncoder:
    return exported_text_encoder


class Pipeline:
    """memory + summariser on one local host."""

    def __init__(self, data_dir: Path, encoder: TextEncoder, tiers: TierSettings, *, backend=None, lead_frames: int = 5,
                 timeout_s: float = 5.0) -> None:
        self.tiers = tiers
        self.host = LocalHost()
        self.memory: MemoryStage = self.host.add(MemoryStage(MemorySettings(data_dir=data_dir, edge_search_threads=1), tiers, text_encoder=encoder))
        self.summariser_settings = SummariserSettings(backend="digest", lead_frames=lead_frames, retry_wait_s=0, timeout_s=timeout_s)
        self.summariser = self.add_summariser(backend)

    def add_summariser(self, backend=None) -> SummariserStage:
        return self.host.add(SummariserStage(self.summariser_settings, self.tiers, backend=backend or DigestSummariser(),
                                             memory=LocalMemoryStub(self.memory)))

    def frames(self, seconds, caption_at, key=KEY) -> None:
        for s in seconds:
            caption = caption_at(s)
            self.host.bus.send(topics.EMBEDDINGS, key, events_pb2.EncodedFrameEvent(
                key=key, media_ts_ms=s * 1000, seq=s, caption=caption, person_count=caption.count("person"),
                labels=[events_pb2.Label(name=w, score=0.5) for w in caption.split()[:2]]))
        self.host.run_until_idle()

    def answer(self, at_s: int, question: str, answer: str, response_id: str) -> None:
        self.host.bus.send(topics.RESPONSES, KEY, events_pb2.ResponseEvent(
            key=KEY, response_id=response_id, index=1, final=True, trigger=common_pb2.TRIGGER_QUESTION,
            media_ts_ms=at_s * 1000, prompt_text=question, answer_text=answer))
        self.host.run_until_idle()

    def context(self, now_s: float, key: common_pb2.StreamKey = KEY) -> memory_pb2.ContextResponse:
        return self.memory.context(memory_pb2.ContextRequest(key=key, now_ms=int(now_s * 1000)))

    def recall(self, query: str, now_s: float = 0, key: common_pb2.StreamKey = KEY, **kw) -> memory_pb2.RecallResponse:
        return self.memory.recall(memory_pb2.RecallRequest(key=key, query=query, now_ms=int(now_s * 1000), **kw))

    def summaries(self, tier: str) -> list:
        return list(self.memory.store.scan(Scope(SKEY, (tier,))))


@pytest.fixture
def small(tmp_path: Path, encoder: TextEncoder) -> Iterator[Pipeline]:
    """Chunks of 20 s, blocks of 3 chunks, 2 blocks kept: horizon 20 * (1 + 3 + 6) = 200 s."""
    p = Pipeline(tmp_path, encoder, TierSettings(chunk_s=20, summaries_per_block=3, blocks_kept=2))
    yield p
    p.host.close()


def scene(s: int) -> str:
    return ["empty street", "a person walking a dog", "a red car parked", "two person near a bus"][(s // 37) % 4]


def test_every_chunk_gets_one_summary_covering_its_frames_and_blocks_fold_them(small: Pipeline) -> None:
    small.frames(range(0, 130), scene)
    mids = small.summaries("mid")
    # Cuts 5 frames before each 20-s boundary: chunk k covers [20k - 5, 20k + 15) s.
    assert [m.index for m in mids] == [0, 1, 2, 3, 4, 5]
    assert [(m.start_ms, m.end_ms) for m in mids[:2]] == [(0, 14_000), (15_000, 34_000)]
    assert [m.visible_from_ms for m in mids] == [20_000 * (k + 1) for k in range(6)]
    assert sum(m.frames for m in mids) == 115  # frames 0..114: every frame before the last cut, once
    assert all(m.backend == "digest" and not m.fallback for m in mids)
    blocks = small.summaries("long")
    assert [(b.index, b.start_ms, b.end_ms, b.frames) for b in blocks] == [(0, 0, 54_000, 3), (1, 55_000, 114_000, 3)]
    assert [b.visible_from_ms for b in blocks] == [60_000, 120_000]


def test_the_context_prefix_is_byte_identical_within_a_chunk_and_changes_at_the_boundary(small: Pipeline) -> None:
    small.frames(range(0, 130), scene)
    a, b = small.context(100.0), small.context(119.9)
    assert a.prefix_text == b.prefix_text and a.prefix_version == b.prefix_version and a.chunk_start_ms == 100_000
    assert [s.start_ms for s in a.summaries] == [55_000, 75_000]  # chunks 3 and 4: after block 0 (chunks 0-2)
    assert [x.start_ms for x in a.blocks] == [0]
    assert "(automatic digest)" not in a.prefix_text and "Long-term memory" in a.prefix_text
    c = small.context(120.0)
    assert c.prefix_text != a.prefix_text and c.chunk_start_ms == 120_000
    assert [x.start_ms for x in c.blocks] == [0, 55_000] and list(c.summaries) == []  # block 1 folds chunks 3-5
    # Recent frames: what the visible summaries do not cover yet, up to now, never past it.
    assert [i.start_ms for i in a.recent] == list(range(95_000, 100_001, 1000))
    assert [i.start_ms for i in c.recent] == list(range(115_000, 120_001, 1000))
    assert a.prefix_tokens > 0 and small.context(10.0).prefix_text == ""


def test_eviction_removes_exactly_what_is_past_the_horizon(small: Pipeline) -> None:
    assert small.tiers.horizon_ms == 200_000
    small.frames(range(0, 430), scene)
    store = small.memory.store
    # The last boundary crossed was 420 s: everything that ended before 420 - 200 = 220 s is gone.
    frames = list(store.scan(Scope(SKEY, ("short",))))
    assert frames[0].start_ms == 220_000 and len(frames) == 210
    assert all(m.end_ms >= 220_000 for m in small.summaries("mid"))
    assert min(m.end_ms for m in small.summaries("mid")) < 240_000  # ... and nothing newer was removed
    blocks = small.summaries("long")
    assert len(blocks) <= 2 and all(b.end_ms >= 220_000 for b in blocks)
    # Deleted points are vacuumed in the background (SH_MEMORY_COMPACT_INTERVAL_S).
    compaction = small.memory.compact_in_background()
    assert compaction is not None
    compaction.join(60)
    assert len(list(store.scan(Scope(SKEY, ("short",))))) == 210
    # Bounded: a longer stream keeps the same amount.
    small.frames(range(430, 830), scene)
    assert len(list(store.scan(Scope(SKEY, ("short",))))) == 210
    assert len(small.summaries("long")) <= 2


def test_blocks_are_evicted_by_count_and_by_their_token_budget(tmp_path: Path, encoder: TextEncoder) -> None:
    tiers = TierSettings(chunk_s=10, summaries_per_block=1, blocks_kept=3, horizon_s=100_000, long_tokens=100_000)
    p = Pipeline(tmp_path / "count", encoder, tiers, lead_frames=2)
    p.frames(range(0, 75), scene)
    assert [b.index for b in p.summaries("long")] == [4, 5, 6]  # the newest 3 of blocks 0..6
    p.host.close()
    tight = TierSettings(chunk_s=10, summaries_per_block=1, blocks_kept=40, horizon_s=100_000, long_tokens=70)
    q = Pipeline(tmp_path / "budget", encoder, tight, lead_frames=2)
    q.frames(range(0, 75), scene)
    kept = q.summaries("long")
    assert 1 <= len(kept) < 7 and [b.index for b in kept] == list(range(7 - len(kept), 7))  # the newest, contiguous
    assert sum(b.tokens for b in kept) <= 70 or len(kept) == 1  # the newest block is kept whatever its size
    q.host.close()


def test_recall_reports_the_time_of_an_event_planted_hours_earlier(tmp_path: Path, encoder: TextEncoder) -> None:
    p = Pipeline(tmp_path, encoder, TierSettings())  # the defaults: 200-s chunks, 12 h horizon
    van = range(4200, 4230)  # 1:10:00 - 1:10:29

    def caption(s: int) -> str:
        return "a white delivery van at the gate" if s in van else scene(s)

    p.frames(range(0, 5 * 3600, 2), caption)  # five hours at one frame every 2 s
    reply = p.recall("when did the delivery van come?", now_s=5 * 3600)
    assert reply.items[0].text == "a white delivery van at the gate"
    assert (reply.span_start_ms, reply.span_end_ms) == (4_200_000, 4_228_000)  # one item spanning the run
    assert reply.items[0].frames == 15
    by_time = p.recall("what was at the gate around 1:10?", now_s=5 * 3600)
    assert by_time.from_ms == 3_900_000 and by_time.to_ms == 4_500_000 and by_time.notes
    assert by_time.items[0].text == "a white delivery van at the gate"
    before = p.recall("what was in the street before the delivery van arrived?", now_s=5 * 3600)
    assert before.to_ms < 4_200_000 and all(i.end_ms < 4_200_000 for i in before.items)
    assert any("delivery van" in n for n in before.notes)
    # The mid-term summary of that chunk mentions the van too, with its time.
    (chunk,) = [m for m in p.summaries("mid") if m.start_ms <= 4_200_000 <= m.end_ms]
    assert "van" in chunk.text
    p.host.close()


def test_a_malformed_time_phrase_is_ignored_with_a_note(small: Pipeline) -> None:
    small.frames(range(0, 60), scene)
    reply = small.recall("was there a dog around 25:99?", now_s=60)
    assert reply.items and reply.from_ms == 0 and reply.to_ms == 60_000
    assert any("25:99" in n for n in reply.notes)


def test_questions_and_answers_are_remembered(small: Pipeline) -> None:
    small.frames(range(0, 70), scene)
    small.answer(45, "What colour is the car?", "The car is red.", "r-45")
    small.answer(45, "What colour is the car?", "The car is red.", "r-45")  # redelivered: once
    small.answer(65, "Is anyone there?", "Yes, a person with a dog.", "r-65")
    ctx = small.context(66)
    assert [(h.start_ms, h.prompt_text, h.text) for h in ctx.history] == [
        (45_000, "What colour is the car?", "The car is red."), (65_000, "Is anyone there?", "Yes, a person with a dog.")]
    assert [h.start_ms for h in small.context(50).history] == [45_000]  # nothing said after now
    told = small.recall("what did you tell me at 0:00:45?", now_s=66)
    assert told.items[0].tier == memory_pb2.MEMORY_TIER_QA and told.items[0].text == "The car is red."
    # Records that are not final answers are not kept.
    small.host.bus.send(topics.RESPONSES, KEY, events_pb2.ResponseEvent(key=KEY, response_id="r-x", index=0, text="The", media_ts_ms=1))
    small.host.run_until_idle()
    assert len(small.summaries("qa")) == 2


def test_a_tenant_cannot_recall_another_tenants_stream(small: Pipeline) -> None:
    other = make_key("globex", "cam-b")
    small.frames(range(0, 30), lambda s: "a secret prototype on the bench", key=other)
    # With the other tenant's stream id under its own tenant: that stream does not exist.
    with pytest.raises(NotFound, match="cam-b"):
        small.recall("prototype", key=make_key(TENANT, "cam-b"))
    # A caller identified as acme asking for globex's key: the same NOT_FOUND, never the data.
    with pytest.raises(NotFound, match="cam-b"):
        small.memory.recall(memory_pb2.RecallRequest(key=other, query="prototype"), caller_tenant=TENANT)
    with pytest.raises(NotFound):
        small.memory.context(memory_pb2.ContextRequest(key=other, now_ms=10_000), caller_tenant=TENANT)
    assert small.memory.recall(memory_pb2.RecallRequest(key=other, query="prototype"), caller_tenant="globex").items


def test_bad_requests_say_what_is_wrong(small: Pipeline) -> None:
    small.frames(range(0, 5), scene)
    with pytest.raises(InvalidInput, match="tier is required"):
        small.memory.items(memory_pb2.ItemsRequest(key=KEY))
    with pytest.raises(InvalidInput, match="SH_MEMORY_RECALL_MAX_LIMIT"):
        small.recall("a dog", limit=1000)
    with pytest.raises(NotFound):
        small.recall("a dog", key=make_key(TENANT, "never-seen"))
    # Context of a stream with nothing yet is empty, not an error (a question can come before the first frame).
    unknown = small.context(10, key=make_key(TENANT, "never-seen"))
    assert list(unknown.recent) == [] and unknown.prefix_text == ""


def test_a_restarted_summariser_writes_each_chunk_once_and_misses_no_frame(tmp_path: Path, encoder: TextEncoder) -> None:
    tiers = TierSettings(chunk_s=20, summaries_per_block=3, blocks_kept=2)
    p = Pipeline(tmp_path, encoder, tiers)
    p.frames(range(0, 48), scene)  # chunks 0 and 1 written (cuts at 15 s and 35 s); chunk 2 in progress
    (lost,) = [m for m in p.summaries("mid") if m.index == 1]
    p.memory.store.delete_ended_before(SKEY, lost.end_ms + 1, ("mid",))  # as if summaries 0 and 1 never landed
    # The summariser dies (its state is lost) and a new one resumes after the last committed frame
    # (47 s): it catches chunks 0 and 1 up (SH_SUMMARISER_CATCH_UP_CHUNKS=2) and reads chunk 2's
    # frames it did not see back from memory.
    p.host._hosted.pop("summariser")  # noqa: SLF001 - the local host has no "kill one stage"
    p.summariser = p.add_summariser()
    p.frames(range(48, 100), scene)
    # Delivered again, as after a crash before a batch was committed: overwritten, never duplicated.
    p.frames(range(30, 40), scene)
    mids = p.summaries("mid")
    assert [m.index for m in mids] == [0, 1, 2, 3, 4]
    assert [(m.start_ms, m.end_ms, m.frames) for m in mids[:3]] == [(0, 14_000, 15), (15_000, 34_000, 20), (35_000, 54_000, 20)]
    assert sum(m.frames for m in mids) == 95  # frames 0..94, each in exactly one summary
    assert [b.index for b in p.summaries("long")] == [0]  # block 0 = chunks 0-2, compressed once chunk 2 was written
    p.host.close()


def test_a_summariser_model_that_fails_or_hangs_gives_a_marked_fallback(tmp_path: Path, encoder: TextEncoder) -> None:
    release = threading.Event()

    class Broken(DigestSummariser):
        name = "broken"

        def __init__(self, hang: bool) -> None:
            self.hang, self.calls = hang, 0

        def summarise(self, chunk):
            self.calls += 1
            if self.hang:
                release.wait(30)
            raise GenerationError("the generator is down")

    down = Broken(hang=False)
    p = Pipeline(tmp_path / "down", encoder, TierSettings(chunk_s=20, summaries_per_block=3, blocks_kept=2), backend=down)
    p.frames(range(0, 40), scene)
    (m0, m1) = p.summaries("mid")
    assert m0.fallback and m0.backend == "digest" and down.calls == 2 * p.summariser_settings.attempts
    assert "(automatic digest)" in p.context(40).prefix_text
    p.host.close()

    slow = Broken(hang=True)
    q = Pipeline(tmp_path / "slow", encoder, TierSettings(chunk_s=20, summaries_per_block=3, blocks_kept=2), backend=slow, timeout_s=0.5)
    q.frames(range(0, 20), scene)
    release.set()
    (m,) = q.summaries("mid")
    assert m.fallback and slow.calls == 1  # timed out once: no second try past the deadline
    q.host.close()


def test_a_jump_in_media_time_skips_the_empty_chunks_and_closes_the_open_block(tmp_path: Path, encoder: TextEncoder) -> None:
    p = Pipeline(tmp_path, encoder, TierSettings(chunk_s=20, summaries_per_block=3, blocks_kept=2, horizon_s=200_000))
    p.frames(range(0, 30), scene)  # chunk 0 written at its cut (15 s); chunk 1 open
    calls: list = []
    real = p.summariser._items  # noqa: SLF001
    p.summariser._items = lambda *a, **k: calls.append(a) or real(*a, **k)  # noqa: SLF001
    p.frames([20 * 3600 + s for s in range(0, 40)], scene)  # the stream resumes 20 h later
    mids = p.summaries("mid")
    assert [m.index for m in mids] == [0, 1, 3600, 3601] and mids[1].end_ms == 29_000
    assert [b.index for b in p.summaries("long")] == [0]  # the block of chunks 0-2, closed by the jump
    assert calls == []  # nothing was read back from memory for the thousands of empty chunks
    p.host.close()


def test_a_question_that_is_only_a_time_gets_what_memory_holds_of_that_time(small: Pipeline) -> None:
    def caption(s: int) -> str:
        return "a fire engine with flashing lights" if 100 <= s < 110 else scene(s)

    small.frames(range(0, 190), caption)
    reply = small.recall("what happened at 0:01:45?", now_s=190)  # +-30 s around 105 s
    assert (reply.from_ms, reply.to_ms) == (75_000, 135_000) and any("names no subject" in n for n in reply.notes)
    first = reply.items[0]
    assert first.tier == memory_pb2.MEMORY_TIER_MID and first.start_ms <= 105_000 <= first.end_ms
    runs = [i for i in reply.items if i.tier == memory_pb2.MEMORY_TIER_SHORT]
    assert runs[0].text == "a fire engine with flashing lights" and (runs[0].start_ms, runs[0].end_ms, runs[0].frames) == (100_000, 109_000, 10)


def test_a_question_about_a_long_window_gets_its_summaries_in_time_order(small: Pipeline) -> None:
    small.frames(range(0, 190), scene)
    reply = small.recall("what happened in the last 2 minutes?", now_s=189)
    assert [i.tier for i in reply.items] == [memory_pb2.MEMORY_TIER_MID] * len(reply.items) and len(reply.items) >= 5
    assert [i.start_ms for i in reply.items] == sorted(i.start_ms for i in reply.items)
    assert reply.items[0].end_ms >= 69_000 and reply.items[-1].end_ms <= 189_000
