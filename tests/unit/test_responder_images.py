"""Frames for a VLM behind an OpenAI-compatible server: the prompt's content parts are laid out so
that prefix caching hits, the client sends them (with a per-tenant ``cache_salt``) and names the
setting to change when a server refuses images, and the responder keeps each stream's recent frames
from the ``frames`` topic and sends them, scaled down, with each decision's prompt.

The server here is a real HTTP server on 127.0.0.1 speaking the OpenAI protocol (``GET /v1/models``,
streamed ``POST /v1/chat/completions``) that decodes every image it is sent with Pillow."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image, ImageStat

from streamharness import topics
from streamharness.generation import FrameImage, GenerationError, GenerationRejected, GenerationSettings, OpenAICompatibleGenerator, Prompt
from streamharness.generation.openai_client import CACHE_SALT_NAMESPACE
from streamharness.hosts.local import LocalHost
from streamharness.keys import make_key
from streamharness.memory.timephrases import clock
from streamharness.responder.frames import FrameRings, prepare_jpeg
from streamharness.responder.service import ResponderSettings, ResponderStage
from streamharness.settings import KafkaSettings
from streamharness.topology import TOPOLOGY
from streamharness.v1 import common_pb2, events_pb2, memory_pb2

MODEL = "tiny-vlm"
MEMORY = "0:00:00-0:03:20: a quiet street in daylight; a van parks at 0:02:10."


def jpeg(width: int, height: int, grey: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (grey, grey, grey)).save(out, format="JPEG", quality=90)
    return out.getvalue()


# -- a real OpenAI-compatible server on 127.0.0.1 ------------------------------------------------------
class FakeOpenAIServer:
    """``GET /v1/models`` and streamed ``POST /v1/chat/completions``; every image data URL is decoded
    with Pillow and what was seen is recorded (``seen``) and answered ("3 images: 597x336 ...").
    ``status``/``error``: answer every chat request with that HTTP error instead."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.seen: list[dict[str, Any]] = []
        self.status = 200
        self.error = ""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.rstrip("/") == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                fake.bodies.append(body)
                if self.path != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                if fake.status != 200:
                    self._json(fake.status, {"error": {"message": fake.error, "type": "BadRequestError", "code": fake.status}})
                    return
                seen = fake.look(body)
                fake.seen.append(seen)
                text = f"{len(seen['sizes'])} images: " + " ".join(f"{w}x{h}" for w, h in seen["sizes"])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in ("I see", " " + text):
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
                             "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @staticmethod
    def look(body: dict[str, Any]) -> dict[str, Any]:
        """Decode every image of the request (raises, so the request fails, on one that is not an image)."""
        user = body["messages"][-1]["content"]
        parts = user if isinstance(user, list) else [{"type": "text", "text": user}]
        sizes, greys, labels, kinds = [], [], [], []
        for i, part in enumerate(parts):
            kinds.append(part["type"])
            if part["type"] == "image_url":
                url = part["image_url"]["url"]
                head, _, data = url.partition(",")
                assert head == "data:image/jpeg;base64"
                with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as image:
                    image.load()
                    assert image.format == "JPEG"
                    sizes.append(image.size)
                    greys.append(round(ImageStat.Stat(image.convert("L")).mean[0]))
                labels.append(parts[i - 1]["text"])
        return {"sizes": sizes, "greys": greys, "labels": labels, "kinds": kinds, "salt": body.get("cache_salt")}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    fake = FakeOpenAIServer()
    try:
        yield fake
    finally:
        fake.stop()


def generation(server: FakeOpenAIServer, **overrides: Any) -> GenerationSettings:
    values: dict[str, Any] = {"backend": "openai", "base_url": server.base_url, "model": MODEL, "api_key": None,
                              "max_new_tokens": 32, "read_timeout_s": 10, "connect_timeout_s": 5}
    values.update(overrides)
    return GenerationSettings(**values)


