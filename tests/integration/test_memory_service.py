"""The memory and summariser services end to end: a real Kafka broker, both stages on the Kafka host
(memory behind a real gRPC server, the summariser reading back from it over gRPC), Qdrant's engine in
a temporary folder, the real MiniLM text encoder; the summariser's backend is the deterministic
digest (the model backends have their own tests).

One stream shows an empty street for 30 s, then 2 people and a trolleybus for 30 s, then a dog for
30 s, and one question was answered at 45 s; memory must answer Recall and Context from its tiers
at the right media times, never from after the time asked about; the services killed (SIGKILL)
mid-stream and restarted resume from committed offsets with no duplicated or missing summaries.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
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
from streamharness.decision.policy import RulePolicy
from streamharness.decision.service import DecisionSettings, DecisionStage
from streamharness.devinfra.common import free_port
from streamharness.auth import AuthSettings, InternalTokens
from streamharness.memory.service import MemorySettings, MemoryStage
from streamharness.memory.store import Scope
from streamharness.memory.tiers import TierSettings
from streamharness.summariser.backends import DigestSummariser
from streamharness.summariser.settings import SummariserSettings
from streamharness.summariser.stage import SummariserStage
from streamharness.topology import TOPOLOGY
from streamharness.runner import ServiceRunner
from streamharness.settings import KafkaSettings, ServiceSettings, load_settings
from streamharness.text_encoder import TextEncoder, default_model_dir, export_text_encoder, is_exported
from streamharness.v1 import common_pb2, events_pb2, memory_pb2, memory_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TENANT, STREAM = "acme", "cam-1"
KEY = make_key(TENANT, STREAM)
SKEY = f"{TENANT}/{STREAM}"
CHUNK_S, LEAD, M = 30, 5, 3  # chunks of 30 s cut 5 frames early, blocks of 3 chunks
TIERS = TierSettings(chunk_s=CHUNK_S, summaries_per_block=M, blocks_kept=4)
ROOT = Path(__file__).resolve().parents[2]


def caption_at(second: int) -> str:
    if second < 30:
        return "empty street"
    if second < 60:
        return "2 people; trolleybus"
    return "a dog on the pavement"


def encoded_frame(second: int, key: common_pb2.StreamKey = KEY) -> events_pb2.EncodedFrameEvent:
    caption = caption_at(second)
    return events_pb2.EncodedFrameEvent(
        key=key, session_id="s1", media_ts_ms=second * 1000, seq=second, embedding=[0.0] * 8,
        labels=[events_pb2.Label(name="street", score=0.5)], person_count=2 if "people" in caption else 0, caption=caption,
    )


def answer_at(second: int) -> events_pb2.ResponseEvent:
    return events_pb2.ResponseEvent(key=KEY, response_id=f"{SKEY}/{second * 1000}/q1", index=3, final=True,
                                    trigger=common_pb2.TRIGGER_QUESTION, media_ts_ms=second * 1000,
                                    prompt_text="Is there a bus?", answer_text="Yes, a trolleybus with 2 people.")


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


TOKENS = InternalTokens(AuthSettings(), "memory-test")


def as_tenant(tenant: str) -> tuple[tuple[str, str], ...]:
    """The metadata a stage acting for ``tenant`` sends (a signed internal identity token)."""
    return TOKENS.metadata(tenant, "memory")


class AsStreamTenant:
    """``MemoryServiceStub`` whose calls carry the identity of the request's stream's tenant (as the
    stages' :class:`~streamharness.memory.client.MemoryClient` does), unless ``metadata`` is given."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = memory_pb2_grpc.MemoryServiceStub(channel)

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)

        def call(request, metadata=None, **kw):
            return method(request, metadata=as_tenant(request.key.tenant) if metadata is None else metadata, **kw)

        return call


@dataclass
class Running:
    service: KafkaHost
    runner: ServiceRunner
    stub: memory_pb2_grpc.MemoryServiceStub
    kafka: KafkaSettings
    summariser: KafkaHost | None = None


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    if not is_exported(default_model_dir()):
        pytest.importorskip("torch", reason="exporting the text encoder needs the models extra (torch)")
    return TextEncoder(model_dir=export_text_encoder())


def produce(kafka: KafkaSettings, records: list[tuple[str, object]]) -> None:
    with EventProducer(kafka, client_id="test-producer") as producer:
        for topic, message in records:
            producer.send(topic, KEY, message)
        producer.flush(30)


