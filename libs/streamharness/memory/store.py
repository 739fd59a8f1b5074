"""Where the memory stage keeps what each stream showed and said: the three tiers and the Q&A history.

One point per *entry* (:class:`Entry`) of one stream:

* tier ``short``: one encoded frame (its caption, labels, people count) at ``start_ms == end_ms``;
* tier ``mid``: one chunk summary (``index`` = chunk number) over ``[start_ms, end_ms]``;
* tier ``long``: one block compressed from M chunk summaries (``index`` = block number);
* tier ``qa``: one answered question or triggered instruction (``prompt_text``) and the answer (``text``).

Ids are deterministic (UUIDv5 of ``"<tenant>/<stream>/<tier>/<ms or index or response id>"``,
:func:`entry_id`), so a redelivered Kafka record or a re-summarised chunk overwrites its own point.
Vectors are MiniLM embeddings (384-d, cosine) of the entry's text (for ``qa``: question + answer).

Every read names one stream and filters **server-side** on ``tenant``, ``stream_id`` and ``key``
(each a keyword payload index; ``key`` is the tenant index Qdrant groups points by), and on
``tier``/``start_ms``/``end_ms``. There is no read that omits the stream filter. Two backends share
this code path through the small :class:`_Engine` adapter:

* :class:`QdrantEdgeMemoryStore`: Qdrant's engine in-process (``qdrant-edge-py``), data in a local
  folder (a PersistentVolumeClaim in the chart). What runs here and in the tests.
* :class:`QdrantServerMemoryStore`: a Qdrant server (the official chart) by URL, ``qdrant-client``.
"""

from __future__ import annotations

import abc
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streamharness.errors import DependencyUnavailable
from streamharness.memory.tiers import estimate_tokens

log = logging.getLogger(__name__)

VECTOR_DIM = 384  # all-MiniLM-L6-v2 (streamharness.text_encoder.EMBEDDING_DIM)
# Fixed namespace of point ids: changing it would duplicate every stored entry on redelivery.
POINT_NAMESPACE = uuid.UUID("6f1d8f5e-3b1a-5c53-9e36-5f3a0f6c1a10")
SCROLL_PAGE = 1024  # points per scroll request when reading a long range

Tier = Literal["short", "mid", "long", "qa"]
TIERS: tuple[Tier, ...] = ("short", "mid", "long", "qa")


