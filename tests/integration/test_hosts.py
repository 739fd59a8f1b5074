"""One stage, two hosts: the same input records give the same output records on the Kafka host
(real broker) and on the local host, and a failing handler is retried, given up and dead-lettered
the same way on both."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from kafka import KafkaConsumer, TopicPartition

from streamharness import topics
from streamharness.decision.policy import RulePolicy
from streamharness.decision.service import DecisionSettings, DecisionStage
from streamharness.hosts.kafka import KafkaHost
from streamharness.hosts.local import LocalHost
from streamharness.kafka import EventProducer, ensure_topics
from streamharness.keys import make_key
from streamharness.records import DLQ_ERROR
from streamharness.settings import KafkaSettings
from streamharness.text_encoder import TextEncoder
from streamharness.topology import TOPOLOGY, all_topics
from streamharness.v1 import common_pb2, events_pb2
from tests.unit.test_local_host import SPEC, _frame, _Recorder

pytestmark = pytest.mark.integration
KEY = make_key("acme", "cam")
Q = events_pb2.QueryEvent


def read_all(kafka: KafkaSettings, full_topic: str, count: int, timeout_s: float = 60) -> list:
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_list, enable_auto_commit=False)
    try:
        consumer.assign([TopicPartition(full_topic, p) for p in consumer.partitions_for_topic(full_topic) or []])
        consumer.seek_to_beginning()
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records += batch
        time.sleep(0.5)  # and nothing more than expected arrives
        for batch in consumer.poll(timeout_ms=500).values():
            records += batch
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def inputs() -> list[tuple[str, object]]:
    """A session with a standing instruction, a question and 12 frames (people walk in at 4 s)."""
    records: list[tuple[str, object]] = [(topics.QUERIES, Q(
        key=KEY, session_id="s1", kind=Q.KIND_SESSION_START, reply_to="gw",
        instructions=[common_pb2.StandingInstruction(instruction_id="walk-in", text="tell me when someone walks in")]))]
    records.append((topics.QUERIES, Q(key=KEY, session_id="s1", kind=Q.KIND_QUESTION, question_id="q1",
                                      text="how many people are there?", media_ts_ms=6000, reply_to="gw")))
    emb = np.zeros(1280, np.float32)
    emb[0] = 1
    for second in range(12):
        people = 0 if second < 4 else 2
        records.append((topics.EMBEDDINGS, events_pb2.EncodedFrameEvent(
            key=KEY, session_id="s1", media_ts_ms=second * 1000, seq=second, embedding=emb.tolist(),
            person_count=people, caption=f"{people} people; street sign")))
    records.append((topics.QUERIES, Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_END, media_ts_ms=11000)))
    return records


def semantic(decision: events_pb2.DecisionEvent) -> tuple:
    return (decision.decision_id, decision.media_ts_ms, decision.trigger, decision.question_id,
            decision.instruction_id, decision.prompt_text, decision.reason, decision.policy, decision.reply_to)


def test_the_decision_stage_decides_the_same_on_both_hosts(kafka_settings: KafkaSettings):
    encoder = TextEncoder().load()
    settings = DecisionSettings()

    local = LocalHost(kafka_settings)
    local.add(DecisionStage(settings, policy=RulePolicy(encoder.encode)))
    for topic, message in inputs():
        local.bus.send(topic, KEY, message)
    local.run_until_idle()
    expected = [semantic(events_pb2.DecisionEvent.FromString(r.value)) for r in local.bus.take(topics.DECISIONS)]
    assert {d[2] for d in expected} == {common_pb2.TRIGGER_INSTRUCTION, common_pb2.TRIGGER_QUESTION}, expected

    ensure_topics(kafka_settings, all_topics())
    with EventProducer(kafka_settings, client_id="test-inputs") as producer:
        for topic, message in inputs():
            producer.send(topic, KEY, message)
        producer.flush(30)
    host = KafkaHost(DecisionStage(settings, policy=RulePolicy(encoder.encode)), TOPOLOGY["decision"], kafka_settings)
    host.load()
    host.start()
    try:
        wait_until(lambda: host.processed >= len(inputs()), "every input handled on Kafka")
    finally:
        host.stop(time.monotonic() + 30)
    got = [semantic(events_pb2.DecisionEvent.FromString(r.value))
           for r in read_all(kafka_settings, kafka_settings.topic(topics.DECISIONS), len(expected))]
    assert got == expected


def test_a_failing_handler_is_retried_given_up_and_dead_lettered_the_same_way_on_both_hosts(kafka_settings: KafkaSettings):
    kafka = kafka_settings.model_copy(update={"handler_retries": 3})
    frames = [_frame(seq) for seq in (1, 2, 3, 4, 5)]
    failures = {"fail_seqs": {2}, "invalid_seqs": {3}, "batch_reject_seqs": {4}}

    local_stage = _Recorder(**failures)
    local = LocalHost(kafka)
    local.add(local_stage, SPEC)
    for f in frames:
        local.bus.send(topics.FRAMES, KEY, f)
    local.run_until_idle()

    ensure_topics(kafka, [topics.FRAMES, topics.EMBEDDINGS], partitions=1)
    with EventProducer(kafka, client_id="test-frames") as producer:
        for f in frames:
            producer.send(topics.FRAMES, KEY, f)
        producer.flush(30)
    kafka_stage = _Recorder(**failures)
    host = KafkaHost(kafka_stage, SPEC, kafka)
    host.load()
    host.start()
    try:
        wait_until(lambda: host.processed + host.dead_lettered >= len(frames) - 1 and len(kafka_stage.calls) >= 7,
                   "every frame handled on Kafka")
    finally:
        host.stop(time.monotonic() + 30)

    assert kafka_stage.calls == local_stage.calls == [1, 2, 2, 2, 3, 4, 5]
    assert kafka_stage.given_up == local_stage.given_up == [(2, "RuntimeError"), (3, "InvalidInput")]

    def letter(record) -> tuple:
        headers = {k: v for k, v in record.headers if k.startswith("sh-dlq-") and k != DLQ_ERROR}
        return record.key, record.value, tuple(sorted(headers.items())), dict(record.headers)[DLQ_ERROR].decode()[:40]

    # seq 2 (gave up) and 3 (bad input) by the host, seq 4 by the stage from inside its batch
    kafka_letters = read_all(kafka, kafka.topic(kafka.dead_letter_topic), 3)
    assert [letter(r) for r in kafka_letters] == [letter(r) for r in local.bus.dead_letters]
    assert [events_pb2.FrameEvent.FromString(r.value).seq for r in kafka_letters] == [2, 3, 4]
    outputs = read_all(kafka, kafka.topic(topics.EMBEDDINGS), 3)
    assert [r.value for r in outputs] == [r.value for r in local.bus.take(topics.EMBEDDINGS)]
