"""The gateway's HTTP API (streamharness.gateway.http) against a scripted gateway: the mapping of
HTTP to the session's messages and back, with the official openai client where a user would use it.
The real gateway, broker and ingest behind it: tests/integration/test_http_api.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import types

import aiohttp
import grpc
import openai
import pytest

from streamharness.errors import InvalidInput, NotFound, RateLimited, StreamHarnessError, Unauthenticated
from streamharness.gateway.http import HttpApi, _AnswerRelay, message_json
from streamharness.v1 import common_pb2, session_pb2

KEYS = {"key-acme": "acme", "key-other": "other"}
JPEG = b"\xff\xd8\xff\xe0fake-jpeg"
SM = session_pb2.ServerMessage


class Closed(StreamHarnessError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeAuth:
    def tenant(self, metadata, *, peer=""):
        md = dict(metadata)
        key = md.get("x-api-key") or md.get("authorization", "").removeprefix("Bearer ").strip()
        if key not in KEYS:
            raise Unauthenticated("unknown API key" if key else "no credentials: send x-api-key metadata")
        return KEYS[key]


class FakeGateway:
    """What the HTTP layer needs of GatewayStage, scripted: a frame whose bytes say "bad" is refused,
    a question is answered by the chunks in ``answers`` (default: "it is " + "fine"), a second
    question within the session's first is rate-limited when ``rate_limit`` is set."""

    def __init__(self) -> None:
        self.settings = types.SimpleNamespace(http_host="127.0.0.1", http_port=0, idle_timeout_s=30.0, end_grace_s=2.0,
                                              max_frame_bytes=4096)
        self.auth = FakeAuth()
        self.answers: list[session_pb2.ResponseChunk] | None = None
        self.rate_limit = False
        self.sent: list[session_pb2.ClientMessage] = []
        self.watchers: list[asyncio.Queue] = []

    async def run_session(self, requests, metadata, peer):
        tenant = self.auth.tenant(metadata, peer=peer)
        first = session_pb2.ClientMessage.FromString(await anext(requests))
        if not first.start.stream_id or " " in first.start.stream_id:
            raise InvalidInput(f"stream_id {first.start.stream_id!r} is not valid")
        sid = f"s-{first.start.stream_id}"
        yield SM(accepted=session_pb2.SessionAccepted(session_id=sid, key=common_pb2.StreamKey(tenant=tenant, stream_id=first.start.stream_id),
                                                      decision_fps=first.start.decision_fps or 1.0, resume_token="tok"))
        questions = 0
        async for raw in requests:
            msg = session_pb2.ClientMessage.FromString(raw)
            self.sent.append(msg)
            kind = msg.WhichOneof("message")
            if kind == "frame":
                if msg.frame.image.startswith(b"bad"):
                    yield SM(error=session_pb2.SessionError(code=3, message="cannot decode JPEG", seq=msg.frame.seq))
                else:
                    yield SM(ack=session_pb2.Ack(kind=session_pb2.Ack.KIND_FRAME, seq=msg.frame.seq, media_ts_ms=msg.frame.media_ts_ms, sampled=True))
            elif kind == "question":
                questions += 1
                if self.rate_limit and questions > 1:
                    yield SM(error=session_pb2.SessionError(code=8, message="questions are limited; resets in 1.50 s", retry_after_ms=1500))
                    continue
                qid = msg.question.question_id
                yield SM(ack=session_pb2.Ack(kind=session_pb2.Ack.KIND_QUESTION, id=qid))
                for chunk in self.answers or [session_pb2.ResponseChunk(index=0, text="it is "), session_pb2.ResponseChunk(index=1, text="fine", final=True)]:
                    c = session_pb2.ResponseChunk()
                    c.CopyFrom(chunk)
                    c.question_id, c.response_id, c.trigger = qid, c.response_id or f"r-{qid}", common_pb2.TRIGGER_QUESTION
                    await asyncio.sleep(0.01)
                    yield SM(response=c)
            elif kind == "instruction":
                yield SM(ack=session_pb2.Ack(kind=session_pb2.Ack.KIND_INSTRUCTION, id=msg.instruction.add.instruction_id))
                yield SM(response=session_pb2.ResponseChunk(response_id="alert-1", index=0, text="someone walked in", final=True,
                                                            trigger=common_pb2.TRIGGER_INSTRUCTION, instruction_id=msg.instruction.add.instruction_id))
            elif kind == "end":
                yield SM(ack=session_pb2.Ack(kind=session_pb2.Ack.KIND_END))
                return
            if first.start.stream_id == "doomed":
                raise Closed(grpc.StatusCode.ALREADY_EXISTS, "stream_in_use: another session holds stream doomed")

    def streams(self, tenant):
        return [{"stream_id": "cam", "session_id": "s-cam", "source": "", "opened_unix_ms": 1, "last_media_ts_ms": 0, "frames": 1}] if tenant == "acme" else []

    @contextlib.contextmanager
    def watch(self, tenant, stream_id):
        if tenant != "acme" or stream_id != "cam":
            raise NotFound(f"stream {stream_id} has no open session on this gateway replica")
        q: asyncio.Queue = asyncio.Queue()
        self.watchers.append(q)
        yield types.SimpleNamespace(queue=q)

    async def latest_frame(self, tenant, stream_id):
        return (2000, JPEG) if (tenant, stream_id) == ("acme", "cam") else None

    async def ask(self, tenant, stream_id, text):
        if (tenant, stream_id) != ("acme", "cam"):
            raise NotFound(f"stream {stream_id} has no open session on this gateway replica")
        if text == "flood":
            raise RateLimited("questions are limited; resets in 0.40 s", 0.4)
        return "view-1"

    async def add_instruction(self, tenant, stream_id, text):
        return "view-i1"