# -- the layout -----------------------------------------------------------------------------------------
def test_two_requests_of_one_chunk_share_their_prefix_up_to_the_earlier_frames(server: FakeOpenAIServer) -> None:
    frames = [FrameImage(65_000 + 1000 * i, jpeg(64, 48, 40 + 40 * i)) for i in range(3)]
    first = Prompt(system="S", context=MEMORY, recent_captions=("[0:01:06] a van",), question="What colour is the van?",
                   stream="acme/cam-1", images=tuple(frames[:2]))
    second = Prompt(system="S", context=MEMORY, recent_captions=("[0:01:07] a van", "[0:01:07] a man"),
                    instruction="tell me when someone walks in", stream="acme/cam-1", images=tuple(frames))
    generator = OpenAICompatibleGenerator(generation(server))
    try:
        a = json.dumps(generator._payload(first)["messages"], ensure_ascii=False)
        b = json.dumps(generator._payload(second)["messages"], ensure_ascii=False)
    finally:
        generator.close()
    # The first request up to and including its last frame: the system message, the memory block,
    # then the frames oldest first. Whatever is put before the memory block or between the frames
    # that changes per call (captions, the question) ends this prefix early, and so does a frame
    # order that is not oldest first (the second request's new frame would come first).
    last_url = FrameImage(frames[1].media_ts_ms, frames[1].jpeg).data_url()
    end = a.index(last_url) + len(last_url) + len('"}}')
    prefix = a[:end]
    assert b.startswith(prefix)
    memory_block = json.dumps({"type": "text", "text": f"Memory of the stream so far:\n{MEMORY}"}, ensure_ascii=False)
    assert prefix.startswith(json.dumps([{"role": "system", "content": "S"}])[:-1])
    assert memory_block in prefix and prefix.index(memory_block) < prefix.index(frames[0].data_url())
    assert prefix.index(frames[0].data_url()) < prefix.index(frames[1].data_url())
    assert "Frame at 0:01:05:" in prefix and "Frame at 0:01:06:" in prefix
    assert "colour" not in prefix and "What the camera shows" not in prefix  # the captions and the question come after
    # The memory block is exactly the text a text-only prompt starts with.
    assert first.user_text().startswith(f"Memory of the stream so far:\n{MEMORY}\n\n")
    parts = second.content_parts()
    assert [p["type"] for p in parts] == ["text"] + ["text", "image_url"] * 3 + ["text"]
    assert parts[-1]["text"] == second.tail_text() and parts[-1]["text"].startswith("What the camera shows now")
    assert [parts[1 + 2 * i]["text"] for i in range(3)] == [f"Frame at {clock(f.media_ts_ms)}:" for f in frames]


def test_a_prompt_without_images_is_sent_as_one_text_as_before() -> None:
    p = Prompt(system="S", context="mem", recent_captions=("cap",), question="Q?", stream="acme/cam-1")
    assert p.messages() == [{"role": "system", "content": "S"}, {"role": "user", "content": p.user_text()}]
    assert p.user_text() == "Memory of the stream so far:\nmem\n\nWhat the camera shows now (oldest first):\n- cap\n\nQuestion: Q?"
    # Frames given out of order are still laid out oldest first.
    late, early = FrameImage(2000, b"b"), FrameImage(1000, b"a")
    parts = Prompt(system="S", question="Q?", images=(late, early)).content_parts()
    assert [p["text"] for p in parts if p["type"] == "text"] == ["Frame at 0:00:01:", "Frame at 0:00:02:", "Question: Q?"]


