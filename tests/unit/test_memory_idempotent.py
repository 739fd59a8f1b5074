"""Memory's intake is idempotent: delivered at least once — batches redelivered after a crash, the
process restarted, records duplicated and reordered — the store ends up as it is after every record
was delivered exactly once: one frame per media time, one summary per id, one Q&A turn per
response_id, and the same evictions (the horizon, the long-term blocks' budget).

A property test (hypothesis) over small sets of records of one or two streams: encoded frames,
mid-term summaries and long-term blocks, final responses with their answer (and the records memory
ignores: chunks, a closing final without an answer). Memory's real stage and Qdrant's real engine in
a temporary folder, each record serialised and parsed on the way as on Kafka; the text encoder is
the real MiniLM, its vectors cached by text (the store is what is compared, not the encoder).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamharness.keys import parse_key
from streamharness.memory.service import MemorySettings, MemoryStage
from streamharness.memory.store import Scope
from streamharness.memory.tiers import TierSettings
from streamharness.records import ConsumedEvent
from streamharness.stage import StageContext
from streamharness.text_encoder import TextEncoder
from streamharness.v1 import common_pb2, events_pb2, memory_pb2

STREAMS = ("acme/cam-1", "beta/cam-9")
#: 10-s chunks, blocks of 2 chunks, 3 blocks kept within 30 tokens, everything older than 60 s
#: before the newest chunk's start deleted: small enough that a few records cross every rule.
TIERS = TierSettings(chunk_s=10, summaries_per_block=2, blocks_kept=3, long_tokens=30, horizon_s=60)
CAPTIONS = ("empty street", "a person walking a dog", "a red car parked", "two people near a bus")
#: Block texts of 3 to 25 tokens, so the token budget of the long-term blocks evicts some, not all.
BLOCK_TEXTS = ("quiet.", "a van parked by the kerb for a while.",
               "people crossed the square, a dog ran after a ball, then a red car parked near the bus stop and waited.")
EXAMPLES = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CachedEncoder:
    """The real text encoder, one vector per distinct text (the same text gives the same vector)."""

    def __init__(self, encoder: TextEncoder) -> None:
        self._encoder = encoder
        self._vectors: dict[str, np.ndarray] = {}
        self.loaded = True

    def load(self) -> CachedEncoder:
        return self

    def encode(self, texts: list[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            self._vectors.update(zip(missing, self._encoder.encode(missing)))
        return np.stack([self._vectors[t] for t in texts])


@pytest.fixture(scope="module")
def encoder(exported_text_encoder: TextEncoder) -> CachedEncoder:
    return CachedEncoder(exported_text_encoder)


# -- records ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One record as a producer wrote it: its partition (topic and stream) and the message."""

    topic: str
    key: str
    message: Message

    @property
    def partition(self) -> tuple[str, str]:
        return self.topic, self.key


def _stream_key(key: str) -> common_pb2.StreamKey:
    return parse_key(key)


