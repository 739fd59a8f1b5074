"""Kafka producer and consumer used by every service (kafka-python).

Conventions they enforce (docs/architecture.md):

- every record is keyed by ``tenant/stream``, so one stream's events stay ordered in one partition;
- the value is one protobuf message; header ``sh-type`` names its full type, and the W3C trace
  context of the sender travels in the headers (``traceparent``, ``tracestate``, ``baggage``);
- topic names passed in here are *logical* (``"frames"``); ``KafkaSettings.topic()`` adds the
  environment prefix. Consumer group ids get the same prefix, so two environments sharing a cluster
  never share a group;
- a consumer commits offsets only after the handler's effect is done, synchronously, once per
  polled batch; a record that cannot be decoded or processed goes to the dead-letter topic (sent
  synchronously before its offset is committed) and the consumer goes on. What happens to one record
  (decode, retries, dead letter) is :mod:`streamharness.records`, shared with the local host.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

from streamharness import topics
from streamharness.errors import SettingsError
from streamharness.keys import key_str, parse_key
from streamharness.records import (  # noqa: F401 - re-exported: the record vocabulary of both hosts
    DLQ_ERROR,
    DLQ_GROUP,
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TOPIC,
    TYPE_HEADER,
    ConsumedEvent,
    Headers,
    dead_letter_headers,
    dead_letter_record,
    message_headers,
    process_record,
    sending,
)
from streamharness.settings import KafkaSettings
from streamharness.v1.common_pb2 import StreamKey

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

_MIB = 1024 * 1024


def client_config(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by producers, consumers and admin clients."""
    cfg: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_list,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol.startswith("SASL_"):
        if not settings.sasl_mechanism or not settings.sasl_username or settings.sasl_password is None:
            raise SettingsError(
                f"SH_KAFKA_SECURITY_PROTOCOL={settings.security_protocol} needs SH_KAFKA_SASL_MECHANISM, "
                "SH_KAFKA_SASL_USERNAME and SH_KAFKA_SASL_PASSWORD"
            )
        cfg.update(
            sasl_mechanism=settings.sasl_mechanism,
            sasl_plain_username=settings.sasl_username,
            sasl_plain_password=settings.sasl_password.get_secret_value(),
        )
    return cfg


