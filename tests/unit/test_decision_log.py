"""The decision-log topic (issue 15): one record per decided second, silent ones too, with the
trigger of a respond — what the live view's timeline and ``SessionStart.want_decisions`` show."""

from __future__ import annotations

from streamharness import topics
from streamharness.v1 import events_pb2

from tests.unit.test_decision_durable import Q, frame, host_with, of, policy, publish, query, start  # noqa: F401 - fixture

D = events_pb2.DecisionEvent


def test_every_decided_second_is_logged_with_what_it_chose(policy):  # noqa: F811 - the fixture
    host, _ = host_with(policy)
    host.bus.subscribe(f"check-{topics.DECISION_LOG}", [host.kafka.topic(topics.DECISION_LOG)])
    publish(host, start(), frame(0, 0), frame(1000, 0), frame(2000, 2),
            query(Q.KIND_QUESTION, question_id="q1", text="what is there?", media_ts_ms=3000), frame(3000, 2))
    log = of(host, topics.DECISION_LOG, D)
    by_second = {}
    for d in log:
        by_second.setdefault(d.media_ts_ms, []).append(d)
    assert sorted(by_second) == [0, 1000, 2000, 3000]  # every decided second, once
    assert [d.action for d in by_second[0]] == [D.ACTION_SILENT] and [d.action for d in by_second[1000]] == [D.ACTION_SILENT]
    assert [(d.action, d.instruction_id) for d in by_second[2000]] == [(D.ACTION_RESPOND, "p")]  # someone walked in
    assert any(d.action == D.ACTION_RESPOND and d.question_id == "q1" and d.prompt_text == "what is there?" for d in by_second[3000])
    assert all(d.session_id == "s1" and d.reply_to == "gw-1" and d.policy for d in log)
    # The respond records match what went to the responder.
    responded = {(d.media_ts_ms, d.question_id or d.instruction_id) for d in of(host, topics.DECISIONS, D)}
    assert responded == {(d.media_ts_ms, d.question_id or d.instruction_id) for d in log if d.action == D.ACTION_RESPOND}


def test_a_question_answered_after_its_second_was_decided_is_logged_too(policy):  # noqa: F811 - the fixture
    host, _ = host_with(policy)
    host.bus.subscribe(f"check-{topics.DECISION_LOG}", [host.kafka.topic(topics.DECISION_LOG)])
    publish(host, start(), frame(0, 0), frame(1000, 0))
    publish(host, query(Q.KIND_QUESTION, question_id="late", text="what was there?", media_ts_ms=500))  # frames went past it
    log = of(host, topics.DECISION_LOG, D)
    late = [d for d in log if d.question_id == "late"]
    assert [(d.action, d.media_ts_ms) for d in late] == [(D.ACTION_RESPOND, 1000)]
    assert sorted(d.media_ts_ms for d in log if d.action == D.ACTION_SILENT) == [0, 1000]  # the silent seconds stay as they were