def entry_id(key: str, tier: Tier, ref: str | int) -> str:
    """Deterministic point id: the same frame / chunk / block / answer always lands on the same point."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{key}/{tier}/{ref}"))


@dataclass(frozen=True)
class Entry:
    """One stored item of one stream (see the module docstring for the tiers)."""

    key: str  # "<tenant>/<stream_id>"
    tier: Tier
    start_ms: int
    end_ms: int
    text: str
    labels: tuple[str, ...] = ()
    person_count: int = 0
    index: int = -1  # chunk (mid) or block (long) number
    visible_from_ms: int = 0  # mid/long: the boundary from which Context shows it
    fallback: bool = False  # mid/long: written by the deterministic fallback
    backend: str = ""
    frames: int = 1  # frames (short, mid) or summaries (long) covered
    prompt_text: str = ""  # qa: the question or instruction
    ref: str = ""  # qa: the response id; short: the session id
    seq: int = 0
    tokens: int = field(default=-1)  # estimated prompt tokens of ``text`` (computed when -1)

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r}")
        if self.end_ms < self.start_ms:
            raise ValueError(f"end_ms {self.end_ms} is before start_ms {self.start_ms}")
        if self.tokens < 0:
            object.__setattr__(self, "tokens", estimate_tokens(self.text))

    @property
    def point_id(self) -> str:
        if self.tier == "short":
            return entry_id(self.key, "short", self.start_ms)
        if self.tier == "qa":
            return entry_id(self.key, "qa", self.ref)
        return entry_id(self.key, self.tier, self.index)

    @property
    def embed_text(self) -> str:
        """What the vector is computed from."""
        if self.tier == "qa":
            return f"{self.prompt_text} {self.text}".strip()
        return self.text.strip() or ", ".join(self.labels)

    def payload(self) -> dict[str, Any]:
        tenant, _, stream_id = self.key.partition("/")
        return {
            "key": self.key, "tenant": tenant, "stream_id": stream_id, "tier": self.tier,
            "start_ms": int(self.start_ms), "end_ms": int(self.end_ms), "text": self.text,
            "labels": list(self.labels), "person_count": int(self.person_count), "index": int(self.index),
            "visible_from_ms": int(self.visible_from_ms), "fallback": bool(self.fallback), "backend": self.backend,
            "frames": int(self.frames), "prompt_text": self.prompt_text, "ref": self.ref, "seq": int(self.seq),
            "tokens": int(self.tokens),
        }

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> Entry:
        return cls(
            key=str(p["key"]), tier=p["tier"], start_ms=int(p["start_ms"]), end_ms=int(p["end_ms"]),
            text=str(p.get("text") or ""), labels=tuple(str(x) for x in p.get("labels") or ()),
            person_count=int(p.get("person_count") or 0), index=int(p.get("index", -1)),
            visible_from_ms=int(p.get("visible_from_ms") or 0), fallback=bool(p.get("fallback")),
            backend=str(p.get("backend") or ""), frames=int(p.get("frames") or 1),
            prompt_text=str(p.get("prompt_text") or ""), ref=str(p.get("ref") or ""), seq=int(p.get("seq") or 0),
            tokens=int(p.get("tokens", -1)),
        )


@dataclass(frozen=True)
class Hit:
    entry: Entry
    score: float  # cosine similarity of the query to the entry's text


@dataclass(frozen=True)
class Scope:
    """The part of one stream a read looks at: tiers and a media-time range (entries that overlap it)."""

    key: str
    tiers: tuple[Tier, ...] = ()  # empty = every tier
    from_ms: int | None = None  # entries with end_ms >= from_ms
    to_ms: int | None = None  # ... and start_ms <= to_ms
    ended_by_ms: int | None = None  # ... and end_ms <= ended_by_ms (nothing that runs past it)


class _Engine(abc.ABC):
    """The few engine calls the store needs, over Qdrant's edge engine or its server API."""

    @abc.abstractmethod
    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None: ...

    @abc.abstractmethod
    def query(self, scope: Scope, vector: list[float], limit: int) -> list[tuple[dict[str, Any], float]]: ...

    @abc.abstractmethod
    def scroll(self, scope: Scope, limit: int, order_field: str, descending: bool, after: int | None) -> list[dict[str, Any]]:
        """Up to ``limit`` payloads in ``scope`` ordered by ``order_field``; ``after``: strictly past this value."""

    @abc.abstractmethod
    def count(self, scope: Scope | None) -> int: ...

    @abc.abstractmethod
    def delete(self, scope: Scope, extra_end_before: int | None) -> None: ...

    @abc.abstractmethod
    def flush(self) -> None: ...

    def compact(self) -> None:
        """Reclaim the space of deleted points (the server does this by itself)."""

    @abc.abstractmethod
    def close(self) -> None: ...


