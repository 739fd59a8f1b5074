"""The decision stage's durable stream state (issue 14): the compacted stream-state changelog is
written after each batch and restored by a new member, so a restarted or moved partition goes on
with its instructions and pending questions; a stream belongs to one session (a second one is
refused, never a silent reset); a session whose client went away is kept for a resume."""

from __future__ import annotations

import time

import numpy as np
import pytest

from streamharness import topics
from streamharness.decision.policy import RulePolicy
from streamharness.decision.service import DecisionSettings, DecisionStage
from streamharness.hosts.local import LocalHost
from streamharness.keys import key_str, make_key
from streamharness.text_encoder import TextEncoder
from streamharness.v1 import common_pb2, events_pb2

KEY = make_key("t", "cam")
Q = events_pb2.QueryEvent


@pytest.fixture(scope="module")
def policy():
    return RulePolicy(TextEncoder().load().encode)


def frame(ts_ms: int, people: int, session: str = "s1", age_ms: int = 0, sent_ns: int | None = None) -> events_pb2.EncodedFrameEvent:
    emb = np.zeros(1280, np.float32)
    emb[0] = 1
    hop = common_pb2.HopStamp(hop="gateway", wall_unix_ns=(sent_ns or time.time_ns()) - age_ms * 1_000_000)
    return events_pb2.EncodedFrameEvent(key=KEY, session_id=session, media_ts_ms=ts_ms, embedding=emb.tolist(),
                                        person_count=people, hops=[hop])


def query(kind, session: str = "s1", reply_to: str = "gw-1", **fields) -> events_pb2.QueryEvent:
    return Q(key=KEY, session_id=session, kind=kind, reply_to=reply_to, **fields)


def start(session: str = "s1", reply_to: str = "gw-1") -> events_pb2.QueryEvent:
    return query(Q.KIND_SESSION_START, session, reply_to, decision_fps=1.0,
                 instructions=[common_pb2.StandingInstruction(instruction_id="p", text="tell me when someone walks in")])


def host_with(policy, bus=None, **settings) -> tuple[LocalHost, DecisionStage]:
    host = LocalHost(bus=bus)
    for topic in (topics.DECISIONS, topics.RESPONSES):  # read what the stage publishes from the start
        host.bus.subscribe(f"check-{topic}", [host.kafka.topic(topic)])
    stage = host.add(DecisionStage(DecisionSettings(**settings), policy=policy), "decision")
    return host, stage


def publish(host: LocalHost, *messages) -> None:
    for m in messages:
        topic = topics.QUERIES if isinstance(m, Q) else topics.EMBEDDINGS
        host.bus.send(topic, m.key, m)
    host.run_until_idle()


def of(host: LocalHost, topic: str, cls):
    return [cls.FromString(r.value) for r in host.bus.take(topic, group=f"check-{topic}")]


def test_a_new_member_restores_instructions_and_questions_and_goes_on_without_a_session_start(policy):
    first, _ = host_with(policy)
    publish(first, start(), frame(0, 0), frame(1000, 0), query(Q.KIND_QUESTION, question_id="q1", text="what is there?", media_ts_ms=5000))
    table = first.bus.table(topics.STREAM_STATE)
    record = events_pb2.StreamStateRecord.FromString(table[key_str(KEY).encode()])
    assert [i.instruction_id for i in record.instructions] == ["p"]
    assert [q.question_id for q in record.questions] == ["q1"] and record.last_decision_ms == 1000
    assert record.session_id == "s1" and record.reply_to == "gw-1"

    # The process dies; a new one restores from the changelog (the same bus stands in for Kafka).
    second, stage = host_with(policy, bus=first.bus)
    state = stage.states[key_str(KEY)]
    assert state.started and set(state.instructions) == {"p"} and [q.question_id for q in state.questions] == ["q1"]
    already = len(of(first, topics.DECISIONS, events_pb2.DecisionEvent))
    publish(second, frame(1000, 0), frame(5000, 2))  # a redelivered frame, then one with people, past the question
    decisions = of(second, topics.DECISIONS, events_pb2.DecisionEvent)[already:]
    assert sorted((d.media_ts_ms, d.question_id or d.instruction_id) for d in decisions) == [(5000, "p"), (5000, "q1")]
    assert all(d.reply_to == "gw-1" for d in decisions)  # no frame held for 30 s waiting for a start


