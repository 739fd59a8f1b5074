"""Gateway + ingest on the real broker: frames reach the frames topic resampled and bounded,
damaged frames get per-frame errors while the session goes on, questions reach the queries topic
stamped with the replica, and responses reach only the replica and session they belong to."""

from __future__ import annotations

import asyncio
import time

import cv2
import grpc
import pytest
from kafka import KafkaConsumer

from streamharness import topics
from streamharness.client import Session
from streamharness.gateway.service import GatewaySettings, GatewayStage
from streamharness.hosts.kafka import KafkaHost
from streamharness.topology import TOPOLOGY
from streamharness.ingest.service import IngestSettings, IngestStage
from streamharness.kafka import EventProducer, ensure_topics
from streamharness.media import read_video, sample_path
from streamharness.runner import ServiceRunner
from streamharness.settings import ServiceSettings
from streamharness.v1 import common_pb2, events_pb2, session_pb2

pytestmark = pytest.mark.integration


@pytest.fixture
def services(kafka_settings):
    ensure_topics(kafka_settings, topics.PIPELINE)
    runners = []

    def serve(service, name):
        runner = ServiceRunner(service, ServiceSettings(service_name=name, grpc_port=0, shutdown_grace_s=3))
        runner.serve()
        runners.append(runner)
        return runner

    ingest = serve(KafkaHost(IngestStage(IngestSettings(max_pixels=320 * 240)), TOPOLOGY["ingest"], kafka_settings), "ingest")
    gateways = []
    for replica in ("gw-a", "gw-b"):
        service = KafkaHost(GatewayStage(GatewaySettings(replica_id=replica, ingest_address=f"127.0.0.1:{ingest.port}", end_grace_s=10, allow_anonymous=True, end_wait_for_decision=False)),
                            TOPOLOGY["gateway"], kafka_settings)
        runner = serve(service, replica)
        deadline = time.monotonic() + 30
        while not service.ready():
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.1)
        gateways.append((service, f"127.0.0.1:{runner.port}"))
    yield gateways
    for runner in reversed(runners):
        runner.request_stop()
        runner.shutdown()


def read_topic(kafka_settings, topic: str, message_type):
    consumer = KafkaConsumer(kafka_settings.topic(topic), bootstrap_servers=kafka_settings.bootstrap_list,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        return [(r.key.decode(), message_type.FromString(r.value)) for r in consumer]
    finally:
        consumer.close()


def vtest_jpegs(n: int, fps: float = 4.0):
    out = []
    for frame in read_video(sample_path("vtest.avi"), fps=fps):
        out.append((frame.media_ts_ms, cv2.imencode(".jpg", cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR))[1].tobytes()))
        if len(out) == n:
            return out
    return out


def test_frames_questions_and_errors(services, kafka_settings):
    (_, address), _ = services

    async def run():
        msgs = []
        async with Session(address, stream_id="cam-1", tenant="acme", instructions={"p": "tell me when someone walks in"}) as s:
            for i, (ts, jpeg) in enumerate(vtest_jpegs(12)):  # 4 fps for 3 s
                await s.send_frame(ts, b"\xff\xd8garbage" if i == 5 else jpeg)
            await s.send_frame(100, vtest_jpegs(1)[0][1])  # time going back
            qid = await s.ask("what is happening?", at_ms=2000)
            await s.ask("   ", at_ms=2000)  # empty text
            await s.end()
            async for m in s:
                msgs.append(m)
        return qid, msgs

    qid, msgs = asyncio.run(run())
    errors = [m.error for m in msgs if m.WhichOneof("message") == "error"]
    acks = [m.ack for m in msgs if m.WhichOneof("message") == "ack"]
    assert {e.seq for e in errors} == {6, 13, 0}
    assert all(not e.fatal and e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for e in errors)
    assert any("not after the previous" in e.message for e in errors)
    assert any("question text is empty" in e.message for e in errors)
    frame_acks = [a for a in acks if a.kind == session_pb2.Ack.KIND_FRAME]
    assert len(frame_acks) == 11 and sum(a.sampled for a in frame_acks) == 3  # 1 per media second
    assert acks[-1].kind == session_pb2.Ack.KIND_END

    frames = read_topic(kafka_settings, topics.FRAMES, events_pb2.FrameEvent)
    assert [k for k, _ in frames] == ["acme/cam-1"] * 3
    assert [f.media_ts_ms for _, f in frames] == [0, 1000, 2000]
    assert all(f.width * f.height <= 320 * 240 and [h.hop for h in f.hops] == ["gateway", "ingest"] for _, f in frames)

    queries = read_topic(kafka_settings, topics.QUERIES, events_pb2.QueryEvent)
    kinds = [q.kind for _, q in queries]
    Q = events_pb2.QueryEvent
    assert kinds == [Q.KIND_SESSION_START, Q.KIND_QUESTION, Q.KIND_SESSION_END]
    assert queries[0][1].instructions[0].text == "tell me when someone walks in"
    assert queries[1][1].question_id == qid and all(q.reply_to == "gw-a" for _, q in queries)


