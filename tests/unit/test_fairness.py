"""Fairness between streams that share a partition: one stream's flood of questions never starves
another stream's answer (docs/architecture.md, "Fairness between streams").

The real decision and responder stages run on the local host, where every topic has one partition,
so every stream here shares its partition with the others. The generation backend is a small
in-process ``ResponseGenerator`` that answers at once and records the order it was asked in: that
order is the "work ahead" of an answer, which the bounds below are stated in (numbers of
generations, never wall-clock time)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from streamharness import topics
from streamharness.decision.policy import RulePolicy
from streamharness.decision.service import REFUSAL_TOO_MANY_OPEN, DecisionSettings, DecisionStage
from streamharness.generation import GenerationRejected, Prompt, ResponseGenerator
from streamharness.hosts.local import LocalBus, LocalHost
from streamharness.keys import key_str, make_key
from streamharness.responder.service import ResponderSettings, ResponderStage, Stopping, round_robin
from streamharness.settings import KafkaSettings
from streamharness.text_encoder import TextEncoder
from streamharness.topology import TOPOLOGY
from streamharness.v1 import common_pb2, events_pb2

Q = events_pb2.QueryEvent
A = make_key("acme", "flood")
B = make_key("acme", "canary")
LIMIT = DecisionSettings().max_open_questions_per_stream


class Recording(ResponseGenerator):
    """Answers every prompt at once ("answer to <question>") and records what it was asked, in order.
    ``reject``: questions it refuses (as a backend refusing a request); ``fail_once``: questions whose
    first attempt fails (a backend hiccup)."""

    def __init__(self, reject: set[str] = frozenset(), fail_once: set[str] = frozenset()) -> None:
        self.asked: list[tuple[str, str]] = []  # (stream, question or instruction)
        self.reject = set(reject)
        self.fail_once = set(fail_once)
        self.on_ask = None

    def stream(self, prompt: Prompt) -> Iterator[str]:
        text = prompt.question or prompt.instruction
        self.asked.append((prompt.stream, text))
        if self.on_ask is not None:
            self.on_ask()
        if text in self.reject:
            raise GenerationRejected(f"refused: {text}")
        if text in self.fail_once:
            self.fail_once.discard(text)
            raise ConnectionError("the backend hiccuped")
        yield "answer to "
        yield text

    def ready(self) -> bool:
        return True


@pytest.fixture(scope="module")
def policy() -> RulePolicy:
    return RulePolicy(TextEncoder().load().encode)


def start(key: common_pb2.StreamKey) -> events_pb2.QueryEvent:
    return Q(key=key, session_id=f"s-{key.stream_id}", kind=Q.KIND_SESSION_START, reply_to="gateway-1")


def question(key: common_pb2.StreamKey, qid: str, t_ms: int) -> events_pb2.QueryEvent:
    return Q(key=key, session_id=f"s-{key.stream_id}", kind=Q.KIND_QUESTION, question_id=qid, text=f"question {qid}?",
             media_ts_ms=t_ms, reply_to="gateway-1")


def frame(key: common_pb2.StreamKey, t_ms: int) -> events_pb2.EncodedFrameEvent:
    embedding = np.zeros(8, np.float32)
    embedding[0] = 1.0
    return events_pb2.EncodedFrameEvent(key=key, session_id=f"s-{key.stream_id}", media_ts_ms=t_ms,
                                        embedding=embedding.tolist(), caption="a street")


def responses(bus: LocalBus, group: str = "client") -> list[events_pb2.ResponseEvent]:
    return [events_pb2.ResponseEvent.FromString(r.value) for r in bus.take(topics.RESPONSES, group)]


def finals(events: list[events_pb2.ResponseEvent]) -> dict[str, events_pb2.ResponseEvent]:
    """question id → its final record (exactly one each), once repeats are dropped by
    ``(response_id, index)`` as the gateway does (delivery is at least once)."""
    out: dict[str, events_pb2.ResponseEvent] = {}
    seen: set[tuple[str, int]] = set()
    for e in events:
        if (e.response_id, e.index) in seen:
            continue
        seen.add((e.response_id, e.index))
        if e.final:
            assert e.question_id not in out, f"two final records for {e.question_id}"
            out[e.question_id] = e
    return out


def flood(host: LocalHost, n: int) -> None:
    """Stream A asks ``n`` questions in one second of media time; stream B, on the same partition, asks one."""
    bus = host.bus
    for key in (A, B):
        bus.send(topics.QUERIES, key, start(key))
        bus.send(topics.EMBEDDINGS, key, frame(key, 0))
    for i in range(n):
        bus.send(topics.QUERIES, A, question(A, f"a-{i}", 1000))
    bus.send(topics.QUERIES, B, question(B, "b-0", 1000))
    for key in (A, B):
        bus.send(topics.EMBEDDINGS, key, frame(key, 1000))
    host.run_until_idle()


def pipeline(policy: RulePolicy, generator: Recording, decision: DecisionSettings | None = None,
             responder: ResponderSettings | None = None) -> LocalHost:
    host = LocalHost(KafkaSettings(handler_retries=2))
    host.add(DecisionStage(decision or DecisionSettings(policy="rules"), policy=policy))
    host.add(ResponderStage(responder or ResponderSettings(memory_address=""), generator=generator))
    host.bus.subscribe("client", [host.kafka.topic(topics.RESPONSES)])
    return host


def generations_before(generator: Recording, stream: common_pb2.StreamKey) -> int:
    """How many generations ran before the stream's first one."""
    return next(i for i, (s, _) in enumerate(generator.asked) if s == key_str(stream))


