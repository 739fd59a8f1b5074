"""The memory store on Qdrant's real engine (qdrant-edge, in-process) in a temporary folder.

The server store's calls run against qdrant-client's local mode (an emulation of the server API:
no Qdrant server binary can be installed here), with the same assertions where they apply.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from streamharness.errors import DependencyUnavailable
from streamharness.memory.store import (
    SCROLL_PAGE,
    VECTOR_DIM,
    FrameRecord,
    MemoryStore,
    QdrantEdgeMemoryStore,
    QdrantServerMemoryStore,
    point_id,
)
from streamharness.text_encoder import TextEncoder, default_model_dir, export_text_encoder, is_exported

KEY = "acme/cam-1"
OTHER = "acme/cam-2"


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    if not is_exported(default_model_dir()):
        pytest.importorskip("torch", reason="exporting the text encoder needs the models extra (torch)")
    return TextEncoder(model_dir=export_text_encoder()).load()


def open_edge(path: Path) -> QdrantEdgeMemoryStore:
    return QdrantEdgeMemoryStore(path, search_threads=1)


@pytest.fixture(params=["edge", "server-api-local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MemoryStore]:
    if request.param == "edge":
        s: MemoryStore = open_edge(tmp_path)
    else:
        from qdrant_client import QdrantClient

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "payload indexes have no effect in local mode"
            s = QdrantServerMemoryStore(client=QdrantClient(":memory:"))
    yield s
    s.close()


def frames(key: str, captions: list[str], *, step_ms: int = 1000, start_ms: int = 0) -> list[FrameRecord]:
    return [
        FrameRecord(key=key, media_ts_ms=start_ms + i * step_ms, caption=c, labels=("street",), person_count=c.count("people"))
        for i, c in enumerate(captions)
    ]


def remember(store: MemoryStore, encoder: TextEncoder, records: list[FrameRecord]) -> None:
    store.upsert(records, encoder.encode([r.caption for r in records]))


def random_unit(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, VECTOR_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_point_ids_are_deterministic_per_stream_and_time() -> None:
    assert point_id(KEY, 5000) == point_id(KEY, 5000) == FrameRecord(KEY, 5000, "x").point_id
    assert len({point_id(KEY, 5000), point_id(KEY, 6000), point_id(OTHER, 5000)}) == 3


def test_upsert_then_read_back(store: MemoryStore, encoder: TextEncoder) -> None:
    records = frames(KEY, ["empty street", "2 people; trolleybus"])
    remember(store, encoder, records)
    assert store.count(KEY) == 2 and store.count(OTHER) == 0 and store.count() == 2
    assert store.window(KEY, after_ms=None, until_ms=10_000, limit=10) == records


def test_redelivered_records_overwrite_instead_of_duplicating(store: MemoryStore, encoder: TextEncoder) -> None:
    remember(store, encoder, frames(KEY, ["empty street"] * 5))
    remember(store, encoder, frames(KEY, ["empty street"] * 5))  # the same records again
    assert store.count(KEY) == 5
    remember(store, encoder, frames(KEY, ["a red cup"], start_ms=2000))  # same (stream, time): replaced
    assert store.count(KEY) == 5
    (hit,) = store.search(KEY, encoder.encode(["a red cup"])[0], from_ms=2000, to_ms=2000, limit=5)
    assert hit.record.caption == "a red cup" and hit.score > 0.99


def test_recall_ranks_by_caption_meaning(store: MemoryStore, encoder: TextEncoder) -> None:
    captions = ["empty street", "two people crossing the road", "a trolleybus at the stop", "a red cup on a table"]
    remember(store, encoder, frames(KEY, captions))
    bus = store.search(KEY, encoder.encode(["a bus"])[0], from_ms=None, to_ms=None, limit=4)
    assert [h.record.caption for h in bus][0] == "a trolleybus at the stop"
    assert [h.score for h in bus] == sorted((h.score for h in bus), reverse=True)
    people = store.search(KEY, encoder.encode(["people walking"])[0], from_ms=None, to_ms=None, limit=2)
    assert people[0].record.caption == "two people crossing the road"
    assert people[0].record.person_count == 1 and people[0].record.labels == ("street",)


def test_search_keeps_to_the_time_range_and_the_stream(store: MemoryStore, encoder: TextEncoder) -> None:
    remember(store, encoder, frames(KEY, ["empty street"] * 30 + ["2 people; trolleybus"] * 30))
    remember(store, encoder, frames(OTHER, ["2 people; trolleybus"] * 60))
    query = encoder.encode(["a trolleybus"])[0]
    hits = store.search(KEY, query, from_ms=10_000, to_ms=35_000, limit=100)
    assert {h.record.media_ts_ms for h in hits} == set(range(10_000, 35_001, 1000))  # bounds inclusive
    assert {h.record.key for h in hits} == {KEY}
    assert hits[0].record.caption == "2 people; trolleybus" and 30_000 <= hits[0].record.media_ts_ms <= 35_000
    up_to = store.search(KEY, query, from_ms=None, to_ms=29_000, limit=5)
    assert up_to and all(h.record.caption == "empty street" for h in up_to)  # nothing after to_ms
    assert store.search("acme/unknown", query, from_ms=None, to_ms=None, limit=5) == []


def test_window_is_the_newest_frames_in_range_oldest_first(store: MemoryStore, encoder: TextEncoder) -> None:
    remember(store, encoder, frames(KEY, [f"frame {i}" for i in range(60)]))
    window = store.window(KEY, after_ms=40_000, until_ms=50_000, limit=100)
    assert [r.media_ts_ms for r in window] == list(range(41_000, 50_001, 1000))  # (after, until]
    newest = store.window(KEY, after_ms=40_000, until_ms=50_000, limit=3)
    assert [r.media_ts_ms for r in newest] == [48_000, 49_000, 50_000]


def test_scan_pages_through_long_ranges_in_order(store: MemoryStore) -> None:
    n = SCROLL_PAGE * 2 + 100
    records = [FrameRecord(KEY, i * 1000, f"c{i % 7}") for i in range(n)]
    store.upsert(records, random_unit(n))
    store.upsert([FrameRecord(OTHER, 5000, "other")], random_unit(1, seed=1))
    got = [r.media_ts_ms for r in store.scan(KEY, from_ms=1000, before_ms=(n - 1) * 1000)]
    assert got == list(range(1000, (n - 1) * 1000, 1000))  # [from, before), each once, in order


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
        (hit,) = reopened.search(KEY, encoder.encode(["a trolleybus"])[0], from_ms=None, to_ms=None, limit=1)
        assert hit.record.caption == "2 people; trolleybus" and hit.record.media_ts_ms >= 30_000
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
        from streamharness.memory.store import FrameRecord, QdrantEdgeMemoryStore
        store = QdrantEdgeMemoryStore(Path({str(tmp_path)!r}), search_threads=1)
        v = np.eye(3, 384, dtype=np.float32)
        store.upsert([FrameRecord({KEY!r}, i * 1000, "c") for i in range(3)], v)
        os._exit(0)  # no flush, no close: a crash right after the upsert returned
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    store = open_edge(tmp_path)
    try:
        assert [r.media_ts_ms for r in store.window(KEY, after_ms=None, until_ms=10_000, limit=10)] == [0, 1000, 2000]
    finally:
        store.close()
