"""The gateway's HTTP API on the real broker, gateway and ingest, called as users call it: the
official ``openai`` client for chat completions (streamed and whole), plain HTTP for sessions,
frames, server-sent events and the live view's routes. Authentication is real (a hashed API keys
file, the key sent as ``Authorization: Bearer``). No decision stage or responder runs: a scripted
responder thread reads the ``queries`` topic and answers into ``responses`` (and the decided
seconds into ``decision-log``) addressed to the session, so what is tested is the HTTP and SSE path
through real Kafka; the full pipeline behind the live view is tests/e2e/test_web_view.py."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import cv2
import httpx
import openai
import pytest
from kafka import KafkaConsumer

from streamharness import topics
from streamharness.auth import add_api_key, new_api_key
from streamharness.gateway.service import GatewaySettings, GatewayStage
from streamharness.hosts.kafka import KafkaHost
from streamharness.ingest.service import IngestSettings, IngestStage
from streamharness.kafka import EventProducer, ensure_topics
from streamharness.media import read_video, sample_path
from streamharness.runner import ServiceRunner
from streamharness.settings import KafkaSettings, ServiceSettings, load_settings
from streamharness.topology import TOPOLOGY
from streamharness.v1 import common_pb2, events_pb2

pytestmark = pytest.mark.integration
Q = events_pb2.QueryEvent
REPLICA = "gw-http"


def vtest_jpegs(n: int, fps: float = 1.0) -> list[tuple[int, bytes]]:
    out = []
    for frame in read_video(sample_path("vtest.avi"), fps=fps):
        out.append((frame.media_ts_ms, cv2.imencode(".jpg", cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR))[1].tobytes()))
        if len(out) == n:
            break
    return out


class ScriptedResponder:
    """Stands in for decision + responder: a question is answered "Answer to: <text>" in three
    chunks (a question that says "crash" is answered twice, as after a responder crash mid-answer:
    the first attempt stops after one chunk); an added instruction gets a proactive alert; each
    question or instruction is also a decided second on decision-log."""

    def __init__(self, kafka: KafkaSettings) -> None:
        self.kafka = kafka
        self.queries: list[events_pb2.QueryEvent] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="scripted-responder")

    def start(self) -> ScriptedResponder:
        self._thread.start()
        assert self._ready.wait(30), "the scripted responder never got its partitions"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        consumer = KafkaConsumer(self.kafka.topic(topics.QUERIES), bootstrap_servers=self.kafka.bootstrap_list,
                                 auto_offset_reset="earliest", enable_auto_commit=False, group_id=f"scripted-{uuid.uuid4().hex[:6]}")
        producer = EventProducer(self.kafka, client_id="scripted-responder")
        try:
            while not self._stop.is_set():
                batch = consumer.poll(timeout_ms=100)
                if consumer.assignment():
                    self._ready.set()
                for records in batch.values():
                    for record in records:
                        q = Q.FromString(record.value)
                        self.queries.append(q)
                        self._answer(producer, q)
        finally:
            producer.close()
            consumer.close()

    def _answer(self, producer: EventProducer, q: events_pb2.QueryEvent) -> None:
        def send(topic, message):
            producer.send(topic, message.key, message).get(10)

        def decided(trigger, **ids):
            send(topics.DECISION_LOG, events_pb2.DecisionEvent(
                key=q.key, session_id=q.session_id, reply_to=q.reply_to, media_ts_ms=q.media_ts_ms,
                action=events_pb2.DecisionEvent.ACTION_RESPOND, trigger=trigger, prompt_text=q.text, reason="scripted", **ids))

        def respond(chunks, attempt, **fields):
            rid = f"{q.key.tenant}/{q.key.stream_id}/{q.media_ts_ms}/{q.question_id or q.instruction_id}"
            for i, text in enumerate(chunks):
                send(topics.RESPONSES, events_pb2.ResponseEvent(
                    key=q.key, session_id=q.session_id, reply_to=q.reply_to, response_id=rid, index=i, text=text,
                    final=i == len(chunks) - 1 and attempt != "crashed",
                    media_ts_ms=q.media_ts_ms, attempt=attempt, **fields))

        if q.kind == Q.KIND_QUESTION:
            decided(common_pb2.TRIGGER_QUESTION, question_id=q.question_id)
            words = ["Answer ", "to: ", q.text]
            if "crash" in q.text:
                respond(words[:2], "crashed", trigger=common_pb2.TRIGGER_QUESTION, question_id=q.question_id)
            respond(words, "whole", trigger=common_pb2.TRIGGER_QUESTION, question_id=q.question_id)
        elif q.kind == Q.KIND_INSTRUCTION_ADD:
            decided(common_pb2.TRIGGER_INSTRUCTION, instruction_id=q.instruction_id)
            respond(["Alert: ", q.text], "whole", trigger=common_pb2.TRIGGER_INSTRUCTION, instruction_id=q.instruction_id)


@pytest.fixture(scope="module")
def env(kafka_broker, tmp_path_factory):
    kafka = load_settings(KafkaSettings, bootstrap_servers=kafka_broker.bootstrap_servers, security_protocol="PLAINTEXT",
                          topic_prefix=f"t{uuid.uuid4().hex[:12]}.", partitions=3, consumer_poll_timeout_ms=100)
    ensure_topics(kafka, topics.PIPELINE)
    keys_file = tmp_path_factory.mktemp("http") / "api-keys.json"
    keys = {tenant: new_api_key() for tenant in ("acme", "globex")}
    for tenant, key in keys.items():
        add_api_key(keys_file, tenant, key)
    runners = []

    def serve(service, name):
        runner = ServiceRunner(service, ServiceSettings(service_name=name, grpc_port=0, grpc_workers=2, shutdown_grace_s=3))
        runner.serve()
        runners.append(runner)
        return runner

    ingest = serve(KafkaHost(IngestStage(IngestSettings(max_pixels=320 * 240)), TOPOLOGY["ingest"], kafka), "ingest")
    stage = GatewayStage(GatewaySettings(replica_id=REPLICA, ingest_address=f"127.0.0.1:{ingest.port}", api_keys_file=keys_file,
                                         end_grace_s=5, end_wait_for_decision=False, http_port=0,
                                         questions_per_s=0.5, questions_burst=6))
    gateway = KafkaHost(stage, TOPOLOGY["gateway"], kafka)
    serve(gateway, REPLICA)
    deadline = time.monotonic() + 30
    while not gateway.ready():
        assert time.monotonic() < deadline, "gateway never became ready"
        time.sleep(0.1)
    assert stage.http_port, "the gateway started no HTTP API (SH_GATEWAY_HTTP_PORT=0)"
    responder = ScriptedResponder(kafka).start()
    yield type("Env", (), {"kafka": kafka, "keys": keys, "base": f"http://127.0.0.1:{stage.http_port}", "responder": responder})
    responder.stop()
    for runner in reversed(runners):
        runner.request_stop()
        runner.shutdown()


def http(env, tenant: str = "acme") -> httpx.Client:
    return httpx.Client(base_url=env.base, headers={"Authorization": f"Bearer {env.keys[tenant]}"}, timeout=30)


def open_session(client: httpx.Client, stream_id: str, **body) -> dict:
    r = client.post("/v1/sessions", json={"stream_id": stream_id, **body})
    assert r.status_code == 201, r.text
    return r.json()


def sse(lines, until: str) -> list[tuple[str, dict]]:
    """(event, data) from an SSE line iterator, up to the first event of type ``until``."""
    out, event, data = [], "message", []
    for line in lines:
        if not line:
            if data:
                out.append((event, json.loads("\n".join(data))))
                if event == until:
                    return out
            event, data = "message", []
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
    raise AssertionError(f"the stream ended before an {until} event: {out}")


def test_openai_client_streams_the_answer_to_a_sessions_frames(env):
    frames = vtest_jpegs(4)
    with http(env) as c:
        s = open_session(c, "cam-chat", instructions=[{"instruction_id": "door", "text": "tell me when someone walks in"}])
        sid = s["session_id"]
        assert s["decision_fps"] == 1 and s["resume_token"] and s["urls"]["events"] == f"/v1/sessions/{sid}/events"
        acks = [c.post(f"/v1/sessions/{sid}/frames", content=jpeg, params={"media_ts_ms": ts},
                       headers={"Content-Type": "image/jpeg"}).json() for ts, jpeg in frames[:3]]
        assert [a["media_ts_ms"] for a in acks] == [0, 1000, 2000] and all(a["sampled"] for a in acks)

        client = openai.OpenAI(base_url=f"{env.base}/v1", api_key=env.keys["acme"], max_retries=0)
        image = "data:image/jpeg;base64," + base64.b64encode(frames[3][1]).decode()
        stream = client.chat.completions.create(
            model="streamharness", stream=True, extra_body={"session_id": sid},
            messages=[{"role": "system", "content": "ignored: the session's memory is the context"},
                      {"role": "user", "content": [{"type": "text", "text": "How many people are there?"},
                                                   {"type": "image_url", "image_url": {"url": image}}]}])
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Answer to: How many people are there?"
        assert len(chunks) >= 4 and chunks[-1].choices[0].finish_reason == "stop"  # role, 3 text chunks, stop
        # the image went in as the session's next frame (a decision step after the last), the question at its time
        asked = [q for q in env.responder.queries if q.session_id == sid and q.kind == Q.KIND_QUESTION]
        assert asked[-1].media_ts_ms == 3000 and asked[-1].key.tenant == "acme"

        # a responder crashed mid-answer: the regenerated answer repeats the text, the stream goes on, nothing doubled
        stream = client.chat.completions.create(model="streamharness", stream=True, extra_body={"session_id": sid},
                                                messages=[{"role": "user", "content": "crash, then what?"}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == "Answer to: crash, then what?"

        whole = client.chat.completions.create(model="streamharness", messages=[{"role": "user", "content": "And now?"}],
                                               extra_headers={"x-session-id": sid})
        assert whole.choices[0].message.content == "Answer to: And now?" and whole.object == "chat.completion"
        assert whole.model_extra["streamharness"]["media_ts_ms"] == 3000

        summary = c.delete(f"/v1/sessions/{sid}").json()
        assert summary["status"] == "ended" and summary["end"]["code"] == "ok"
        assert summary["frames"]["sent"] == 4 and summary["questions"] == {"asked": 3, "answered": 3, "refused": 0, "not_answered": 0}
        assert c.post(f"/v1/sessions/{sid}/frames", content=frames[0][1]).status_code == 410


def test_session_events_carry_an_instructions_proactive_response(env):
    with http(env) as c:
        sid = open_session(c, "cam-events")["session_id"]
        with c.stream("GET", f"/v1/sessions/{sid}/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            r = c.post(f"/v1/sessions/{sid}/instructions", json={"instruction_id": "van", "text": "tell me when a van stops"})
            assert r.status_code == 201 and r.json()["instruction_id"] == "van"
            got = sse(events.iter_lines(), "response")
        response = got[-1][1]
        assert response["instruction_id"] == "van" and response["trigger"] == "instruction" and response["text"] == "Alert: "
        assert ("ack", {"kind": "instruction", "seq": 0, "media_ts_ms": 0, "sampled": False, "shed": False, "id": "van"}) in got
        # a reader that reconnects with Last-Event-ID gets what it missed, from the session's start
        with c.stream("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": "0"}) as events:
            kinds = [k for k, _ in sse(events.iter_lines(), "response")]
        assert kinds[0] == "accepted"
        c.delete(f"/v1/sessions/{sid}")


def test_errors_map_to_http_statuses(env):
    frames = vtest_jpegs(1)
    base = f"{env.base}/v1"
    r = httpx.post(f"{base}/chat/completions", json={"model": "x", "messages": []})  # no key at all (the openai client insists on one)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and "no credentials" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError, match="unknown API key"):
        openai.OpenAI(base_url=base, api_key="sk-not-a-key", max_retries=0).models.list()

    with http(env) as c, http(env, "globex") as other:
        sid = open_session(c, "cam-errors")["session_id"]
        # another tenant's session: not found, as an unknown one; never its data
        assert other.get(f"/v1/sessions/{sid}").status_code == 404
        assert other.post(f"/v1/sessions/{sid}/frames", content=frames[0][1]).status_code == 404
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=base, api_key=env.keys["globex"], max_retries=0).chat.completions.create(
                model="x", messages=[{"role": "user", "content": "what do you see?"}], extra_body={"session_id": sid})
        assert other.get("/v1/streams").json()["data"] == []

        # a damaged image: ingest's words, 400; the session goes on
        r = c.post(f"/v1/sessions/{sid}/frames", content=frames[0][1][: len(frames[0][1]) // 3], headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 400 and "cannot decode JPEG" in r.json()["error"]["message"]
        client = openai.OpenAI(base_url=base, api_key=env.keys["acme"], max_retries=0)
        with pytest.raises(openai.BadRequestError, match="base64"):
            client.chat.completions.create(model="x", extra_body={"session_id": sid}, messages=[{"role": "user", "content": [
                {"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,@@@"}}]}])
        assert c.post(f"/v1/sessions/{sid}/frames", content=frames[0][1], headers={"Content-Type": "image/jpeg"}).status_code == 200

        # questions beyond the session's rate: 429 with Retry-After (the openai client would wait that long and retry)
        statuses = [c.post(f"/v1/sessions/{sid}/questions", json={"text": f"question {i}"}) for i in range(8)]
        limited = [r for r in statuses if r.status_code == 429]
        assert limited and all(r.status_code == 202 for r in statuses[:5])
        assert int(limited[0].headers["Retry-After"]) >= 1 and "SH_GATEWAY_QUESTIONS_PER_S" in limited[0].json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "one more?"}], extra_body={"session_id": sid})

        r = c.get("/v1/no-such-route")
        assert r.status_code == 404 and r.json()["error"]["message"] == "no route GET /v1/no-such-route"
        r = c.post("/v1/sessions", json={"stream_id": "bad stream id!"})
        assert r.status_code == 400 and "stream_id" in r.json()["error"]["message"]
        r = c.post("/v1/sessions", content=b'{"stream_id": ', headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        c.delete(f"/v1/sessions/{sid}")


def test_live_view_routes_show_any_clients_stream(env):
    frames = vtest_jpegs(2)
    with http(env) as c:
        sid = open_session(c, "cam-view")["session_id"]
        for ts, jpeg in frames:
            c.post(f"/v1/sessions/{sid}/frames", content=jpeg, params={"media_ts_ms": ts}, headers={"Content-Type": "image/jpeg"})
        (listed,) = [st for st in c.get("/v1/streams").json()["data"] if st["stream_id"] == "cam-view"]
        assert listed["session_id"] == sid and listed["frames"] == 2
        frame = c.get("/v1/streams/cam-view/frame.jpg")
        assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg" and frame.content == frames[-1][1]
        assert frame.headers["x-media-ts-ms"] == str(frames[-1][0])
        with c.stream("GET", "/v1/streams/cam-view/events") as events:
            lines = events.iter_lines()
            assert sse(lines, "stream")[-1][1]["session_id"] == sid
            r = c.post("/v1/streams/cam-view/questions", json={"text": "who is in view?"})
            assert r.status_code == 202
            qid = r.json()["question_id"]
            got = sse(lines, "response")
        decision = next(d for k, d in got if k == "decision")
        assert decision["respond"] and decision["question_id"] == qid and decision["prompt_text"] == "who is in view?"
        assert got[-1][1]["question_id"] == qid
        assert c.post("/v1/streams/no-such-stream/questions", json={"text": "?"}).status_code == 404
        page = httpx.get(f"{env.base}/view")
        assert page.status_code == 200 and "<script src=\"/view/view.js\"" in page.text
        c.delete(f"/v1/sessions/{sid}")


def test_an_uploaded_video_streams_through_the_session(env):
    video = sample_path("Megamind.avi").read_bytes()
    with http(env) as c:
        s = open_session(c, "cam-upload", source={"upload": True, "speed": 0, "upload_bytes": len(video)})
        sid = s["session_id"]
        assert s["source"]["upload"] is True
        assert c.post(f"/v1/sessions/{sid}/frames", content=b"\xff\xd8").status_code == 400  # it pulls its own frames
        with c.stream("GET", f"/v1/sessions/{sid}/events") as events:
            def body():
                for i in range(0, len(video), 300_000):  # as a client streams a file up
                    yield video[i:i + 300_000]

            r = c.put(f"/v1/sessions/{sid}/video", content=body(), headers={"Content-Type": "video/x-msvideo"})
            assert r.status_code == 202, r.text
            assert r.json()["bytes"] == len(video)
            got = sse(events.iter_lines(), "end")
        statuses = [d["kind"] for k, d in got if k == "source"]
        assert statuses[0] == "connected" and statuses[-1] == "ended"
        assert got[-1][1]["code"] == "ok"
        assert c.put(f"/v1/sessions/{sid}/video", content=b"again").status_code == 410