# -- decision + responder: the flood --------------------------------------------------------------------------------
def test_a_flood_of_200_questions_gets_8_answers_and_192_refusals_and_the_canary_waits_for_at_most_8_generations(policy):
    generator = Recording()
    host = pipeline(policy, generator)
    try:
        flood(host, 200)
        out = responses(host.bus)
    finally:
        host.close()
    by_question = finals(out)
    # Every question got exactly one final record: none is dropped.
    assert set(by_question) == {f"a-{i}" for i in range(200)} | {"b-0"}
    answered = {q for q, e in by_question.items() if e.answer_text}
    assert not any(by_question[q].refusal for q in answered)
    assert answered == {f"a-{i}" for i in range(LIMIT)} | {"b-0"}
    assert by_question["b-0"].answer_text == "answer to question b-0?"
    # The 9th open question on (and every one after it): refused at once, with its message, to the client.
    expected = REFUSAL_TOO_MANY_OPEN.format(limit=LIMIT)
    assert expected.startswith("Not answered: this stream already has 8 questions waiting for an answer")
    for i in range(LIMIT, 200):
        refusal = by_question[f"a-{i}"]
        assert (refusal.index, refusal.final, refusal.text, refusal.refusal) == (0, True, expected, "too_many_open_questions")
        assert refusal.trigger == common_pb2.TRIGGER_QUESTION and refusal.reply_to == "gateway-1"
        assert refusal.key == A and refusal.session_id == "s-flood" and refusal.media_ts_ms == 1000
        assert refusal.response_id == f"acme/flood/1000/a-{i}/refused" and not refusal.answer_text
        assert [e for e in out if e.response_id == refusal.response_id] == [refusal]  # one record, no chunks
    # Work ahead of the canary's answer: only A's open questions can be queued ahead of it.
    assert len(generator.asked) == LIMIT + 1
    assert generations_before(generator, B) <= LIMIT


def test_with_room_in_the_responders_batch_the_canary_is_answered_after_at_most_one_of_the_floods(policy):
    generator = Recording()
    host = pipeline(policy, generator, responder=ResponderSettings(memory_address="", batch_records=LIMIT + 8))
    try:
        flood(host, 200)
        out = responses(host.bus)
    finally:
        host.close()
    assert generations_before(generator, B) <= 1
    # A's answers keep A's order, in generation and on the topic.
    a_asked = [q for s, q in generator.asked if s == key_str(A)]
    assert a_asked == [f"question a-{i}?" for i in range(LIMIT)]
    a_answers = [e.question_id for e in out if e.key == A and e.final and e.answer_text]
    assert a_answers == [f"a-{i}" for i in range(LIMIT)]


