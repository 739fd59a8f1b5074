"""The memory service end to end: a real Kafka broker, the service in-process behind a real gRPC
server, Qdrant's engine in a temporary folder, the real MiniLM text encoder.

One stream shows an empty street for 30 s, then 2 people and a trolleybus for 30 s, then a dog for
30 s; memory must answer Recall and Context from the stored frames at the right media times, and
never from frames after the time asked about.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from streamharness import topics
from streamharness.devinfra.kafka_broker import KafkaBroker
from streamharness.kafka import TYPE_HEADER, EventProducer, client_config, ensure_topics
from streamharness.keys import make_key
from streamharness.hosts.kafka import KafkaHost
from streamharness.memory.service import MemorySettings, MemoryStage
from streamharness.topology import TOPOLOGY
from streamharness.runner import ServiceRunner
from streamharness.settings import KafkaSettings, ServiceSettings, load_settings
from streamharness.text_encoder import TextEncoder, default_model_dir, export_text_encoder, is_exported
from streamharness.v1 import events_pb2, memory_pb2, memory_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TENANT, STREAM = "acme", "cam-1"
KEY = make_key(TENANT, STREAM)
WINDOW_S = 30.0  # short-term tier and digest chunk of this test (the default T_s is 200 s)


def caption_at(second: int) -> str:
    if second < 30:
        return "empty street"
    if second < 60:
        return "2 people; trolleybus"
    return "a dog on the pavement"


def encoded_frame(second: int) -> events_pb2.EncodedFrameEvent:
    caption = caption_at(second)
    return events_pb2.EncodedFrameEvent(
        key=KEY,
        session_id="s1",
        media_ts_ms=second * 1000,
        seq=second,
        embedding=[0.0] * 8,
        labels=[events_pb2.Label(name="street", score=0.5)],
        person_count=2 if "people" in caption else 0,
        caption=caption,
    )


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Running:
    service: KafkaHost
    runner: ServiceRunner
    stub: memory_pb2_grpc.MemoryServiceStub
    kafka: KafkaSettings


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    if not is_exported(default_model_dir()):
        pytest.importorskip("torch", reason="exporting the text encoder needs the models extra (torch)")
    return TextEncoder(model_dir=export_text_encoder())


@contextmanager
def running_memory(kafka_settings: KafkaSettings, text_encoder: TextEncoder, data_dir: Path) -> Iterator[Running]:
    # Frames first, the malformed records among them, then the service starts: a new consumer
    # group reads from the earliest offset, so everything already on the topic is remembered.
    ensure_topics(kafka_settings, [topics.EMBEDDINGS])
    producer = EventProducer(kafka_settings, client_id="test-encoder")
    topic = kafka_settings.topic(topics.EMBEDDINGS)
    key = f"{TENANT}/{STREAM}".encode()
    producer.send_raw(topic, key, b"\x08\x96\x01garbage", [(TYPE_HEADER, b"streamharness.v1.EncodedFrameEvent")])
    producer.send_raw(topic, key, b"not even protobuf", [])
    bad_time = encoded_frame(5)
    bad_time.media_ts_ms = -5
    producer.send(topics.EMBEDDINGS, KEY, bad_time)
    for second in range(90):
        producer.send(topics.EMBEDDINGS, KEY, encoded_frame(second))
    for second in (31, 32, 33):  # redelivered records: overwrite, never duplicate
        producer.send(topics.EMBEDDINGS, KEY, encoded_frame(second))
    producer.flush(30)
    producer.close()

    settings = MemorySettings(
        data_dir=data_dir, recent_window_s=WINDOW_S, chunk_s=WINDOW_S, edge_search_threads=1, flush_interval_s=1.0
    )
    service = KafkaHost(MemoryStage(settings, text_encoder=text_encoder), TOPOLOGY["memory"], kafka_settings)
    runner = ServiceRunner(service, load_settings(ServiceSettings, grpc_port=0, service_name="memory-test", shutdown_grace_s=15))
    runner.serve()
    channel = grpc.insecure_channel(f"127.0.0.1:{runner.port}")
    try:
        yield Running(service, runner, memory_pb2_grpc.MemoryServiceStub(channel), kafka_settings)
    finally:
        channel.close()
        runner.request_stop()
        runner.shutdown()


@pytest.fixture(scope="module")
def memory(kafka_broker: KafkaBroker, text_encoder: TextEncoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One service for the read-only tests (its own topic prefix, like the kafka_settings fixture)."""
    settings = load_settings(
        KafkaSettings,
        bootstrap_servers=kafka_broker.bootstrap_servers,
        security_protocol="PLAINTEXT",
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        partitions=3,
        consumer_poll_timeout_ms=100,
    )
    with running_memory(settings, text_encoder, tmp_path_factory.mktemp("memory")) as m:
        yield m