@pytest.fixture
def run():
    """Runs ``test(api, base_url)`` with the API started on a free port of a fresh loop."""

    def go(test, gateway: FakeGateway | None = None):
        async def main():
            api = HttpApi(gateway or FakeGateway())
            await api.start()
            try:
                return await test(api, f"http://127.0.0.1:{api.port}")
            finally:
                await api.stop()

        return asyncio.run(main())

    return go


async def _open(http: aiohttp.ClientSession, base: str, key: str = "key-acme", **body) -> dict:
    async with http.post(f"{base}/v1/sessions", json={"stream_id": "cam", **body}, headers={"x-api-key": key}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


def test_message_json_is_plain_json():
    msg = session_pb2.DecisionStep(media_ts_ms=12_000, respond=True, trigger=common_pb2.TRIGGER_INSTRUCTION, instruction_id="door", score=0.5)
    assert message_json(msg) == {"media_ts_ms": 12_000, "respond": True, "trigger": "instruction", "question_id": "",
                                 "instruction_id": "door", "prompt_text": "", "score": 0.5, "policy": "", "reason": ""}
    status = message_json(common_pb2.SourceStatus(kind=common_pb2.SourceStatus.KIND_GAP, gap_ms=4000))
    assert status["kind"] == "gap" and status["gap_ms"] == 4000


def test_a_regenerated_answer_never_retracts_what_was_streamed():
    relay = _AnswerRelay()
    C = session_pb2.ResponseChunk  # noqa: N806
    assert relay.feed(C(text="The door ")) == ("The door ", False)
    # the same text again after a crash: nothing until it goes past what was streamed
    assert relay.feed(C(text="The ", restart=True)) == ("", False)
    assert relay.feed(C(text="door opens")) == ("opens", False)
    # a different text: streamed whole after a separator, flagged
    out, restart = relay.feed(C(text="A van", restart=True))
    assert restart and out.endswith("A van") and relay.text == "A van"
    assert relay.feed(C(text=" stops")) == (" stops", False)


def test_open_frames_and_end(run):
    async def test(api, base):
        async with aiohttp.ClientSession() as http:
            s = await _open(http, base, instructions=["tell me when someone walks in"], decision_fps=2)
            assert s["session_id"] == "s-cam" and s["decision_fps"] == 2 and s["resume_token"] == "tok"
            assert s["instructions"] == [{"instruction_id": "i1", "text": "tell me when someone walks in"}]
            url, h = f"{base}/v1/sessions/s-cam/frames", {"x-api-key": "key-acme"}
            async with http.post(url, data=JPEG, headers={**h, "Content-Type": "image/jpeg"}) as r:
                assert r.status == 200 and await r.json() == {"seq": 1, "media_ts_ms": 0, "sampled": True, "shed": False}
            async with http.post(url, data=JPEG, headers={**h, "Content-Type": "image/jpeg"}) as r:
                assert (await r.json())["media_ts_ms"] == 500  # one decision step after the last
            async with http.post(url + "?media_ts_ms=9000", data=b"bad", headers={**h, "Content-Type": "image/jpeg"}) as r:
                assert r.status == 400 and (await r.json())["error"]["message"] == "cannot decode JPEG"
            async with http.post(url, data=b"GIF89a", headers={**h, "Content-Type": "image/gif"}) as r:
                assert r.status == 415
            async with http.post(url, data=b"\xff\xd8" + b"x" * 5000, headers={**h, "Content-Type": "image/jpeg"}) as r:
                assert r.status == 413 and (await r.json())["error"]["code"] == "too_large"
            async with http.post(url + "?media_ts_ms=soon", data=JPEG, headers=h) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "media_ts_ms"
            async with http.delete(f"{base}/v1/sessions/s-cam", headers=h) as r:
                summary = await r.json()
                assert r.status == 200 and summary["status"] == "ended" and summary["frames"]["sent"] == 3
                assert summary["frames"]["rejected"] == 1 and summary["end"]["code"] == "ok"
            async with http.post(url, data=JPEG, headers=h) as r:
                assert r.status == 410 and (await r.json())["error"]["code"] == "session_ended"
            async with http.delete(f"{base}/v1/sessions/s-cam", headers=h) as r:
                assert r.status == 200  # the summary again

    run(test)


def test_errors_are_openai_shaped(run):
    async def test(api, base):
        async with aiohttp.ClientSession() as http:
            h = {"x-api-key": "key-acme"}
            async with http.post(f"{base}/v1/sessions", json={"stream_id": "cam"}) as r:
                body = await r.json()
                assert r.status == 401 and body["error"]["type"] == "authentication_error" and "no credentials" in body["error"]["message"]
            async with http.post(f"{base}/v1/sessions", data=b"{not json", headers=h) as r:
                assert r.status == 400 and "not valid JSON" in (await r.json())["error"]["message"]
            async with http.post(f"{base}/v1/sessions", json={"decision_fps": 1}, headers=h) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "stream_id"
            async with http.post(f"{base}/v1/sessions", json={"stream_id": "cam", "instructions": [{"id": "x"}]}, headers=h) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "instructions[0].text"
            async with http.post(f"{base}/v1/sessions", json={"stream_id": "bad id"}, headers=h) as r:
                assert r.status == 400 and "stream_id" in (await r.json())["error"]["message"]  # the gateway's own check
            async with http.get(f"{base}/v1/nothing", headers=h) as r:
                assert r.status == 404 and (await r.json())["error"]["message"] == "no route GET /v1/nothing"
            async with http.put(f"{base}/v1/models", headers=h) as r:
                assert r.status == 405 and "GET" in r.headers["Allow"]
            await _open(http, base)
            async with http.get(f"{base}/v1/sessions/s-cam", headers={"x-api-key": "key-other"}) as r:
                assert r.status == 404  # another tenant's session is not found, as an unknown one
            async with http.get(f"{base}/v1/sessions", headers={"x-api-key": "key-other"}) as r:
                assert (await r.json())["data"] == []

    run(test)


def test_chat_completions_with_the_openai_client(run):
    gateway = FakeGateway()

    async def test(api, base):
        async with aiohttp.ClientSession() as http:
            await _open(http, base)
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="key-acme", max_retries=0)
        assert [m.id for m in (await client.models.list()).data] == ["streamharness"]
        image = "data:image/jpeg;base64," + __import__("base64").b64encode(JPEG).decode()
        stream = await client.chat.completions.create(
            model="streamharness", stream=True, extra_body={"session_id": "s-cam"},
            messages=[{"role": "user", "content": [{"type": "text", "text": "what is happening?"},
                                                   {"type": "image_url", "image_url": {"url": image}}]}])
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == "it is fine" and chunks[-1].choices[0].finish_reason == "stop"
        question = gateway.sent[-1].question
        assert question.text == "what is happening?" and question.media_ts_ms == gateway.sent[-2].frame.media_ts_ms == 0

        # a regeneration that repeats the text continues the stream; the whole answer without streaming
        gateway.answers = [session_pb2.ResponseChunk(index=0, text="a van "), session_pb2.ResponseChunk(index=0, text="a van ", restart=True),
                           session_pb2.ResponseChunk(index=1, text="stops", final=True)]
        stream = await client.chat.completions.create(model="x", stream=True, messages=[{"role": "user", "content": "and now?"}],
                                                      extra_headers={"x-session-id": "s-cam"})
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "a van stops"
        done = await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "and now?"}], extra_body={"session_id": "s-cam"})
        assert done.choices[0].message.content == "a van stops" and done.model_extra["streamharness"]["session_id"] == "s-cam"

        gateway.answers = [session_pb2.ResponseChunk(index=0, text="too many open questions", final=True, refusal="too_many_open_questions")]
        done = await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "?"}], extra_body={"session_id": "s-cam"})
        assert done.choices[0].message.content is None and done.choices[0].message.refusal == "too many open questions"

        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError):
            await openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="key-other", max_retries=0).chat.completions.create(
                model="x", messages=[{"role": "user", "content": "?"}], extra_body={"session_id": "s-cam"})
        with pytest.raises(openai.BadRequestError, match="data: URL"):
            await client.chat.completions.create(model="x", extra_body={"session_id": "s-cam"}, messages=[
                {"role": "user", "content": [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}]}])
        with pytest.raises(openai.BadRequestError, match="session_id is required"):
            await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "?"}])
        gateway.rate_limit = True
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="x", messages=[{"role": "user", "content": "?"}], extra_body={"session_id": "s-cam"})
        assert err.value.response.headers["Retry-After"] == "2" and err.value.body["retry_after_ms"] == 1500
        await client.close()

    run(test, gateway)


