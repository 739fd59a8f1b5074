"""The local host: the pipeline's stages in one process, with no broker (quick evaluation runs,
experiments, tests).

A :class:`LocalBus` takes Kafka's place: every record is stored as Kafka would carry it — key
bytes, serialised value, headers with the type and trace context — and parsed again by
:func:`~streamharness.records.process_record` on the way to each consumer, so a stage sees only
what the wire carries and a malformed record is rejected exactly as on Kafka. Each consumer group
has its own position on each topic (two stages can read one topic); records every group has read
are dropped, so a long run's memory stays flat.

:class:`LocalHost` runs the stages in topology order, each draining what waits for it batch by
batch (``spec.batching.max_records``), until nothing waits anywhere: a deterministic order on media
time for one session. The policy per record is the Kafka host's: decode, retries
(``SH_KAFKA_HANDLER_RETRIES``), ``give_up`` then a dead letter. A failing ``end_batch`` redelivers
the batch, as Kafka's seek-back does; locally there is no one to wait for, so after ``attempts``
deliveries the error is raised to the caller instead of waiting for the dependency for ever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from streamharness import topics, topology
from streamharness.keys import key_str
from streamharness.records import (
    ConsumedEvent,
    Headers,
    dead_letter_event,
    dead_letter_record,
    message_headers,
    process_record,
    sending,
)
from streamharness.settings import KafkaSettings
from streamharness.stage import Stage, StageContext, StageSpec
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalRecord:
    """A record as Kafka would hand it over (the attributes of kafka-python's ``ConsumerRecord``)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp: int
    sent_monotonic: float = 0.0
    seq: int = 0  # global send order across topics


class _Delivered:
    """What ``send`` returns: already durable (the ``.get(timeout)`` of kafka-python's future)."""

    def __init__(self, topic: str, offset: int) -> None:
        self.topic, self.offset = topic, offset

    def get(self, timeout: float | None = None) -> _Delivered:
        return self


@dataclass
class _Topic:
    records: deque[LocalRecord] = field(default_factory=deque)
    base: int = 0  # offset of records[0]
    next_offset: int = 0


def _key_bytes(key: common_pb2.StreamKey | str | bytes | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return (key_str(key) if isinstance(key, common_pb2.StreamKey) else key).encode()


class LocalBus:
    """In-memory topics with the producer interface stages publish through (``send``/``send_raw``)."""

    def __init__(self, kafka: KafkaSettings | None = None) -> None:
        self.kafka = kafka or KafkaSettings()
        self._topics: dict[str, _Topic] = {}
        self._cursors: dict[tuple[str, str], int] = {}  # (group, full topic) -> next offset
        self._groups: dict[str, set[str]] = {}  # full topic -> groups that read it
        self._seq = 0
        self._lock = threading.Lock()
        # Compacted topics (topics.CONFIGS) are tables here: the latest value per key, nothing else.
        self._compacted = {self.kafka.topic(t) for t, c in topics.CONFIGS.items() if c.get("cleanup.policy") == "compact"}
        self._tables: dict[str, dict[bytes, bytes]] = {}

    @property
    def dead_letter_topic(self) -> str:
        return self.kafka.topic(self.kafka.dead_letter_topic)

    # -- producing -----------------------------------------------------------------------------
    def send(self, topic: str, key: common_pb2.StreamKey | str, message: Message, headers: Headers | None = None) -> _Delivered:
        """``message`` on the logical ``topic``, serialised with the type and trace headers (in a
        PRODUCER span, as on Kafka)."""
        full, raw_key = self.kafka.topic(topic), _key_bytes(key)
        with sending(full, raw_key.decode() if raw_key else None):
            return self.send_raw(full, raw_key, message.SerializeToString(), message_headers(message, headers))

    def send_raw(self, full_topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> _Delivered:
        """Bytes as they are to a full topic name (dead letters; tests that send malformed records)."""
        with self._lock:
            if full_topic in self._compacted:
                table = self._tables.setdefault(full_topic, {})
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
                return _Delivered(full_topic, -1)
            t = self._topics.setdefault(full_topic, _Topic())
            self._seq += 1
            record = LocalRecord(full_topic, 0, t.next_offset, key, value, tuple(headers), int(time.time() * 1000),
                                 time.monotonic(), self._seq)
            t.records.append(record)
            t.next_offset += 1
            self._trim(full_topic)
            return _Delivered(full_topic, record.offset)

    def table(self, topic: str) -> dict[bytes, bytes]:
        """The latest value per key of the compacted logical ``topic``."""
        with self._lock:
            return dict(self._tables.get(self.kafka.topic(topic), {}))

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass

    # -- consuming -----------------------------------------------------------------------------
    def subscribe(self, group: str, full_topics: list[str]) -> None:
        """``group`` reads ``full_topics`` from their start (what was sent before it joined too)."""
        with self._lock:
            for topic in full_topics:
                self._groups.setdefault(topic, set()).add(group)
                t = self._topics.setdefault(topic, _Topic())
                self._cursors.setdefault((group, topic), t.base)

    def poll(self, group: str, full_topics: list[str], max_records: int) -> list[LocalRecord]:
        """Up to ``max_records`` records of ``full_topics`` not yet read by ``group``, in send order."""
        with self._lock:
            waiting: list[LocalRecord] = []
            for topic in full_topics:
                t = self._topics.get(topic)
                if t is None:
                    continue
                start = self._cursors.get((group, topic), t.base) - t.base
                for i in range(max(0, start), min(len(t.records), max(0, start) + max_records)):
                    waiting.append(t.records[i])
            waiting.sort(key=lambda r: r.seq)
            batch = waiting[:max_records]
            for record in batch:
                self._cursors[(group, record.topic)] = record.offset + 1
            for topic in {r.topic for r in batch}:
                self._trim(topic)
            return batch

    def rewind(self, group: str, records: list[LocalRecord]) -> None:
        """Deliver ``records`` to ``group`` again (a batch whose flush failed). Only what was not trimmed."""
        with self._lock:
            for record in records:
                key = (group, record.topic)
                self._cursors[key] = min(self._cursors.get(key, record.offset), record.offset)

    def pending(self, group: str, full_topics: list[str]) -> int:
        with self._lock:
            total = 0
            for topic in full_topics:
                t = self._topics.get(topic)
                if t is not None:
                    total += t.next_offset - self._cursors.get((group, topic), t.base)
            return total

    def take(self, topic: str, group: str = "reader") -> list[LocalRecord]:
        """Every record of the logical ``topic`` that ``group`` has not read, in order."""
        full = self.kafka.topic(topic)
        self.subscribe(group, [full])
        return self.poll(group, [full], 1 << 30)

    def records(self, full_topic: str) -> list[LocalRecord]:
        """What ``full_topic`` still holds (records some group has not read yet; all of an unread topic)."""
        with self._lock:
            t = self._topics.get(full_topic)
            return list(t.records) if t else []

    @property
    def dead_letters(self) -> list[LocalRecord]:
        """Every dead letter (nobody consumes that topic locally, so none is ever dropped)."""
        return self.records(self.dead_letter_topic)

    def _trim(self, topic: str) -> None:
        """Drop records every reading group has passed (called with the lock held)."""
        groups = self._groups.get(topic)
        t = self._topics[topic]
        if not groups:
            return  # nobody reads it (yet): keep, a later subscriber starts from the beginning
        low = min(self._cursors.get((g, topic), t.base) for g in groups)
        while t.records and t.base < low:
            t.records.popleft()
            t.base += 1


class LocalOutbox:
    """A stage's outbox on the local bus: sends, and dead letters with the Kafka host's headers."""

    def __init__(self, bus: LocalBus, group: str) -> None:
        self._bus = bus
        self._group = group

    def send(self, topic: str, key: Any, message: Message, headers: Headers | None = None) -> _Delivered:
        return self._bus.send(topic, key, message, headers)

    def delete(self, topic: str, key: Any) -> _Delivered:
        return self._bus.send_raw(self._bus.kafka.topic(topic), _key_bytes(key), None, [])

    def dead_letter(self, event: ConsumedEvent[Any], reason: str, error: BaseException) -> None:
        dead_letter_event(self._bus.send_raw, self._bus.dead_letter_topic, event, reason, error, self._group)
        meters.records_dead_lettered().add(1, {"topic": event.topic, "reason": reason})


@dataclass
class _Hosted:
    stage: Stage
    spec: StageSpec
    group: str
    topics: list[str]
    processed: int = 0
    dead_lettered: int = 0


class LocalHost:
    """Stages in one process over a :class:`LocalBus`. ``add`` each stage, then ``run_until_idle``."""

    def __init__(self, kafka: KafkaSettings | None = None, bus: LocalBus | None = None) -> None:
        self.kafka = kafka or KafkaSettings()
        self.bus = bus or LocalBus(self.kafka)
        self._hosted: dict[str, _Hosted] = {}
        self._stop = threading.Event()

    def add(self, stage: Stage, spec: StageSpec | str | None = None) -> Stage:
        """Open ``stage`` under its topology row (``spec``: the row, or its name; default: the stage's
        ``name`` attribute) and subscribe its group; returns the stage."""
        if spec is None or isinstance(spec, str):
            spec = topology.stage_spec(spec or getattr(stage, "name"))
        spec = stage.configure(spec)
        group = self.kafka.topic(spec.group or spec.name)
        full = [self.kafka.topic(t) for t in spec.consumes]
        stage.open(StageContext(outbox=LocalOutbox(self.bus, group), attempts=self.kafka.handler_retries,
                                stopping=self._stop, topic_prefix=self.kafka.topic_prefix,
                                read_table=lambda topic, partitions=None: {0: self.bus.table(topic)},
                                read_back=self._read_back))
        if full:
            self.bus.subscribe(group, full)
            stage.assigned({t: {0} for t in spec.consumes})  # one partition of each, for good
        stage.start()
        self._hosted[spec.name] = _Hosted(stage, spec, group, full)
        return stage

    def _read_back(self, topic: str, key: Any, since_unix_ms: int, timeout_s: float) -> list[bytes]:
        raw = _key_bytes(key)
        return [r.value for r in self.bus.records(self.kafka.topic(topic))
                if r.key == raw and r.timestamp >= since_unix_ms and r.value is not None]

    def stage(self, name: str) -> Stage:
        return self._hosted[name].stage

    def healthy(self) -> bool:
        return all(h.stage.healthy() for h in self._hosted.values())

    def counts(self, name: str) -> tuple[int, int]:
        """(records processed, records dead-lettered) by stage ``name``."""
        h = self._hosted[name]
        return h.processed, h.dead_lettered

    # -- running -------------------------------------------------------------------------------
    def run_until_idle(self, max_rounds: int = 1_000_000) -> int:
        """Deliver until no stage has anything waiting; returns how many records were delivered."""
        order = [n for n in topology.TOPOLOGY if n in self._hosted] + [n for n in self._hosted if n not in topology.TOPOLOGY]
        delivered = 0
        for _ in range(max_rounds):
            moved = 0
            for name in order:
                h = self._hosted[name]
                if not h.topics:
                    continue
                while True:
                    n = self._run_batch(h)
                    if not n:
                        break
                    moved += n
            delivered += moved
            if not moved:
                return delivered
        raise RuntimeError(f"the local pipeline did not settle after {max_rounds} rounds (a stage feeding itself?)")

    def _run_batch(self, h: _Hosted) -> int:
        records = self.bus.poll(h.group, h.topics, h.spec.batching.max_records)
        if not records:
            return 0
        types = {self.kafka.topic(t): cls for t, cls in h.spec.consumes.items()}
        attempts = max(1, self.kafka.handler_retries)

        def dead_letter(record, headers, reason, detail) -> None:
            dead_letter_record(self.bus.send_raw, self.bus.dead_letter_topic, record, headers, reason, detail, h.group)
            h.dead_lettered += 1

        for delivery in range(1, attempts + 1):
            for record in records:
                event = process_record(record, types, h.stage.handle, attempts=self.kafka.handler_retries,
                                       group=h.group, dead_letter=dead_letter, on_give_up=h.stage.give_up,
                                       stage=h.spec.name)
                if event is not None:
                    h.processed += 1
            try:
                h.stage.end_batch()
                return len(records)
            except Exception:
                if delivery >= attempts:
                    raise
                log.exception("%s: batch flush failed; redelivering the batch (%d of %d)", h.spec.name, delivery, attempts)
        return len(records)  # pragma: no cover - the loop returns or raises

    def close(self, timeout_s: float = 10.0) -> None:
        """Close every stage (the last added first)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for h in reversed(list(self._hosted.values())):
            try:
                h.stage.close(deadline)
            except Exception:  # noqa: BLE001 - closing what is left matters more
                log.exception("closing %s", h.spec.name)
        self._hosted.clear()
