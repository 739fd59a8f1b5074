"""The responder on the local host with a scripted generator: what the decision step notes for people
never reaches a prompt or an answer (memory up or down), and every chunk carries the attempt of the
generation it belongs to: a response generated again (a redelivered decision, a retry after a failed
generation) keeps its response_id and comes whole under a new attempt; give_up closes it under one
of its own."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from streamharness import topics
from streamharness.generation import Prompt, ResponseGenerator
from streamharness.generation.base import GenerationError
from streamharness.hosts.local import LocalHost
from streamharness.keys import make_key
from streamharness.responder.service import ResponderSettings, ResponderStage, ResponseBuilder
from streamharness.settings import KafkaSettings
from streamharness.v1 import common_pb2, events_pb2, memory_pb2

KEY = make_key("acme", "cam-1")
#: What policies write in DecisionEvent.reason (for people and logs), and the words around it.
REASONS = ("a question is pending", "instruction 'walk-in' matched caption 'a person walks in' (0.71)")
INTERNAL = ("decision step", "noted", "pending", "matched caption", "0.71", "rules-v2")


class MemoryDown(grpc.RpcError):
    """What a gRPC stub raises when nothing answers at memory's address."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses"


class DownMemory:
    def Context(self, request, timeout=None):  # noqa: N802 - gRPC name
        raise MemoryDown()

    def Recall(self, request, timeout=None):  # noqa: N802 - gRPC name
        raise MemoryDown()


class UpMemory:
    def Context(self, request, timeout=None):  # noqa: N802 - gRPC name
        return memory_pb2.ContextResponse(prefix_text="[0:00:00–0:03:20] a quiet street, a van parked.\n", recent=[
            memory_pb2.MemoryItem(tier=memory_pb2.MEMORY_TIER_SHORT, start_ms=request.now_ms, end_ms=request.now_ms,
                                  text="a person walks in")])

    def Recall(self, request, timeout=None):  # noqa: N802 - gRPC name
        return memory_pb2.RecallResponse()


class ScriptedGenerator(ResponseGenerator):
    """Repeats its whole prompt back, word by word (the worst case of a model that copies what it is
    given), after ``fail_after`` words failing for the first ``failures`` generations."""

    def __init__(self, *, failures: int = 0, fail_after: int = 0) -> None:
        self.prompts: list[Prompt] = []
        self.failures = failures
        self.fail_after = fail_after

    def stream(self, prompt: Prompt) -> Iterator[str]:
        self.prompts.append(prompt)
        fail = self.failures > 0
        self.failures -= 1
        words = f"{prompt.system}\n{prompt.user_text()}".split()
        for n, word in enumerate(words):
            if fail and n == self.fail_after:
                raise GenerationError("the backend went away mid-answer")
            yield word + " "

    def ready(self) -> bool:
        return True


def decision(media_ts_ms: int = 75_000, *, reason: str = REASONS[0], question: str = "", instruction: str = "") -> events_pb2.DecisionEvent:
    if question:
        trigger, qid, iid, text = common_pb2.TRIGGER_QUESTION, f"q-{media_ts_ms}", "", question
    else:
        trigger, qid, iid, text = common_pb2.TRIGGER_INSTRUCTION, "", "walk-in", instruction or "tell me when someone walks in"
    return events_pb2.DecisionEvent(
        key=KEY, session_id="s-1", media_ts_ms=media_ts_ms, action=events_pb2.DecisionEvent.ACTION_RESPOND,
        trigger=trigger, question_id=qid, instruction_id=iid, prompt_text=text, reason=reason, score=0.71,
        policy="rules-v2", reply_to="gw-a", decision_id=f"acme/cam-1/{media_ts_ms}/{qid or iid}")


class Responder:
    def __init__(self, generator: ScriptedGenerator, memory: object | None, retries: int = 3) -> None:
        self.host = LocalHost(KafkaSettings(handler_retries=retries))
        self.stage = self.host.add(ResponderStage(ResponderSettings(memory_address=""), generator=generator, memory=memory))

    def answer(self, *decisions: events_pb2.DecisionEvent) -> list[events_pb2.ResponseEvent]:
        for d in decisions:
            self.host.bus.send(topics.DECISIONS, KEY, d)
        self.host.run_until_idle()
        return [events_pb2.ResponseEvent.FromString(r.value) for r in self.host.bus.take(topics.RESPONSES)]

    def close(self) -> None:
        self.host.close()