def test_a_finished_stream_is_a_tombstone(policy):
    host, _ = host_with(policy)
    publish(host, start(), frame(0, 0), query(Q.KIND_SESSION_END, media_ts_ms=0))
    assert key_str(KEY).encode() not in host.bus.table(topics.STREAM_STATE)


def test_a_second_session_is_refused_and_the_first_keeps_its_state(policy):
    host, stage = host_with(policy)
    publish(host, start(), frame(0, 0))
    publish(host, start("s2", "gw-2"), query(Q.KIND_QUESTION, "s2", "gw-2", question_id="x", text="hi?", media_ts_ms=0),
            frame(1000, 0, session="s2"))
    refusals = [r for r in of(host, topics.RESPONSES, events_pb2.ResponseEvent) if r.refusal]
    assert [(r.session_id, r.reply_to, r.refusal, r.final) for r in refusals] == [("s2", "gw-2", "stream_in_use", True)]
    assert "already open in another session" in refusals[0].text
    state = stage.states[key_str(KEY)]
    assert state.session_id == "s1" and set(state.instructions) == {"p"} and not state.questions and state.last_ms == 0


def test_away_answers_pending_questions_then_resume_and_takeover(policy):
    host, stage = host_with(policy)
    publish(host, start(), frame(0, 0), query(Q.KIND_QUESTION, question_id="q1", text="what is there?", media_ts_ms=9000))
    publish(host, query(Q.KIND_SESSION_AWAY, media_ts_ms=0))
    answered = [d for d in of(host, topics.DECISIONS, events_pb2.DecisionEvent) if d.question_id == "q1"]
    assert len(answered) == 1  # answered now, not left waiting for frames that will not come
    state = stage.states[key_str(KEY)]
    assert state.away_since is not None and set(state.instructions) == {"p"}

    publish(host, query(Q.KIND_SESSION_RESUME, reply_to="gw-2"))
    assert state.away_since is None and state.reply_to == "gw-2"
    publish(host, frame(2000, 2))
    alerts = [d for d in of(host, topics.DECISIONS, events_pb2.DecisionEvent) if d.instruction_id == "p"]
    assert [(d.media_ts_ms, d.reply_to) for d in alerts] == [(2000, "gw-2")]

    publish(host, query(Q.KIND_SESSION_RESUME, "old", "gw-3"))  # a token of a session that no longer holds it
    assert [r.refusal for r in of(host, topics.RESPONSES, events_pb2.ResponseEvent) if r.session_id == "old"] == ["session_expired"]

    publish(host, query(Q.KIND_SESSION_AWAY, media_ts_ms=2000), start("s3", "gw-3"))  # away: a new session may take it
    assert stage.states[key_str(KEY)].session_id == "s3"


def test_a_question_sent_again_is_not_answered_twice(policy):
    host, _ = host_with(policy)
    ask = query(Q.KIND_QUESTION, question_id="q1", text="what is there?", media_ts_ms=1000)
    publish(host, start(), ask, ask, frame(0, 0), ask, frame(1000, 0), frame(2000, 0))
    assert [d.question_id for d in of(host, topics.DECISIONS, events_pb2.DecisionEvent) if d.question_id] == ["q1"]


