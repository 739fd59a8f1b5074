"""Where the memory service keeps what each stream showed: one point per encoded frame.

A point is one frame of one stream:

* id: UUIDv5 of ``"<tenant>/<stream_id>/<media_ts_ms>"`` (:func:`point_id`), so a redelivered Kafka
  record overwrites its own point instead of adding a second one (idempotent upserts);
* vector: the MiniLM embedding (384-d, cosine) of the frame's caption, for text ``Recall``;
* payload: ``key``, ``tenant``, ``stream_id``, ``media_ts_ms``, ``caption``, ``labels``,
  ``person_count``, ``session_id``, ``seq``.

Every read names one stream and a media-time range; nothing reads across streams. Two backends
share the :class:`MemoryStore` interface:

* :class:`QdrantEdgeMemoryStore`: Qdrant's engine in-process (``qdrant-edge-py``), data in a local
  folder. What runs here and in the tests.
* :class:`QdrantServerMemoryStore`: a Qdrant server (the official chart) through ``qdrant-client``.
"""

from __future__ import annotations

import abc
import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamharness.errors import DependencyUnavailable

log = logging.getLogger(__name__)

VECTOR_DIM = 384  # all-MiniLM-L6-v2 (streamharness.text_encoder.EMBEDDING_DIM)
# Fixed namespace of point ids: changing it would duplicate every stored frame on redelivery.
POINT_NAMESPACE = uuid.UUID("6f1d8f5e-3b1a-5c53-9e36-5f3a0f6c1a10")
SCROLL_PAGE = 1024  # points per scroll request when reading a long range


def point_id(key: str, media_ts_ms: int) -> str:
    """Deterministic id of a stream's frame at ``media_ts_ms``: the same record always lands on the same point."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{key}/{int(media_ts_ms)}"))


@dataclass(frozen=True)
class FrameRecord:
    """What memory keeps of one encoded frame."""

    key: str  # "<tenant>/<stream_id>"
    media_ts_ms: int
    caption: str
    labels: tuple[str, ...] = ()
    person_count: int = 0
    session_id: str = ""
    seq: int = 0

    @property
    def point_id(self) -> str:
        return point_id(self.key, self.media_ts_ms)

    def payload(self) -> dict[str, Any]:
        tenant, _, stream_id = self.key.partition("/")
        return {
            "key": self.key,
            "tenant": tenant,
            "stream_id": stream_id,
            "media_ts_ms": int(self.media_ts_ms),
            "caption": self.caption,
            "labels": list(self.labels),
            "person_count": int(self.person_count),
            "session_id": self.session_id,
            "seq": int(self.seq),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> FrameRecord:
        return cls(
            key=str(payload["key"]),
            media_ts_ms=int(payload["media_ts_ms"]),
            caption=str(payload.get("caption") or ""),
            labels=tuple(str(x) for x in payload.get("labels") or ()),
            person_count=int(payload.get("person_count") or 0),
            session_id=str(payload.get("session_id") or ""),
            seq=int(payload.get("seq") or 0),
        )


@dataclass(frozen=True)
class RecallHit:
    record: FrameRecord
    score: float  # cosine similarity of the query to the caption


class MemoryStore(abc.ABC):
    """Frames of many streams, searchable by caption meaning within one stream and a media-time range.

    Thread-safe: the Kafka consumer writes while gRPC threads read. All times are media time in ms.
    """

    @abc.abstractmethod
    def upsert(self, records: Sequence[FrameRecord], vectors: np.ndarray) -> None:
        """Insert or overwrite ``records`` (one row of ``vectors`` each). On return the write survives
        a crash of this process (edge: write-ahead log; server: acknowledged with ``wait=True``)."""

    @abc.abstractmethod
    def search(self, key: str, vector: np.ndarray, *, from_ms: int | None, to_ms: int | None, limit: int) -> list[RecallHit]:
        """The ``limit`` frames of stream ``key`` with ``from_ms <= media_ts_ms <= to_ms`` (None = open)
        whose captions are most similar to ``vector``, best first."""

    @abc.abstractmethod
    def window(self, key: str, *, after_ms: int | None, until_ms: int, limit: int) -> list[FrameRecord]:
        """The newest ``limit`` frames with ``after_ms < media_ts_ms <= until_ms``, returned oldest first."""

    @abc.abstractmethod
    def scan(self, key: str, *, from_ms: int, before_ms: int) -> Iterator[FrameRecord]:
        """Every frame with ``from_ms <= media_ts_ms < before_ms``, oldest first (pages internally)."""

    @abc.abstractmethod
    def count(self, key: str | None = None) -> int:
        """Frames stored for ``key`` (all streams when None)."""

    def flush(self) -> None:
        """Persist everything written so far in the store's own files (cheaper restarts)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release the store. Further calls raise DependencyUnavailable."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @staticmethod
    def _check_vectors(records: Sequence[FrameRecord], vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(records), VECTOR_DIM):
            raise ValueError(f"vectors of shape {vectors.shape} for {len(records)} records (want (n, {VECTOR_DIM}))")
        return vectors