async def _sse(resp: aiohttp.ClientResponse, until: str, limit: int = 50) -> list[tuple[str, str, dict]]:
    """(event, id, data) of an SSE response, up to the first event of type ``until``."""
    out, event, eid, data = [], "message", "", []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if data:
                out.append((event, eid, json.loads("\n".join(data))))
                if event == until or len(out) >= limit:
                    return out
            event, data = "message", []
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("id: "):
            eid = line[4:]
        elif line.startswith("data: "):
            data.append(line[6:])
    return out


def test_session_events_replay_after_last_event_id_and_end(run):
    async def test(api, base):
        h = {"x-api-key": "key-acme"}
        async with aiohttp.ClientSession() as http:
            await _open(http, base)
            async with http.get(f"{base}/v1/sessions/s-cam/events", headers=h) as events:
                async with http.post(f"{base}/v1/sessions/s-cam/instructions", json={"text": "tell me when someone walks in"}, headers=h) as r:
                    assert r.status == 201
                got = await _sse(events, "response")
            assert got[-1][0] == "response" and got[-1][2]["text"] == "someone walked in" and got[-1][2]["trigger"] == "instruction"
            async with http.get(f"{base}/v1/sessions/s-cam/events", headers={**h, "Last-Event-ID": "0"}) as events:
                replay = await _sse(events, "response")
            assert [e for e, _, _ in replay] == ["accepted", "ack", "response"]
            async with http.get(f"{base}/v1/sessions/s-cam/events", headers=h) as events:
                async with http.delete(f"{base}/v1/sessions/s-cam", headers=h):
                    pass
                end = await _sse(events, "end")
            assert end[-1][0] == "end" and end[-1][2]["code"] == "ok"

    run(test)