def test_a_lagging_batch_decides_each_streams_newest_frame_only(policy):
    host, _ = host_with(policy, shed_lag_ms=1000)
    publish(host, start())
    t0 = time.time_ns() - 10_000_000_000
    for ts in range(0, 5000, 1000):  # a live camera's frames (sent a second apart), a backlog 5 s old
        host.bus.send(topics.EMBEDDINGS, KEY, frame(ts, 2, sent_ns=t0 + ts * 1_000_000))
    host.run_until_idle()
    alerts = [d.media_ts_ms for d in of(host, topics.DECISIONS, events_pb2.DecisionEvent) if d.instruction_id == "p"]
    assert alerts == [4000]  # the four older frames were shed, the newest decided

    replay, _ = host_with(policy, shed_lag_ms=1000)
    publish(replay, start())
    for ts in range(0, 60_000, 1000):  # a minute of a file sent at once, 5 s ago: never shed
        replay.bus.send(topics.EMBEDDINGS, KEY, frame(ts, 2 if ts // 1000 % 2 else 0, age_ms=5000))
    replay.run_until_idle()
    alerts = [d.media_ts_ms for d in of(replay, topics.DECISIONS, events_pb2.DecisionEvent) if d.instruction_id == "p"]
    # Someone walks in every other second; every frame decided: an alert each refractory period (10 s).
    assert alerts == list(range(1000, 60_000, 10_000))

    fresh, _ = host_with(policy, shed_lag_ms=1000)
    publish(fresh, start())
    for ts in range(0, 5000, 1000):
        fresh.bus.send(topics.EMBEDDINGS, KEY, frame(ts, 2))  # not lagging: every frame is decided
    fresh.run_until_idle()
    assert [d.media_ts_ms for d in of(fresh, topics.DECISIONS, events_pb2.DecisionEvent) if d.instruction_id == "p"] == [0]


def test_a_finished_session_says_so_with_the_responses_still_to_come(policy):
    host, _ = host_with(policy)
    publish(host, start(), frame(0, 0), frame(1000, 2), query(Q.KIND_QUESTION, question_id="q1", text="what?", media_ts_ms=1000))
    decisions = of(host, topics.DECISIONS, events_pb2.DecisionEvent)
    alert, answer = sorted(decisions, key=lambda d: d.question_id)
    # The responder answered the alert already; the question's answer is still to come.
    host.bus.send(topics.RESPONSES, KEY, events_pb2.ResponseEvent(key=KEY, session_id="s1", response_id=alert.decision_id,
                                                                  index=0, final=True, instruction_id="p", reply_to="gw-1"))
    publish(host, query(Q.KIND_SESSION_END, media_ts_ms=1000))
    (done,) = [r for r in of(host, topics.RESPONSES, events_pb2.ResponseEvent) if r.session_finished]
    assert (done.session_id, done.reply_to, done.final) == ("s1", "gw-1", True)
    assert list(done.pending_response_ids) == [answer.decision_id]


def test_a_declared_replay_is_never_shed_even_in_its_first_seconds(policy):
    # Its first 5 s of media time sent at once, lagging: judged by timing alone these look like a
    # camera's backlog (the first SLACK_MS cannot tell) and all but the newest would be shed. A
    # replay that says so (an upload, a file, the player faster than real time) keeps every frame.
    def run(pace):
        host, _ = host_with(policy, shed_lag_ms=1000)
        host.bus.subscribe(f"check-{topics.DECISION_LOG}", [host.kafka.topic(topics.DECISION_LOG)])
        publish(host, start())
        for ts in range(0, 5000, 1000):
            f = frame(ts, 2 if ts == 3000 else 0, age_ms=5000)
            f.pace = pace
            host.bus.send(topics.EMBEDDINGS, KEY, f)
        host.run_until_idle()
        return sorted({d.media_ts_ms for d in of(host, topics.DECISION_LOG, events_pb2.DecisionEvent)})

    assert run(common_pb2.PACE_UNSPECIFIED) == [4000]  # judged live: the backlog shed
    assert run(common_pb2.PACE_REPLAY) == [0, 1000, 2000, 3000, 4000]
    assert run(common_pb2.PACE_LIVE) == [4000]
