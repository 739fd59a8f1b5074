"""The local host: records as the wire carries them, one position per consumer group, the Kafka
host's retry and dead-letter policy, and batches redelivered when their flush fails."""

from __future__ import annotations

import pytest

from streamharness import topics
from streamharness.errors import InvalidInput
from streamharness.hosts.local import LocalBus, LocalHost
from streamharness.inprocess import image_encoding
from streamharness.keys import make_key
from streamharness.records import DLQ_GROUP, DLQ_REASON, DLQ_SOURCE_OFFSET, DLQ_SOURCE_TOPIC, TYPE_HEADER
from streamharness.settings import KafkaSettings
from streamharness.stage import Batching, Stage, StageSpec
from streamharness.v1 import common_pb2, events_pb2

KEY = make_key("acme", "cam")


def test_records_are_copies_in_order_with_offsets_per_topic():
    bus = LocalBus(KafkaSettings(topic_prefix="t1."))
    first = events_pb2.FrameEvent(key=KEY, media_ts_ms=0, seq=1, jpeg=b"a")
    assert bus.send(topics.FRAMES, KEY, first).get(timeout=1).offset == 0
    bus.send(topics.FRAMES, "acme/cam", events_pb2.FrameEvent(key=KEY, media_ts_ms=1000, seq=2, jpeg=b"b"))
    first.seq = 99  # what was sent is what the wire carried then, not the caller's object
    records = bus.take(topics.FRAMES)
    assert [(r.offset, r.topic, r.key) for r in records] == [(0, "t1.frames", b"acme/cam"), (1, "t1.frames", b"acme/cam")]
    assert [events_pb2.FrameEvent.FromString(r.value).seq for r in records] == [1, 2]
    assert dict(records[0].headers)[TYPE_HEADER] == b"streamharness.v1.FrameEvent"
    assert bus.take(topics.FRAMES) == []


def test_each_group_reads_a_topic_from_its_own_position_and_read_records_are_dropped():
    bus = LocalBus()
    bus.subscribe("a", ["embeddings"])
    bus.subscribe("b", ["embeddings"])
    for ts in (0, 1000, 2000):
        bus.send(topics.EMBEDDINGS, KEY, events_pb2.EncodedFrameEvent(key=KEY, media_ts_ms=ts))
    assert len(bus.poll("a", ["embeddings"], 10)) == 3
    assert len(bus.records("embeddings")) == 3  # b has not read them yet
    assert [r.offset for r in bus.poll("b", ["embeddings"], 2)] == [0, 1]
    assert [r.offset for r in bus.records("embeddings")] == [2]
    assert bus.pending("b", ["embeddings"]) == 1 and bus.pending("a", ["embeddings"]) == 0


class _Recorder(Stage):
    """Consumes frames; fails on the frames it is told to, publishes the rest's seq to embeddings."""

    def __init__(self, fail_seqs=(), invalid_seqs=(), flush_failures=0, batch_reject_seqs=()) -> None:
        self.fail_seqs, self.invalid_seqs = set(fail_seqs), set(invalid_seqs)
        self.batch_reject_seqs = set(batch_reject_seqs)  # fail inside the batch: dead-lettered alone
        self.flush_failures = flush_failures
        self.calls: list[int] = []
        self.given_up: list[tuple[int, str]] = []
        self.batches: list[list[int]] = []
        self._batch: list[int] = []

    def open(self, ctx) -> None:
        self.out = ctx.outbox

    def handle(self, event) -> None:
        seq = event.message.seq
        self.calls.append(seq)
        if seq in self.invalid_seqs:
            raise InvalidInput(f"seq {seq} is bad input")
        if seq in self.fail_seqs:
            raise RuntimeError(f"seq {seq} failed")
        self._batch.append(event)

    def end_batch(self) -> None:
        batch, self._batch = self._batch, []
        if self.flush_failures:
            self.flush_failures -= 1
            raise RuntimeError("flush failed")
        self.batches.append([e.message.seq for e in batch])
        for event in batch:
            seq = event.message.seq
            if seq in self.batch_reject_seqs:
                self.out.dead_letter(event, "handler-failed", ValueError(f"the model rejected seq {seq}"))
                continue
            self.out.send(topics.EMBEDDINGS, KEY, events_pb2.EncodedFrameEvent(key=KEY, seq=seq)).get(timeout=1)

    def give_up(self, event, error) -> None:
        self.given_up.append((event.message.seq, type(error).__name__))


SPEC = StageSpec(name="recorder", factory="tests:none", consumes={topics.FRAMES: events_pb2.FrameEvent},
                 produces=(topics.EMBEDDINGS,), group="recorder", batching=Batching(max_records=2))


def _host(stage: Stage, retries: int = 3) -> LocalHost:
    host = LocalHost(KafkaSettings(handler_retries=retries))
    host.add(stage, SPEC)
    return host


