"""Sessions that resume (issue 14), on the running gateway and ingest with a real Kafka broker. The
test plays the pipeline behind the gateway: it reads the queries the gateway publishes and writes
the responses a responder would. The gateway is stopped mid-session and started again on the same
port; the SDK reconnects by itself with its resume token and gets every answer exactly once and
whole — including one whose first attempt was cut off and regenerated while the client was away."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest
from kafka import KafkaConsumer

from streamharness import topics
from streamharness.client import Session
from streamharness.gateway.service import GatewaySettings, GatewayStage
from streamharness.hosts.kafka import KafkaHost
from streamharness.ingest.service import IngestSettings, IngestStage
from streamharness.kafka import EventProducer, ensure_topics
from streamharness.runner import ServiceRunner
from streamharness.settings import KafkaSettings, ServiceSettings, load_settings
from streamharness.topology import TOPOLOGY
from streamharness.v1 import common_pb2, events_pb2

pytestmark = pytest.mark.integration
Q = events_pb2.QueryEvent


def serve(service, name: str, port: int = 0) -> ServiceRunner:
    runner = ServiceRunner(service, ServiceSettings(service_name=name, grpc_port=port, shutdown_grace_s=2, readiness_interval_s=0.2))
    runner.serve()
    threading.Thread(target=runner._watch_readiness, daemon=True).start()
    return runner


def gateway(kafka: KafkaSettings, ingest: str, port: int = 0) -> tuple[ServiceRunner, KafkaHost]:
    host = KafkaHost(GatewayStage(GatewaySettings(replica_id="gw-r", ingest_address=ingest, allow_anonymous=True, end_wait_for_decision=False,
                                                  end_grace_s=3, resume_window_s=120)), TOPOLOGY["gateway"], kafka)
    runner = serve(host, "gateway", port)
    deadline = time.monotonic() + 30
    while not host.ready():
        assert time.monotonic() < deadline, "the gateway never became ready"
        time.sleep(0.1)
    return runner, host


class Pipeline:
    """Reads queries; answers questions through ``answer(query)`` -> list of (attempt, chunks)."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.queries: list[events_pb2.QueryEvent] = []
        self.producer = EventProducer(kafka, "test-pipeline")
        self._consumer = KafkaConsumer(kafka.topic(topics.QUERIES), bootstrap_servers=kafka.bootstrap_list,
                                       auto_offset_reset="earliest", group_id=f"p-{uuid.uuid4().hex[:6]}")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for records in self._consumer.poll(timeout_ms=100).values():
                self.queries.extend(Q.FromString(r.value) for r in records)

    def wait_for(self, pred, what: str, timeout_s: float = 20) -> events_pb2.QueryEvent:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [q for q in list(self.queries) if pred(q)]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {what} query within {timeout_s} s; saw {[Q.Kind.Name(q.kind) for q in self.queries]}")

    def respond(self, q: events_pb2.QueryEvent, response_id: str, attempt: str, pieces: list[str], final: bool = True,
                question_id: str = "", instruction_id: str = "", reply_to: str | None = None) -> None:
        trigger = common_pb2.TRIGGER_QUESTION if question_id else common_pb2.TRIGGER_INSTRUCTION
        chunks = [events_pb2.ResponseEvent(key=q.key, session_id=q.session_id, response_id=response_id, index=i, text=t,
                                           trigger=trigger, question_id=question_id, instruction_id=instruction_id,
                                           reply_to=reply_to if reply_to is not None else q.reply_to, attempt=attempt)
                  for i, t in enumerate(pieces)]
        if final:
            chunks.append(events_pb2.ResponseEvent(key=q.key, session_id=q.session_id, response_id=response_id,
                                                   index=len(pieces), final=True, trigger=trigger, question_id=question_id,
                                                   instruction_id=instruction_id, attempt=attempt,
                                                   reply_to=reply_to if reply_to is not None else q.reply_to))
        for c in chunks:
            self.producer.send(topics.RESPONSES, q.key, c).get(timeout=10)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()
        self.producer.close()


@pytest.fixture
def env(kafka_broker):
    kafka = load_settings(KafkaSettings, bootstrap_servers=kafka_broker.bootstrap_servers, security_protocol="PLAINTEXT",
                          topic_prefix=f"r{uuid.uuid4().hex[:10]}.", partitions=3, consumer_poll_timeout_ms=100)
    ensure_topics(kafka, topics.PIPELINE)
    ingest = serve(KafkaHost(IngestStage(IngestSettings()), TOPOLOGY["ingest"], kafka), "ingest")
    pipeline = Pipeline(kafka)
    yield kafka, f"127.0.0.1:{ingest.port}", pipeline
    pipeline.close()
    ingest.request_stop()
    ingest.shutdown()