class QdrantEdgeMemoryStore(MemoryStore):
    """Qdrant's engine in-process (``qdrant-edge-py``): one shard in ``<data_dir>/frames``.

    Layout: ONE shard for all tenants and streams, partitioned by payload, not a shard per tenant or
    per stream. Every read filters on ``key`` (keyword index with ``is_tenant``: Qdrant keeps each
    stream's points together and plans per-stream searches as exact scans of that stream only) and
    on ``media_ts_ms`` (integer index with range and ``is_principal``: time is the main filter). One
    shard means one write-ahead log, one search thread pool and a fixed number of open files however
    many streams a replica holds (thousands of per-stream shards would each hold their own), and a
    stream or tenant is removed by one delete-by-filter. Tenant isolation does not rely on separate
    files: this class has no read that omits the stream filter.

    No HNSW index is built (``optimize()`` is never called): every query is restricted to one
    stream (at most 43,200 points for 12 h at 1 FPS), which Qdrant answers by exact search over the
    filtered points (~15 ms at 100k x 512-d here) without an index that took minutes to build.

    Durability: the shard keeps a write-ahead log, so an ``upsert`` that returned survives a crash
    of the process (checked: points written and then ``os._exit`` are there after ``load``);
    ``flush`` writes segments so that a restart does not replay the log.

    The data is local to this replica: with several memory replicas use the server store, or give
    each replica its own volume and route each stream's calls to the replica that consumes it.
    """

    SHARD_DIR = "frames"

    def __init__(self, data_dir: Path, *, search_threads: int | None = None) -> None:
        import qdrant_edge as qe

        self._qe = qe
        self.path = Path(data_dir) / self.SHARD_DIR
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=VECTOR_DIM, distance=qe.Distance.Cosine),
            max_search_threads=search_threads or None,
        )
        try:
            if (self.path / "edge_config.json").is_file():
                self._shard = qe.EdgeShard.load(str(self.path), config)  # checks the vector config matches
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self._shard = qe.EdgeShard.create(str(self.path), config)
            # Idempotent: creating an index that exists is a no-op.
            self._shard.update(qe.UpdateOperation.create_field_index("key", qe.KeywordIndexParams(is_tenant=True)))
            self._shard.update(
                qe.UpdateOperation.create_field_index(
                    "media_ts_ms", qe.IntegerIndexParams(lookup=True, range=True, is_principal=True)
                )
            )
        except Exception as err:  # noqa: BLE001 - the engine raises plain Exception
            raise DependencyUnavailable(f"cannot open the Qdrant edge shard in {self.path}: {err}") from err
        self._open = True
        self._lock = threading.Lock()  # guards open/close only; the shard itself is thread-safe
        log.info("memory store: Qdrant edge shard %s (%d points)", self.path, self._shard.info().points_count)

    # -- writes ---------------------------------------------------------------------------------
    def upsert(self, records: Sequence[FrameRecord], vectors: np.ndarray) -> None:
        if not records:
            return
        vectors = self._check_vectors(records, vectors)
        qe = self._qe
        points = [qe.Point(r.point_id, v.tolist(), r.payload()) for r, v in zip(records, vectors)]
        self._call(self._shard.update, qe.UpdateOperation.upsert_points(points))

    def flush(self) -> None:
        if self._open:
            self._call(self._shard.flush)

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            try:
                self._shard.flush()
            finally:
                self._shard.close()

    @property
    def is_open(self) -> bool:
        return self._open

    # -- reads ----------------------------------------------------------------------------------
    def search(self, key: str, vector: np.ndarray, *, from_ms: int | None, to_ms: int | None, limit: int) -> list[RecallHit]:
        qe = self._qe
        request = qe.QueryRequest(
            limit=limit,
            query=qe.Query.Nearest(np.asarray(vector, dtype=np.float32).tolist()),
            filter=self._filter(key, gte=from_ms, lte=to_ms),
            with_payload=True,
        )
        points = self._call(self._shard.query, request)
        return [RecallHit(FrameRecord.from_payload(p.payload), float(p.score)) for p in points]

    def window(self, key: str, *, after_ms: int | None, until_ms: int, limit: int) -> list[FrameRecord]:
        qe = self._qe
        request = qe.ScrollRequest(
            limit=limit,
            filter=self._filter(key, gt=after_ms, lte=until_ms),
            with_payload=True,
            order_by=qe.OrderBy("media_ts_ms", qe.Direction.Desc),
        )
        records, _ = self._call(self._shard.scroll, request)
        return [FrameRecord.from_payload(r.payload) for r in reversed(records)]

    def scan(self, key: str, *, from_ms: int, before_ms: int) -> Iterator[FrameRecord]:
        qe = self._qe
        start = from_ms
        while start < before_ms:
            # Ordered scrolls page by value, not by offset: media_ts_ms is unique within a stream
            # (it is part of the point id), so the next page starts just after the last value.
            request = qe.ScrollRequest(
                limit=SCROLL_PAGE,
                filter=self._filter(key, gte=start, lt=before_ms),
                with_payload=True,
                order_by=qe.OrderBy("media_ts_ms", qe.Direction.Asc),
            )
            records, _ = self._call(self._shard.scroll, request)
            for r in records:
                yield FrameRecord.from_payload(r.payload)
            if len(records) < SCROLL_PAGE:
                return
            start = int(records[-1].payload["media_ts_ms"]) + 1

    def count(self, key: str | None = None) -> int:
        qe = self._qe
        flt = qe.Filter(must=[qe.FieldCondition("key", match=qe.MatchValue(key))]) if key is not None else None
        return int(self._call(self._shard.count, qe.CountRequest(exact=True, filter=flt)))

    # -- internals ------------------------------------------------------------------------------
    def _filter(self, key: str, **bounds: int | None) -> Any:
        qe = self._qe
        must = [qe.FieldCondition("key", match=qe.MatchValue(key))]
        given = {k: float(v) for k, v in bounds.items() if v is not None}
        if given:
            must.append(qe.FieldCondition("media_ts_ms", range=qe.RangeFloat(**given)))
        return qe.Filter(must=must)

    def _call(self, fn: Any, *args: Any) -> Any:
        if not self._open:
            raise DependencyUnavailable("the memory store is closed")
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - the engine raises plain Exception
            if not self._open:
                raise DependencyUnavailable("the memory store is closed") from err
            raise