def ensure_topics(
    settings: KafkaSettings,
    names: Iterable[str],
    partitions: int | None = None,
    *,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the missing topics among ``names`` (logical names; the prefix is applied here) and the
    dead-letter topic. Idempotent: existing topics are left as they are (partitions are never added
    to an existing topic, since that would move keys to other partitions and break per-stream order).

    Returns the full names of the topics this call created.
    """
    wanted = {settings.topic(n): n for n in [*names, settings.dead_letter_topic]}
    count = partitions or settings.partitions
    admin = KafkaAdminClient(**client_config(settings), client_id="streamharness-admin",
                             request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        created: list[str] = []
        if missing:
            spec = {t: {"num_partitions": count, "replication_factor": settings.replication_factor,
                        "configs": dict(topics.CONFIGS.get(wanted[t], {}))} for t in missing}
            result = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for topic in result["topics"]:
                code = topic["error_code"]
                if code == 0:
                    created.append(topic["name"])
                elif code != TopicAlreadyExistsError.errno:  # created meanwhile by another replica: fine
                    raise KafkaError(f"cannot create topic {topic['name']!r}: error {code} {topic.get('error_message') or ''}")
            # The create response comes before the partitions have leaders; wait so that the first
            # produce does not fail.
            admin.wait_for_topics(missing, timeout_ms=int(timeout_s * 1000))
            log.info("created Kafka topics %s with %d partitions", created, count)
        present = [t for t in wanted if t in existing]
        for desc in admin.describe_topics(present) if present and partitions else []:
            have = len(desc.get("partitions") or [])
            if have and have != partitions:
                log.warning("topic %s has %d partitions, not %d; left as it is", desc["name"], have, partitions)
        return created
    finally:
        admin.close()


def _key_bytes(key: StreamKey | str) -> bytes:
    if isinstance(key, StreamKey):
        return key_str(key).encode()
    return key_str(parse_key(key)).encode()  # validates "tenant/stream"


class EventProducer:
    """Sends protobuf events keyed by stream, with trace context and type in the headers."""

    def __init__(self, settings: KafkaSettings, client_id: str, **overrides: Any) -> None:
        self._settings = settings
        config: dict[str, Any] = {
            **client_config(settings),
            "client_id": client_id,
            # kafka-python 3 defaults, made explicit: no record is lost or duplicated by retries.
            "acks": "all",
            "enable_idempotence": True,
            "max_request_size": settings.max_request_bytes,
            # A few ms of batching helps throughput without hurting sub-second latency.
            "linger_ms": 5,
        }
        config.update(overrides)
        self._producer = KafkaProducer(**config)

    def send(
        self,
        topic: str,
        key: StreamKey | str,
        message: Message,
        headers: Headers | None = None,
    ) -> FutureRecordMetadata:
        """Send ``message`` to the logical ``topic``; returns kafka-python's future (``.get(timeout)``)."""
        full = self._settings.topic(topic)
        raw_key = _key_bytes(key)
        with sending(full, raw_key.decode()):
            all_headers = message_headers(message, headers)
            return self._producer.send(full, key=raw_key, value=message.SerializeToString(), headers=all_headers)

    def send_raw(self, full_topic: str, key: bytes | None, value: bytes | None, headers: Headers) -> FutureRecordMetadata:
        """Send bytes as they are to a full (already prefixed) topic name: dead letters, replays."""
        return self._producer.send(full_topic, key=key, value=value, headers=headers)

    def connected(self) -> bool:
        """True once the producer holds cluster metadata from a live broker (readiness probes).
        kafka-python 3 keeps no bootstrap connection open, so ``bootstrap_connected()`` is no use."""
        return bool(self._producer._metadata.brokers())  # noqa: SLF001 - no public accessor

    def fetch_metadata(self, topic: str) -> None:
        """Block until the broker answered with ``topic``'s partitions (raises KafkaTimeoutError)."""
        self._producer.partitions_for(self._settings.topic(topic))

    def flush(self, timeout: float | None = None) -> None:
        self._producer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        self._producer.close(timeout=timeout)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventConsumer(Generic[M]):
    """A consumer-group member that decodes ``message_type`` records and calls ``handler`` on each.

    Use from one thread: ``run(stop)`` polls until ``stop`` (or ``self.stop()``) is set, then commits
    what it processed and closes. Handler exceptions are retried (``settings.handler_retries``
    attempts in all; ``InvalidInput`` is not retried), then the record is dead-lettered. Delivery is
    at least once: a crash between the handler's effect and the commit redelivers the record, so
    handlers must be idempotent (deterministic ids for what they write).
    """

    def __init__(
        self,
        settings: KafkaSettings,
        group_id: str,
        topics: Sequence[str],
        message_type: type[M] | Mapping[str, type[Message]],
        handler: Callable[[ConsumedEvent[M]], None],
        *,
        auto_offset_reset: str = "earliest",
        client_id: str | None = None,
        on_processed: Callable[[ConsumedEvent[M]], None] | None = None,
        on_batch_end: Callable[[], None] | None = None,
        on_give_up: Callable[[ConsumedEvent[M], BaseException], None] | None = None,
        on_assigned: Callable[[dict[str, set[int]]], None] | None = None,
        on_revoked: Callable[[dict[str, set[int]]], None] | None = None,
        stage: str = "",
        **overrides: Any,
    ) -> None:
        """``message_type`` is one type for all ``topics``, or a mapping of logical topic name to
        type when one consumer reads co-partitioned topics of different payloads (the decision
        service reads queries and embeddings of the same streams in one group). ``on_batch_end``
        runs after each polled batch is handed to the handler and before its offsets are
        committed: a handler that accumulates (micro-batching) flushes there. ``on_give_up(event,
        error)`` runs when a handler failed for the last time, just before the dead letter.
        ``on_assigned`` / ``on_revoked`` get ``{logical topic: partitions}`` when a rebalance gives
        this member partitions or takes them away (inside ``poll``, on the polling thread, before
        any record of an assigned partition is handed over): a stage restores or drops the state
        of those partitions' streams there. ``stage``: the name of the stage it feeds (spans and
        meters: :func:`~streamharness.records.process_record`)."""
        self._settings = settings
        self._stage = stage
        self.group_id = settings.topic(group_id)
        self.topics = [settings.topic(t) for t in topics]
        if isinstance(message_type, Mapping):
            missing = set(topics) - set(message_type)
            if missing:
                raise ValueError(f"no message type for topics {sorted(missing)}")
            self._types = {settings.topic(t): message_type[t] for t in topics}
        else:
            self._types = {t: message_type for t in self.topics}
        self.message_type = message_type
        self._on_batch_end = on_batch_end
        self._handler = handler
        self._on_processed = on_processed
        self._on_give_up = on_give_up
        self._client_id = client_id or f"{group_id}-consumer"
        self._dlq_topic = settings.topic(settings.dead_letter_topic)
        self._dlq_producer: EventProducer | None = None
        self._stop = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._pending: dict[TopicPartition, OffsetAndMetadata] = {}
        self.processed = 0
        self.dead_lettered = 0
        config: dict[str, Any] = {
            **client_config(settings),
            "group_id": self.group_id,
            "client_id": self._client_id,
            # Offsets are committed by us, after the handler's effect is done (see _commit).
            "enable_auto_commit": False,
            # 'earliest' on purpose: a consumer group that is new (first deploy, a new service, a
            # renamed group) must not skip the events produced before it joined; 'latest' would
            # silently drop them. Committed offsets win over this once the group has any.
            "auto_offset_reset": auto_offset_reset,
            # The range assignor, set here rather than left to the client's default list: it gives one
            # member the same partition numbers of every topic it subscribes to, which is what makes
            # co-partitioned topics (the decision stage's queries + embeddings, keyed alike with equal
            # partition counts) arrive at one member per stream.
            "partition_assignment_strategy": (RangePartitionAssignor,),
            "max_poll_records": settings.consumer_max_records,
            # A killed member's partitions move after this long (Kafka's default is 45 s).
            "session_timeout_ms": settings.session_timeout_ms,
            "heartbeat_interval_ms": settings.heartbeat_interval_ms,
            # Frames are up to max_request_bytes: one record must fit into one partition fetch.
            "max_partition_fetch_bytes": max(_MIB, settings.max_request_bytes),
            "fetch_max_bytes": max(50 * _MIB, 2 * settings.max_request_bytes),
        }
        config.update(overrides)
        self._consumer = KafkaConsumer(**config)
        self._logical = {settings.topic(t): t for t in topics}
        self._on_assigned, self._on_revoked = on_assigned, on_revoked
        self._consumer.subscribe(self.topics, listener=_Listener(self))

    # -- loop --------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Poll, process, commit, until ``stop`` or ``self.stop()``; then commit and close. The
        broker away (a ``KafkaError`` out of a poll or a commit: a restart, a network cut) is
        waited out with a growing pause, never the end of the consumer: what was processed and not
        committed is redelivered, at least once."""
        pause, away_since = 0.5, None
        try:
            while not self._stopping(stop):
                try:
                    self.poll_once(stop)
                except KafkaError as err:
                    if away_since is None:
                        away_since = time.monotonic()
                        log.warning("%s: Kafka is unavailable (%s: %s); retrying until it is back", self.group_id,
                                    type(err).__name__, err)
                    self._stop.wait(pause)  # stop() (the host calls it at shutdown) ends the wait
                    pause = min(5.0, pause * 2)
                    continue
                if away_since is not None:
                    log.info("%s: Kafka is back after %.1f s", self.group_id, time.monotonic() - away_since)
                    pause, away_since = 0.5, None
        finally:
            self.close()

    def poll_once(self, stop: threading.Event | None = None) -> int:
        """One poll → process each record → commit. Returns how many records were polled."""
        batch = self._consumer.poll(
            timeout_ms=self._settings.consumer_poll_timeout_ms,
            max_records=self._settings.consumer_max_records,
        )
        _resume_abandoned_join(self._consumer)
        polled = 0
        for records in batch.values():
            for record in records:
                # Stop between records, not inside one: what was processed gets committed, the rest
                # of the batch is redelivered to whoever owns the partition next.
                if self._stopping(stop):
                    break
                polled += 1
                self._process(record)
        if self._on_batch_end is not None and polled:
            try:
                self._on_batch_end()
            except Exception:  # noqa: BLE001 - the batch is redelivered, not lost
                log.exception("batch flush failed; the batch will be redelivered")
                self._pending.clear()
                for tp, records in batch.items():
                    if records:
                        self._consumer.seek(tp, records[0].offset)
                return polled
        self._commit()
        return polled

    def assigned(self) -> bool:
        """True once this member holds partitions (a group with more members than partitions
        leaves some idle; a fresh one holds none until its first join completes)."""
        return bool(self._consumer.assignment())

    def assigned_topics(self) -> set[str]:
        """Full names of the topics this member holds partitions of."""
        return {tp.topic for tp in self._consumer.assignment()}

    def _stopping(self, stop: threading.Event | None) -> bool:
        return self._stop.is_set() or (stop is not None and stop.is_set())

    def _process(self, record: Any) -> None:
        event = process_record(
            record, self._types, self._handler, attempts=self._settings.handler_retries, group=self.group_id,
            dead_letter=self._dead_letter, on_give_up=self._on_give_up, stage=self._stage,
        )
        if event is not None:
            self.processed += 1
            if self._on_processed is not None:
                self._on_processed(event)
        self._pending[TopicPartition(record.topic, record.partition)] = OffsetAndMetadata(record.offset + 1, "", -1)

    def _dead_letter(self, record: Any, headers: tuple[tuple[str, bytes], ...], reason: str, detail: str) -> None:
        if self._dlq_producer is None:
            self._dlq_producer = EventProducer(self._settings, f"{self._client_id}-dlq")
        # Synchronous: the dead letter must be durable before the source offset is committed. If
        # this raises, nothing is committed and the record comes back after a restart.
        dead_letter_record(self._dlq_producer.send_raw, self._dlq_topic, record, headers, reason, detail,
                           self.group_id).get(timeout=30)
        self.dead_lettered += 1

    def _commit(self) -> None:
        if not self._pending:
            return
        offsets, self._pending = self._pending, {}
        try:
            self._consumer.commit(offsets)
        except CommitFailedError as err:
            # The group rebalanced while we processed: another member gets these records again
            # (at least once; handlers are idempotent).
            log.warning("offset commit failed after a rebalance, records will be redelivered: %s", err)

    # -- shutdown ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask ``run`` to finish after the current record (safe from any thread or signal handler)."""
        self._stop.set()

    def close(self) -> None:
        """Commit what was processed and close (call from the thread that polls, or after ``run``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        try:
            self._commit()
        finally:
            self._consumer.close(autocommit=False)
            if self._dlq_producer is not None:
                self._dlq_producer.close(timeout=10)

    def __enter__(self) -> EventConsumer[M]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Listener(ConsumerRebalanceListener):
    """Hands a rebalance to the consumer's ``on_assigned`` / ``on_revoked`` (logical topic names)."""

    def __init__(self, owner: EventConsumer[Any]) -> None:
        self._owner = owner

    def _by_topic(self, partitions: Iterable[TopicPartition]) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for tp in partitions:
            out.setdefault(self._owner._logical.get(tp.topic, tp.topic), set()).add(tp.partition)  # noqa: SLF001
        return out

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        owner = self._owner
        # What was processed is committed before the partitions go (their next owner starts there).
        owner._commit()  # noqa: SLF001
        if owner._on_revoked is not None and revoked:  # noqa: SLF001
            owner._on_revoked(self._by_topic(revoked))  # noqa: SLF001

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        owner = self._owner
        if owner._on_assigned is not None and assigned:  # noqa: SLF001
            owner._on_assigned(self._by_topic(assigned))  # noqa: SLF001


def _reader(settings: KafkaSettings, full: str, client_id: str, deadline: float) -> tuple[KafkaConsumer, list[int]]:
    """A group-less consumer (assigned by hand, nothing committed) and ``full``'s partitions, sorted
    (``KafkaTimeoutError`` when the broker names none before ``deadline``; the caller closes it)."""
    from kafka.errors import KafkaTimeoutError

    consumer = KafkaConsumer(**client_config(settings), client_id=client_id, enable_auto_commit=False,
                             group_id=None, max_partition_fetch_bytes=max(_MIB, settings.max_request_bytes))
    known = consumer.partitions_for_topic(full)
    while not known and time.monotonic() < deadline:
        time.sleep(0.1)
        known = consumer.partitions_for_topic(full)
    if not known:
        consumer.close(autocommit=False)
        raise KafkaTimeoutError(f"no metadata for topic {full} in time")
    return consumer, sorted(known)


def read_table(settings: KafkaSettings, topic: str, partitions: Iterable[int] | None = None,
               *, timeout_s: float = 30.0) -> dict[int, dict[bytes, bytes]]:
    """``{partition: {key: latest value}}`` of the (compacted) logical ``topic`` on ``partitions``
    (None: all), read from the start up to the end offsets of the moment of the call; a key whose
    latest record is a tombstone (no value) is left out. Raises ``KafkaError`` when it cannot finish
    within ``timeout_s``."""

    from kafka.errors import KafkaTimeoutError

    full = settings.topic(topic)
    deadline = time.monotonic() + timeout_s
    consumer, known = _reader(settings, full, f"table-{topic}", deadline)
    try:
        wanted = [TopicPartition(full, p) for p in sorted(known if partitions is None else set(partitions) & set(known))]
        table: dict[int, dict[bytes, bytes]] = {tp.partition: {} for tp in wanted}
        if not wanted:
            return table
        consumer.assign(wanted)
        consumer.seek_to_beginning(*wanted)
        end = consumer.end_offsets(wanted)
        left = {tp for tp in wanted if end[tp] > consumer.position(tp)}
        while left:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"topic {full} not read to its end within {timeout_s:g} s")
            for tp, records in consumer.poll(timeout_ms=200).items():
                for r in records:
                    if r.offset >= end[tp]:
                        continue
                    if r.value is None:
                        table[tp.partition].pop(r.key, None)
                    else:
                        table[tp.partition][r.key] = r.value
            left = {tp for tp in left if consumer.position(tp) < end[tp]}
        return table
    finally:
        consumer.close(autocommit=False)