class MemoryStore:
    """Entries of many streams, searchable by meaning and read by time within one stream.

    Thread-safe: the Kafka consumer writes while gRPC threads read. All times are media time in ms.
    """

    def __init__(self, engine: _Engine, description: str) -> None:
        self._engine = engine
        self.description = description
        self._open = True
        self._lock = threading.Lock()  # guards open/close only; the engines are thread-safe

    # -- writes ---------------------------------------------------------------------------------
    def upsert(self, entries: Sequence[Entry], vectors: np.ndarray) -> None:
        """Insert or overwrite ``entries`` (one row of ``vectors`` each). On return the write survives
        a crash of this process (edge: write-ahead log; server: acknowledged with ``wait=True``)."""
        if not entries:
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(entries), VECTOR_DIM):
            raise ValueError(f"vectors of shape {vectors.shape} for {len(entries)} entries (want (n, {VECTOR_DIM}))")
        self._call(self._engine.upsert, [e.point_id for e in entries], vectors, [e.payload() for e in entries])

    def delete_ended_before(self, key: str, cutoff_ms: int, tiers: Sequence[Tier] = ()) -> None:
        """Delete the stream's entries (of ``tiers``; all when empty) that ended before ``cutoff_ms``."""
        self._call(self._engine.delete, Scope(key, tuple(tiers)), int(cutoff_ms))

    def flush(self) -> None:
        """Persist everything written so far in the store's own files (cheaper restarts)."""
        if self._open:
            self._call(self._engine.flush)

    def compact(self) -> None:
        """Reclaim what deleted entries still take in memory and on disk (after evictions)."""
        if self._open:
            self._call(self._engine.compact)

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._engine.close()

    @property
    def is_open(self) -> bool:
        return self._open

    # -- reads ----------------------------------------------------------------------------------
    def search(self, scope: Scope, vector: np.ndarray, limit: int) -> list[Hit]:
        """The ``limit`` entries in ``scope`` closest in meaning to ``vector``, best first."""
        found = self._call(self._engine.query, scope, np.asarray(vector, dtype=np.float32).tolist(), limit)
        return [Hit(Entry.from_payload(p), s) for p, s in found]

    def newest(self, scope: Scope, limit: int) -> list[Entry]:
        """The ``limit`` entries in ``scope`` that start last, returned oldest first."""
        rows = self._call(self._engine.scroll, scope, limit, "start_ms", True, None)
        return [Entry.from_payload(p) for p in reversed(rows)]

    def scan(self, scope: Scope) -> Iterator[Entry]:
        """Every entry in ``scope``, oldest first (pages internally)."""
        after: int | None = None
        while True:
            rows = self._call(self._engine.scroll, scope, SCROLL_PAGE, "start_ms", False, after)
            for p in rows:
                yield Entry.from_payload(p)
            if len(rows) < SCROLL_PAGE:
                return
            # Ordered scrolls page by value: within one tier of one stream start_ms is unique for
            # frames; summaries and answers are few, and the page size exceeds any tie run.
            after = int(rows[-1]["start_ms"])

    def edge(self, key: str, *, newest: bool) -> Entry | None:
        """The stream's first (or newest) entry of any tier, or None for an unknown stream."""
        rows = self._call(self._engine.scroll, Scope(key), 1, "start_ms" if not newest else "end_ms", newest, None)
        return Entry.from_payload(rows[0]) if rows else None

    def count(self, key: str | None = None, tiers: Sequence[Tier] = ()) -> int:
        """Entries stored for ``key`` (of ``tiers``; every stream when ``key`` is None)."""
        return int(self._call(self._engine.count, Scope(key, tuple(tiers)) if key is not None else None))

    def _call(self, fn: Any, *args: Any) -> Any:
        if not self._open:
            raise DependencyUnavailable("the memory store is closed")
        try:
            return fn(*args)
        except DependencyUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - the engines raise plain Exception
            if not self._open:
                raise DependencyUnavailable("the memory store is closed") from err
            raise


# -- Qdrant's engine in-process ------------------------------------------------------------------
_KEYWORD_FIELDS = ("tenant", "stream_id", "tier")
_INTEGER_FIELDS = ("end_ms", "index")