# -- the client against the server ------------------------------------------------------------------------
def test_the_client_streams_a_prompt_with_frames_and_salts_it_per_tenant(server: FakeOpenAIServer) -> None:
    generator = OpenAICompatibleGenerator(generation(server))
    try:
        assert generator.ready()
        frames = (FrameImage(1000, jpeg(320, 240, 50)), FrameImage(2000, jpeg(160, 90, 200)))
        for stream in ("acme/cam-1", "acme/cam-2", "zeta/cam-1"):
            text = "".join(generator.stream(Prompt(system="S", context=MEMORY, question="What is there?", stream=stream, images=frames)))
            assert text == "I see 2 images: 320x240 160x90"
        text = "".join(generator.stream(Prompt(system="S", question="No stream?", images=frames)))
        assert text.startswith("I see 2 images")
    finally:
        generator.close()
    assert [s["greys"] for s in server.seen] == [[50, 200]] * 4
    assert server.seen[0]["labels"] == ["Frame at 0:00:01:", "Frame at 0:00:02:"]
    assert server.seen[0]["kinds"] == ["text", "text", "image_url", "text", "image_url", "text"]
    salts = [s["salt"] for s in server.seen]
    assert salts[0] == salts[1] == hashlib.sha256(f"{CACHE_SALT_NAMESPACE}acme".encode()).hexdigest()
    assert salts[2] != salts[0] and len(salts[2]) == 64
    assert salts[3] is None and "cache_salt" not in server.bodies[3]  # no stream, no tenant
    assert "acme" not in json.dumps(server.bodies[0]["cache_salt"])


def test_cache_salt_can_be_turned_off(server: FakeOpenAIServer) -> None:
    generator = OpenAICompatibleGenerator(generation(server, cache_salt=False))
    try:
        "".join(generator.stream(Prompt(system="S", question="Q?", stream="acme/cam-1")))
    finally:
        generator.close()
    assert "cache_salt" not in server.bodies[0]
    assert server.bodies[0]["messages"][1]["content"] == "Question: Q?"  # text only: one string, as before


@pytest.mark.parametrize(("status", "error", "images", "named"), [
    (400, "image input is not supported", 1, True),
    (400, "This model does not support multimodal inputs", 0, True),  # the message says it: the hint too
    (422, "Field required", 1, True),  # any refusal of a request with images
    (400, "max_tokens is too large", 0, False),
])
def test_a_server_that_refuses_the_images_names_the_setting(server: FakeOpenAIServer, status, error, images, named) -> None:
    server.status, server.error = status, error
    generator = OpenAICompatibleGenerator(generation(server))
    prompt = Prompt(system="S", question="Q?", stream="acme/cam-1", images=tuple(FrameImage(1000 * i, jpeg(32, 32, 9)) for i in range(images)))
    try:
        with pytest.raises(GenerationRejected) as caught:
            list(generator.stream(prompt))
    finally:
        generator.close()
    message = str(caught.value)
    assert f"HTTP {status}" in message and error in message
    assert ("SH_RESPONDER_FRAMES_PER_REQUEST=0" in message) is named


def test_a_transient_refusal_stays_retryable_with_images(server: FakeOpenAIServer) -> None:
    server.status, server.error = 429, "too many requests"
    generator = OpenAICompatibleGenerator(generation(server))
    try:
        with pytest.raises(GenerationError) as caught:
            list(generator.stream(Prompt(system="S", question="Q?", images=(FrameImage(0, jpeg(8, 8, 1)),))))
    finally:
        generator.close()
    assert not isinstance(caught.value, GenerationRejected)


# -- the responder ---------------------------------------------------------------------------------------------
class FixedMemory:
    """``Context`` and ``Recall`` as the responder calls them; the same memory for every stream."""

    def Context(self, request: memory_pb2.ContextRequest, timeout: float | None = None) -> memory_pb2.ContextResponse:  # noqa: N802
        return memory_pb2.ContextResponse(prefix_text=MEMORY, recent=[memory_pb2.MemoryItem(
            tier=memory_pb2.MEMORY_TIER_SHORT, start_ms=request.now_ms, end_ms=request.now_ms, text="a van and a man")])

    def Recall(self, request: memory_pb2.RecallRequest, timeout: float | None = None) -> memory_pb2.RecallResponse:  # noqa: N802
        return memory_pb2.RecallResponse()