def summariser_settings(memory_port: int) -> SummariserSettings:
    return SummariserSettings(backend="digest", lead_frames=LEAD, memory_address=f"127.0.0.1:{memory_port}", retry_wait_s=0)


@contextmanager
def running_memory(kafka_settings: KafkaSettings, text_encoder: TextEncoder, data_dir: Path, *, summariser: bool = True) -> Iterator[Running]:
    # Records first, the malformed ones among them, then the services start: a new consumer group
    # reads from the earliest offset, so everything already on the topics is remembered.
    ensure_topics(kafka_settings, [topics.EMBEDDINGS, topics.SUMMARIES, topics.RESPONSES, topics.FRAMES])
    producer = EventProducer(kafka_settings, client_id="test-encoder")
    topic = kafka_settings.topic(topics.EMBEDDINGS)
    key = SKEY.encode()
    producer.send_raw(topic, key, b"\x08\x96\x01garbage", [(TYPE_HEADER, b"streamharness.v1.EncodedFrameEvent")])
    producer.send_raw(topic, key, b"not even protobuf", [])
    bad_time = encoded_frame(5)
    bad_time.media_ts_ms = -5
    producer.send(topics.EMBEDDINGS, KEY, bad_time)
    for second in range(90):
        producer.send(topics.EMBEDDINGS, KEY, encoded_frame(second))
    for second in (31, 32, 33):  # redelivered records: overwrite, never duplicate
        producer.send(topics.EMBEDDINGS, KEY, encoded_frame(second))
    producer.send(topics.RESPONSES, KEY, answer_at(45))
    producer.flush(30)
    producer.close()

    settings = MemorySettings(data_dir=data_dir, edge_search_threads=1, flush_interval_s=1.0)
    service = KafkaHost(MemoryStage(settings, TIERS, text_encoder=text_encoder), TOPOLOGY["memory"], kafka_settings)
    runner = ServiceRunner(service, load_settings(ServiceSettings, grpc_port=0, service_name="memory-test", shutdown_grace_s=15))
    runner.serve()
    writer = None
    if summariser:
        writer = KafkaHost(SummariserStage(summariser_settings(runner.port), TIERS, backend=DigestSummariser()),
                           TOPOLOGY["summariser"], kafka_settings)
        writer.load()
        writer.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{runner.port}")
    try:
        yield Running(service, runner, AsStreamTenant(channel), kafka_settings, writer)
    finally:
        channel.close()
        if writer is not None:
            writer.stop(time.monotonic() + 15)
        runner.request_stop()
        runner.shutdown()