def test_bad_session_start_ends_the_call_with_a_status(services):
    (_, address), _ = services

    async def run():
        async with Session(address, stream_id="bad stream id!"):
            pass

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(run())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream_id" in err.value.details()


def test_responses_reach_only_their_replica_and_session(services, kafka_settings):
    (gw_a, addr_a), (gw_b, addr_b) = services

    async def session(address, stream_id):
        s = Session(address, stream_id=stream_id)
        await s.__aenter__()
        return s

    async def run():
        sa, sb = await session(addr_a, "a"), await session(addr_b, "b")
        producer = EventProducer(kafka_settings, client_id="test-responder")
        for s, replica, text in ((sa, "gw-a", "for a"), (sb, "gw-b", "for b")):
            for i, chunk in enumerate((text, " done")):
                r = events_pb2.ResponseEvent(
                    key=common_pb2.StreamKey(tenant="default", stream_id=s.stream_id), session_id=s.session_id,
                    response_id=f"r-{s.stream_id}", index=i, text=chunk, final=i == 1,
                    trigger=common_pb2.TRIGGER_INSTRUCTION, instruction_id="x", reply_to=replica)
                producer.send(topics.RESPONSES, r.key, r).get(10)
                producer.send(topics.RESPONSES, r.key, r).get(10)  # redelivered: must be dropped
        producer.close()
        got = {}
        for s in (sa, sb):
            async def first(s=s):
                async for r in s.responses():
                    return r
            got[s.stream_id] = await asyncio.wait_for(first(), 30)
            await s.end()
            async for _ in s:
                pass
            await s.__aexit__(None, None, None)
        return got

    got = asyncio.run(run())
    assert got["a"].text == "for a done" and got["a"].chunks == 2
    assert got["b"].text == "for b done" and got["b"].chunks == 2


def test_a_client_that_leaves_without_ending_is_told_to_the_pipeline_as_away(services, kafka_settings):
    # Away, not ended: the client may come back with its resume token; the decision stage keeps the
    # stream's state for SH_DECISION_AWAY_KEEP_S and then finishes it.
    (_, address), _ = services

    async def run():
        async with Session(address, stream_id="leaver") as s:
            await s.send_frame(0, vtest_jpegs(1)[0][1])
            await asyncio.sleep(0.5)
        return s.session_id  # __aexit__ cancelled the call: no SessionEnd was sent

    session_id = asyncio.run(run())
    deadline = time.monotonic() + 20
    kinds = []
    while time.monotonic() < deadline:
        kinds = [q.kind for _, q in read_topic(kafka_settings, topics.QUERIES, events_pb2.QueryEvent) if q.session_id == session_id]
        if events_pb2.QueryEvent.KIND_SESSION_AWAY in kinds:
            break
    assert kinds == [events_pb2.QueryEvent.KIND_SESSION_START, events_pb2.QueryEvent.KIND_SESSION_AWAY]