@st.composite
def stream_records(draw: st.DrawFn, key: str) -> list[Record]:
    """One stream's records, each partition in the order its producer wrote it."""
    skey = _stream_key(key)
    out: list[Record] = []
    for t in sorted(draw(st.sets(st.integers(0, 30), max_size=10))):  # frames every 5 s of 0..150 s
        caption = draw(st.sampled_from(CAPTIONS))
        out.append(Record("embeddings", key, events_pb2.EncodedFrameEvent(
            key=skey, session_id="s-1", media_ts_ms=t * 5000, seq=t, caption=caption, person_count=caption.count("people"),
            labels=[events_pb2.Label(name=w, score=0.5) for w in caption.split()[:2]])))
    summaries: list[tuple[int, int, events_pb2.SummaryEvent]] = []
    for k in draw(st.sets(st.integers(0, 14), max_size=5)):
        start, end = k * TIERS.chunk_ms, (k + 1) * TIERS.chunk_ms - 1
        summaries.append((end, 0, events_pb2.SummaryEvent(
            key=skey, summary_id=f"{key}/mid/{k}", tier=memory_pb2.MEMORY_TIER_MID, index=k, start_ms=start, end_ms=end,
            visible_from_ms=end + 1, text=f"chunk {k}: {draw(st.sampled_from(CAPTIONS))}", frames=2, backend="digest")))
    for b in draw(st.sets(st.integers(0, 7), max_size=6)):
        start, end = b * TIERS.block_ms, (b + 1) * TIERS.block_ms - 1
        summaries.append((end, 1, events_pb2.SummaryEvent(
            key=skey, summary_id=f"{key}/long/{b}", tier=memory_pb2.MEMORY_TIER_LONG, index=b, start_ms=start, end_ms=end,
            visible_from_ms=end + 1, text=f"block {b}: {draw(st.sampled_from(BLOCK_TEXTS))}", frames=2, backend="digest")))
    out += [Record("summaries", key, s) for _, _, s in sorted(summaries, key=lambda x: x[:2])]  # a chunk's, then its block
    for t in sorted(draw(st.sets(st.integers(0, 30), max_size=4))):
        rid = f"{key}/{t * 5000}/q{t}"
        common = dict(key=skey, session_id="s-1", response_id=rid, trigger=common_pb2.TRIGGER_QUESTION, question_id=f"q{t}",
                      media_ts_ms=t * 5000, attempt="a1")
        out.append(Record("responses", key, events_pb2.ResponseEvent(index=0, text="Two people ", **common)))
        out.append(Record("responses", key, events_pb2.ResponseEvent(
            index=1, text="near a bus.", final=True, prompt_text=f"who is there at {t}?", answer_text="Two people near a bus.", **common)))
    if draw(st.booleans()):  # a response closed without an answer (give_up): nothing to keep
        out.append(Record("responses", key, events_pb2.ResponseEvent(
            key=skey, session_id="s-1", response_id=f"{key}/1/failed", index=0, final=True, attempt="a9",
            trigger=common_pb2.TRIGGER_QUESTION, question_id="qf", media_ts_ms=1)))
    return out


@st.composite
def record_sets(draw: st.DrawFn) -> list[Record]:
    keys = STREAMS[: draw(st.integers(1, 2))]
    return [r for key in keys for r in draw(stream_records(key))]


