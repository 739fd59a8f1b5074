"""Property-based fuzz (hypothesis, bounded) of the gateway's and ingest's message handling: any
bytes a client or a caller can send end in a message or a clear StreamHarnessError, never in
another exception; ingest answers every frame with a status and publishes only what it decoded."""

from __future__ import annotations

import struct
import threading

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamharness.errors import InvalidInput, StreamHarnessError
from streamharness.grpcutil.wire import invalid_utf8_field, parse
from streamharness.hosts.local import LocalBus
from streamharness.ingest.frames import Resampler
from streamharness.ingest.service import IngestServicer, IngestSettings
from streamharness.keys import make_key
from streamharness.session import SessionMapper
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2, session_pb2

CM = session_pb2.ClientMessage
R = ingest_pb2.IngestFrameResult
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JPEG = cv2.imencode(".jpg", np.full((24, 32, 3), 120, np.uint8))[1].tobytes()
PNG = cv2.imencode(".png", np.full((24, 32, 3), 60, np.uint8))[1].tobytes()


def started() -> SessionMapper:
    mapper = SessionMapper("acme", "s1", max_text_chars=50, max_frame_bytes=4096)
    mapper.start(CM(start=session_pb2.SessionStart(stream_id="cam")))
    return mapper


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_parse_to_a_message_or_an_invalid_input(data):
    try:
        msg = parse(CM, data, "message")
    except InvalidInput as err:
        assert str(err).startswith("message")
        return
    mapper = started()
    kind = msg.WhichOneof("message")
    try:
        if kind == "frame":
            mapper.frame(msg.frame)
        elif kind not in ("end",):
            mapper.query(msg)
    except StreamHarnessError:
        pass


@FUZZ
@given(text=st.text(min_size=1, max_size=30), junk=st.binary(min_size=1, max_size=6))
@example(text="\x07", junk=b"\x00")  # its byte equals the field's length byte: CI found it
def test_a_string_field_that_is_not_utf8_is_named(text, junk):
    msg = CM(question=session_pb2.Question(question_id="q1", text=text))
    raw = msg.SerializeToString()
    encoded = text.encode()
    assert raw.endswith(encoded)  # text is the question's last field, so its bytes end the message
    bad = (b"\xff" + junk[1:])[: len(encoded)]  # 0xff never occurs in UTF-8
    broken = raw[: len(raw) - len(encoded)] + bad + encoded[len(bad):]
    with pytest.raises(InvalidInput, match=r"field question\.(text|question_id) is not valid UTF-8"):
        parse(CM, broken, "message")
    assert invalid_utf8_field(CM.DESCRIPTOR, raw) is None


def _image(data: st.DataObject) -> tuple[bytes, int]:
    kind = data.draw(st.sampled_from(["jpeg", "png", "truncated", "bomb", "random", "mismatch"]))
    if kind == "jpeg":
        return JPEG, common_pb2.IMAGE_ENCODING_JPEG
    if kind == "png":
        return PNG, common_pb2.IMAGE_ENCODING_PNG
    if kind == "truncated":
        return JPEG[: data.draw(st.integers(0, len(JPEG) - 1))], common_pb2.IMAGE_ENCODING_JPEG
    if kind == "bomb":
        raw = bytearray(JPEG)
        sof = raw.index(b"\xff\xc0")
        struct.pack_into(">HH", raw, sof + 5, data.draw(st.integers(1, 65535)), data.draw(st.integers(1, 65535)))
        return bytes(raw), common_pb2.IMAGE_ENCODING_JPEG
    if kind == "mismatch":
        return JPEG, common_pb2.IMAGE_ENCODING_PNG
    return data.draw(st.binary(max_size=300)), data.draw(st.integers(0, 5))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_ingest_answers_every_frame_and_publishes_only_decoded_ones(data):
    bus = LocalBus()
    frames_topic = bus.kafka.topic("frames")
    bus.subscribe("check", [frames_topic])
    opened = threading.Event()
    opened.set()
    servicer = IngestServicer(IngestSettings(max_input_pixels=640 * 480), bus, opened)
    key = make_key("acme", "cam")
    resampler = Resampler(2.0, max_jump_ms=60_000)
    published = 0
    try:
        for seq in range(data.draw(st.integers(1, 8))):
            image, encoding = _image(data)
            ts = data.draw(st.one_of(st.integers(-5, 10_000), st.integers(0, 2**62)))
            req = ingest_pb2.IngestFrameRequest(key=key, session_id="s", media_ts_ms=ts, image=image, encoding=encoding, seq=seq)
            result = servicer.ingest_one(parse(ingest_pb2.IngestFrameRequest, req.SerializeToString(), "request"), key, resampler)
            assert result.status in (R.STATUS_PUBLISHED, R.STATUS_SKIPPED, R.STATUS_REJECTED)
            assert (result.status == R.STATUS_REJECTED) == bool(result.error)
            published += result.status == R.STATUS_PUBLISHED
    finally:
        servicer.close()
    records = bus.poll("check", [frames_topic], 100)
    assert len(records) == published
    for record in records:  # what ingest published is a whole, bounded, decodable frame
        event = events_pb2.FrameEvent.FromString(record.value)
        assert event.width * event.height <= 640 * 480 and cv2.imdecode(np.frombuffer(event.jpeg, np.uint8), cv2.IMREAD_COLOR) is not None
