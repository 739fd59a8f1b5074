"""EventProducer / EventConsumer / ensure_topics against a real Kafka broker (one per session)."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from streamharness.errors import InvalidInput
from streamharness.kafka import (
    DLQ_ERROR,
    DLQ_GROUP,
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    DLQ_SOURCE_PARTITION,
    DLQ_SOURCE_TOPIC,
    TYPE_HEADER,
    ConsumedEvent,
    EventConsumer,
    EventProducer,
    client_config,
    ensure_topics,
)
from streamharness.keys import make_key
from streamharness.settings import KafkaSettings
from streamharness.v1.events_pb2 import FrameEvent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FRAMES = "frames"
WAIT_S = 60.0


def frame(tenant: str, stream: str, seq: int) -> FrameEvent:
    return FrameEvent(key=make_key(tenant, stream), seq=seq, media_ts_ms=seq * 1000, jpeg=b"\xff\xd8" + bytes(16))


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def running(consumer: EventConsumer) -> Iterator[threading.Event]:
    """Run ``consumer`` in a thread; on exit stop it and wait until it committed and closed."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run(stop)
        except BaseException as err:  # surfaced in the test thread below
            errors.append(err)

    thread = threading.Thread(target=target, name="test-consumer", daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive(), "consumer did not stop within 30 s"
    if errors:
        raise errors[0]


def read_topic(settings: KafkaSettings, logical: str, count: int, timeout_s: float = WAIT_S) -> list:
    """Every record of a topic from the beginning (no group), until ``count`` are there."""
    topic = settings.topic(logical)
    consumer = KafkaConsumer(**client_config(settings), enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        assert parts, f"topic {topic} does not exist"
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list = []
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


def committed_offsets(settings: KafkaSettings, group_id: str) -> dict[TopicPartition, int]:
    admin = KafkaAdminClient(**client_config(settings))
    try:
        offsets = admin.list_group_offsets({settings.topic(group_id): None})[settings.topic(group_id)]
    finally:
        admin.close()
    return {tp: meta.offset for tp, meta in offsets.items()}


def test_records_keep_per_stream_order_key_and_trace_context(kafka_settings: KafkaSettings) -> None:
    ensure_topics(kafka_settings, [FRAMES])
    tracer = TracerProvider().get_tracer("test")  # a recording tracer, so there is a context to carry
    per_key = 25
    with EventProducer(kafka_settings, "test-producer") as producer, tracer.start_as_current_span("ingest") as parent:
        trace_id = parent.get_span_context().trace_id
        for seq in range(per_key):
            producer.send(FRAMES, make_key("acme", "cam-1"), frame("acme", "cam-1", seq))
            producer.send(FRAMES, "acme/cam-2", frame("acme", "cam-2", seq))  # str keys work too
        producer.flush(30)

    got: list[ConsumedEvent[FrameEvent]] = []
    handler_trace_ids: set[int] = set()

    def handle(event: ConsumedEvent[FrameEvent]) -> None:
        handler_trace_ids.add(trace.get_current_span().get_span_context().trace_id)
        got.append(event)

    consumer = EventConsumer(kafka_settings, "order", [FRAMES], FrameEvent, handle)
    with running(consumer):
        wait_until(lambda: len(got) >= 2 * per_key, what=f"{2 * per_key} records")
        time.sleep(0.5)  # anything extra (duplicates) would arrive now
    assert consumer.processed == 2 * per_key and consumer.dead_lettered == 0

    by_key: dict[str, list[int]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for event in got:
        assert event.key == f"{event.message.key.tenant}/{event.message.key.stream_id}"
        by_key[event.key].append(event.message.seq)
        partitions[event.key].add(event.partition)
        assert event.header(TYPE_HEADER) == b"streamharness.v1.FrameEvent"
        traceparent = event.header("traceparent")
        assert traceparent is not None, "no W3C trace context in the headers"
        assert traceparent.decode().split("-")[1] == f"{trace_id:032x}"
    assert dict(by_key) == {"acme/cam-1": list(range(per_key)), "acme/cam-2": list(range(per_key))}
    assert all(len(p) == 1 for p in partitions.values()), f"a stream spread over partitions: {dict(partitions)}"
    # The handler ran inside the producer's trace.
    assert handler_trace_ids == {trace_id}

    raw = read_topic(kafka_settings, FRAMES, 2 * per_key)
    assert {r.key for r in raw} == {b"acme/cam-1", b"acme/cam-2"}


def test_committed_offsets_survive_a_consumer_restart(kafka_settings: KafkaSettings) -> None:
    ensure_topics(kafka_settings, [FRAMES])
    streams = [("acme", f"cam-{i}") for i in range(4)]
    first_batch, second_batch, consumed_by_a = 40, 20, 17

    def produce(seqs: range) -> set[tuple[str, int]]:
        sent = set()
        with EventProducer(kafka_settings, "test-producer") as producer:
            for seq in seqs:
                for tenant, stream in streams:
                    producer.send(FRAMES, make_key(tenant, stream), frame(tenant, stream, seq))
                    sent.add((f"{tenant}/{stream}", seq))
            producer.flush(30)
        return sent

    all_sent = produce(range(first_batch // len(streams)))
    a_got: list[tuple[str, int]] = []
    stop_a = threading.Event()

    def handle_a(event: ConsumedEvent[FrameEvent]) -> None:
        a_got.append((event.key, event.message.seq))
        if len(a_got) == consumed_by_a:
            stop_a.set()  # the consumer stops before the next record, and commits what it did

    consumer_a = EventConsumer(kafka_settings, "restart", [FRAMES], FrameEvent, handle_a)
    thread = threading.Thread(target=consumer_a.run, args=(stop_a,), daemon=True)
    thread.start()
    assert stop_a.wait(WAIT_S), f"consumer A got only {len(a_got)} records"
    thread.join(30)
    assert not thread.is_alive()
    assert len(a_got) == consumed_by_a
    assert sum(committed_offsets(kafka_settings, "restart").values()) == consumed_by_a

    all_sent |= produce(range(first_batch // len(streams), (first_batch + second_batch) // len(streams)))
    b_got: list[tuple[str, int]] = []
    consumer_b = EventConsumer(kafka_settings, "restart", [FRAMES], FrameEvent, lambda e: b_got.append((e.key, e.message.seq)))
    expected_b = len(all_sent) - consumed_by_a
    with running(consumer_b):
        wait_until(lambda: len(b_got) >= expected_b, what=f"{expected_b} records in consumer B")
        time.sleep(1.0)  # duplicates, if any, would show up now

    duplicates = [k for k, n in Counter(b_got).items() if n > 1]
    assert not duplicates, f"consumer B got records twice: {duplicates[:5]}"
    assert not set(a_got) & set(b_got), "consumer B re-read records A had committed"
    assert set(a_got) | set(b_got) == all_sent, "records lost across the restart"
    assert len(b_got) == expected_b


def test_malformed_records_are_dead_lettered_and_the_consumer_goes_on(kafka_settings: KafkaSettings) -> None:
    ensure_topics(kafka_settings, [FRAMES], partitions=1)  # one partition: one order for all records
    topic = kafka_settings.topic(FRAMES)
    key = b"acme/cam-1"
    # 0x0f is field 1 with wire type 7, which does not exist: never a valid protobuf.
    undecodable = b"\x0f" + os.urandom(64)
    untyped = os.urandom(64)
    with EventProducer(kafka_settings, "test-producer") as producer:
        producer.send_raw(topic, key, undecodable, [(TYPE_HEADER, b"streamharness.v1.FrameEvent")]).get(30)
        producer.send_raw(topic, key, untyped, []).get(30)
        producer.send_raw(topic, b"not-a-stream-key", frame("acme", "cam-1", 0).SerializeToString(),
                          [(TYPE_HEADER, b"streamharness.v1.FrameEvent")]).get(30)
        producer.send(FRAMES, key.decode(), frame("acme", "cam-1", 7)).get(30)

    got: list[ConsumedEvent[FrameEvent]] = []
    consumer = EventConsumer(kafka_settings, "malformed", [FRAMES], FrameEvent, got.append)
    with running(consumer):
        wait_until(lambda: len(got) == 1 and consumer.dead_lettered == 3, what="1 good record and 3 dead letters")
    assert [e.message.seq for e in got] == [7]
    assert consumer.processed == 1

    dead = read_topic(kafka_settings, kafka_settings.dead_letter_topic, 3)
    headers = [dict(r.headers) for r in dead]
    assert [h[DLQ_REASON] for h in headers] == [b"undecodable", b"missing-type", b"bad-key"]
    assert [r.value for r in dead[:2]] == [undecodable, untyped], "dead letters must keep the original bytes"
    for h, offset in zip(headers, range(3)):
        assert h[DLQ_SOURCE_TOPIC] == topic.encode()
        assert h[DLQ_SOURCE_OFFSET] == str(offset).encode()
        assert h[DLQ_GROUP] == kafka_settings.topic("malformed").encode()
        assert h[DLQ_ERROR]
        assert h[DLQ_SOURCE_PARTITION] == b"0"
    # Past all four records: the malformed ones are not redelivered after a restart.
    assert committed_offsets(kafka_settings, "malformed") == {TopicPartition(topic, 0): 4}


def test_a_failing_handler_is_retried_then_dead_lettered(kafka_settings: KafkaSettings) -> None:
    ensure_topics(kafka_settings, [FRAMES])
    tracer = TracerProvider().get_tracer("test")
    with EventProducer(kafka_settings, "test-producer") as producer, tracer.start_as_current_span("ingest") as parent:
        trace_id = parent.get_span_context().trace_id
        for seq in range(4):
            producer.send(FRAMES, "acme/cam-1", frame("acme", "cam-1", seq))
        producer.flush(30)

    attempts: Counter[int] = Counter()
    done: list[int] = []

    def handle(event: ConsumedEvent[FrameEvent]) -> None:
        seq = event.message.seq
        attempts[seq] += 1
        if seq == 1:
            raise RuntimeError("encoder unavailable")
        if seq == 2:
            raise InvalidInput("frame is 0x0 pixels")  # bad input: retrying cannot help
        done.append(seq)

    consumer = EventConsumer(kafka_settings, "retry", [FRAMES], FrameEvent, handle)
    with running(consumer):
        wait_until(lambda: len(done) == 2 and consumer.dead_lettered == 2, what="2 processed and 2 dead letters")
    assert done == [0, 3]
    assert attempts == {0: 1, 1: kafka_settings.handler_retries, 2: 1, 3: 1}

    dead = read_topic(kafka_settings, kafka_settings.dead_letter_topic, 2)
    assert [FrameEvent.FromString(r.value).seq for r in dead] == [1, 2]
    first = dict(dead[0].headers)
    assert first[DLQ_REASON] == b"handler-failed"
    assert b"encoder unavailable" in first[DLQ_ERROR]
    assert first[DLQ_SOURCE_OFFSET] == b"1"
    assert f"{trace_id:032x}".encode() in first["traceparent"], "dead letters keep the trace context"


def test_ensure_topics_is_idempotent_and_sets_partitions(kafka_settings: KafkaSettings) -> None:
    created = ensure_topics(kafka_settings, ["frames", "decisions"], partitions=4)
    expected = {kafka_settings.topic(n) for n in ("frames", "decisions", kafka_settings.dead_letter_topic)}
    assert set(created) == expected

    assert ensure_topics(kafka_settings, ["frames", "decisions"], partitions=4) == []
    # Never repartitions an existing topic (that would move streams to other partitions).
    assert ensure_topics(kafka_settings, ["frames"], partitions=2) == []

    admin = KafkaAdminClient(**client_config(kafka_settings))
    try:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(sorted(expected))}
        unprefixed = {"frames", "decisions"} & set(admin.list_topics())
    finally:
        admin.close()
    assert described == {name: 4 for name in expected}
    assert not unprefixed, "the topic prefix was not applied"


def test_consumers_with_a_short_poll_timeout_get_their_partitions(kafka_settings: KafkaSettings) -> None:
    """kafka-python 3.0.12 can abandon a finished group join when poll() times out during it; the
    member then holds no partitions forever (see streamharness.kafka._resume_abandoned_join)."""
    settings = kafka_settings.model_copy(update={"consumer_poll_timeout_ms": 10})
    ensure_topics(settings, [FRAMES])
    with EventProducer(settings, "test-producer") as producer:
        for seq in range(3):
            producer.send(FRAMES, "acme/cam-1", frame("acme", "cam-1", seq))
        producer.flush(30)
    for attempt in range(6):
        got: list[ConsumedEvent[FrameEvent]] = []
        consumer = EventConsumer(settings, f"short-poll-{attempt}", [FRAMES], FrameEvent, got.append)
        with running(consumer):
            wait_until(lambda: len(got) == 3, timeout_s=20, what=f"consumer {attempt} to get its records")


def test_a_broker_that_does_not_come_up_fails_with_its_log(tmp_path) -> None:
    from streamharness.devinfra.kafka_broker import KafkaBroker, KafkaBrokerError

    broker = KafkaBroker(tmp_path / "slow", start_timeout_s=0.5, show_progress=False)
    with pytest.raises(KafkaBrokerError, match="did not serve within") as err:
        broker.start()
    assert str(tmp_path / "slow" / "broker.log") in str(err.value)
    assert not broker.is_running(), "a broker that failed to start must not keep running"