def test_a_reconnect_after_a_gateway_restart_gets_every_answer_once_and_whole(env):
    kafka, ingest, pipeline = env
    runner, _ = gateway(kafka, ingest)
    port = runner.port

    async def scenario():
        got: list = []
        restarts = []
        async with Session(f"127.0.0.1:{port}", stream_id="cam", tenant="acme", reconnect=True, reconnect_timeout_s=40,
                           instructions={"p": "tell me when someone walks in"}) as s:
            first_session, first_token = s.session_id, s.resume_token
            assert first_token

            async def read():
                async for r in s.responses(on_message=lambda m: restarts.append(m.response.restart)
                                           if m.WhichOneof("message") == "response" else None):
                    got.append(r)

            reader = asyncio.create_task(read())
            q1 = await s.ask("how many people?", at_ms=1000, question_id="q1")
            asked = await asyncio.to_thread(pipeline.wait_for, lambda q: q.question_id == q1, "q1")
            await asyncio.to_thread(pipeline.respond, asked, "acme/cam/1000/q1", "a1", ["Two ", "people."], question_id=q1)
            await s.ask("and now?", at_ms=2000, question_id="q2")
            asked2 = await asyncio.to_thread(pipeline.wait_for, lambda q: q.question_id == "q2", "q2")
            await asyncio.to_thread(pipeline.respond, asked2, "acme/cam/2000/q2", "a1", ["Hal"], final=False, question_id="q2")
            deadline = time.monotonic() + 20
            while len(got) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

            # The gateway goes away mid-answer; the session's client is away.
            await asyncio.to_thread(runner.request_stop)
            await asyncio.to_thread(runner.shutdown)
            away = await asyncio.to_thread(pipeline.wait_for, lambda q: q.kind == Q.KIND_SESSION_AWAY, "away")
            assert away.session_id == first_session
            # Meanwhile the pipeline regenerates q2 whole under a new attempt and raises an alert,
            # both addressed to the replica that is gone.
            await asyncio.to_thread(pipeline.respond, asked2, "acme/cam/2000/q2", "a2", ["Three ", "people."], question_id="q2")
            await asyncio.to_thread(pipeline.respond, asked2, "acme/cam/2500/p", "a1", ["Someone ", "walked in."], instruction_id="p")
            holder = {}
            holder["runner"], _ = await asyncio.to_thread(gateway, kafka, ingest, port)

            resumed = await asyncio.to_thread(pipeline.wait_for, lambda q: q.kind == Q.KIND_SESSION_RESUME, "resume", 60)
            assert resumed.session_id == first_session and s.session_id == first_session and s.reconnects >= 1
            deadline = time.monotonic() + 30
            while len(got) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # nothing more may come
            await s.end()
            await asyncio.wait_for(reader, 20)
        return got, restarts, holder["runner"]

    got, restarts, second = asyncio.run(scenario())
    try:
        whole = {r.response_id: r.text for r in got}
        assert len(got) == len(whole), f"an answer came twice: {[r.response_id for r in got]}"
        assert whole == {"acme/cam/1000/q1": "Two people.", "acme/cam/2000/q2": "Three people.",
                         "acme/cam/2500/p": "Someone walked in."}
        assert not any(r.refusal for r in got)
        pipeline.wait_for(lambda q: q.kind == Q.KIND_SESSION_END, "end", 10)
        kinds = [Q.Kind.Name(q.kind) for q in pipeline.queries]
        assert kinds[:2] == ["KIND_SESSION_START", "KIND_QUESTION"] and "KIND_SESSION_END" in kinds
        assert kinds.index("KIND_SESSION_AWAY") < kinds.index("KIND_SESSION_RESUME") < kinds.index("KIND_SESSION_END")
    finally:
        second.request_stop()
        second.shutdown()


def test_a_question_open_at_the_end_is_said_not_answered_and_a_bad_token_is_refused(env):
    kafka, ingest, pipeline = env
    runner, _ = gateway(kafka, ingest)

    async def scenario():
        async with Session(f"127.0.0.1:{runner.port}", stream_id="cam2", tenant="acme") as s:
            await s.ask("anything?", at_ms=0, question_id="q9")
            await s.end()
            got = [r async for r in s.responses()]
        import grpc

        bad = Session(f"127.0.0.1:{runner.port}", stream_id="cam3", tenant="acme")
        await bad.__aenter__()
        try:
            bad.resume_token = "not-a-token"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await bad._open(resume=True)
        finally:
            await bad.__aexit__(None, None, None)
        return got, err.value

    try:
        got, err = asyncio.run(scenario())
        assert [(r.question_id, r.refusal) for r in got] == [("q9", "not_answered")]
        assert "Not answered" in got[0].text
        assert err.code().name == "INVALID_ARGUMENT" and "resume_token is not valid" in err.details()
    finally:
        runner.request_stop()
        runner.shutdown()