class Responder:
    """The responder on the local host (the topology row, configure(), the records serialised and
    parsed as on Kafka) against the fake server."""

    def __init__(self, server: FakeOpenAIServer, **settings: Any) -> None:
        values: dict[str, Any] = {"memory_address": "", "recall_limit": 0}
        values.update(settings)
        self.host = LocalHost(KafkaSettings(handler_retries=1))
        self.asked = 0
        self.stage: ResponderStage = self.host.add(ResponderStage(ResponderSettings(**values), generation(server), memory=FixedMemory()))

    def frame(self, key: common_pb2.StreamKey, t_ms: int, data: bytes, session: str = "s1") -> None:
        self.host.bus.send(topics.FRAMES, key, events_pb2.FrameEvent(key=key, session_id=session, media_ts_ms=t_ms, seq=t_ms // 1000,
                                                                    jpeg=data, width=1280, height=720))

    def ask(self, key: common_pb2.StreamKey, t_ms: int, question: str = "What is in the street?", session: str = "s1") -> str:
        self.asked += 1
        decision_id = f"{key.tenant}/{key.stream_id}/{t_ms}/q{self.asked}"
        self.host.bus.send(topics.DECISIONS, key, events_pb2.DecisionEvent(
            key=key, session_id=session, media_ts_ms=t_ms, action=events_pb2.DecisionEvent.ACTION_RESPOND,
            trigger=common_pb2.TRIGGER_QUESTION, question_id=f"q{self.asked}", prompt_text=question, decision_id=decision_id))
        return decision_id

    def run(self) -> dict[str, list[events_pb2.ResponseEvent]]:
        self.host.run_until_idle()
        out: dict[str, list[events_pb2.ResponseEvent]] = {}
        for record in self.host.bus.take(topics.RESPONSES):
            event = events_pb2.ResponseEvent.FromString(record.value)
            out.setdefault(event.response_id, []).append(event)
        return out

    def close(self) -> None:
        self.host.close()


def answer(chunks: list[events_pb2.ResponseEvent]) -> str:
    assert chunks[-1].final and [c.index for c in chunks] == list(range(len(chunks)))
    return chunks[-1].answer_text


KEY = make_key("acme", "cam-1")


def test_the_responder_sends_each_streams_recent_frames_scaled_down_in_media_time_order(server: FakeOpenAIServer) -> None:
    responder = Responder(server, frames_per_request=3)
    try:
        assert set(responder.host._hosted["responder"].spec.consumes) == {topics.DECISIONS, topics.FRAMES}
        for s in range(1, 5):
            responder.frame(KEY, s * 1000, jpeg(1280, 720, 40 * s))
        first = responder.ask(KEY, 4000)
        responder.frame(KEY, 5000, jpeg(1280, 720, 200))
        second = responder.ask(KEY, 4500, "And now?")  # frame 5 is after it: not shown
        other_tenant = make_key("zeta", "cam-9")
        responder.frame(other_tenant, 1000, jpeg(400, 300, 90))
        third = responder.ask(other_tenant, 1000)
        fourth = responder.ask(make_key("acme", "cam-2"), 1000)  # no frames of that stream: text only
        responses = responder.run()
    finally:
        responder.close()
    assert len(server.seen) == 4  # one generation per decision; the frames cost none
    a, b, c, d = server.seen
    # The ring holds the last 3 frames; each decision gets those at or before its media time, oldest first.
    assert a["greys"] == [80, 120, 160] and a["labels"] == ["Frame at 0:00:02:", "Frame at 0:00:03:", "Frame at 0:00:04:"]
    assert b["greys"] == [120, 160] and b["labels"] == ["Frame at 0:00:03:", "Frame at 0:00:04:"]
    limit = ResponderSettings().frame_max_pixels
    for w, h in a["sizes"] + b["sizes"]:
        assert w * h <= limit and w * h > 0.97 * limit and abs(w / h - 1280 / 720) < 0.01  # downscaled, aspect kept
    assert c["sizes"] == [(400, 300)]  # small enough: sent as it came
    assert d["sizes"] == [] and d["kinds"] == ["text"]
    # The frames go after the memory block, then the captions and the question.
    assert a["kinds"] == ["text"] + ["text", "image_url"] * 3 + ["text"]
    user = server.bodies[0]["messages"][1]["content"]
    assert user[0]["text"] == f"Memory of the stream so far:\n{MEMORY}" and user[-1]["text"].endswith("Question: What is in the street?")
    # cache_salt: one per tenant.
    assert a["salt"] == b["salt"] == d["salt"] and c["salt"] != a["salt"] and a["salt"]
    assert answer(responses[first]) == "I see 3 images: " + " ".join(f"{w}x{h}" for w, h in a["sizes"])
    assert answer(responses[second]).startswith("I see 2 images")
    assert answer(responses[third]) == "I see 1 images: 400x300"
    assert answer(responses[fourth]) == "I see 0 images:"