class QdrantServerMemoryStore(MemoryStore):
    """A Qdrant server (e.g. the official Helm chart) through ``qdrant-client``: one collection for all
    streams, with the same payload partitioning, indexes, ids and reads as :class:`QdrantEdgeMemoryStore`.

    Kept thin on purpose. It is NOT exercised against a real server here: no Qdrant server binary
    can be installed in this environment. Its code paths run in the unit tests against
    ``qdrant-client``'s local mode (a Python emulation of the server API), which checks the calls
    and their arguments but not the server's behaviour under load or failure.

    Writes use ``wait=True``: an upsert returns once the server applied it to its write-ahead log,
    which is when the Kafka offset may be committed.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        collection: str = "streamharness_frames",
        api_key: str | None = None,
        timeout_s: float = 10.0,
        client: Any = None,
    ) -> None:
        from qdrant_client import QdrantClient, models

        self._m = models
        self.collection = collection
        self._client = client if client is not None else QdrantClient(url=url, api_key=api_key, timeout=int(timeout_s))
        self._open = True
        try:
            if not self._client.collection_exists(collection):
                self._client.create_collection(
                    collection, vectors_config=models.VectorParams(size=VECTOR_DIM, distance=models.Distance.COSINE)
                )
            self._client.create_payload_index(
                collection, "key", field_schema=models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True)
            )
            self._client.create_payload_index(
                collection,
                "media_ts_ms",
                field_schema=models.IntegerIndexParams(type=models.IntegerIndexType.INTEGER, lookup=True, range=True, is_principal=True),
            )
        except Exception as err:  # noqa: BLE001 - connection and API errors alike mean "not there"
            raise DependencyUnavailable(f"cannot use Qdrant collection {collection!r} at {url}: {err}") from err

    def upsert(self, records: Sequence[FrameRecord], vectors: np.ndarray) -> None:
        if not records:
            return
        vectors = self._check_vectors(records, vectors)
        m = self._m
        points = [m.PointStruct(id=r.point_id, vector=v.tolist(), payload=r.payload()) for r, v in zip(records, vectors)]
        self._client.upsert(self.collection, points=points, wait=True)

    def search(self, key: str, vector: np.ndarray, *, from_ms: int | None, to_ms: int | None, limit: int) -> list[RecallHit]:
        result = self._client.query_points(
            self.collection,
            query=np.asarray(vector, dtype=np.float32).tolist(),
            query_filter=self._filter(key, gte=from_ms, lte=to_ms),
            limit=limit,
            with_payload=True,
        )
        return [RecallHit(FrameRecord.from_payload(p.payload or {}), float(p.score)) for p in result.points]

    def window(self, key: str, *, after_ms: int | None, until_ms: int, limit: int) -> list[FrameRecord]:
        records, _ = self._client.scroll(
            self.collection,
            scroll_filter=self._filter(key, gt=after_ms, lte=until_ms),
            limit=limit,
            with_payload=True,
            order_by=self._m.OrderBy(key="media_ts_ms", direction=self._m.Direction.DESC),
        )
        return [FrameRecord.from_payload(r.payload or {}) for r in reversed(records)]

    def scan(self, key: str, *, from_ms: int, before_ms: int) -> Iterator[FrameRecord]:
        start = from_ms
        while start < before_ms:
            records, _ = self._client.scroll(
                self.collection,
                scroll_filter=self._filter(key, gte=start, lt=before_ms),
                limit=SCROLL_PAGE,
                with_payload=True,
                order_by=self._m.OrderBy(key="media_ts_ms", direction=self._m.Direction.ASC),
            )
            for r in records:
                yield FrameRecord.from_payload(r.payload or {})
            if len(records) < SCROLL_PAGE:
                return
            start = int(records[-1].payload["media_ts_ms"]) + 1

    def count(self, key: str | None = None) -> int:
        m = self._m
        flt = m.Filter(must=[m.FieldCondition(key="key", match=m.MatchValue(value=key))]) if key is not None else None
        return int(self._client.count(self.collection, count_filter=flt, exact=True).count)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._client.close()

    @property
    def is_open(self) -> bool:
        return self._open

    def _filter(self, key: str, **bounds: int | None) -> Any:
        m = self._m
        must: list[Any] = [m.FieldCondition(key="key", match=m.MatchValue(value=key))]
        given = {k: v for k, v in bounds.items() if v is not None}
        if given:
            must.append(m.FieldCondition(key="media_ts_ms", range=m.Range(**given)))
        return m.Filter(must=must)