class _EdgeEngine(_Engine):
    def __init__(self, path: Path, search_threads: int | None) -> None:
        import qdrant_edge as qe

        self._qe = qe
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=VECTOR_DIM, distance=qe.Distance.Cosine),
            max_search_threads=search_threads or None,
            # optimize() vacuums segments with deleted points (evictions) and never builds an HNSW
            # index (indexing_threshold=0): searches are exact within one stream (see the class).
            optimizers=qe.EdgeOptimizersConfig(deleted_threshold=0.1, vacuum_min_vector_number=1000, indexing_threshold=0),
        )
        try:
            if (path / "edge_config.json").is_file():
                self._shard = qe.EdgeShard.load(str(path), config)  # checks the vector config matches
            else:
                path.mkdir(parents=True, exist_ok=True)
                self._shard = qe.EdgeShard.create(str(path), config)
            # Idempotent: creating an index that exists is a no-op.
            update = self._shard.update
            update(qe.UpdateOperation.create_field_index("key", qe.KeywordIndexParams(is_tenant=True)))
            for name in _KEYWORD_FIELDS:
                update(qe.UpdateOperation.create_field_index(name, qe.KeywordIndexParams()))
            update(qe.UpdateOperation.create_field_index(
                "start_ms", qe.IntegerIndexParams(lookup=True, range=True, is_principal=True)))
            for name in _INTEGER_FIELDS:
                update(qe.UpdateOperation.create_field_index(name, qe.IntegerIndexParams(lookup=True, range=True)))
        except Exception as err:  # noqa: BLE001 - the engine raises plain Exception
            raise DependencyUnavailable(f"cannot open the Qdrant edge shard in {path}: {err}") from err
        self.points = int(self._shard.info().points_count)

    def _filter(self, scope: Scope, *, end_before: int | None = None, order: tuple[str, bool, int | None] | None = None) -> Any:
        qe = self._qe
        tenant, _, stream_id = scope.key.partition("/")
        must = [
            qe.FieldCondition("key", match=qe.MatchValue(scope.key)),
            qe.FieldCondition("tenant", match=qe.MatchValue(tenant)),
            qe.FieldCondition("stream_id", match=qe.MatchValue(stream_id)),
        ]
        if scope.tiers:
            must.append(qe.FieldCondition("tier", match=qe.MatchAny(list(scope.tiers))))
        if scope.to_ms is not None:
            must.append(qe.FieldCondition("start_ms", range=qe.RangeFloat(lte=float(scope.to_ms))))
        if scope.from_ms is not None:
            must.append(qe.FieldCondition("end_ms", range=qe.RangeFloat(gte=float(scope.from_ms))))
        if scope.ended_by_ms is not None:
            must.append(qe.FieldCondition("end_ms", range=qe.RangeFloat(lte=float(scope.ended_by_ms))))
        if end_before is not None:
            must.append(qe.FieldCondition("end_ms", range=qe.RangeFloat(lt=float(end_before))))
        if order is not None and order[2] is not None:
            name, descending, after = order
            bound = {"lt": float(after)} if descending else {"gt": float(after)}
            must.append(qe.FieldCondition(name, range=qe.RangeFloat(**bound)))
        return qe.Filter(must=must)

    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        qe = self._qe
        points = [qe.Point(i, v.tolist(), p) for i, v, p in zip(ids, vectors, payloads)]
        self._shard.update(qe.UpdateOperation.upsert_points(points))

    def query(self, scope: Scope, vector: list[float], limit: int) -> list[tuple[dict[str, Any], float]]:
        qe = self._qe
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(vector), filter=self._filter(scope), with_payload=True)
        return [(p.payload, float(p.score)) for p in self._shard.query(request)]

    def scroll(self, scope: Scope, limit: int, order_field: str, descending: bool, after: int | None) -> list[dict[str, Any]]:
        qe = self._qe
        request = qe.ScrollRequest(
            limit=limit, filter=self._filter(scope, order=(order_field, descending, after)), with_payload=True,
            order_by=qe.OrderBy(order_field, qe.Direction.Desc if descending else qe.Direction.Asc),
        )
        records, _ = self._shard.scroll(request)
        return [r.payload for r in records]

    def count(self, scope: Scope | None) -> int:
        qe = self._qe
        return int(self._shard.count(qe.CountRequest(exact=True, filter=self._filter(scope) if scope else None)))

    def delete(self, scope: Scope, extra_end_before: int | None) -> None:
        self._shard.update(self._qe.UpdateOperation.delete_points_by_filter(self._filter(scope, end_before=extra_end_before)))

    def flush(self) -> None:
        self._shard.flush()

    def compact(self) -> None:
        self._shard.optimize()
        self._shard.flush()

    def close(self) -> None:
        try:
            self._shard.flush()
        finally:
            self._shard.close()


