"""The trigger loss and the per-second conversion, on hand-made sequences."""

import math

import pytest
import torch

from streamharness.train.convert import roles_of, to_messages, to_steps, trigger_labels, user_turn
from streamharness.train.objective import (
    IGNORE_INDEX,
    TriggerWeights,
    role_weights,
    shift_for_causal_lm,
    weighted_decision_loss,
    weighted_token_loss,
)
from streamharness.train.samples import AnnotationFormatError, StreamSample, TimedText, Trigger


def _sample() -> StreamSample:
    return StreamSample(
        sample_id="s", video_name="v", video_path="v.mp4", duration_s=7,
        triggers=[
            Trigger(trigger_id="i", kind="instruction", content="Tell me when a red shape appears.", time=0.0,
                    withdrawn=6.0, responses=[TimedText(content="A red square appeared.", time=4.0)], windows=[(4.0, 7.0)]),
            Trigger(trigger_id="q", kind="question", content="How many shapes?", time=2.4,
                    responses=[TimedText(content="2 shapes.", time=2.4)], windows=[(2.4, 7.0)]),
        ])


def test_roles_first_repeated_response():
    #            S      S      R     S      S      S     R     R
    assert roles_of([0, 0, 1, 0, 0, 0, 1, 1]) == [
        "first_silence", "repeated_silence", "response", "first_silence", "repeated_silence", "repeated_silence",
        "response", "response"]


def test_steps_insert_questions_answers_and_withdrawals_at_their_seconds():
    steps = to_steps(_sample())
    assert [s.t_s for s in steps] == [0, 1, 2, 3, 4, 5, 6]
    assert steps[0].user == "Tell me when a red shape appears.\n<0.0 seconds>\n<image>"
    assert steps[1].user == "<1.0 seconds>\n<image>" == user_turn(1.0)
    assert steps[2].user == "How many shapes?\n<2.0 seconds>\n<image>"  # asked at 2.4: inside the step of second 2
    assert steps[2].target == "</response> 2 shapes." and steps[2].responding == ("q",)
    assert steps[4].target == "</response> A red square appeared."
    assert steps[6].user.startswith("Stop: Tell me when a red shape appears.")
    assert [s.role for s in steps] == ["first_silence", "repeated_silence", "response", "first_silence", "response",
                                       "first_silence", "repeated_silence"]
    msgs = to_messages(steps)
    assert msgs[0]["role"] == "user" and msgs[1] == {"role": "assistant", "content": "</silence>"}
    assert len(msgs) == 14


def test_trigger_labels_cover_its_time_in_force():
    sample = _sample()
    start, labels = trigger_labels(sample.triggers[0], 7)
    assert start == 0 and labels == [0, 0, 0, 0, 1, 0, 0]  # withdrawn at 6: step 6 included, nothing after
    start, labels = trigger_labels(sample.triggers[1], 7)
    assert start == 2 and labels == [1, 0, 0, 0, 0]


def test_default_weights_are_the_papers_and_normalisation_by_positions():
    w = TriggerWeights()
    assert (w.weight_first_silence, w.weight_repeated_silence, w.weight_response, w.normalise) == (1.0, 0.8, 1.5, "positions")
    roles = ["first_silence", "repeated_silence", "repeated_silence", "response"]
    assert role_weights(roles, w).tolist() == pytest.approx([1.0, 0.8, 0.8, 1.5])
    with pytest.raises(ValueError, match="unknown role"):
        w.of("silence")


def test_decision_loss_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0, 3.0])
    targets = torch.tensor([0, 0, 0, 1, IGNORE_INDEX])  # the last position is not supervised
    weights = torch.tensor([1.0, 0.8, 0.8, 1.5, 9.0])
    ce = [math.log(2), math.log1p(math.exp(2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(-1.0))]
    weighted = 1.0 * ce[0] + 0.8 * ce[1] + 0.8 * ce[2] + 1.5 * ce[3]
    got_pos = weighted_decision_loss(logits, targets, weights, "positions")
    got_w = weighted_decision_loss(logits, targets, weights, "weights")
    assert float(got_pos) == pytest.approx(weighted / 4, rel=1e-5)
    assert float(got_w) == pytest.approx(weighted / (1.0 + 0.8 + 0.8 + 1.5), rel=1e-5)
    # Down-weighting repeated silence lowers the loss of a model that is wrong on repeated silence.
    uniform = weighted_decision_loss(logits, targets, torch.tensor([1.0, 1.0, 1.0, 1.5, 9.0]), "positions")
    assert float(uniform) > float(got_pos)


def test_token_loss_shifted_like_labels():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[IGNORE_INDEX, 3, 5, 1]])
    weights = torch.tensor([[0.0, 1.5, 1.0, 0.8]])
    shifted_labels, shifted_w = shift_for_causal_lm(labels, weights)
    assert shifted_labels.tolist() == [[3, 5, 1, IGNORE_INDEX]]
    assert shifted_w[0].tolist() == pytest.approx([1.5, 1.0, 0.8, 0.0])
    loss = weighted_token_loss(logits, shifted_labels, shifted_w, "positions")
    logp = torch.log_softmax(logits[0], dim=-1)
    want = -(1.5 * logp[0, 3] + 1.0 * logp[1, 5] + 0.8 * logp[2, 1]) / 3
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    by_w = weighted_token_loss(logits, shifted_labels, shifted_w, "weights")
    assert float(by_w) == pytest.approx(float(want) * 3 / 3.3, rel=1e-5)


def test_uniform_weights_make_both_normalisations_agree():
    logits = torch.tensor([0.3, -0.2, 1.0])
    targets = torch.tensor([0, 1, 0])
    w = torch.ones(3)
    assert float(weighted_decision_loss(logits, targets, w, "positions")) == pytest.approx(
        float(weighted_decision_loss(logits, targets, w, "weights")))


def test_sample_checks():
    with pytest.raises(ValueError, match="before the question"):
        Trigger(trigger_id="q", kind="question", content="x", time=5, responses=[TimedText(content="y", time=4)])
    with pytest.raises(ValueError, match="repeat"):
        StreamSample(sample_id="s", video_name="v", video_path="v", triggers=[
            Trigger(trigger_id="a", kind="question", content="x", time=0),
            Trigger(trigger_id="a", kind="question", content="y", time=1)])
    err = AnnotationFormatError("a.json", 3, "time", "must be a number")
    assert str(err) == "a.json:3: field 'time': must be a number"
