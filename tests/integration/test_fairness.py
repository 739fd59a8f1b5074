"""Fairness between streams on a real Kafka broker (docs/architecture.md, "Fairness between streams"):
the decision stage reads ``responses`` co-partitioned with its other topics and refuses a flooding
stream's questions past its bound; the responder, with several consumer-group members, answers
each member's batch round-robin by stream and commits it once answered.

The generation backend is the in-process recording one of tests/unit/test_fairness.py: the order
it was asked in is the work ahead of an answer (numbers of generations, not wall-clock time)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from streamharness import topics
from streamharness.decision.policy import RulePolicy
from streamharness.decision.service import REFUSAL_TOO_MANY_OPEN, DecisionSettings, DecisionStage
from streamharness.hosts.kafka import KafkaHost
from streamharness.kafka import EventProducer, ensure_topics
from streamharness.keys import key_str, make_key
from streamharness.responder.service import ResponderSettings, ResponderStage
from streamharness.settings import KafkaSettings
from streamharness.text_encoder import TextEncoder
from streamharness.topology import TOPOLOGY, all_topics
from streamharness.v1 import common_pb2, events_pb2
from tests.unit.test_fairness import Recording, decision_event, finals, frame, question, start

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
LIMIT = DecisionSettings().max_open_questions_per_stream


def partition_of(key: common_pb2.StreamKey, partitions: int) -> int:
    """kafka-python's default partitioner (Java's): murmur2 of the key bytes."""
    return (murmur2(key_str(key).encode()) & 0x7FFFFFFF) % partitions


def keys_on_one_partition(kafka: KafkaSettings) -> tuple[common_pb2.StreamKey, common_pb2.StreamKey, common_pb2.StreamKey]:
    """A flooding stream, a canary on its partition and a stream on another partition."""
    flood = make_key("acme", "flood")
    p = partition_of(flood, kafka.partitions)
    canary = next(k for k in (make_key("acme", f"canary-{i}") for i in range(100)) if partition_of(k, kafka.partitions) == p)
    other = next(k for k in (make_key("zeta", f"cam-{i}") for i in range(100)) if partition_of(k, kafka.partitions) != p)
    return flood, canary, other


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Reader:
    """Every record of a topic (all partitions) from the beginning."""

    def __init__(self, kafka: KafkaSettings, logical: str) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_list, enable_auto_commit=False)
        self.consumer.assign([TopicPartition(kafka.topic(logical), p) for p in range(kafka.partitions)])
        self.consumer.seek_to_beginning()
        self.events: list[events_pb2.ResponseEvent] = []

    def poll(self) -> list[events_pb2.ResponseEvent]:
        for records in self.consumer.poll(timeout_ms=200).values():
            self.events += [events_pb2.ResponseEvent.FromString(r.value) for r in records]
        return self.events

    def close(self) -> None:
        self.consumer.close()


def committed(kafka: KafkaSettings, group: str, logical: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=kafka.bootstrap_list)
    try:
        full = kafka.topic(group)
        offsets = admin.list_group_offsets({full: None}).get(full, {})
        return sum(meta.offset for tp, meta in offsets.items() if tp.topic == kafka.topic(logical))
    finally:
        admin.close()


def started(host: KafkaHost) -> KafkaHost:
    host.load()
    host.start()
    return host


def test_two_responder_members_answer_their_batches_round_robin_and_commit_them(kafka_settings: KafkaSettings):
    flood, canary, other = keys_on_one_partition(kafka_settings)
    ensure_topics(kafka_settings, all_topics())
    sent = [decision_event(flood, n) for n in range(12)] + [decision_event(canary, 0)] + [decision_event(other, n) for n in range(3)]
    with EventProducer(kafka_settings, client_id="test") as producer:
        partitions = {key_str(d.key): producer.send(topics.DECISIONS, d.key, d).get(timeout=30).partition for d in sent}
    assert partitions[key_str(flood)] == partitions[key_str(canary)] != partitions[key_str(other)]
    generator = Recording()
    reader = Reader(kafka_settings, topics.RESPONSES)
    settings = ResponderSettings(memory_address="", workers=2, batch_records=16)
    host = started(KafkaHost(ResponderStage(settings, generator=generator), TOPOLOGY["responder"], kafka_settings))
    try:
        wait_until(lambda: len(finals(reader.poll())) == len(sent), "every decision answered")
        wait_until(lambda: committed(kafka_settings, "responder", topics.DECISIONS) == len(sent), "the batches committed")
    finally:
        host.stop(time.monotonic() + 30)
        reader.close()
    on_the_partition = [s for s, _ in generator.asked if s in (key_str(flood), key_str(canary))]
    # The canary's decision came after 12 of the flood's in its partition; it waited for one of them.
    assert on_the_partition.index(key_str(canary)) <= 1
    for key, n in ((flood, 12), (other, 3)):
        asked = [q for s, q in generator.asked if s == key_str(key)]
        assert asked == [f"question {key.stream_id}-{i}?" for i in range(n)]  # each stream's own order
        answered = [e.question_id for e in reader.events if e.key == key and e.final]
        assert answered == [f"{key.stream_id}-{i}" for i in range(n)]


def test_a_flood_on_kafka_is_refused_past_the_bound_and_an_answer_frees_a_slot(kafka_settings: KafkaSettings):
    flood, canary, _ = keys_on_one_partition(kafka_settings)
    ensure_topics(kafka_settings, all_topics())
    inputs: list[tuple[str, common_pb2.StreamKey, object]] = []
    for key in (flood, canary):
        inputs += [(topics.QUERIES, key, start(key)), (topics.EMBEDDINGS, key, frame(key, 0))]
    inputs += [(topics.QUERIES, flood, question(flood, f"a-{i}", 1000)) for i in range(20)]
    inputs.append((topics.QUERIES, canary, question(canary, "b-0", 1000)))
    inputs += [(topics.EMBEDDINGS, key, frame(key, 1000)) for key in (flood, canary)]
    with EventProducer(kafka_settings, client_id="test") as producer:
        for topic, key, message in inputs:
            producer.send(topic, key, message)
        producer.flush(30)
    generator = Recording()
    reader = Reader(kafka_settings, topics.RESPONSES)
    decision = started(KafkaHost(DecisionStage(DecisionSettings(policy="rules"), policy=RulePolicy(TextEncoder().load().encode)),
                                 TOPOLOGY["decision"], kafka_settings))
    responder = started(KafkaHost(ResponderStage(ResponderSettings(memory_address="", workers=2), generator=generator),
                                  TOPOLOGY["responder"], kafka_settings))
    try:
        assert topics.RESPONSES in decision.spec.consumes
        wait_until(lambda: len(finals(reader.poll())) == 21, "21 questions closed")
        first = finals(reader.events)
        # The decision stage has read back every record of the responses (the answers close the slots).
        wait_until(lambda: decision.processed >= len(inputs) + len(reader.poll()), "the answers read by the decision stage")
        with EventProducer(kafka_settings, client_id="test-2") as producer:
            producer.send(topics.QUERIES, flood, question(flood, "a-20", 1500))
            producer.send(topics.EMBEDDINGS, flood, frame(flood, 2000))
            producer.flush(30)
        wait_until(lambda: "a-20" in finals(reader.poll()), "the question after the answers")
        again = finals(reader.events)["a-20"]
    finally:
        decision.stop(time.monotonic() + 30)
        responder.stop(time.monotonic() + 30)
        reader.close()
    refused = {q for q, e in first.items() if not e.answer_text}
    assert refused == {f"a-{i}" for i in range(LIMIT, 20)}
    assert all(first[q].text == REFUSAL_TOO_MANY_OPEN.format(limit=LIMIT) for q in refused)
    assert first["b-0"].answer_text == "answer to question b-0?"
    assert next(i for i, (s, _) in enumerate(generator.asked) if s == key_str(canary)) <= LIMIT
    assert again.answer_text == "answer to question a-20?"
