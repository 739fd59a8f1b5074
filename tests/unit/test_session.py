"""The session mapping the gateway and the local host share: client messages → records, and every
bad message refused with words that say what was wrong."""

from __future__ import annotations

import grpc
import pytest
from streamharness.errors import InvalidInput, StreamHarnessError, TooLarge
from streamharness.session import SessionMapper
from streamharness.v1 import common_pb2, events_pb2, session_pb2

Q = events_pb2.QueryEvent
CM = session_pb2.ClientMessage


def started(**kw) -> SessionMapper:
    mapper = SessionMapper("acme", "s1", max_text_chars=20, max_frame_bytes=10, reply_to="gw-1", **kw)
    mapper.start(CM(start=session_pb2.SessionStart(stream_id="cam", decision_fps=2)))
    return mapper


def test_the_start_names_the_stream_under_the_authenticated_tenant_and_carries_the_instructions():
    mapper = SessionMapper("acme", "s1", reply_to="gw-1")
    query = mapper.start(CM(start=session_pb2.SessionStart(
        stream_id="cam", instructions=[common_pb2.StandingInstruction(instruction_id="p", text="tell me when someone walks in")])))
    assert (query.key.tenant, query.key.stream_id, query.kind, query.decision_fps) == ("acme", "cam", Q.KIND_SESSION_START, 1.0)
    assert query.reply_to == "gw-1" and query.session_id == "s1" and [h.hop for h in query.hops] == ["gateway"]
    assert [i.instruction_id for i in query.instructions] == ["p"]


@pytest.mark.parametrize(("message", "words"), [
    (None, "first message of a session must be SessionStart"),
    (CM(question=session_pb2.Question(question_id="q", text="hi")), "must be SessionStart"),
    (CM(start=session_pb2.SessionStart(stream_id="cam", decision_fps=31)), "decision_fps 31.0 is out of range"),
    (CM(start=session_pb2.SessionStart(stream_id="bad/name")), "stream"),
    (CM(start=session_pb2.SessionStart(stream_id="cam", instructions=[
        common_pb2.StandingInstruction(instruction_id="a", text="x"), common_pb2.StandingInstruction(instruction_id="a", text="y")])),
     "unique, non-empty instruction_id"),
    (CM(start=session_pb2.SessionStart(stream_id="cam", instructions=[common_pb2.StandingInstruction(instruction_id="a", text=" ")])),
     "instruction text is empty"),
])
def test_a_bad_start_is_refused(message, words):
    with pytest.raises(InvalidInput, match=words):
        SessionMapper("acme", "s1").start(message)


def test_frames_become_ingest_requests_with_the_session_rate_and_bad_ones_are_refused():
    mapper = started()
    req = mapper.frame(session_pb2.Frame(media_ts_ms=500, image=b"\xff\xd8ok", seq=3))
    assert (req.key.stream_id, req.session_id, req.media_ts_ms, req.seq, req.decision_fps) == ("cam", "s1", 500, 3, 2.0)
    with pytest.raises(InvalidInput, match="frame seq 4 has no image bytes"):
        mapper.frame(session_pb2.Frame(seq=4))
    with pytest.raises(TooLarge, match=r"frame.image of seq 5 is 11 bytes, above the limit of 10 \(SH_GATEWAY_MAX_FRAME_BYTES\)") as err:
        mapper.frame(session_pb2.Frame(seq=5, image=b"x" * 11))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_questions_and_instruction_changes_become_queries_with_their_acks():
    mapper = started()
    query, ack = mapper.query(CM(question=session_pb2.Question(question_id="q1", text="how many?", media_ts_ms=7000)))
    assert (query.kind, query.question_id, query.text, query.media_ts_ms) == (Q.KIND_QUESTION, "q1", "how many?", 7000)
    assert (ack.ack.kind, ack.ack.media_ts_ms) == (session_pb2.Ack.KIND_QUESTION, 7000)
    query, ack = mapper.query(CM(instruction=session_pb2.InstructionUpdate(
        add=common_pb2.StandingInstruction(instruction_id="i", text="a dog"), media_ts_ms=9000)))
    assert (query.kind, query.instruction_id, ack.ack.kind) == (Q.KIND_INSTRUCTION_ADD, "i", session_pb2.Ack.KIND_INSTRUCTION)
    query, _ = mapper.query(CM(instruction=session_pb2.InstructionUpdate(remove_instruction_id="i", media_ts_ms=9500)))
    assert (query.kind, query.instruction_id, query.media_ts_ms) == (Q.KIND_INSTRUCTION_REMOVE, "i", 9500)
    end = mapper.end(12000)
    assert (end.kind, end.media_ts_ms, end.reply_to) == (Q.KIND_SESSION_END, 12000, "gw-1")


@pytest.mark.parametrize(("message", "words"), [
    (CM(question=session_pb2.Question(question_id="q", text="   ")), "question text is empty"),
    (CM(question=session_pb2.Question(question_id="q", text="x" * 21)), "question.text has 21 characters, above the limit of 20"),
    (CM(question=session_pb2.Question(text="hi")), "question_id is empty"),
    (CM(instruction=session_pb2.InstructionUpdate(media_ts_ms=1)), "neither add nor remove_instruction_id"),
    (CM(instruction=session_pb2.InstructionUpdate(add=common_pb2.StandingInstruction(text="a dog"))), "instruction_id is empty"),
    (CM(start=session_pb2.SessionStart(stream_id="cam")), "SessionStart may be sent only once"),
    (CM(), "empty ClientMessage"),
])
def test_a_bad_message_in_a_session_is_refused(message, words):
    with pytest.raises(StreamHarnessError, match=words):
        started().query(message)


def test_a_pulled_session_names_its_source_once_and_is_checked():
    from streamharness.errors import InvalidInput, TooLarge

    m = SessionMapper("acme", "s1", max_frame_bytes=1024)
    m.start(session_pb2.ClientMessage(start=session_pb2.SessionStart(stream_id="cam", decision_fps=2)))
    req = m.pull(common_pb2.Source(url="rtsp://cam.example/live", rtsp_transport="udp"))
    assert req.source.url == "rtsp://cam.example/live" and req.decision_fps == 2 and req.key.tenant == "acme" and not req.image
    assert m.pull(common_pb2.Source(url="rtsp://cam.example/live"), 5000, resumed=True).media_ts_ms == 5000
    for bad, words in ((common_pb2.Source(), "either url or upload"),
                       (common_pb2.Source(url="rtsp://x/y", upload=True), "either url or upload"),
                       (common_pb2.Source(url="rtsp://x/y", rtsp_transport="http"), "not tcp or udp"),
                       (common_pb2.Source(url="http://x/y.mp4", speed=-1), "out of range")):
        with pytest.raises(InvalidInput, match=words):
            m.pull(bad)
    with pytest.raises(InvalidInput, match="cannot be resumed"):
        m.pull(common_pb2.Source(upload=True), resumed=True)
    chunk = m.video(session_pb2.VideoChunk(data=b"x" * 1024, last=True))
    assert chunk.video == b"x" * 1024 and chunk.video_last and chunk.session_id == "s1"
    with pytest.raises(TooLarge, match="SH_GATEWAY_MAX_FRAME_BYTES"):
        m.video(session_pb2.VideoChunk(data=b"x" * 1025))
    with pytest.raises(InvalidInput, match="no data"):
        m.video(session_pb2.VideoChunk())