class QdrantEdgeMemoryStore(MemoryStore):
    """Qdrant's engine in-process (``qdrant-edge-py``): one shard in ``<data_dir>/tiers``.

    Layout: ONE shard for all tenants and streams, partitioned by payload, not a shard per tenant or
    per stream: one write-ahead log, one search thread pool and a fixed number of open files however
    many streams a replica holds, and a stream is removed by one delete-by-filter. ``key`` is a
    keyword index with ``is_tenant`` (Qdrant keeps each stream's points together and plans
    per-stream searches as exact scans of that stream), ``start_ms`` the principal integer index.

    No HNSW index is built (the optimizers' ``indexing_threshold`` is 0): every query is restricted
    to one stream (at most ~86,400 frames for 24 h at 1 FPS, plus a few hundred summaries), which
    Qdrant answers by exact search over the filtered points without an index that took minutes to
    build. :meth:`compact` runs the optimizers, which vacuum segments whose points were deleted by
    evictions: without it deleted points keep their memory and disk (measured: +6 MiB/h of disk at a
    constant point count, docs/benchmarks.md).

    Durability: the shard keeps a write-ahead log, so an ``upsert`` that returned survives a crash
    of the process; ``flush`` writes segments so that a restart does not replay the log.
    """

    SHARD_DIR = "tiers"

    def __init__(self, data_dir: Path, *, search_threads: int | None = None) -> None:
        self.path = Path(data_dir) / self.SHARD_DIR
        engine = _EdgeEngine(self.path, search_threads)
        super().__init__(engine, f"Qdrant edge shard {self.path}")
        log.info("memory store: %s (%d points)", self.description, engine.points)