def remembered(m: Running) -> None:
    """Every record handled: 90 frames + 3 redelivered ones stored, 3 malformed ones dead-lettered."""
    host = m.service
    wait_until(lambda: host.processed >= 93 and host.dead_lettered >= 3, "all 96 records handled")
    assert m.service.stage.store.count(f"{TENANT}/{STREAM}") == 90


def test_recall_finds_what_was_seen_at_the_right_time(memory: Running) -> None:
    remembered(memory)
    assert memory.service.ready()
    # "What did you see 30 seconds ago?" asked at 60 s: the responder asks about [25 s, 40 s].
    reply = memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="people and a bus", from_ms=25_000, to_ms=40_000, limit=5))
    assert len(reply.items) == 5
    assert all(25_000 <= item.start_ms <= 40_000 for item in reply.items)
    top = reply.items[0]
    assert top.text == "2 people; trolleybus" and 30_000 <= top.start_ms <= 40_000
    assert top.person_count == 2 and list(top.labels) == ["street"] and top.tier == memory_pb2.MEMORY_TIER_SHORT
    assert top.item_id == f"{TENANT}/{STREAM}/{top.start_ms}" and top.score > 0.3
    assert [i.score for i in reply.items] == sorted((i.score for i in reply.items), reverse=True)

    street = memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="an empty street", limit=3))
    assert [i.text for i in street.items] == ["empty street"] * 3 and all(i.start_ms < 30_000 for i in street.items)

    # Never about the future of the time asked: the dog (60-89 s) is not there up to 60 s.
    dog = memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="a dog", to_ms=60_000, limit=100))
    assert dog.items and max(i.start_ms for i in dog.items) <= 60_000
    assert memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="a dog", limit=1)).items[0].text == "a dog on the pavement"

    # Redelivered frames overwrote themselves; an unknown stream has no memory (not an error).
    assert memory.service.stage.store.count(f"{TENANT}/{STREAM}") == 90
    unknown = memory.stub.Recall(memory_pb2.RecallRequest(key=make_key(TENANT, "cam-9"), query="a bus"))
    assert list(unknown.items) == []