def test_without_the_bounds_the_canary_waits_for_the_whole_flood(policy):
    """The failure the bounds fix (issue 13): every question accepted, answered in record order."""
    generator = Recording()
    host = pipeline(policy, generator, decision=DecisionSettings(policy="rules", max_open_questions_per_stream=0),
                    responder=ResponderSettings(memory_address="", batch_records=1))
    try:
        assert topics.RESPONSES not in host._hosted["decision"].spec.consumes
        flood(host, 200)
    finally:
        host.close()
    assert generations_before(generator, B) == 200


def test_an_answer_frees_its_slot_and_a_question_redelivered_while_open_is_not_refused(policy):
    """Open means 'not answered yet': a decided question stays open until its final response comes
    back on 'responses'. The decision and the responder run on two hosts sharing one bus, so the
    test says when the responder gets to work."""
    generator = Recording()
    bus = LocalBus(KafkaSettings())
    deciding, answering = LocalHost(bus=bus), LocalHost(bus=bus)
    deciding.add(DecisionStage(DecisionSettings(policy="rules", max_open_questions_per_stream=3), policy=policy))
    answering.add(ResponderStage(ResponderSettings(memory_address=""), generator=generator))
    bus.subscribe("client", [bus.kafka.topic(topics.RESPONSES)])
    try:
        bus.send(topics.QUERIES, A, start(A))
        for i in range(3):
            bus.send(topics.QUERIES, A, question(A, f"a-{i}", 500))
        bus.send(topics.EMBEDDINGS, A, frame(A, 1000))
        deciding.run_until_idle()
        assert len(bus.take(topics.DECISIONS, "peek")) == 3  # decided: not answered yet
        bus.send(topics.QUERIES, A, question(A, "a-3", 1200))  # a 4th while 3 are open: refused
        bus.send(topics.QUERIES, A, question(A, "a-1", 500))  # a redelivery of an open one: not refused
        deciding.run_until_idle()
        first = finals(responses(bus))
        assert set(first) == {"a-3"} and first["a-3"].text == REFUSAL_TOO_MANY_OPEN.format(limit=3)
        answering.run_until_idle()  # the 3 answers (and the redelivered one, again under its id)
        deciding.run_until_idle()  # ... reach the decision stage: the slots are free
        bus.send(topics.QUERIES, A, question(A, "a-4", 1500))
        bus.send(topics.EMBEDDINGS, A, frame(A, 2000))
        deciding.run_until_idle()
        answering.run_until_idle()
        second = finals(responses(bus))
    finally:
        deciding.close()
        answering.close()
    assert {q: e.answer_text for q, e in second.items()} == {
        "a-0": "answer to question a-0?", "a-1": "answer to question a-1?", "a-2": "answer to question a-2?",
        "a-4": "answer to question a-4?"}


# -- the responder alone: round-robin in a batch --------------------------------------------------------------------
def decision_event(key: common_pb2.StreamKey, n: int, t_ms: int = 1000) -> events_pb2.DecisionEvent:
    qid = f"{key.stream_id}-{n}"
    return events_pb2.DecisionEvent(
        key=key, session_id="s1", media_ts_ms=t_ms + n, action=events_pb2.DecisionEvent.ACTION_RESPOND,
        trigger=common_pb2.TRIGGER_QUESTION, question_id=qid, prompt_text=f"question {qid}?", reply_to="gateway-1",
        decision_id=f"{key_str(key)}/{t_ms + n}/{qid}")


def responder(generator: Recording, retries: int = 2, **settings) -> LocalHost:
    host = LocalHost(KafkaSettings(handler_retries=retries))
    host.add(ResponderStage(ResponderSettings(memory_address="", **settings), generator=generator))
    host.bus.subscribe("client", [host.kafka.topic(topics.RESPONSES)])
    return host


def test_round_robin_takes_each_streams_first_then_each_streams_second_keeping_each_streams_order():
    items = ["a1", "a2", "a3", "b1", "a4", "c1", "b2"]
    assert round_robin(items, lambda s: s[0]) == ["a1", "b1", "c1", "a2", "b2", "a3", "a4"]
    assert round_robin([], lambda s: s) == []