def _frame(seq: int) -> events_pb2.FrameEvent:
    return events_pb2.FrameEvent(key=KEY, seq=seq, media_ts_ms=seq * 1000)


def test_a_failing_handler_is_retried_then_given_up_and_dead_lettered():
    stage = _Recorder(fail_seqs={2}, invalid_seqs={3})
    host = _host(stage, retries=3)
    for seq in (1, 2, 3, 4):
        host.bus.send(topics.FRAMES, KEY, _frame(seq))
    assert host.run_until_idle() == 4
    assert stage.calls == [1, 2, 2, 2, 3, 4]  # 3 attempts at seq 2, bad input not retried
    assert stage.given_up == [(2, "RuntimeError"), (3, "InvalidInput")]
    letters = host.bus.dead_letters
    assert [dict(d.headers)[DLQ_REASON] for d in letters] == [b"handler-failed", b"handler-failed"]
    assert [dict(d.headers)[DLQ_SOURCE_OFFSET] for d in letters] == [b"1", b"2"]
    assert all(dict(d.headers)[DLQ_SOURCE_TOPIC] == b"frames" and dict(d.headers)[DLQ_GROUP] == b"recorder" for d in letters)
    assert [events_pb2.FrameEvent.FromString(d.value).seq for d in letters] == [2, 3]  # the original value
    assert [events_pb2.EncodedFrameEvent.FromString(r.value).seq for r in host.bus.take(topics.EMBEDDINGS)] == [1, 4]
    assert host.counts("recorder") == (2, 2)


def test_a_record_that_fails_inside_a_batch_is_dead_lettered_alone_with_the_same_headers():
    stage = _Recorder(batch_reject_seqs={2})
    host = _host(stage)
    for seq in (1, 2, 3):
        host.bus.send(topics.FRAMES, KEY, _frame(seq))
    host.run_until_idle()
    [letter] = host.bus.dead_letters
    headers = dict(letter.headers)
    assert (headers[DLQ_REASON], headers[DLQ_SOURCE_TOPIC], headers[DLQ_SOURCE_OFFSET], headers[DLQ_GROUP]) == (
        b"handler-failed", b"frames", b"1", b"recorder")
    assert b"the model rejected seq 2" in headers["sh-dlq-error"] and headers[TYPE_HEADER] == b"streamharness.v1.FrameEvent"
    assert events_pb2.FrameEvent.FromString(letter.value).seq == 2
    assert [events_pb2.EncodedFrameEvent.FromString(r.value).seq for r in host.bus.take(topics.EMBEDDINGS)] == [1, 3]


def test_malformed_records_are_dead_lettered_with_their_reason_and_the_rest_go_on():
    stage = _Recorder()
    host = _host(stage)
    host.bus.send_raw("frames", b"acme/cam", b"\x00\x01", [])  # no type header
    host.bus.send_raw("frames", b"acme/cam", b"x", [(TYPE_HEADER, b"streamharness.v1.QueryEvent")])
    host.bus.send_raw("frames", b"no-slash", _frame(7).SerializeToString(), [(TYPE_HEADER, b"streamharness.v1.FrameEvent")])
    host.bus.send(topics.FRAMES, KEY, _frame(8))
    host.run_until_idle()
    assert [dict(d.headers)[DLQ_REASON] for d in host.bus.dead_letters] == [b"missing-type", b"wrong-type", b"bad-key"]
    assert stage.calls == [8]


def test_a_failed_flush_redelivers_the_batch_and_gives_up_after_the_budget():
    stage = _Recorder(flush_failures=1)
    host = _host(stage)
    for seq in (1, 2):
        host.bus.send(topics.FRAMES, KEY, _frame(seq))
    host.run_until_idle()
    assert stage.calls == [1, 2, 1, 2] and stage.batches == [[1, 2]]

    stuck = _Recorder(flush_failures=10)
    host = _host(stuck, retries=2)
    host.bus.send(topics.FRAMES, KEY, _frame(1))
    with pytest.raises(RuntimeError, match="flush failed"):
        host.run_until_idle()
    assert stuck.calls == [1, 1]


def test_batches_follow_the_spec():
    stage = _Recorder()
    host = _host(stage)
    for seq in range(1, 6):
        host.bus.send(topics.FRAMES, KEY, _frame(seq))
    host.run_until_idle()
    assert stage.batches == [[1, 2], [3, 4], [5]]


def test_image_encoding_follows_the_bytes():
    assert image_encoding(b"\x89PNG\r\n\x1a\n....") == common_pb2.IMAGE_ENCODING_PNG
    assert image_encoding(b"\xff\xd8\xff\xe0") == common_pb2.IMAGE_ENCODING_JPEG
