"""The decision stage applies a polled batch in media-time order, whatever order the two topics'
records came in, and holds frames that arrive before their session's start."""

from __future__ import annotations

import numpy as np
import pytest

from streamharness import topics
from streamharness.decision.policy import RulePolicy
from streamharness.decision.service import DecisionSettings, DecisionStage
from streamharness.keys import key_str, make_key
from streamharness.text_encoder import TextEncoder
from streamharness.v1 import common_pb2, events_pb2

KEY = make_key("t", "cam")
Q = events_pb2.QueryEvent


class _Done:
    def get(self, timeout=None):
        return None


class _Captured:
    def __init__(self) -> None:
        self.sent = []
        self.state = {}  # the stream-state changelog, as a table
        self.finished = []  # the sessions' "finished" records
        self.log = []  # decision-log: every decided second (the live view's timeline)

    def send(self, topic, key, message):
        if isinstance(message, events_pb2.StreamStateRecord):
            self.state[key_str(key) if not isinstance(key, str) else key] = message
        elif isinstance(message, events_pb2.ResponseEvent) and message.session_finished:
            self.finished.append(message)
        elif topic == topics.DECISION_LOG:
            self.log.append(message)
        else:
            self.sent.append(message)
        return _Done()

    def delete(self, topic, key):
        self.state.pop(key, None)
        return _Done()


@pytest.fixture(scope="module")
def policy():
    return RulePolicy(TextEncoder().load().encode)


@pytest.fixture
def service(policy):
    svc = DecisionStage(DecisionSettings(), policy=policy)
    svc.out = _Captured()  # what it would publish, captured instead of sent to a broker
    return svc


def frame(ts_ms: int, people: int) -> events_pb2.EncodedFrameEvent:
    emb = np.zeros(1280, np.float32)
    emb[0] = 1
    return events_pb2.EncodedFrameEvent(key=KEY, session_id="s1", media_ts_ms=ts_ms, embedding=emb.tolist(), person_count=people)


def start() -> events_pb2.QueryEvent:
    return Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_START, reply_to="gw",
             instructions=[common_pb2.StandingInstruction(instruction_id="p", text="tell me when someone walks in")])


def test_frames_polled_before_the_session_start_still_see_its_instructions(service):
    service._batch = [frame(0, 2), frame(1000, 2), frame(2000, 3), start()]
    service.end_batch()
    alerts = [d for d in service.out.sent if d.instruction_id == "p"]
    assert [d.media_ts_ms for d in alerts] == [0]
    assert alerts[0].reply_to == "gw"


def test_frames_held_across_batches_until_the_start_arrives(service):
    service._batch = [frame(0, 1), frame(1000, 1)]
    service.end_batch()
    assert service.out.sent == []
    service._batch = [start(), frame(2000, 1)]
    service.end_batch()
    assert [d.media_ts_ms for d in service.out.sent] == [0]


def test_a_start_that_never_comes_holds_frames_only_so_long(service, monkeypatch):
    service._batch = [frame(t * 1000, 0) for t in range(5)]
    service._batch.append(Q(key=KEY, session_id="s1", kind=Q.KIND_QUESTION, question_id="q", text="what now?", media_ts_ms=3000))
    service.end_batch()
    assert service.out.sent == []
    service.HOLD_S = 0.0  # the wait for the start is over
    service._batch = [frame(5000, 0)]
    service.end_batch()
    answers = [d for d in service.out.sent if d.question_id == "q"]
    # the held frames are decided in order, so the question is answered at its own step
    assert len(answers) == 1 and answers[0].media_ts_ms == 3000


def test_an_end_releases_held_frames(service):
    service._batch = [frame(0, 2), frame(1000, 2), Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_END, media_ts_ms=1000)]
    service.end_batch()
    assert "t/cam" not in service.states


def test_session_end_waits_for_the_last_frame(service):
    end = Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_END, media_ts_ms=3000)
    question = Q(key=KEY, session_id="s1", kind=Q.KIND_QUESTION, question_id="q", text="how many?", media_ts_ms=2500)
    service._batch = [start(), question, end, frame(0, 0), frame(1000, 0)]
    service.end_batch()
    assert service.out.sent == [] and "t/cam" in service.states and not service.out.finished
    service._batch = [frame(2000, 0), frame(3000, 0)]
    service.end_batch()
    assert [(d.question_id, d.media_ts_ms) for d in service.out.sent] == [("q", 3000)]
    assert "t/cam" not in service.states
    # Finished once its last frame was decided, with the answer the responder has yet to write.
    assert [list(f.pending_response_ids) for f in service.out.finished] == [[service.out.sent[0].decision_id]]


def test_an_end_with_no_frames_published_finishes_at_once(service):
    question = Q(key=KEY, session_id="s1", kind=Q.KIND_QUESTION, question_id="q", text="anyone there?", media_ts_ms=0)
    service._batch = [start(), question, Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_END, media_ts_ms=-1)]
    service.end_batch()
    assert [d.question_id for d in service.out.sent] == ["q"] and "t/cam" not in service.states


def test_an_end_before_its_frames_waits_for_them(service):
    service._batch = [start(), Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_END, media_ts_ms=1000)]
    service.end_batch()
    assert "t/cam" in service.states
    service._batch = [frame(0, 2), frame(1000, 2)]
    service.end_batch()
    assert [d.instruction_id for d in service.out.sent] == ["p"] and "t/cam" not in service.states


def test_a_question_after_the_last_frame_in_the_same_batch_as_the_end_is_answered(service):
    """The end's media time is its last frame's; a question asked later (media time past it) that
    comes in the same poll must still be answered, not sorted after the end and forgotten."""
    question = Q(key=KEY, session_id="s1", kind=Q.KIND_QUESTION, question_id="late", text="what happened?", media_ts_ms=60_000)
    end = Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_END, media_ts_ms=1000)
    service._batch = [start(), frame(0, 0), frame(1000, 0), question, end]
    service.end_batch()
    assert [(d.question_id, d.media_ts_ms) for d in service.out.sent] == [("late", 60_000)]
    assert "t/cam" not in service.states