def test_a_corrupt_frame_is_skipped_and_the_response_still_goes_out(server: FakeOpenAIServer, caplog) -> None:
    responder = Responder(server, frames_per_request=4, frame_max_pixels=64 * 48)
    good = jpeg(640, 480, 100)
    try:
        responder.frame(KEY, 1000, good)
        responder.frame(KEY, 2000, good[: len(good) // 2])  # truncated
        responder.frame(KEY, 3000, b"\xff\xd8\xff\xe0 not a jpeg at all")
        responder.frame(KEY, 4000, jpeg(640, 480, 150))
        with caplog.at_level(logging.WARNING, logger="streamharness.responder.frames"):
            first = responder.ask(KEY, 4000)
            second = responder.ask(KEY, 4000, "Again?")
            responses = responder.run()
    finally:
        responder.close()
    assert [s["greys"] for s in server.seen] == [[100, 150], [100, 150]]
    assert server.seen[0]["labels"] == ["Frame at 0:00:01:", "Frame at 0:00:04:"]
    assert all(w * h <= 64 * 48 for s in server.seen for w, h in s["sizes"])
    assert answer(responses[first]).startswith("I see 2 images") and answer(responses[second]).startswith("I see 2 images")
    warned = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    assert len(warned) == 2 and "0:00:02" in warned[0] and "0:00:03" in warned[1]  # once per frame, not per prompt
    # Both prompts sent the same bytes for the same frame (prepared once): the prefix cache can hit.
    urls = [[p["image_url"]["url"] for p in body["messages"][1]["content"] if p["type"] == "image_url"] for body in server.bodies]
    assert urls[0] == urls[1]


def test_frames_older_than_the_max_age_are_not_sent(server: FakeOpenAIServer) -> None:
    responder = Responder(server, frames_per_request=4, frame_max_age_s=10)
    try:
        for s in (1, 2, 50):
            responder.frame(KEY, s * 1000, jpeg(64, 48, 20 * s % 250))
        responder.ask(KEY, 30_000)  # 28 s after the newest frame before it
        responder.ask(KEY, 55_000)
        responder.run()
    finally:
        responder.close()
    assert [s["labels"] for s in server.seen] == [[], ["Frame at 0:00:50:"]]


def test_a_server_that_refuses_images_closes_the_response_and_dead_letters_it_naming_the_setting(server: FakeOpenAIServer) -> None:
    server.status, server.error = 400, "image input is not supported"
    responder = Responder(server, frames_per_request=2)
    try:
        responder.frame(KEY, 1000, jpeg(64, 48, 10))
        decision_id = responder.ask(KEY, 1000)
        responses = responder.run()
        dead = responder.host.bus.dead_letters
    finally:
        responder.close()
    assert [(c.final, c.text) for c in responses[decision_id]] == [(True, "")]  # closed: nobody waits
    assert len(dead) == 1
    headers = dict(dead[0].headers)
    assert headers["sh-dlq-source-topic"].decode().endswith(topics.DECISIONS)
    error = headers["sh-dlq-error"].decode()
    assert "SH_RESPONDER_FRAMES_PER_REQUEST=0" in error


def test_text_only_by_default_the_responder_does_not_read_frames(server: FakeOpenAIServer) -> None:
    spec = ResponderStage(ResponderSettings(memory_address="")).configure(TOPOLOGY["responder"])
    assert set(spec.consumes) == {topics.DECISIONS}
    assert set(TOPOLOGY["responder"].consumes) == {topics.DECISIONS, topics.FRAMES}
    responder = Responder(server)
    try:
        assert responder.stage.frames is None
        responder.frame(KEY, 1000, jpeg(64, 48, 10))
        decision_id = responder.ask(KEY, 1000)
        responses = responder.run()
    finally:
        responder.close()
    assert answer(responses[decision_id]) == "I see 0 images:"
    body = server.bodies[0]
    assert isinstance(body["messages"][1]["content"], str)  # the text prompt, as before
    assert body["cache_salt"] == hashlib.sha256(f"{CACHE_SALT_NAMESPACE}acme".encode()).hexdigest()  # stream is always set


# -- the rings ----------------------------------------------------------------------------------------------------
def test_rings_drop_redeliveries_restart_with_a_new_session_and_evict_the_least_recently_updated_stream() -> None:
    rings = FrameRings(2, 2, max_pixels=10_000, jpeg_quality=80)
    data = jpeg(32, 32, 60)
    assert rings.add("a/1", "s1", 1000, data) and rings.add("a/1", "s1", 2000, data) and rings.add("a/1", "s1", 3000, data)
    assert not rings.add("a/1", "s1", 2000, data) and not rings.add("a/1", "s1", 3000, data)  # redelivered
    assert not rings.add("a/1", "s1", 4000, b"")
    assert [i.media_ts_ms for i in rings.images("a/1", "s1", 10_000)] == [2000, 3000]
    assert [i.media_ts_ms for i in rings.images("a/1", "s2", 10_000)] == []  # another session's decision
    assert [i.media_ts_ms for i in rings.images("a/1", "", 2500)] == [2000]
    assert [i.media_ts_ms for i in rings.images("a/1", "s1", 10_000, from_ms=2500)] == [3000]  # too old: not sent
    assert rings.add("a/1", "s2", 0, data)  # a new session: media time starts again
    assert [i.media_ts_ms for i in rings.images("a/1", "s2", 10_000)] == [0]
    rings.add("a/2", "s1", 1000, data)
    rings.add("a/1", "s2", 1000, data)  # a/1 updated last
    rings.add("b/1", "s1", 1000, data)  # a third stream: a/2 goes
    assert len(rings) == 2
    assert rings.images("a/2", "s1", 10_000) == [] and len(rings.images("a/1", "s2", 10_000)) == 2


def test_prepare_jpeg_keeps_small_jpegs_and_scales_big_ones_keeping_the_aspect_ratio() -> None:
    small = jpeg(100, 50, 30)
    assert prepare_jpeg(small, 100 * 50, 80) is small
    out = prepare_jpeg(jpeg(1000, 10, 30), 500, 80)
    with Image.open(io.BytesIO(out)) as image:
        assert image.format == "JPEG" and image.size[0] * image.size[1] <= 500 and image.size[0] / image.size[1] > 50
    png = io.BytesIO()
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(png, format="PNG")
    with Image.open(io.BytesIO(prepare_jpeg(png.getvalue(), 10_000, 80))) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (20, 20)
    with pytest.raises(Exception):
        prepare_jpeg(b"not an image", 10_000, 80)
