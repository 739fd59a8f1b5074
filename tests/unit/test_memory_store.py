"""The memory store on Qdrant's real engine (qdrant-edge, in-process) in a temporary folder.

The server store runs the same tests against qdrant-client's local mode (an emulation of the server
API: no Qdrant server binary can be installed here) and against a real Qdrant server when
``SH_TEST_QDRANT_URL`` names one (e.g. ``http://127.0.0.1:6333``; each test uses its own collection).
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamharness.errors import DependencyUnavailable
from streamharness.memory.store import (
    SCROLL_PAGE,
    VECTOR_DIM,
    Entry,
    MemoryStore,
    QdrantEdgeMemoryStore,
    QdrantServerMemoryStore,
    Scope,
    entry_id,
)
from streamharness.text_encoder import TextEncoder

KEY = "acme/cam-1"
OTHER = "acme/cam-2"


@pytest.fixture
def encoder(exported_text_encoder: TextEncoder) -> TextEncoder:
    return exported_text_encoder


def open_edge(path: Path) -> QdrantEdgeMemoryStore:
    return QdrantEdgeMemoryStore(path, search_threads=1)


SERVER_URL = os.environ.get("SH_TEST_QDRANT_URL", "")


@pytest.fixture(params=["edge", "server-api-local", *(["server-url"] if SERVER_URL else [])])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore]:
    if request.param == "edge":
        s: MemoryStore = open_edge(tmp_path)
    elif request.param == "server-url":
        s = QdrantServerMemoryStore(SERVER_URL, collection=f"sh-test-{uuid.uuid4().hex[:12]}")
    else:
        from qdrant_client import QdrantClient

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "payload indexes have no effect in local mode"
            s = QdrantServerMemoryStore(client=QdrantClient(":memory:"))
    yield s
    s.close()


def frame(key: str, ts: int, caption: str, **kw) -> Entry:
    return Entry(key=key, tier="short", start_ms=ts, end_ms=ts, text=caption, **kw)


def frames(key: str, captions: list[str], *, step_ms: int = 1000, start_ms: int = 0) -> list[Entry]:
    return [frame(key, start_ms + i * step_ms, c, labels=("street",), person_count=c.count("people")) for i, c in enumerate(captions)]


def summary(key: str, tier: str, index: int, start_ms: int, end_ms: int, text: str) -> Entry:
    return Entry(key=key, tier=tier, start_ms=start_ms, end_ms=end_ms, text=text, index=index, visible_from_ms=end_ms + 1)  # type: ignore[arg-type]


def remember(store: MemoryStore, encoder: TextEncoder, entries: list[Entry]) -> None:
    store.upsert(entries, encoder.encode([e.embed_text for e in entries]))


def everything(store: MemoryStore, key: str, *tiers: str) -> list[Entry]:
    return list(store.scan(Scope(key, tuple(tiers))))  # type: ignore[arg-type]


def random_unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, VECTOR_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.skipif(not SERVER_URL, reason="no Qdrant server binary installs here: set SH_TEST_QDRANT_URL to run "
                    "every store test against a real server too")
def test_a_real_qdrant_server_is_used_when_given() -> None:
    s = QdrantServerMemoryStore(SERVER_URL, collection=f"sh-test-{uuid.uuid4().hex[:12]}")
    try:
        assert s.count() == 0 and "at " + SERVER_URL in s.description
    finally:
        s.close()


def test_entry_ids_are_deterministic_per_stream_tier_and_position() -> None:
    assert frame(KEY, 5000, "x").point_id == frame(KEY, 5000, "y").point_id == entry_id(KEY, "short", 5000)
    ids = {frame(KEY, 5000, "x").point_id, frame(KEY, 6000, "x").point_id, frame(OTHER, 5000, "x").point_id,
           summary(KEY, "mid", 5000, 0, 1, "s").point_id, summary(KEY, "long", 5000, 0, 1, "s").point_id}
    assert len(ids) == 5
    assert summary(KEY, "mid", 3, 0, 10, "a").point_id == summary(KEY, "mid", 3, 5, 20, "b").point_id  # a re-summary overwrites
    qa = Entry(key=KEY, tier="qa", start_ms=1, end_ms=1, text="red", prompt_text="colour?", ref="r-1")
    assert qa.point_id == entry_id(KEY, "qa", "r-1") and qa.embed_text == "colour? red"


def test_entries_check_their_tier_and_span() -> None:
    with pytest.raises(ValueError, match="tier"):
        Entry(key=KEY, tier="medium", start_ms=0, end_ms=0, text="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="before start_ms"):
        Entry(key=KEY, tier="mid", start_ms=10, end_ms=5, text="x")
    assert Entry(key=KEY, tier="mid", start_ms=0, end_ms=5, text="x" * 41).tokens == 11


def test_upsert_then_read_back(store: MemoryStore, encoder: TextEncoder) -> None:
    entries = frames(KEY, ["empty street", "2 people; trolleybus"]) + [summary(KEY, "mid", 0, 0, 1000, "a quiet street")]
    remember(store, encoder, entries)
    assert store.count(KEY) == 3 and store.count(KEY, ("short",)) == 2 and store.count(OTHER) == 0 and store.count() == 3
    assert everything(store, KEY, "short") == entries[:2]
    assert everything(store, KEY, "mid") == entries[2:]
    assert store.edge(KEY, newest=False).start_ms == 0 and store.edge(KEY, newest=True).end_ms == 1000
    assert store.edge("acme/unknown", newest=True) is None


def test_redelivered_entries_overwrite_instead_of_duplicating(store: MemoryStore, encoder: TextEncoder) -> None:
    remember(store, encoder, frames(KEY, ["empty street"] * 5))
    remember(store, encoder, frames(KEY, ["empty street"] * 5))  # the same records again
    assert store.count(KEY) == 5
    remember(store, encoder, frames(KEY, ["a red cup"], start_ms=2000))  # same (stream, time): replaced
    assert store.count(KEY) == 5
    remember(store, encoder, [summary(KEY, "mid", 0, 0, 4000, "first try"), summary(KEY, "mid", 0, 0, 4000, "second try")])
    assert [e.text for e in everything(store, KEY, "mid")] == ["second try"]
    (hit,) = store.search(Scope(KEY, ("short",), 2000, 2000), encoder.encode(["a red cup"])[0], 5)
    assert hit.entry.text == "a red cup" and hit.score > 0.99


def test_search_ranks_by_meaning_across_tiers(store: MemoryStore, encoder: TextEncoder) -> None:
    captions = ["empty street", "two people crossing the road", "a trolleybus at the stop", "a red cup on a table"]
    remember(store, encoder, frames(KEY, captions) + [summary(KEY, "mid", 0, 0, 3000, "a delivery van parked by the door")])
    bus = store.search(Scope(KEY), encoder.encode(["a bus"])[0], 5)
    assert bus[0].entry.text == "a trolleybus at the stop"
    assert [h.score for h in bus] == sorted((h.score for h in bus), reverse=True)
    van = store.search(Scope(KEY), encoder.encode(["a van"])[0], 1)
    assert van[0].entry.tier == "mid"
    only_frames = store.search(Scope(KEY, ("short",)), encoder.encode(["a van"])[0], 5)
    assert {h.entry.tier for h in only_frames} == {"short"}


def test_search_keeps_to_the_time_range_and_the_stream(store: MemoryStore, encoder: TextEncoder) -> None:
    remember(store, encoder, frames(KEY, ["empty street"] * 30 + ["2 people; trolleybus"] * 30))
    remember(store, encoder, frames(OTHER, ["2 people; trolleybus"] * 60))
    remember(store, encoder, [summary(KEY, "mid", 0, 0, 59_000, "trolleybus")])
    query = encoder.encode(["a trolleybus"])[0]
    hits = store.search(Scope(KEY, ("short",), 10_000, 35_000), query, 100)
    assert {h.entry.start_ms for h in hits} == set(range(10_000, 35_001, 1000))  # bounds inclusive
    assert {h.entry.key for h in hits} == {KEY}
    up_to = store.search(Scope(KEY, ("short",), None, 29_000), query, 5)
    assert up_to and all(h.entry.text == "empty street" for h in up_to)  # nothing after to_ms
    overlapping = store.search(Scope(KEY, ("mid",), 20_000, 25_000), query, 5)
    assert [h.entry.index for h in overlapping] == [0]  # a summary overlapping the range counts
    assert store.search(Scope("acme/unknown"), query, 5) == []


def test_tenant_and_stream_are_separate_filters(store: MemoryStore, encoder: TextEncoder) -> None:
    """'a/b/c' style keys cannot collide: tenant and stream id are filtered one by one, besides the key."""
    remember(store, encoder, frames("acme/cam-1", ["a red cup"]) + frames("evil/cam-1", ["a red cup"]))
    hits = store.search(Scope("acme/cam-1"), encoder.encode(["cup"])[0], 10)
    assert [h.entry.key for h in hits] == ["acme/cam-1"]


def test_newest_is_the_last_entries_in_range_oldest_first(store: MemoryStore, encoder: TextEncoder) -> None:
    remember(store, encoder, frames(KEY, [f"frame {i}" for i in range(60)]))
    window = store.newest(Scope(KEY, ("short",), 41_000, 50_000), 100)
    assert [e.start_ms for e in window] == list(range(41_000, 50_001, 1000))
    assert [e.start_ms for e in store.newest(Scope(KEY, ("short",), 41_000, 50_000), 3)] == [48_000, 49_000, 50_000]


def test_scan_pages_through_long_ranges_in_order(store: MemoryStore) -> None:
    n = SCROLL_PAGE * 2 + 100
    entries = [frame(KEY, i * 1000, f"c{i % 7}") for i in range(n)]
    store.upsert(entries, random_unit(n))
    store.upsert([frame(OTHER, 5000, "other")], random_unit(1, seed=1))
    got = [e.start_ms for e in store.scan(Scope(KEY, ("short",), 1000, (n - 2) * 1000))]
    assert got == list(range(1000, (n - 1) * 1000, 1000))  # [from, to], each once, in order


def test_delete_ended_before_removes_exactly_the_older_entries(store: MemoryStore) -> None:
    entries = frames(KEY, [f"c{i}" for i in range(10)]) + [summary(KEY, "mid", 0, 0, 4000, "s0"), summary(KEY, "mid", 1, 4001, 9000, "s1")]
    store.upsert(entries, random_unit(len(entries)))
    store.upsert(frames(OTHER, ["x"] * 10), random_unit(10, seed=2))
    store.delete_ended_before(KEY, 5000)
    assert [e.start_ms for e in everything(store, KEY, "short")] == list(range(5000, 10_000, 1000))
    assert [e.index for e in everything(store, KEY, "mid")] == [1]  # s0 ended at 4000 < 5000; s1 ends after
    assert store.count(OTHER) == 10  # another stream is untouched
    store.delete_ended_before(KEY, 9500, ("mid",))
    assert store.count(KEY, ("mid",)) == 0 and store.count(KEY, ("short",)) == 5


def test_upsert_rejects_vectors_that_do_not_match(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="shape"):
        store.upsert(frames(KEY, ["a", "b"]), random_unit(1))


def test_edge_store_keeps_its_data_after_close_and_reopen(tmp_path: Path, encoder: TextEncoder) -> None:
    store = open_edge(tmp_path)
    remember(store, encoder, frames(KEY, ["empty street"] * 30 + ["2 people; trolleybus"] * 30))
    store.close()
    assert not store.is_open
    with pytest.raises(DependencyUnavailable, match="closed"):
        store.count(KEY)

    reopened = open_edge(tmp_path)
    try:
        assert reopened.count(KEY) == 60
        (hit,) = reopened.search(Scope(KEY), encoder.encode(["a trolleybus"])[0], 1)
        assert hit.entry.text == "2 people; trolleybus" and hit.entry.start_ms >= 30_000
        remember(reopened, encoder, frames(KEY, ["empty street"] * 30))  # still idempotent after reopen
        assert reopened.count(KEY) == 60
    finally:
        reopened.close()


def test_edge_upsert_survives_a_crash_without_flush_or_close(tmp_path: Path) -> None:
    """What lets the service commit a Kafka offset right after upsert() returned: the write-ahead log."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from pathlib import Path
        from streamharness.memory.store import Entry, QdrantEdgeMemoryStore
        store = QdrantEdgeMemoryStore(Path({str(tmp_path)!r}), search_threads=1)
        v = np.eye(3, 384, dtype=np.float32)
        store.upsert([Entry({KEY!r}, "short", i * 1000, i * 1000, "c") for i in range(3)], v)
        os._exit(0)  # no flush, no close: a crash right after the upsert returned
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    store = open_edge(tmp_path)
    try:
        assert [e.start_ms for e in everything(store, KEY, "short")] == [0, 1000, 2000]
    finally:
        store.close()


def test_compacting_after_deletes_keeps_what_was_not_deleted(store: MemoryStore) -> None:
    n = 3000
    store.upsert([frame(KEY, i * 1000, f"c{i % 7}") for i in range(n)], random_unit(n))
    store.delete_ended_before(KEY, 2_000_000)
    store.compact()  # vacuums the deleted points (edge); a server does it by itself
    assert store.count(KEY) == 1000
    assert [e.start_ms for e in everything(store, KEY, "short")][:3] == [2_000_000, 2_001_000, 2_002_000]
    store.upsert([frame(KEY, n * 1000, "after")], random_unit(1, seed=3))
    assert store.count(KEY) == 1001
