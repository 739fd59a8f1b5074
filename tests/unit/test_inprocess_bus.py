"""The in-process pipeline's bus: Kafka's producer interface, records as the wire carries them."""

from __future__ import annotations

from streamharness import topics
from streamharness.inprocess import LocalBus, image_encoding
from streamharness.keys import make_key
from streamharness.settings import KafkaSettings
from streamharness.v1 import common_pb2, events_pb2


def test_records_are_copies_in_order_with_offsets_per_topic():
    bus = LocalBus(KafkaSettings(topic_prefix="t1."))
    key = make_key("acme", "cam")
    first = events_pb2.FrameEvent(key=key, media_ts_ms=0, seq=1, jpeg=b"a")
    assert bus.send(topics.FRAMES, key, first).get(timeout=1).offset == 0
    bus.send(topics.FRAMES, "acme/cam", events_pb2.FrameEvent(key=key, media_ts_ms=1000, seq=2, jpeg=b"b"))
    bus.send(topics.QUERIES, key, events_pb2.QueryEvent(key=key, kind=events_pb2.QueryEvent.KIND_SESSION_START))
    first.seq = 99  # what was sent is what the wire carried then, not the caller's object
    assert bus.pending(topics.FRAMES) == 2
    frames = bus.take(topics.FRAMES)
    assert [(e.offset, e.message.seq, e.key, e.topic) for e in frames] == [(0, 1, "acme/cam", "t1.frames"), (1, 2, "acme/cam", "t1.frames")]
    assert bus.pending(topics.FRAMES) == 0 and bus.take(topics.FRAMES) == []
    [(query, sent)] = bus.take_timed(topics.QUERIES)
    assert query.offset == 0 and query.message.kind == events_pb2.QueryEvent.KIND_SESSION_START and sent > 0


def test_dead_letters_are_kept():
    bus = LocalBus()
    bus.send_raw("dead-letter", b"acme/cam", b"\x00", [("sh-dlq-reason", b"handler-failed")])
    assert [(d.topic, d.key, d.headers) for d in bus.dead_letters] == [("dead-letter", b"acme/cam", [("sh-dlq-reason", b"handler-failed")])]


def test_image_encoding_follows_the_bytes():
    assert image_encoding(b"\x89PNG\r\n\x1a\n....") == common_pb2.IMAGE_ENCODING_PNG
    assert image_encoding(b"\xff\xd8\xff\xe0") == common_pb2.IMAGE_ENCODING_JPEG