def test_the_responder_answers_a_batch_round_robin_and_keeps_each_streams_order():
    C = make_key("zeta", "cam")
    generator = Recording()
    host = responder(generator, batch_records=16)
    assert host._hosted["responder"].spec.batching.max_records == 16
    try:
        sent = [decision_event(A, n) for n in range(12)] + [decision_event(B, 0), decision_event(C, 0), decision_event(B, 1)]
        for d in sent:
            host.bus.send(topics.DECISIONS, d.key, d)
        host.run_until_idle()
        out = responses(host.bus)
    finally:
        host.close()
    asked = [q.removeprefix("question ").removesuffix("?") for _, q in generator.asked]
    # B's and C's first decisions wait for one of A's, not twelve; B's second comes in the second round.
    assert asked[:6] == ["flood-0", "canary-0", "cam-0", "flood-1", "canary-1", "flood-2"]
    assert sorted(asked) == sorted(d.question_id for d in sent)  # each answered once
    for key, n in ((A, 12), (B, 2), (C, 1)):
        mine = [q for q in asked if q.startswith(key.stream_id)]
        assert mine == [f"{key.stream_id}-{i}" for i in range(n)]
        chunks = [e for e in out if e.key == key]
        assert [e.question_id for e in chunks if e.final] == mine  # the stream's responses in its order
        for d in (d for d in sent if d.key == key):
            records = [e for e in chunks if e.response_id == d.decision_id]
            assert [e.index for e in records] == [0, 1, 2] and [e.final for e in records] == [False, False, True]


def test_a_decision_that_fails_for_good_is_closed_and_dead_lettered_and_the_batch_goes_on():
    generator = Recording(reject={"question flood-1?"}, fail_once={"question canary-0?"})
    host = responder(generator, retries=3, batch_records=8)
    try:
        for d in (decision_event(A, 0), decision_event(A, 1), decision_event(A, 2), decision_event(B, 0)):
            host.bus.send(topics.DECISIONS, d.key, d)
        host.run_until_idle()
        out = finals(responses(host.bus))
        dead = host.bus.dead_letters
    finally:
        host.close()
    assert {q: e.answer_text for q, e in out.items()} == {
        "flood-0": "answer to question flood-0?", "flood-1": "", "flood-2": "answer to question flood-2?",
        "canary-0": "answer to question canary-0?"}
    # The rejected one: asked once (not retried), closed, dead-lettered; the hiccup: retried once.
    assert [q for _, q in generator.asked] == ["question flood-0?", "question canary-0?", "question canary-0?",
                                               "question flood-1?", "question flood-2?"]
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["sh-dlq-reason"] == b"handler-failed" and b"refused: question flood-1?" in headers["sh-dlq-error"]
    assert events_pb2.DecisionEvent.FromString(dead[0].value).question_id == "flood-1"


def test_a_stop_in_the_middle_of_a_batch_finishes_the_generation_in_hand_and_redelivers_the_rest():
    generator = Recording()
    host = responder(generator, retries=1, batch_records=8)
    stage = host.stage("responder")
    generator.on_ask = stage.ctx.stopping.set  # the host stops during the first generation
    try:
        for n in range(3):
            host.bus.send(topics.DECISIONS, A, decision_event(A, n))
        with pytest.raises(Stopping, match="2 of the batch's 3 decisions not answered"):
            host.run_until_idle()  # locally, a batch that cannot be flushed is raised to the caller
        out = responses(host.bus)
    finally:
        host.close()
    assert len(generator.asked) == 1
    assert [e.question_id for e in out if e.final] == ["flood-0"]


def test_the_responders_batch_and_the_decisions_responses_come_from_their_settings(policy):
    spec = ResponderStage(ResponderSettings(memory_address="", batch_records=5)).configure(TOPOLOGY["responder"])
    assert spec.batching.max_records == 5 and spec.members == ResponderSettings().workers
    bounded = DecisionStage(DecisionSettings(policy="rules"), policy=policy).configure(TOPOLOGY["decision"])
    assert bounded.consumes[topics.RESPONSES] is events_pb2.ResponseEvent
    unbounded = DecisionStage(DecisionSettings(policy="rules", max_open_questions_per_stream=0), policy=policy)
    assert topics.RESPONSES not in unbounded.configure(TOPOLOGY["decision"]).consumes