def attempts(chunks: list[events_pb2.ResponseEvent]) -> list[list[events_pb2.ResponseEvent]]:
    """The chunks grouped by attempt, in the order the attempts started."""
    groups: dict[str, list[events_pb2.ResponseEvent]] = {}
    for c in chunks:
        groups.setdefault(c.attempt, []).append(c)
    return list(groups.values())


# -- internal notes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", [DownMemory(), None, UpMemory()], ids=["memory-down", "no-memory", "memory-up"])
@pytest.mark.parametrize("reason", REASONS)
def test_no_prompt_holds_what_the_decision_step_noted(memory, reason) -> None:
    builder = ResponseBuilder(ResponderSettings(memory_address=""), memory)
    for d, is_question in ((decision(reason=reason, question="is anyone there?"), True), (decision(reason=reason), False)):
        prompt = builder.prompt(d, KEY, is_question)
        text = "\n".join(m["content"] for m in prompt.messages())
        assert reason not in text
        for word in INTERNAL:
            assert word not in text, (word, text)
        assert d.prompt_text in text  # the question or instruction is still what is answered


def test_with_memory_down_an_answer_never_repeats_the_decision_steps_notes() -> None:
    generator = ScriptedGenerator()
    responder = Responder(generator, DownMemory())
    try:
        sent = [decision(75_000, reason=REASONS[0], question="what is happening?"), decision(76_000, reason=REASONS[1])]
        chunks = responder.answer(*sent)
    finally:
        responder.close()
    finals = [c for c in chunks if c.final]
    assert [f.response_id for f in finals] == [d.decision_id for d in sent]
    for final in finals:
        answer = "".join(c.text for c in chunks if c.response_id == final.response_id)
        assert answer.strip() and final.answer_text == answer.strip()  # the model repeated its whole prompt ...
        for text in (answer, final.answer_text):
            assert not any(r in text for r in REASONS) and not any(w in text for w in INTERNAL), text  # ... and no note


# -- attempts ---------------------------------------------------------------------------------------
def test_two_generations_of_one_decision_keep_the_response_id_under_different_attempts() -> None:
    responder = Responder(ScriptedGenerator(), UpMemory())
    try:
        sent = decision(question="who walked in?")
        first = responder.answer(sent)
        again = responder.answer(sent)  # redelivered (a crash before the commit): generated again
    finally:
        responder.close()
    for chunks in (first, again):
        assert {c.response_id for c in chunks} == {sent.decision_id}
        assert len({c.attempt for c in chunks}) == 1 and chunks[0].attempt  # one attempt, stamped on every chunk
        assert [c.index for c in chunks] == list(range(len(chunks))) and [c.final for c in chunks][-1]
    assert first[0].attempt != again[0].attempt
    assert len(first[0].attempt) == 32 and int(first[0].attempt, 16) >= 0  # uuid4 hex


def test_a_generation_that_fails_mid_answer_is_generated_again_whole_under_a_new_attempt() -> None:
    responder = Responder(ScriptedGenerator(failures=1, fail_after=3), UpMemory())
    try:
        sent = decision(question="who walked in?")
        chunks = responder.answer(sent)
        dead = responder.host.bus.dead_letters
    finally:
        responder.close()
    failed, whole = attempts(chunks)
    assert [(c.index, c.final) for c in failed] == [(0, False), (1, False), (2, False)]  # not closed: void once the next starts
    assert [c.index for c in whole] == list(range(len(whole))) and whole[-1].final and not any(c.final for c in whole[:-1])
    assert whole[-1].answer_text.startswith(" ".join(c.text.strip() for c in failed))  # the same text, whole this time
    assert not dead


def test_a_response_that_fails_for_good_is_closed_under_an_attempt_of_its_own() -> None:
    responder = Responder(ScriptedGenerator(failures=3, fail_after=2), UpMemory(), retries=3)
    try:
        sent = decision(question="who walked in?")
        chunks = responder.answer(sent)
        dead = responder.host.bus.dead_letters
    finally:
        responder.close()
    groups = attempts(chunks)
    assert len(groups) == 4 and all(c.attempt for c in chunks)  # three failed attempts, then the closing one
    assert all([(c.index, c.final) for c in g] == [(0, False), (1, False)] for g in groups[:3])
    closing = groups[3]
    assert [(c.index, c.text, c.final, c.answer_text) for c in closing] == [(0, "", True, "")]
    assert closing[0].response_id == sent.decision_id
    assert len(dead) == 1