def test_a_session_ended_with_a_status_says_why(run):
    async def test(api, base):
        h = {"x-api-key": "key-acme"}
        async with aiohttp.ClientSession() as http:
            await _open(http, base, stream_id="doomed")
            async with http.post(f"{base}/v1/sessions/s-doomed/frames", data=JPEG, headers=h) as r:
                assert r.status == 200  # acknowledged, then the session is refused
            await asyncio.sleep(0.05)
            async with http.post(f"{base}/v1/sessions/s-doomed/frames", data=JPEG, headers=h) as r:
                err = (await r.json())["error"]
                assert r.status == 410 and "ALREADY_EXISTS" in err["message"] and "stream_in_use" in err["message"]

    run(test)


def test_streams_view_routes(run):
    gateway = FakeGateway()

    async def test(api, base):
        h = {"Authorization": "Bearer key-acme"}
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/view") as r:
                page = await r.text()
                assert r.status == 200 and "view.js" in page and "script-src 'self'" in r.headers["Content-Security-Policy"]
            for name in ("view.js", "view.css"):
                async with http.get(f"{base}/view/{name}") as r:
                    assert r.status == 200
            async with http.get(f"{base}/v1/streams", headers=h) as r:
                assert [s["stream_id"] for s in (await r.json())["data"]] == ["cam"]
            async with http.get(f"{base}/v1/streams/cam/frame.jpg", headers=h) as r:
                assert r.status == 200 and await r.read() == JPEG and r.headers["X-Media-Ts-Ms"] == "2000"
            async with http.get(f"{base}/v1/streams/cam/frame.jpg", headers={"Authorization": "Bearer key-other"}) as r:
                assert r.status == 404
            async with http.post(f"{base}/v1/streams/cam/questions", json={"text": "who is there?"}, headers=h) as r:
                assert r.status == 202 and (await r.json())["question_id"] == "view-1"
            async with http.post(f"{base}/v1/streams/cam/questions", json={"text": "flood"}, headers=h) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "1"
            async with http.post(f"{base}/v1/streams/cam/questions", json={}, headers=h) as r:
                assert r.status == 400 and (await r.json())["error"]["param"] == "text"
            async with http.get(f"{base}/v1/streams/cam/events", headers={"Authorization": "Bearer key-other"}) as r:
                assert r.status == 404
            async with http.get(f"{base}/v1/streams/cam/events", headers=h) as events:
                while not gateway.watchers:
                    await asyncio.sleep(0.01)
                gateway.watchers[0].put_nowait(SM(decision=session_pb2.DecisionStep(media_ts_ms=3000, reason="nothing new")))
                got = await _sse(events, "decision")
            assert got[0][0] == "stream" and got[1][2]["reason"] == "nothing new" and got[1][2]["respond"] is False

    run(test, gateway)


def test_a_session_nobody_uses_is_ended(run):
    gateway = FakeGateway()
    gateway.settings.idle_timeout_s = 0.4

    async def test(api, base):
        h = {"x-api-key": "key-acme"}
        async with aiohttp.ClientSession() as http:
            await _open(http, base)
            await asyncio.sleep(1.0)
            async with http.get(f"{base}/v1/sessions/s-cam", headers=h) as r:
                body = await r.json()
            assert body["status"] == "ended" and body["end"]["code"] == "ok"  # ended with SessionEnd, not cut off
            assert gateway.sent[-1].WhichOneof("message") == "end"

    run(test, gateway)
