"""Python client SDK for the gateway's session API.

    async with Session("127.0.0.1:50051", stream_id="cam-1", instructions={"people": "tell me when someone walks in"}) as s:
        await s.send_frame(0, jpeg_bytes)
        await s.ask("what is happening?", at_ms=30_000)
        await s.end()
        async for message in s:          # Responses, acks and errors, as they arrive
            ...

``Session`` is an async iterator of ``streamharness.v1.session_pb2.ServerMessage``;
``Session.responses()`` yields whole ``Response`` objects assembled from their chunks, each once (a
chunk with ``restart`` voids what came of its response before: it is being generated again).

**Reconnects.** With ``reconnect=True`` a call that breaks (the gateway restarted or moved, the
network dropped, the broker was away: UNAVAILABLE) is opened again by itself with the session's
resume token, for up to ``reconnect_timeout_s``: the session keeps its id, standing instructions
and pending questions; questions and instruction changes the gateway had not acknowledged are sent
again (the pipeline drops repeats by id); the responses produced meanwhile are delivered, except
those already held whole (their ids go with the resume). A session that can no longer be resumed
raises ``grpc.aio.AioRpcError`` NOT_FOUND.

Credentials: ``api_key`` (metadata ``x-api-key``) or ``bearer_token`` (a JWT from an issuer the
gateway accepts; ``authorization: Bearer``). ``tls=True`` (or ``root_certificates``, PEM bytes of the
CA that signed the gateway's certificate) connects over TLS; ``client_certificate`` /
``client_key`` for a gateway that asks for client certificates.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc

from streamharness.errors import status_code
from streamharness.v1 import common_pb2, session_pb2, session_pb2_grpc

log = logging.getLogger(__name__)
_END = object()
_WAKE = object()  # wakes a request stream waiting on the queue to look at _front


@dataclass
class Response:
    """One response assembled from its chunks, with client-side timings."""

    response_id: str
    trigger: int
    question_id: str
    instruction_id: str
    media_ts_ms: int
    text: str = ""
    first_chunk_wall: float = 0.0  # time.monotonic() when the first chunk arrived
    final_wall: float = 0.0
    chunks: int = 0
    refusal: str = ""  # the question was refused, not answered: why (e.g. "too_many_open_questions")

    @property
    def proactive(self) -> bool:
        return self.trigger == common_pb2.TRIGGER_INSTRUCTION


@dataclass
class Session:
    address: str
    stream_id: str
    decision_fps: float = 1.0
    instructions: Mapping[str, str] = field(default_factory=dict)
    api_key: str | None = None
    tenant: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    bearer_token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_key: bytes | None = None
    reconnect: bool = False
    reconnect_timeout_s: float = 60.0
    #: Pull the stream instead of pushing frames: a camera or file URL (``Source(url=...)``), or an
    #: upload (``Source(upload=True)``, then :meth:`upload`). The gateway answers with ``source``
    #: messages (connected, reconnecting, gap, ended, failed); a file or upload finishes the session
    #: by itself at its end.
    source: common_pb2.Source | None = None
    want_decisions: bool = False  # also receive a DecisionStep for every decided second
    #: ``common_pb2.PACE_REPLAY`` for frames sent faster than real time (a recording): none is ever
    #: shed for lag, so the decisions are those of the media time alone; ``PACE_LIVE`` for a camera.
    pace: int = common_pb2.PACE_UNSPECIFIED

    def __post_init__(self) -> None:
        self._out: asyncio.Queue = asyncio.Queue(maxsize=64)
        self._front: collections.deque = collections.deque()  # taken by a broken call, not sent
        self._seq = 0
        self._generation = 0  # which call's request stream may take from _out
        self.session_id = ""
        self.resume_token = ""
        self.reconnects = 0
        self.asked_wall: dict[str, float] = {}
        self._unacked: dict[str, session_pb2.ClientMessage] = {}  # questions / instruction changes not acknowledged
        self._complete: set[str] = set()  # responses held whole
        self._answered: set[str] = set()  # questions whose final response came
        self._ending = False
        self._pause, self._resumed_at = 0.2, -1e9  # backoff across resumes that break at once

    async def __aenter__(self) -> Session:
        options = [("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.max_receive_message_length", self.max_message_bytes)]
        if self.tls or self.root_certificates:
            credentials = grpc.ssl_channel_credentials(self.root_certificates, self.client_key, self.client_certificate)
            self._channel = grpc.aio.secure_channel(self.address, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.address, options=options)
        self._metadata = []
        if self.api_key:
            self._metadata.append(("x-api-key", self.api_key))
        if self.bearer_token:
            self._metadata.append(("authorization", f"Bearer {self.bearer_token}"))
        if self.tenant:
            self._metadata.append(("x-tenant", self.tenant))
        self._stub = session_pb2_grpc.SessionServiceStub(self._channel)
        await self._open(resume=False)
        return self

    async def _open(self, resume: bool) -> None:
        start = session_pb2.SessionStart(
            stream_id=self.stream_id, decision_fps=self.decision_fps, source=self.source, want_decisions=self.want_decisions, pace=self.pace,
            instructions=[common_pb2.StandingInstruction(instruction_id=k, text=v) for k, v in self.instructions.items()])
        if resume:
            start = session_pb2.SessionStart(stream_id=self.stream_id, decision_fps=self.decision_fps, source=self.source,
                                             want_decisions=self.want_decisions, pace=self.pace, resume_token=self.resume_token,
                                             received_response_ids=sorted(self._complete))
        self._generation += 1
        resend = list(self._unacked.values()) if resume else []
        self._call = self._stub.Stream(self._requests(self._generation, session_pb2.ClientMessage(start=start), resend),
                                       metadata=self._metadata)
        first = await self._call.read()
        if first is grpc.aio.EOF or first.WhichOneof("message") != "accepted":
            raise RuntimeError(f"session was not accepted: {first}")
        self.session_id = first.accepted.session_id
        self.resume_token = first.accepted.resume_token

    async def __aexit__(self, *exc: object) -> None:
        self._generation += 1
        self._call.cancel()
        await self._channel.close()

    async def _requests(self, generation: int, start: session_pb2.ClientMessage, resend: list[session_pb2.ClientMessage]):
        yield start
        for msg in resend:
            yield msg
        while True:
            if self._front:
                item = self._front.popleft()
            else:
                item = await self._out.get()
                if self._front and item is not _WAKE:
                    self._front.append(item)  # queued after what a broken call gave back: keep the order
                    continue
            if item is _WAKE:
                continue
            if generation != self._generation:
                # A broken call's stream took it: it is the next call's, first in line.
                self._front.appendleft(item)
                self._out.put_nowait(_WAKE)
                return
            if item is _END:
                return
            kind = item.WhichOneof("message")
            if kind == "question":
                self._unacked[item.question.question_id] = item
            elif kind == "instruction":
                change = item.instruction
                self._unacked[change.add.instruction_id or change.remove_instruction_id] = item
            yield item

    _RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)

    async def _resume(self, why: str) -> None:
        """Open the call again with the resume token, backing off, for up to reconnect_timeout_s.
        Resumes that keep breaking at once (the gateway accepts, a dependency behind it is still
        down) back off too: the pause grows across them until a call has lived a while."""
        loop = asyncio.get_running_loop()
        log.info("session %s: %s; resuming", self.session_id, why)
        self._call.cancel()  # the broken call's request stream stops here, not in the middle of the next one
        now = loop.time()
        pause = min(5.0, self._pause * 2) if now - self._resumed_at < 10.0 else 0.2
        deadline = now + self.reconnect_timeout_s
        if now - self._resumed_at < 10.0:
            await asyncio.sleep(pause)
        while True:
            try:
                await self._open(resume=True)
                self.reconnects += 1
                self._pause, self._resumed_at = pause, loop.time()
                return
            except grpc.aio.AioRpcError as err:
                if err.code() not in self._RETRYABLE or loop.time() + pause > deadline:
                    raise
            except RuntimeError:
                if loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(5.0, pause * 2)

    async def send_frame(self, media_ts_ms: int, image: bytes, encoding: int = common_pb2.IMAGE_ENCODING_JPEG) -> int:
        self._seq += 1
        await self._out.put(session_pb2.ClientMessage(frame=session_pb2.Frame(
            media_ts_ms=media_ts_ms, image=image, encoding=encoding, seq=self._seq)))
        return self._seq

    async def ask(self, text: str, at_ms: int, question_id: str | None = None) -> str:
        qid = question_id or uuid.uuid4().hex[:8]
        self.asked_wall[qid] = time.monotonic()
        await self._out.put(session_pb2.ClientMessage(question=session_pb2.Question(question_id=qid, text=text, media_ts_ms=at_ms)))
        return qid

    async def watch_for(self, text: str, at_ms: int, instruction_id: str | None = None) -> str:
        iid = instruction_id or uuid.uuid4().hex[:8]
        await self._out.put(session_pb2.ClientMessage(instruction=session_pb2.InstructionUpdate(
            add=common_pb2.StandingInstruction(instruction_id=iid, text=text), media_ts_ms=at_ms)))
        return iid

    async def stop_watching(self, instruction_id: str, at_ms: int) -> None:
        """Withdraw a standing instruction from ``at_ms`` of media time on."""
        await self._out.put(session_pb2.ClientMessage(instruction=session_pb2.InstructionUpdate(
            remove_instruction_id=instruction_id, media_ts_ms=at_ms)))

    async def upload(self, video: bytes | str, chunk_bytes: int = 1024 * 1024) -> int:
        """Send a whole video file (a path or its bytes) for a session opened with
        ``source=Source(upload=True)``, in chunks; ingest decodes it once the last has arrived and
        the session finishes at its end. Returns the bytes sent."""
        if isinstance(video, str):
            with open(video, "rb") as fh:
                video = fh.read()
        for start in range(0, max(1, len(video)), chunk_bytes):
            piece = video[start:start + chunk_bytes]
            await self._out.put(session_pb2.ClientMessage(video=session_pb2.VideoChunk(
                data=piece, last=start + chunk_bytes >= len(video))))
        return len(video)

    async def end(self) -> None:
        self._ending = True
        await self._out.put(session_pb2.ClientMessage(end=session_pb2.SessionEnd()))
        await self._out.put(_END)

    def __aiter__(self) -> AsyncIterator[session_pb2.ServerMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[session_pb2.ServerMessage]:
        failed: common_pb2.SourceStatus | None = None  # the source's KIND_FAILED, which the call's status follows
        while True:
            try:
                msg = await self._call.read()
            except grpc.aio.AioRpcError as err:
                if failed is not None and err.code() == grpc.StatusCode.INTERNAL:
                    # The server ended the call with the source's status while this side was still
                    # sending (an upload's chunks): grpc reports its failed write as INTERNAL instead.
                    raise grpc.aio.AioRpcError(status_code(failed.code), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                               details=failed.message) from err
                if not self.reconnect or err.code() not in self._RETRYABLE:
                    raise
                await self._resume(f"{err.code().name}: {err.details()}")
                continue
            if msg is grpc.aio.EOF:
                if self.reconnect and not self._ending:
                    await self._resume("the call ended before SessionEnd")
                    continue
                return
            kind = msg.WhichOneof("message")
            if kind == "ack" and msg.ack.id:
                self._unacked.pop(msg.ack.id, None)
            elif kind == "source" and msg.source.kind == common_pb2.SourceStatus.KIND_FAILED:
                failed = msg.source
            elif kind == "ack" and msg.ack.kind == session_pb2.Ack.KIND_END:
                self._ending = True  # the session is over (also when a pulled file ended it): no resume at EOF
            elif kind == "error" and msg.error.fatal and self.reconnect and msg.error.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                await self._resume(msg.error.message)
                continue
            yield msg

    async def responses(self, on_message=None) -> AsyncIterator[Response]:
        """Whole responses, yielded when their final chunk arrives. ``on_message`` sees every
        server message (acks, errors, chunks) as it arrives."""
        partial: dict[str, Response] = {}
        async for msg in self:
            if on_message is not None:
                on_message(msg)
            if msg.WhichOneof("message") != "response":
                continue
            c = msg.response
            if c.response_id in self._complete:
                continue  # held whole already
            if c.restart or c.index == 0:
                # Generated again, or delivered again from its start after a resume: what came of it
                # before is void (never two attempts spliced into one answer).
                partial.pop(c.response_id, None)
            r = partial.get(c.response_id)
            if r is None:
                r = partial[c.response_id] = Response(c.response_id, c.trigger, c.question_id, c.instruction_id,
                                                      c.media_ts_ms, first_chunk_wall=time.monotonic())
            r.text += c.text
            r.chunks += 1
            r.refusal = r.refusal or c.refusal
            if c.final:
                r.final_wall = time.monotonic()
                self._complete.add(c.response_id)
                if c.question_id:
                    self._answered.add(c.question_id)
                yield partial.pop(c.response_id)