def test_context_gives_recent_frames_and_a_prefix_of_completed_chunks(memory: Running) -> None:
    remembered(memory)
    ctx = memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=60_000))
    # Short-term: media time in (30 s, 60 s], oldest first; nothing after now (the dog).
    assert [i.start_ms for i in ctx.recent] == list(range(31_000, 60_001, 1000))
    assert {i.text for i in ctx.recent[:-1]} == {"2 people; trolleybus"} and ctx.recent[-1].text == "a dog on the pavement"
    # Digests of the completed chunks [0, 30 s) and [30 s, 60 s).
    assert [(s.start_ms, s.end_ms) for s in ctx.summaries] == [(0, 30_000), (30_000, 60_000)]
    assert "empty street (30x)" in ctx.summaries[0].text and "up to 0 people" in ctx.summaries[0].text
    assert "2 people; trolleybus (30x)" in ctx.summaries[1].text and ctx.summaries[1].person_count == 2
    assert all(s.tier == memory_pb2.MEMORY_TIER_MID for s in ctx.summaries) and list(ctx.blocks) == []
    assert "[00:00:00-00:00:30] 30 frames: empty street (30x)" in ctx.prefix_text
    assert "dog" not in ctx.prefix_text
    assert ctx.prefix_version

    # The prefix (and its version) moves only when a chunk completes.
    later = memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=75_500, max_recent=5))
    assert later.prefix_version == ctx.prefix_version and later.prefix_text == ctx.prefix_text
    assert [i.start_ms for i in later.recent] == [71_000, 72_000, 73_000, 74_000, 75_000]
    next_chunk = memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=90_000))
    assert next_chunk.prefix_version != ctx.prefix_version and "a dog on the pavement (30x)" in next_chunk.prefix_text

    early = memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=10_000))
    assert [i.start_ms for i in early.recent] == list(range(0, 10_001, 1000)) and early.prefix_text == ""


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (memory_pb2.RecallRequest(key=KEY, query="   "), "query is empty"),
        (memory_pb2.RecallRequest(key=KEY, query="a bus", from_ms=40_000, to_ms=30_000), "after to_ms"),
        (memory_pb2.RecallRequest(key=KEY, query="a bus", from_ms=-1), ">= 0"),
        (memory_pb2.RecallRequest(key=KEY, query="a bus", limit=1000), "SH_MEMORY_RECALL_MAX_LIMIT"),
        (memory_pb2.RecallRequest(key=make_key("acme", "cam-1"), query="x" * 3000), "SH_MEMORY_RECALL_MAX_QUERY_CHARS"),
        (memory_pb2.RecallRequest(query="a bus"), "tenant"),
        (memory_pb2.ContextRequest(key=KEY, now_ms=-1), "negative"),
        (memory_pb2.ContextRequest(key=KEY, now_ms=1000, max_recent=100_000), "SH_MEMORY_CONTEXT_MAX_RECENT"),
    ],
)
def test_bad_requests_are_invalid_argument_with_a_message(memory: Running, request_, message: str) -> None:
    call = memory.stub.Recall if isinstance(request_, memory_pb2.RecallRequest) else memory.stub.Context
    with pytest.raises(grpc.RpcError) as err:
        call(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_stop_commits_what_was_remembered(kafka_settings: KafkaSettings, text_encoder: TextEncoder, tmp_path: Path) -> None:
    with running_memory(kafka_settings, text_encoder, tmp_path) as memory:
        remembered(memory)
        memory.runner.request_stop()
        assert memory.runner.shutdown()
        assert not memory.service.stage.store.is_open and not memory.service.ready()

    settings = memory.kafka
    topic = settings.topic(topics.EMBEDDINGS)
    admin = KafkaAdminClient(**client_config(settings))
    probe = KafkaConsumer(**client_config(settings))
    try:
        group = settings.topic("memory")
        committed = admin.list_group_offsets({group: None})[group]
        partitions = [TopicPartition(topic, p) for p in probe.partitions_for_topic(topic)]
        ends = probe.end_offsets(partitions)
    finally:
        admin.close()
        probe.close()
    assert {tp: committed[tp].offset for tp in partitions if tp in committed} == {tp: end for tp, end in ends.items() if end}


def test_a_late_frame_in_a_completed_chunk_updates_the_prefix(kafka_settings: KafkaSettings, text_encoder: TextEncoder, tmp_path: Path) -> None:
    with running_memory(kafka_settings, text_encoder, tmp_path) as memory:
        remembered(memory)
        before = memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=60_000))  # digests now cached
        assert memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=60_000)).prefix_version == before.prefix_version
        late = encoded_frame(10)
        late.media_ts_ms, late.caption = 10_500, "a cyclist"
        with EventProducer(kafka_settings, client_id="test-late") as producer:
            producer.send(topics.EMBEDDINGS, KEY, late).get(timeout=30)
        wait_until(lambda: memory.service.stage.store.count(f"{TENANT}/{STREAM}") == 91, "the late frame stored")
        after = memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=60_000))
        assert "a cyclist (1x)" in after.summaries[0].text and after.summaries[1].text == before.summaries[1].text
        assert after.prefix_version != before.prefix_version