def read_key_since(settings: KafkaSettings, topic: str, key: StreamKey | str, since_unix_ms: int,
                   *, timeout_s: float = 10.0) -> list[bytes]:
    """The values of ``key``'s records on the logical ``topic`` written since ``since_unix_ms``
    (broker timestamps), in order, up to the end offset of the moment of the call. Only the key's
    own partition is read (the producers' default partitioner: murmur2 of the key)."""

    from kafka.errors import KafkaTimeoutError
    from kafka.partitioner.default import murmur2

    full, raw_key = settings.topic(topic), _key_bytes(key)
    deadline = time.monotonic() + timeout_s
    consumer, ordered = _reader(settings, full, f"replay-{topic}", deadline)
    try:
        # The producers' DefaultPartitioner: murmur2 of the key over the sorted partitions.
        tp = TopicPartition(full, ordered[(murmur2(raw_key) & 0x7FFFFFFF) % len(ordered)])
        consumer.assign([tp])
        end = consumer.end_offsets([tp])[tp]
        found = consumer.offsets_for_times({tp: max(0, since_unix_ms)}).get(tp)
        if found is None:
            return []  # nothing written since then
        consumer.seek(tp, found.offset)
        out: list[bytes] = []
        while consumer.position(tp) < end:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"topic {full} not read to its end within {timeout_s:g} s")
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(r.value for r in records if r.offset < end and r.key == raw_key and r.value is not None)
        return out
    finally:
        consumer.close(autocommit=False)


def _resume_abandoned_join(consumer: KafkaConsumer) -> None:
    """Work around a kafka-python 3.0.12 race that leaves a group member with no partitions forever.

    When a rebalance is started by a metadata change (typically: the consumer's first join happened
    before it had the topic's metadata, so it joins again), ``need_rejoin()`` is true only until the
    leader computes the new assignment. If ``poll()``'s timeout ends while that join/sync round trip
    is in flight, the finished join is never collected: ``need_rejoin()`` is now false, the
    assignment is never applied, heartbeats stay disabled, and the member holds nothing. With a
    10 ms poll timeout this hit 17 of 30 fresh consumers on a local broker. Asking for a rejoin when
    a join finished uncollected makes the next ``poll()`` join again and apply the result.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    task = getattr(coordinator, "_join_task", None)
    if task is None or not getattr(task, "is_done", False):
        return
    if not coordinator.need_rejoin():
        log.info("kafka-python left a finished group join uncollected; rejoining group %s", coordinator.group_id)
        coordinator.request_rejoin()

