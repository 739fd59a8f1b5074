"""End to end with ``SH_DECISION_POLICY=model``: the decision service, as its own process behind a
real Kafka broker, steps SmolLM2 on its streaming engine every second and writes its own answers.
The gateway relays them, and the responder (also running) answers none of them."""

from __future__ import annotations

import asyncio
import time

import pytest
from kafka import KafkaConsumer

from streamharness.devinfra.stack import LocalStack
from streamharness.media import sample_path
from streamharness.player import TimedQuestion, play
from streamharness.v1 import events_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def model_stack(tmp_path_factory):
    env = {"SH_DECISION_POLICY": "model", "SH_DECISION_MODEL_QUESTION_MAX_NEW_TOKENS": "24",
           "SH_DECISION_MODEL_ALERT_MAX_NEW_TOKENS": "16", "SH_GENERATION_MAX_NEW_TOKENS": "16"}
    with LocalStack(tmp_path_factory.mktemp("model-stack"), gateways=1, extra_env=env) as s:
        yield s


def decisions_of(stack: LocalStack, key: str, timeout_s: float = 60) -> list[events_pb2.DecisionEvent]:
    consumer = KafkaConsumer("decisions", bootstrap_servers=stack.broker.bootstrap_servers,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=5000)
    out: list[events_pb2.DecisionEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=1000)
            if not polled and out:
                break
            for records in polled.values():
                out += [events_pb2.DecisionEvent.FromString(r.value) for r in records if r.key.decode() == key]
    finally:
        consumer.close()
    return out


def test_the_decision_service_answers_a_question_on_its_cache_through_kafka(model_stack):
    question = TimedQuestion(5_000, "How many people are in the street?")
    result = asyncio.run(play(model_stack.gateway_addresses[0], sample_path("vtest.avi"), stream_id="model-e2e",
                              questions=[question], watch_for=["tell me when someone walks in"],
                              speed=2.0, send_fps=1.0, limit_s=12))
    (qid,) = result.question_ids
    answers = [r for r in result.responses if r.question_id == qid]
    assert len(answers) == 1 and answers[0].text.strip()
    assert answers[0].media_ts_ms >= question.at_ms
    assert answers[0].first_chunk_wall > result.asked_wall[qid]
    # The decision service wrote it: its decision for the question says so, and nobody answered twice.
    decisions = decisions_of(model_stack, "default/model-e2e")
    for_question = [d for d in decisions if d.question_id == qid]
    assert for_question and all(d.answered for d in for_question)
    assert all(d.answered for d in decisions)  # the responder had nothing to do for this stream