# -- a Qdrant server -------------------------------------------------------------------------------
class _ServerEngine(_Engine):
    def __init__(self, client: Any, collection: str) -> None:
        from qdrant_client import models

        self._m = models
        self._client = client
        self.collection = collection
        if not client.collection_exists(collection):
            client.create_collection(collection, vectors_config=models.VectorParams(size=VECTOR_DIM, distance=models.Distance.COSINE))
        keyword = models.KeywordIndexParams
        client.create_payload_index(collection, "key", field_schema=keyword(type=models.KeywordIndexType.KEYWORD, is_tenant=True))
        for name in _KEYWORD_FIELDS:
            client.create_payload_index(collection, name, field_schema=keyword(type=models.KeywordIndexType.KEYWORD))
        integer = models.IntegerIndexParams
        client.create_payload_index(collection, "start_ms", field_schema=integer(
            type=models.IntegerIndexType.INTEGER, lookup=True, range=True, is_principal=True))
        for name in _INTEGER_FIELDS:
            client.create_payload_index(collection, name, field_schema=integer(type=models.IntegerIndexType.INTEGER, lookup=True, range=True))

    def _filter(self, scope: Scope, *, end_before: int | None = None, order: tuple[str, bool, int | None] | None = None) -> Any:
        m = self._m
        tenant, _, stream_id = scope.key.partition("/")
        must: list[Any] = [
            m.FieldCondition(key="key", match=m.MatchValue(value=scope.key)),
            m.FieldCondition(key="tenant", match=m.MatchValue(value=tenant)),
            m.FieldCondition(key="stream_id", match=m.MatchValue(value=stream_id)),
        ]
        if scope.tiers:
            must.append(m.FieldCondition(key="tier", match=m.MatchAny(any=list(scope.tiers))))
        if scope.to_ms is not None:
            must.append(m.FieldCondition(key="start_ms", range=m.Range(lte=scope.to_ms)))
        if scope.from_ms is not None:
            must.append(m.FieldCondition(key="end_ms", range=m.Range(gte=scope.from_ms)))
        if scope.ended_by_ms is not None:
            must.append(m.FieldCondition(key="end_ms", range=m.Range(lte=scope.ended_by_ms)))
        if end_before is not None:
            must.append(m.FieldCondition(key="end_ms", range=m.Range(lt=end_before)))
        if order is not None and order[2] is not None:
            name, descending, after = order
            must.append(m.FieldCondition(key=name, range=m.Range(lt=after) if descending else m.Range(gt=after)))
        return m.Filter(must=must)

    def upsert(self, ids: list[str], vectors: np.ndarray, payloads: list[dict[str, Any]]) -> None:
        m = self._m
        points = [m.PointStruct(id=i, vector=v.tolist(), payload=p) for i, v, p in zip(ids, vectors, payloads)]
        self._client.upsert(self.collection, points=points, wait=True)

    def query(self, scope: Scope, vector: list[float], limit: int) -> list[tuple[dict[str, Any], float]]:
        result = self._client.query_points(self.collection, query=vector, query_filter=self._filter(scope), limit=limit, with_payload=True)
        return [(p.payload or {}, float(p.score)) for p in result.points]

    def scroll(self, scope: Scope, limit: int, order_field: str, descending: bool, after: int | None) -> list[dict[str, Any]]:
        m = self._m
        records, _ = self._client.scroll(
            self.collection, scroll_filter=self._filter(scope, order=(order_field, descending, after)), limit=limit,
            with_payload=True, order_by=m.OrderBy(key=order_field, direction=m.Direction.DESC if descending else m.Direction.ASC),
        )
        return [r.payload or {} for r in records]

    def count(self, scope: Scope | None) -> int:
        return int(self._client.count(self.collection, count_filter=self._filter(scope) if scope else None, exact=True).count)

    def delete(self, scope: Scope, extra_end_before: int | None) -> None:
        m = self._m
        self._client.delete(self.collection, points_selector=m.FilterSelector(filter=self._filter(scope, end_before=extra_end_before)), wait=True)

    def flush(self) -> None:
        pass  # the server persists on its own

    def close(self) -> None:
        self._client.close()


class QdrantServerMemoryStore(MemoryStore):
    """A Qdrant server (e.g. the official Helm chart) through ``qdrant-client``: one collection for all
    streams, with the same payload partitioning, indexes, ids and reads as :class:`QdrantEdgeMemoryStore`
    (one code path: only :class:`_Engine` differs).

    No Qdrant server binary can be installed here: the store tests run against the server API on
    ``qdrant-client``'s local mode (a Python emulation) and against a real server when
    ``SH_TEST_QDRANT_URL`` names one. Writes use ``wait=True``: an upsert returns once the server
    applied it, which is when the Kafka offset may be committed.
    """

    def __init__(self, url: str | None = None, *, collection: str = "streamharness_memory", api_key: str | None = None,
                 timeout_s: float = 10.0, client: Any = None) -> None:
        try:
            if client is None:
                from qdrant_client import QdrantClient

                client = QdrantClient(url=url, api_key=api_key, timeout=int(timeout_s))
            engine = _ServerEngine(client, collection)
        except Exception as err:  # noqa: BLE001 - connection and API errors alike mean "not there"
            raise DependencyUnavailable(f"cannot use Qdrant collection {collection!r} at {url}: {err}") from err
        super().__init__(engine, f"Qdrant collection {collection!r} at {url or 'a given client'}")


__all__ = ["Entry", "Hit", "MemoryStore", "QdrantEdgeMemoryStore", "QdrantServerMemoryStore", "Scope", "TIERS", "Tier", "VECTOR_DIM", "entry_id"]