def partitions(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    out: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        out.setdefault(r.partition, []).append(r)
    return out


# -- memory ----------------------------------------------------------------------------------------
class Memory:
    """Memory's stage over a store in ``data_dir``; ``restart()`` is a crash and a new process."""

    def __init__(self, data_dir: Path, encoder: CachedEncoder) -> None:
        self.data_dir, self.encoder = data_dir, encoder
        self.offset = 0
        self.stage = self._open()

    def _open(self) -> MemoryStage:
        stage = MemoryStage(MemorySettings(data_dir=self.data_dir, edge_search_threads=1, compact_interval_s=86_400),
                            TIERS, text_encoder=self.encoder)  # type: ignore[arg-type]
        stage.open(StageContext(outbox=None, attempts=1, stopping=threading.Event()))  # type: ignore[arg-type]
        return stage

    def deliver(self, record: Record) -> None:
        """As a host hands a record over: serialised and parsed on the way."""
        self.offset += 1
        message = type(record.message).FromString(record.message.SerializeToString())
        self.stage.handle(ConsumedEvent(key=record.key, message=message, topic=record.topic, partition=0,
                                        offset=self.offset, headers=(), timestamp_ms=0))

    def restart(self) -> None:
        self.stage.close(time.monotonic() + 10)
        self.stage = self._open()

    def snapshot(self) -> dict[str, dict[str, list[tuple]]]:
        """Every stored entry, by stream and tier, in a stable order."""
        store = self.stage.store
        assert store is not None
        return {key: {tier: sorted(tuple(sorted(e.payload().items())) for e in store.scan(Scope(key, (tier,))))
                      for tier in ("short", "mid", "long", "qa")} for key in STREAMS}

    def close(self) -> None:
        self.stage.close(time.monotonic() + 10)


def _scratch_root() -> str | None:
    """A RAM-backed folder when there is one with room (the edge shard syncs its files: ~25x faster
    there, and hypothesis runs hundreds of stores), else the default temporary folder."""
    shm = Path("/dev/shm")
    try:
        return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 256 * 1024 * 1024 else None
    except OSError:
        return None


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Module-scoped (hypothesis runs many examples in one test call; each run gets a folder of its own).
    path = Path(tempfile.mkdtemp(prefix="sh-memory-idempotent-", dir=_scratch_root()))
    yield path
    shutil.rmtree(path, ignore_errors=True)


_runs = iter(range(1 << 30))


def run(workdir: Path, encoder: CachedEncoder, deliveries: Iterator[Record | None]) -> dict:
    """Deliver in order (None: a crash and a restart), return the store's contents."""
    memory = Memory(workdir / f"m{next(_runs)}", encoder)
    try:
        for record in deliveries:
            if record is None:
                memory.restart()
            else:
                memory.deliver(record)
        return memory.snapshot()
    finally:
        memory.close()
        shutil.rmtree(memory.data_dir, ignore_errors=True)


def exactly_once(workdir: Path, encoder: CachedEncoder, records: list[Record]) -> dict:
    """Each record once, one partition after the other, each in its order."""
    return run(workdir, encoder, iter([r for part in partitions(records).values() for r in part]))


def assert_one_per_id(snapshot: dict, records: list[Record]) -> None:
    """The reference itself: one entry per frame media time, summary id and answered response."""
    for key in STREAMS:
        tiers = snapshot[key]
        frame_times = [dict(p)["start_ms"] for p in tiers["short"]]
        assert len(frame_times) == len(set(frame_times))
        refs = [dict(p)["ref"] for p in tiers["qa"]]
        assert len(refs) == len(set(refs))
        for tier in ("mid", "long"):
            indexes = [dict(p)["index"] for p in tiers[tier]]
            assert len(indexes) == len(set(indexes))
        answered = {r.message.response_id for r in records if r.key == key and r.topic == "responses" and r.message.answer_text}
        assert set(refs) <= answered  # no answer from a chunk or an empty closing final


def differences(got: dict, expected: dict) -> str:
    lines = []
    for key in STREAMS:
        for tier in ("short", "mid", "long", "qa"):
            have, want = got[key][tier], expected[key][tier]
            for p in have:
                if p not in want:
                    lines.append(f"{key} {tier}: stored, not once: {_brief(p)}")
            for p in want:
                if p not in have:
                    lines.append(f"{key} {tier}: once, not stored: {_brief(p)}")
    return "\n".join(lines)


def _brief(payload: tuple) -> str:
    p = dict(payload)
    return f"{p['start_ms']}..{p['end_ms']} index {p['index']} ref {p['ref']!r} text {p['text'][:40]!r}"


# -- the properties ---------------------------------------------------------------------------------
@EXAMPLES
@given(records=record_sets(), data=st.data())
def test_batches_redelivered_after_crashes_and_restarts_leave_the_store_as_exactly_once(
        workdir: Path, encoder: CachedEncoder, records: list[Record], data: st.DataObject) -> None:
    """Kafka's at-least-once: each partition in its order; a crash rewinds every partition to its last
    commit (a suffix of it comes again) and the next process starts on the same store."""
    expected = exactly_once(workdir, encoder, records)
    assert_one_per_id(expected, records)
    parts = list(partitions(records).values())
    position, committed = [0] * len(parts), [0] * len(parts)
    crashes = data.draw(st.integers(0, 3), label="crashes")

    def deliveries() -> Iterator[Record | None]:
        nonlocal crashes
        while True:
            open_parts = [i for i, part in enumerate(parts) if position[i] < len(part)]
            if not open_parts:
                return
            i = data.draw(st.sampled_from(open_parts), label="partition")
            yield parts[i][position[i]]
            position[i] += 1
            if data.draw(st.booleans(), label="commit"):
                committed[i] = position[i]  # a batch ended: offsets committed
            if crashes and data.draw(st.integers(0, 4), label="crash") == 0:
                crashes -= 1
                position[:] = committed  # uncommitted records come again, in order
                yield None

    got = run(workdir, encoder, deliveries())
    assert got == expected, differences(got, expected)


@EXAMPLES
@given(records=record_sets(), data=st.data())
def test_records_duplicated_at_will_leave_the_store_as_exactly_once(
        workdir: Path, encoder: CachedEncoder, records: list[Record], data: st.DataObject) -> None:
    """Whole records again at any later point, any number of times (a summariser that re-publishes an
    old block, a replayed topic, a producer's retry), the partitions interleaved at will, restarts
    anywhere; each record first comes in its partition's order (what Kafka guarantees)."""
    expected = exactly_once(workdir, encoder, records)
    parts = list(partitions(records).values())
    position = [0] * len(parts)
    sequence: list[Record | None] = []
    while open_parts := [i for i, part in enumerate(parts) if position[i] < len(part)]:
        i = data.draw(st.sampled_from(open_parts), label="partition")
        sequence.append(parts[i][position[i]])
        position[i] += 1
    for _ in range(data.draw(st.integers(0, 2 * len(records)), label="copies")):
        first = data.draw(st.integers(0, len(sequence) - 1), label="copy of")
        again = data.draw(st.integers(first + 1, len(sequence)), label="at")
        sequence.insert(again, sequence[first])  # a copy, anywhere after the one it copies
    for _ in range(data.draw(st.integers(0, 2), label="restarts")):
        sequence.insert(data.draw(st.integers(0, len(sequence)), label="restart at"), None)
    got = run(workdir, encoder, iter(sequence))
    assert got == expected, differences(got, expected)


# -- what the properties found ------------------------------------------------------------------------
def frame(key: str, seconds: int) -> Record:
    return Record("embeddings", key, events_pb2.EncodedFrameEvent(key=_stream_key(key), media_ts_ms=seconds * 1000, seq=seconds,
                                                                 caption="empty street"))


def block(key: str, index: int, text: str = BLOCK_TEXTS[0]) -> Record:
    start, end = index * TIERS.block_ms, (index + 1) * TIERS.block_ms - 1
    return Record("summaries", key, events_pb2.SummaryEvent(
        key=_stream_key(key), summary_id=f"{key}/long/{index}", tier=memory_pb2.MEMORY_TIER_LONG, index=index, start_ms=start,
        end_ms=end, visible_from_ms=end + 1, text=f"block {index}: {text}", frames=2))


def answer(key: str, seconds: int) -> Record:
    return Record("responses", key, events_pb2.ResponseEvent(
        key=_stream_key(key), response_id=f"{key}/{seconds * 1000}/q", index=0, final=True, trigger=common_pb2.TRIGGER_QUESTION,
        media_ts_ms=seconds * 1000, prompt_text="anyone?", answer_text="Nobody."))


def test_after_a_restart_the_horizon_is_where_it_was(workdir: Path, encoder: CachedEncoder) -> None:
    """Frames up to 70 s cut the horizon at 70 - 60 = 10 s. A new process must neither store an answer
    from before it (it did: the cut was only in the old process's memory) nor cut again at a later
    frame of the same chunk (it did: 75 s - 60 s deleted the frame at 10 s that stays exactly once)."""
    key = STREAMS[0]
    before = [frame(key, s) for s in range(0, 75, 5)]  # 0 .. 70 s, committed
    after = [answer(key, 5), frame(key, 75)]  # the first records the next process gets
    expected = run(workdir, encoder, iter([*before, *after]))
    assert [dict(p)["start_ms"] for p in expected[key]["short"]][0] == 10_000 and expected[key]["qa"] == []
    assert run(workdir, encoder, iter([*before, None, *after])) == expected


def test_an_evicted_block_that_comes_again_stays_evicted(workdir: Path, encoder: CachedEncoder) -> None:
    """Blocks of 4, 28, 4 and 4 tokens within a budget of 30: block 1 does not fit beside block 0, nor
    block 2 beside block 1, so 2 and 3 stay. Block 0 re-published later (in this process or the
    next) must not slip back into the room left (it did: nothing remembered that it was evicted)."""
    key = STREAMS[0]
    blocks = [block(key, 0), block(key, 1, BLOCK_TEXTS[2]), block(key, 2), block(key, 3)]
    expected = run(workdir, encoder, iter(blocks))
    assert [dict(p)["index"] for p in expected[key]["long"]] == [2, 3]
    assert run(workdir, encoder, iter([*blocks, blocks[0]])) == expected
    assert run(workdir, encoder, iter([*blocks, None, blocks[0]])) == expected
