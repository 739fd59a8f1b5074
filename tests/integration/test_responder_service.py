"""The responder against a real Kafka broker, a real memory gRPC server (a small fixed-context
MemoryService servicer, so this does not depend on the memory service itself) and the real
generator server (SmolLM2 behind KServe, shared per session via ``tests/fixtures_generation.py``)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from streamharness import topics
from streamharness.kafka import DLQ_REASON, TYPE_HEADER, EventProducer, ensure_topics
from streamharness.keys import make_key
from streamharness.hosts.kafka import KafkaHost
from streamharness.responder import ResponderSettings, ResponderStage
from streamharness.topology import TOPOLOGY
from streamharness.responder.service import HOP_FINAL, HOP_FIRST_TOKEN
from streamharness.settings import KafkaSettings
from streamharness.v1 import common_pb2, events_pb2, memory_pb2, memory_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
KEY = make_key("acme", "cam-1")
WAIT_S = 180.0


class FixedMemory(memory_pb2_grpc.MemoryServiceServicer):
    """Answers every stream with the same memory and remembers what it was asked."""

    def __init__(self) -> None:
        self.contexts: list[memory_pb2.ContextRequest] = []
        self.recalls: list[memory_pb2.RecallRequest] = []

    def Context(self, request, context):  # noqa: N802 - gRPC name
        self.contexts.append(request)
        return memory_pb2.ContextResponse(
            recent=[
                memory_pb2.MemoryItem(tier=memory_pb2.MEMORY_TIER_SHORT, start_ms=request.now_ms - 2000,
                                      end_ms=request.now_ms - 1000, text="three people walk across a paved square"),
                memory_pb2.MemoryItem(tier=memory_pb2.MEMORY_TIER_SHORT, start_ms=request.now_ms - 1000,
                                      end_ms=request.now_ms, text="two people stop near a bench"),
            ],
            prefix_text="0:00:00-0:01:00: a quiet pedestrian square in daylight, a few people walking.",
            prefix_version="v1",
        )

    def Recall(self, request, context):  # noqa: N802 - gRPC name
        self.recalls.append(request)
        return memory_pb2.RecallResponse(items=[
            memory_pb2.MemoryItem(tier=memory_pb2.MEMORY_TIER_MID, start_ms=30_000, end_ms=60_000,
                                  text="a man with a bag crossed the square", score=0.8),
        ])


@pytest.fixture
def memory_server() -> Iterator[tuple[str, FixedMemory]]:
    servicer = FixedMemory()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    memory_pb2_grpc.add_MemoryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0).wait()


def closed_port_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@contextmanager
def running_responder(kafka_settings: KafkaSettings, generation_settings, memory_address: str) -> Iterator[KafkaHost]:
    settings = ResponderSettings(
        memory_address=memory_address, workers=2, question_max_new_tokens=20, alert_max_new_tokens=16,
        memory_timeout_s=1.0,
    )
    service = KafkaHost(ResponderStage(settings, generation_settings), TOPOLOGY["responder"], kafka_settings)
    service.load()
    service.start()
    try:
        wait_until(service.ready, 60, "responder ready")
        yield service
    finally:
        service.stop(time.monotonic() + 60)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


class TopicReader:
    """Reads a topic from the beginning (all partitions), keeping everything seen."""

    def __init__(self, kafka_settings: KafkaSettings, logical: str) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=kafka_settings.bootstrap_list, enable_auto_commit=False)
        topic = kafka_settings.topic(logical)
        self.consumer.assign([TopicPartition(topic, p) for p in range(kafka_settings.partitions)])
        self.consumer.seek_to_beginning()
        self.records: list = []

    def poll(self) -> None:
        for records in self.consumer.poll(timeout_ms=200).values():
            self.records += records

    def close(self) -> None:
        self.consumer.close()


def responses_for(reader: TopicReader, response_id: str) -> list[events_pb2.ResponseEvent]:
    events = [events_pb2.ResponseEvent.FromString(r.value) for r in reader.records]
    return [e for e in events if e.response_id == response_id]


def wait_for_final(reader: TopicReader, response_id: str, count: int = 1) -> list[events_pb2.ResponseEvent]:
    def done() -> bool:
        reader.poll()
        return sum(e.final for e in responses_for(reader, response_id)) >= count

    wait_until(done, WAIT_S, f"final chunk of {response_id}")
    return responses_for(reader, response_id)


def decision(media_ts_ms: int, *, question: str = "", instruction: str = "") -> events_pb2.DecisionEvent:
    if question:
        trigger, qid, iid, text = common_pb2.TRIGGER_QUESTION, f"q-{media_ts_ms}", "", question
    else:
        trigger, qid, iid, text = common_pb2.TRIGGER_INSTRUCTION, "", "walk-in", instruction
    return events_pb2.DecisionEvent(
        key=KEY, session_id="s-1", media_ts_ms=media_ts_ms, action=events_pb2.DecisionEvent.ACTION_RESPOND,
        trigger=trigger, question_id=qid, instruction_id=iid, prompt_text=text, reason="2 people in view",
        policy="rules", reply_to="gateway-7", decision_id=f"acme/cam-1/{media_ts_ms}/{qid or iid}",
        hops=[common_pb2.HopStamp(hop="gateway", wall_unix_ns=time.time_ns() - 50_000_000),
              common_pb2.HopStamp(hop="decision", wall_unix_ns=time.time_ns())],
    )


def assert_one_complete_response(chunks: list[events_pb2.ResponseEvent], sent: events_pb2.DecisionEvent) -> str:
    assert [c.index for c in chunks] == list(range(len(chunks))), "chunks out of order or missing"
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    for c in chunks:
        assert c.response_id == sent.decision_id
        assert c.reply_to == sent.reply_to
        assert c.key == sent.key and c.session_id == sent.session_id
        assert c.trigger == sent.trigger
        assert (c.question_id, c.instruction_id) == (sent.question_id, sent.instruction_id)
        assert c.media_ts_ms == sent.media_ts_ms
    first_hops = [h.hop for h in chunks[0].hops]
    assert first_hops[:3] == ["gateway", "decision", HOP_FIRST_TOKEN]
    assert chunks[-1].hops[-1].hop == HOP_FINAL
    assert all(not c.hops for c in chunks[1:-1])
    return "".join(c.text for c in chunks)


def test_a_question_is_answered_as_an_ordered_stream_of_chunks(
    kafka_settings, generation_settings, memory_server
) -> None:
    address, memory = memory_server
    ensure_topics(kafka_settings, [topics.DECISIONS, topics.RESPONSES])
    reader = TopicReader(kafka_settings, topics.RESPONSES)
    sent = decision(83_000, question="what is happening?")
    try:
        with running_responder(kafka_settings, generation_settings, address):
            with EventProducer(kafka_settings, client_id="test") as producer:
                producer.send(topics.DECISIONS, KEY, sent).get(timeout=30)
            chunks = wait_for_final(reader, sent.decision_id)
    finally:
        reader.close()
    text = assert_one_complete_response(chunks, sent)
    assert len(chunks) >= 3, [c.text for c in chunks]  # streamed: several text chunks, then the final one
    assert sum(c.isalpha() for c in text) >= 10, text
    # The prompt was built from the stream's memory at the decision's media time.
    assert [(r.key, r.now_ms) for r in memory.contexts] == [(KEY, 83_000)]
    assert [(r.key, r.query, r.to_ms) for r in memory.recalls] == [(KEY, "what is happening?", 83_000)]


def test_without_memory_and_with_bad_records_it_keeps_answering(kafka_settings, generation_settings) -> None:
    ensure_topics(kafka_settings, [topics.DECISIONS, topics.RESPONSES])
    reader = TopicReader(kafka_settings, topics.RESPONSES)
    dead = TopicReader(kafka_settings, kafka_settings.dead_letter_topic)
    alert = decision(5_000, instruction="tell me when someone walks in")
    no_id = decision(6_000, question="who is there?")
    no_id.decision_id = ""
    try:
        # Memory is down (nothing listens at its address): responses come from what decisions carry.
        with running_responder(kafka_settings, generation_settings, closed_port_address()) as service:
            with EventProducer(kafka_settings, client_id="test") as producer:
                full = kafka_settings.topic(topics.DECISIONS)
                producer.send_raw(full, b"acme/cam-1", b"\xff\x00garbage",
                                  [(TYPE_HEADER, events_pb2.DecisionEvent.DESCRIPTOR.full_name.encode())]).get(timeout=30)
                producer.send(topics.DECISIONS, KEY, no_id).get(timeout=30)
                producer.send(topics.DECISIONS, KEY, alert).get(timeout=30)
                first = wait_for_final(reader, alert.decision_id)
                # Redelivery (a crash before the commit) generates it again, whole, under the same
                # response id and a new attempt (the gateway restarts the response, or drops it when
                # it delivered the first one whole).
                producer.send(topics.DECISIONS, KEY, alert).get(timeout=30)
                both = wait_for_final(reader, alert.decision_id, count=2)

            def dead_lettered() -> bool:
                dead.poll()
                return len(dead.records) >= 2

            wait_until(dead_lettered, 60, "two dead letters")
            assert service.dead_lettered == 2
    finally:
        reader.close()
        dead.close()
    text = assert_one_complete_response(first, alert)
    assert text.strip(), "an alert must say something"
    # Memory was down: the answer is the model's, with nothing of the decision step's notes for people.
    assert alert.reason not in text and "decision step" not in text.lower(), text
    again = both[len(first):]
    assert_one_complete_response(again, alert)
    assert len({c.attempt for c in first}) == 1 and len({c.attempt for c in again}) == 1
    assert first[0].attempt and again[0].attempt != first[0].attempt
    assert [(c.index, c.text, c.final) for c in again] == [(c.index, c.text, c.final) for c in first]  # greedy: same text
    reasons = sorted(dict(r.headers)[DLQ_REASON] for r in dead.records)
    assert reasons == [b"handler-failed", b"undecodable"]


def test_the_service_answers_then_drains_and_exits_zero_on_sigterm(kafka_settings, generation_settings, tmp_path) -> None:
    """services/responder/main.py as a real process: health SERVING once the generator answers, a
    decision answered and its offset committed, SIGTERM → exit 0."""
    ensure_topics(kafka_settings, [topics.DECISIONS, topics.RESPONSES])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SH_", "OTEL_"))}
    env.update({
        "SH_SERVICE_NAME": "responder",
        "SH_GRPC_PORT": "0",
        "SH_SHUTDOWN_GRACE_S": "30",
        "SH_READINESS_INTERVAL_S": "0.5",
        "SH_TELEMETRY_LOG_JSON": "true",  # one line per record: the port is read from the log
        "SH_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "SH_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "SH_KAFKA_PARTITIONS": str(kafka_settings.partitions),
        "SH_GENERATION_BASE_URL": generation_settings.base_url,
        "SH_GENERATION_MAX_NEW_TOKENS": "12",
        "SH_RESPONDER_MEMORY_ADDRESS": "",
        "SH_RESPONDER_WORKERS": "1",
    })
    log_path = tmp_path / "responder.log"
    reader = TopicReader(kafka_settings, topics.RESPONSES)
    sent = decision(9_000, question="is anyone there?")
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "services" / "responder" / "main.py")], cwd=tmp_path,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        port = wait_for_port(log_path, process)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                return status == health_pb2.HealthCheckResponse.SERVING

            wait_until(serving, 60, "health SERVING")
        with EventProducer(kafka_settings, client_id="test") as producer:
            producer.send(topics.DECISIONS, KEY, sent).get(timeout=30)
        assert_one_complete_response(wait_for_final(reader, sent.decision_id), sent)
        wait_until(lambda: committed(kafka_settings, "responder") == 1, 60, "the decision's offset committed")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=45) == 0, log_path.read_text()
    finally:
        reader.close()
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_for_port(log_path, process: subprocess.Popen) -> int:
    found: list[int] = []

    def listening() -> bool:
        assert process.poll() is None, f"responder exited with {process.returncode}:\n{log_path.read_text()}"
        match = re.search(r"responder listening on [\d.]+:(\d+)", log_path.read_text())
        if match:
            found.append(int(match.group(1)))
        return bool(found)

    wait_until(listening, 60, "the responder to listen")
    return found[0]


def committed(kafka_settings: KafkaSettings, group: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_list)
    try:
        full = kafka_settings.topic(group)
        offsets = admin.list_group_offsets({full: None}).get(full, {})
        return sum(meta.offset for tp, meta in offsets.items() if tp.topic == kafka_settings.topic(topics.DECISIONS))
    finally:
        admin.close()