@pytest.fixture(scope="module")
def memory(kafka_broker: KafkaBroker, text_encoder: TextEncoder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One pair of services for the read-only tests (its own topic prefix, like the kafka_settings fixture)."""
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


def stored(m: Running, tier: str) -> list:
    return list(m.service.stage.store.scan(Scope(SKEY, (tier,))))


def remembered(m: Running) -> None:
    """Every record handled: 90 frames (+3 redelivered), the answer, 3 summaries and a block stored,
    3 malformed frames dead-lettered."""
    wait_until(lambda: m.service.dead_lettered >= 3 and len(stored(m, "long")) == 1 and len(stored(m, "qa")) == 1,
               "frames, summaries, the block and the answer stored")
    assert len(stored(m, "short")) == 90 and [s.index for s in stored(m, "mid")] == [0, 1, 2]


def test_recall_finds_what_was_seen_and_said_at_the_right_time(memory: Running) -> None:
    remembered(memory)
    assert memory.service.ready() and memory.summariser.ready()
    # "What did you see 30 seconds ago?" asked at 60 s: the responder asks about [25 s, 40 s].
    reply = memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="people and a bus", from_ms=25_000, to_ms=40_000,
                                                        limit=3, tiers=[memory_pb2.MEMORY_TIER_SHORT]))
    top = reply.items[0]
    # Runs of equal captions come back as one item spanning the run, within the range asked.
    assert (top.text, top.start_ms, top.end_ms, top.frames) == ("2 people; trolleybus", 30_000, 40_000, 11)
    assert (reply.span_start_ms, reply.span_end_ms) == (30_000, 40_000) and (reply.from_ms, reply.to_ms) == (25_000, 40_000)
    assert top.person_count == 2 and list(top.labels) == ["street"] and top.tier == memory_pb2.MEMORY_TIER_SHORT
    assert top.item_id == f"{SKEY}/short/30000" and top.score > 0.3
    assert [i.score for i in reply.items] == sorted((i.score for i in reply.items), reverse=True)

    # Never about the future of the time asked: the dog (60-89 s) is not there up to 59 s.
    dog = memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="a dog", now_ms=59_000, limit=100))
    assert dog.items and max(i.end_ms for i in dog.items) <= 59_000
    assert memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="a dog", limit=1)).items[0].text == "a dog on the pavement"

    # Time phrases: "in the first 20 seconds" searches [0, 20 s] only and says so.
    first = memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="what was there in the first 20 seconds?", now_ms=89_000))
    assert (first.from_ms, first.to_ms) == (0, 20_000) and first.notes and first.items[0].text == "empty street"
    # What was said is remembered: "what did you tell me at 0:00:45?"
    told = memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="what did you tell me at 0:00:45?", now_ms=89_000))
    assert told.items[0].tier == memory_pb2.MEMORY_TIER_QA and told.items[0].prompt_text == "Is there a bus?"
    assert told.items[0].text == "Yes, a trolleybus with 2 people." and told.span_start_ms == 45_000


def test_unknown_and_other_tenants_streams_are_not_found(memory: Running) -> None:
    remembered(memory)
    for request, metadata in (
        (memory_pb2.RecallRequest(key=make_key(TENANT, "cam-9"), query="a bus"), None),  # unknown
        (memory_pb2.RecallRequest(key=make_key("globex", STREAM), query="a bus"), None),  # B's stream id under another tenant
        (memory_pb2.RecallRequest(key=KEY, query="a bus"), as_tenant("globex")),  # acme's stream, asked as globex
    ):
        with pytest.raises(grpc.RpcError) as err:
            memory.stub.Recall(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "memory holds nothing" in err.value.details()
    assert memory.stub.Recall(memory_pb2.RecallRequest(key=KEY, query="a bus"), metadata=as_tenant(TENANT)).items
    # globex asking about its own id of the same name: nothing of acme's.
    with pytest.raises(grpc.RpcError) as err:
        memory.stub.Recall(memory_pb2.RecallRequest(key=make_key("globex", STREAM), query="a bus"), metadata=as_tenant("globex"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("method", ["Recall", "Context", "Items"])
def test_a_call_without_a_verifiable_identity_is_refused(memory: Running, method: str) -> None:
    remembered(memory)
    request = {"Recall": memory_pb2.RecallRequest(key=KEY, query="a bus"), "Context": memory_pb2.ContextRequest(key=KEY, now_ms=89_000),
               "Items": memory_pb2.ItemsRequest(key=KEY, tier=memory_pb2.MEMORY_TIER_SHORT)}[method]
    forged = InternalTokens(AuthSettings(internal_secret="another-secret-that-is-32-chars-long!"), "attacker").metadata(TENANT, "memory")
    wrong_audience = TOKENS.metadata(TENANT, "ingest")
    for metadata, words in (((), "no x-sh-identity metadata"), ((("x-streamharness-tenant", TENANT),), "no x-sh-identity metadata"),
                            (forged, "Signature verification failed"), (wrong_audience, "Audience doesn't match"),
                            ((("x-sh-identity", "not-a-token"),), "not valid")):
        with pytest.raises(grpc.RpcError) as err:
            getattr(memory.stub, method)(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, err.value.details())
        assert words in err.value.details()


def test_context_prefix_changes_only_at_chunk_boundaries(memory: Running) -> None:
    remembered(memory)
    at = {s: memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=s * 1000)) for s in (30, 45, 59, 60, 89)}
    # Chunk 0 ([0, 25 s): cut 5 frames before the 30-s boundary) is visible from 30 s on.
    assert [(s.start_ms, s.end_ms) for s in at[30].summaries] == [(0, 24_000)]
    assert at[30].prefix_text == at[45].prefix_text == at[59].prefix_text  # byte-identical inside the chunk
    assert at[30].prefix_version == at[59].prefix_version and at[30].chunk_start_ms == 30_000
    assert "empty street" in at[30].prefix_text and "trolleybus" not in at[30].prefix_text
    assert at[60].prefix_text != at[59].prefix_text and [s.index for s in at[60].summaries] == [0, 1]
    # The short-term tier starts where the visible summaries end, and never passes now.
    assert [i.start_ms for i in at[45].recent] == list(range(25_000, 45_001, 1000))
    # The answer given at 45 s is in the history from 45 s on.
    assert list(at[30].history) == [] and [h.text for h in at[45].history] == ["Yes, a trolleybus with 2 people."]
    # Chunk 2 is the block's last: at 89 s the block is not visible yet (it is from 90 s on).
    assert list(at[89].blocks) == [] and len(at[89].summaries) == 2
    at90 = memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=90_000))
    assert [(b.start_ms, b.end_ms, b.frames) for b in at90.blocks] == [(0, 84_000, 3)] and list(at90.summaries) == []
    assert "Long-term memory" in at90.prefix_text and at90.prefix_tokens > 0


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
        (memory_pb2.ItemsRequest(key=KEY), "tier is required"),
    ],
)
def test_bad_requests_are_invalid_argument_with_a_message(memory: Running, request_, message: str) -> None:
    call = {memory_pb2.RecallRequest: memory.stub.Recall, memory_pb2.ContextRequest: memory.stub.Context,
            memory_pb2.ItemsRequest: memory.stub.Items}[type(request_)]
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
    admin = KafkaAdminClient(**client_config(settings))
    probe = KafkaConsumer(**client_config(settings))
    try:
        group = settings.topic("memory")
        committed = admin.list_group_offsets({group: None})[group]
        for logical in (topics.EMBEDDINGS, topics.SUMMARIES, topics.RESPONSES):
            topic = settings.topic(logical)
            partitions = [TopicPartition(topic, p) for p in probe.partitions_for_topic(topic)]
            ends = probe.end_offsets(partitions)
            assert {tp: committed[tp].offset for tp in partitions if tp in committed} == {tp: end for tp, end in ends.items() if end}
    finally:
        admin.close()
        probe.close()


def test_a_slow_summariser_never_delays_memory_or_a_decision(kafka_settings: KafkaSettings, text_encoder: TextEncoder, tmp_path: Path) -> None:
    """The summariser's model hangs: memory still answers with the newest frames and the decision
    step still answers a question at once; the summary comes (as the marked fallback) when its
    deadline passes."""
    release = threading.Event()

    class Hanging(DigestSummariser):
        name = "hanging"

        def summarise(self, chunk):
            release.wait(120)
            raise RuntimeError("released")

    with running_memory(kafka_settings, text_encoder, tmp_path, summariser=False) as memory:
        slow = KafkaHost(SummariserStage(summariser_settings(memory.runner.port).model_copy(update={"timeout_s": 60}), TIERS,
                                         backend=Hanging()), TOPOLOGY["summariser"], kafka_settings)
        slow.load()
        slow.start()
        encoder = text_encoder.load()
        decision = KafkaHost(DecisionStage(DecisionSettings(), policy=RulePolicy(encoder.encode)), TOPOLOGY["decision"], kafka_settings)
        decision.load()
        decision.start()
        try:
            wait_until(lambda: len(stored(memory, "short")) == 90, "memory has every frame while the summariser hangs")
            assert stored(memory, "mid") == [] and not release.is_set()
            ctx = memory.stub.Context(memory_pb2.ContextRequest(key=KEY, now_ms=89_000, max_recent=5))
            assert [i.start_ms for i in ctx.recent] == [85_000, 86_000, 87_000, 88_000, 89_000]
            q = events_pb2.QueryEvent
            produce(kafka_settings, [
                (topics.QUERIES, q(key=KEY, session_id="s1", kind=q.KIND_SESSION_START, reply_to="gw")),
                (topics.QUERIES, q(key=KEY, session_id="s1", kind=q.KIND_QUESTION, question_id="q9", text="is there a dog?",
                                   media_ts_ms=89_000, reply_to="gw")),
                (topics.EMBEDDINGS, encoded_frame(90)),
            ])
            reader = KafkaConsumer(**client_config(kafka_settings), auto_offset_reset="earliest", enable_auto_commit=False)
            reader.subscribe([kafka_settings.topic(topics.DECISIONS)])
            answered: list = []

            def decided() -> bool:
                for batch in reader.poll(timeout_ms=200).values():
                    answered.extend(events_pb2.DecisionEvent.FromString(r.value) for r in batch)
                return any(d.question_id == "q9" for d in answered)

            wait_until(decided, "the decision on the question while the summariser still hangs", timeout_s=45)
            reader.close()
            assert not release.is_set() and stored(memory, "mid") == []
        finally:
            release.set()
            decision.stop(time.monotonic() + 15)
            slow.stop(time.monotonic() + 15)


def _service(name: str, kafka: KafkaSettings, port: int, data_dir: Path, extra: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SH_") or k == "SH_AUTH_INTERNAL_SECRET"}
    env.update({
        "SH_SERVICE_NAME": name, "SH_GRPC_HOST": "127.0.0.1", "SH_GRPC_PORT": str(port),
        "SH_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "SH_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "SH_KAFKA_TOPIC_PREFIX": kafka.topic_prefix, "SH_KAFKA_PARTITIONS": str(kafka.partitions),
        "SH_KAFKA_CONSUMER_POLL_TIMEOUT_MS": "100", "SH_MEMORY_DATA_DIR": str(data_dir), "SH_MEMORY_EDGE_SEARCH_THREADS": "1",
        "SH_TIERS_CHUNK_S": str(CHUNK_S), "SH_TIERS_SUMMARIES_PER_BLOCK": str(M), "SH_TIERS_BLOCKS_KEPT": "4",
        "SH_SUMMARISER_BACKEND": "digest", "SH_SUMMARISER_LEAD_FRAMES": str(LEAD), "PYTHONUNBUFFERED": "1", **extra,
    })
    log = open(data_dir.parent / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(ROOT / "services" / name / "main.py")], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_memory_and_summariser_killed_mid_stream_resume_without_duplicates_or_gaps(
    kafka_settings: KafkaSettings, text_encoder: TextEncoder, tmp_path: Path
) -> None:
    ensure_topics(kafka_settings, [topics.EMBEDDINGS, topics.SUMMARIES, topics.RESPONSES, topics.FRAMES])
    data = tmp_path / "memory"
    data.mkdir()
    port = free_port()
    extra = {"SH_SUMMARISER_MEMORY_ADDRESS": f"127.0.0.1:{port}"}
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = AsStreamTenant(channel)

    def summaries(tier: int) -> list[memory_pb2.MemoryItem]:
        try:
            return list(stub.Items(memory_pb2.ItemsRequest(key=KEY, tier=tier), timeout=5).items)
        except grpc.RpcError:
            return []

    procs = {"memory": _service("memory", kafka_settings, port, data, extra),
             "summariser": _service("summariser", kafka_settings, free_port(), data, extra)}
    try:
        produce(kafka_settings, [(topics.EMBEDDINGS, encoded_frame(s)) for s in range(0, 70)])
        wait_until(lambda: len(summaries(memory_pb2.MEMORY_TIER_MID)) == 2, "summaries of chunks 0 and 1", timeout_s=120)
        for name in ("summariser", "memory"):  # kill -9 both, mid-chunk
            procs[name].send_signal(signal.SIGKILL)
            procs[name].wait(30)
        produce(kafka_settings, [(topics.EMBEDDINGS, encoded_frame(s)) for s in range(70, 200)])
        # The summariser comes back first and reaches chunk 2's cut while memory is still down: it
        # must wait for memory to catch up before reading chunk 2's first frames (55-69 s) back.
        procs = {"summariser": _service("summariser", kafka_settings, free_port(), data, extra)}
        time.sleep(8)
        procs["memory"] = _service("memory", kafka_settings, port, data, extra)
        # Frames 0..199: cuts at 25, 55, ..., 175 s -> chunks 0..5 summarised, blocks 0 and 1.
        wait_until(lambda: len(summaries(memory_pb2.MEMORY_TIER_MID)) == 6 and len(summaries(memory_pb2.MEMORY_TIER_LONG)) == 2,
                   "every summary after the restart", timeout_s=180)
        mids = summaries(memory_pb2.MEMORY_TIER_MID)
        assert [m.index for m in mids] == [0, 1, 2, 3, 4, 5]  # each once
        assert [(m.start_ms, m.end_ms) for m in mids] == [(max(0, k * 30_000 - 5000), k * 30_000 + 24_000) for k in range(6)]
        assert sum(m.frames for m in mids) == 175  # frames 0..174, none missing, none twice
        frames = list(stub.Items(memory_pb2.ItemsRequest(key=KEY, tier=memory_pb2.MEMORY_TIER_SHORT), timeout=5).items)
        assert [f.start_ms for f in frames] == [s * 1000 for s in range(200)]
    finally:
        channel.close()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
