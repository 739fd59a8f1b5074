"""The rule policy on real MiniLM embeddings: questions are answered at once, standing
instructions fire on matching evidence, never before it, and not every second."""

from __future__ import annotations

import numpy as np
import pytest

from streamharness.decision.policy import Evidence, PendingQuestion, RulePolicy, RuleThresholds, StreamState, instruction_target
from streamharness.keys import make_key
from streamharness.text_encoder import TextEncoder
from streamharness.v1 import common_pb2


@pytest.fixture(scope="module")
def policy() -> RulePolicy:
    return RulePolicy(TextEncoder().load().encode, RuleThresholds(refractory_ms=10_000))


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=1280).astype(np.float32)
    return v / np.linalg.norm(v)


def ev(t_s: float, people: int = 0, labels=(("street sign", 0.3),), emb=None) -> Evidence:
    return Evidence(int(t_s * 1000), unit(0) if emb is None else emb, list(labels), people, "")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("tell me when someone walks in", "people"),
        ("let me know if a person shows up at the door", "people"),
        ("tell me when the scene changes", "scene"),
        ("tell me when you see a cup", "object"),
        ("alert me if there is a dog", "object"),
    ],
)
def test_instructions_are_classified(policy, text, kind):
    assert policy.classify(text)[0] == kind


def test_instruction_target():
    assert instruction_target("Tell me when you see a cup.") == "a cup"
    assert instruction_target("alert me if there is a dog") == "a dog"


def test_people_instruction_fires_on_first_person_then_respects_refractory(policy):
    state = StreamState(make_key("t", "s"))
    policy.add_instruction(state, "p", "tell me when someone walks in")
    fired = [t for t, n in [(0, 0), (1, 0), (2, 2), (3, 3), (4, 0), (5, 1), (15, 0), (16, 2)]
             if policy.step(state, ev(t, people=n))]
    assert fired == [2, 16]  # 5 s is inside the 10 s refractory period after 2 s


def test_object_instruction_fires_on_matching_label_only(policy):
    state = StreamState(make_key("t", "s"))
    policy.add_instruction(state, "c", "tell me when you see a cup")
    assert not policy.step(state, ev(0, labels=[("trolleybus, trolley coach", 0.6), ("street sign", 0.2)]))
    out = policy.step(state, ev(1, labels=[("coffee mug", 0.5), ("cup", 0.3)]))
    assert [d.trigger for d in out] == [common_pb2.TRIGGER_INSTRUCTION]
    assert "cup" in out[0].reason or "mug" in out[0].reason


def test_weak_labels_are_not_evidence(policy):
    state = StreamState(make_key("t", "s"))
    policy.add_instruction(state, "c", "tell me when you see a cup")
    assert not policy.step(state, ev(0, labels=[("cup", 0.01)]))


def test_scene_change(policy):
    state = StreamState(make_key("t", "s"))
    policy.add_instruction(state, "x", "tell me when the scene changes")
    a, b = unit(1), unit(2)
    near = (a + 0.05 * unit(3)) / np.linalg.norm(a + 0.05 * unit(3))
    steps = [(0, a), (1, near), (2, a), (3, b)]
    assert [t for t, e in steps if policy.step(state, ev(t, emb=e))] == [3]


def test_questions_are_answered_at_their_time_not_before(policy):
    state = StreamState(make_key("t", "s"))
    state.questions.append(PendingQuestion("q1", "what is there?", 2500))
    assert not policy.step(state, ev(2))
    out = policy.step(state, ev(3))
    assert [(d.trigger_id, d.media_ts_ms) for d in out] == [("q1", 3000)]
    assert not state.questions


def test_trained_policy_leaves_people_to_the_people_rule_and_the_rest_to_the_head():
    """The trained policy's default split: "someone walks in" is decided on the detector's count
    (the rule), a colour instruction by the head. With a head that never reaches its threshold,
    only the people instruction fires — and only once people are counted."""
    from streamharness.decision.trained import TrainedPolicy
    from streamharness.train.head import HeadTrainConfig, TorchHeadScorer, build_head

    embed = TextEncoder().load().encode
    head = TorchHeadScorer(build_head(HeadTrainConfig(hidden=8)).eval(), threshold=1.01, window=8)
    policy = TrainedPolicy(embed, head, people_rules=RulePolicy(embed))
    state = StreamState(key=make_key("t", "s"))
    assert policy.add_instruction(state, "p", "tell me when someone walks in").kind == "people"
    assert policy.add_instruction(state, "c", "Tell me when a red shape appears.").kind == "trained"
    assert policy.step(state, ev(0, people=0)) == []
    fired = policy.step(state, ev(1, people=2))
    assert [d.trigger_id for d in fired] == ["p"] and "2 people" in fired[0].reason
    # Without the people rule the head decides both (and, never reaching 1.01, stays silent).
    alone = TrainedPolicy(embed, head)
    state = StreamState(key=make_key("t", "s"))
    assert alone.add_instruction(state, "p", "tell me when someone walks in").kind == "trained"
    assert alone.step(state, ev(0, people=0)) == [] and alone.step(state, ev(1, people=2)) == []
    assert len(state.policy_state["frames"]) == 2


def test_a_head_that_does_not_answer_keeps_the_stream_going():
    """Triton away mid-stream: the head's instructions stay silent for those steps, questions are
    still answered, and nothing raises (the stream is not dead-lettered frame by frame)."""
    from streamharness.decision.trained import HeadScorer, TrainedPolicy
    from streamharness.settings import TritonSettings

    embed = TextEncoder().load().encode
    scorer = HeadScorer(TritonSettings(url="127.0.0.1:9", timeout_s=2.0))  # nothing listens there
    policy = TrainedPolicy(embed, scorer, threshold=0.5)
    state = StreamState(key=make_key("t", "s"))
    policy.add_instruction(state, "c", "Tell me when a red shape appears.")
    state.questions.append(PendingQuestion("q", "what is there?", 1000))
    assert policy.step(state, ev(0)) == []
    answered = policy.step(state, ev(1))
    assert [d.trigger_id for d in answered] == ["q"]
    scorer.close()
