"""The gateway: ``SessionService.Stream``, one bidirectional call per live session.

Frames go to ingest over one ``IngestFrames`` call per session; questions, standing instructions
and session start/end go to the ``queries`` topic; responses come back from the ``responses``
topic. **Routing**: every replica has an id (``SH_GATEWAY_REPLICA_ID``, the pod name in a
cluster) that it stamps into ``QueryEvent.reply_to``; decisions and responses carry it forward;
each replica consumes ``responses`` in a consumer group of its own and keeps only the records
addressed to it, delivering them to the session by ``session_id`` (``_Session.offer``): a response
starts at index 0 of one ``attempt`` and goes on in order, each chunk once (delivery is at least
once); a new attempt of it (a responder crashed mid-answer) restarts it (``restart=True``); once
delivered whole, later attempts are dropped.

**Resume**: ``SessionAccepted.resume_token`` (:class:`~streamharness.auth.ResumeTokens`) brings a
client back to its session on any replica; a call that ends without ``SessionEnd`` is published as
``KIND_SESSION_AWAY`` (the stream's state is kept), a resume as ``KIND_SESSION_RESUME``, and the
session's responses of the last ``SH_GATEWAY_RESUME_WINDOW_S`` are read back from the key's
partition of ``responses`` and delivered before the live ones. A question still open after
``SH_GATEWAY_END_GRACE_S`` of ``SessionEnd`` is closed with ``refusal="not_answered"``; a refusal of
the session itself by the decision stage (``stream_in_use``, ``session_expired``) ends the call.

**Sessions are coroutines** (``grpc.aio``): an open session holds no thread, so thousands of idle
ones cost memory only, and health, reflection and new sessions never wait behind them. In order,
before anything is allocated for a call: the caller is authenticated (:mod:`streamharness.auth`),
the tenant's and the replica's session quotas are taken, then the first message must arrive within
``SH_GATEWAY_FIRST_MESSAGE_TIMEOUT_S``; a session silent for ``SH_GATEWAY_IDLE_TIMEOUT_S`` ends with
DEADLINE_EXCEEDED. Client messages arrive as bytes and are parsed here
(:mod:`streamharness.grpcutil.wire`), so a message that does not parse (invalid UTF-8 in a
question, say) is answered with a ``SessionError`` naming the field and the session goes on.
Questions and instruction changes are rate-limited per session and per tenant (RESOURCE_EXHAUSTED
with ``retry_after_ms``). Ingest is called with an internal identity token for the session's tenant.

**Pulled sessions** (``SessionStart.source``): the ingest call's first request names the source and
ingest pulls it (``streamharness.ingest.pull``); its ``SourceStatus`` results go to the client and
the viewers, ``KIND_ENDED`` finishes the session as ``SessionEnd`` would, ``KIND_FAILED`` ends the
call with its status; an upload's ``VideoChunk`` messages are forwarded to ingest as they come.

**In-process sessions and the live view**: :meth:`GatewayStage.run_session` runs this same
``Stream`` coroutine for the HTTP API (``streamharness.gateway.http``); :meth:`GatewayStage.watch`
subscribes to a stream's response chunks, decided seconds (``decision-log``, consumed beside
``responses``) and source news, whichever replica holds its session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka.errors import KafkaError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness import topics
from streamharness.auth import AuthSettings, InternalTokens, ResumeTokens, TenantAuth, audit
from streamharness.errors import (
    DeadlineExceeded,
    DependencyUnavailable,
    InvalidInput,
    NotFound,
    QuotaExceeded,
    RateLimited,
    StreamHarnessError,
    status_code,
)
from streamharness.grpcutil.wire import drain_first, parse
from streamharness.keys import key_str, make_key
from streamharness.limits import Buckets, TokenBucket
from streamharness.records import ConsumedEvent
from streamharness.session import SessionMapper
from streamharness.settings import load_settings
from streamharness.stage import Outbox, Stage, StageContext, StageSpec
from streamharness.telemetry import meters, tracing
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc, session_pb2

log = logging.getLogger(__name__)
Q = events_pb2.QueryEvent
_DONE = object()
SERVICE = "streamharness.v1.SessionService"
#: Refusals of the session itself (from the decision stage): the call ends with this status.
SESSION_REFUSALS = {"stream_in_use": grpc.StatusCode.ALREADY_EXISTS, "session_expired": grpc.StatusCode.NOT_FOUND}
NOT_ANSWERED = ("Not answered: the session ended before an answer was ready (within SH_GATEWAY_END_GRACE_S of "
                "SessionEnd). Ask again in a new session.")


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class GatewaySettings(BaseSettings):
    """The public session API."""

    model_config = SettingsConfigDict(env_prefix="SH_GATEWAY_", frozen=True, extra="forbid")

    replica_id: str = Field(default_factory=_default_replica_id, description="This replica's id for response routing; the chart sets the pod name. Default: host-pid-random.")
    ingest_address: str = Field("127.0.0.1:50052", description="host:port of the ingest service.")
    api_keys_file: Path | None = Field(None, description='JSON file {"<tenant>": ["sha256:<hex>", ...]}: hashed API keys, several per tenant (`streamharness keys new` makes one). Clients send the key as metadata x-api-key. Re-read when it changes (rotation without restart).')
    jwt_issuers_file: Path | None = Field(None, description='JSON list of accepted JWT issuers [{"issuer", "audience", "public_key_file" or "jwks_url", "algorithms", "tenant_claim"}]; clients send authorization: Bearer <JWT>. Re-read when it changes.')
    auth_reload_s: float = Field(5.0, gt=0, le=3600, description="How often the API keys and issuers files are checked for changes.")
    allow_anonymous: bool = Field(False, description="Development only: with neither file set, take the tenant from x-tenant metadata (default \"default\") without authentication. Without it and without a file the gateway refuses to start.")
    max_sessions_per_tenant: int = Field(64, ge=1, description="Open sessions a tenant may hold at once on this replica (RESOURCE_EXHAUSTED beyond, before anything is allocated).")
    max_sessions: int = Field(10_000, ge=1, description="Open sessions of all tenants on this replica (RESOURCE_EXHAUSTED beyond).")
    first_message_timeout_s: float = Field(10.0, gt=0, le=600, description="A call must send SessionStart within this long (DEADLINE_EXCEEDED otherwise).")
    idle_timeout_s: float = Field(300.0, gt=0, le=86_400, description="A session with no client message for this long ends with DEADLINE_EXCEEDED.")
    max_frame_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest encoded frame accepted from a client (a larger one: RESOURCE_EXHAUSTED, the session goes on; keep below SH_GRPC_MAX_MESSAGE_BYTES, beyond which gRPC itself ends the call).")
    max_text_chars: int = Field(2000, ge=1, description="Longest question or instruction text (RESOURCE_EXHAUSTED beyond).")
    questions_per_s: float = Field(2.0, gt=0, description="Questions and instruction changes per second of one session (token bucket; RESOURCE_EXHAUSTED with retry_after_ms beyond).")
    questions_burst: int = Field(10, ge=1, description="Burst of the per-session bucket.")
    tenant_questions_per_s: float = Field(20.0, gt=0, description="Questions and instruction changes per second of one tenant on this replica, all sessions together.")
    tenant_questions_burst: int = Field(100, ge=1, description="Burst of the per-tenant bucket.")
    publish_workers: int = Field(8, ge=1, le=256, description="Threads that wait for Kafka to acknowledge queries (sessions themselves hold no thread).")
    end_grace_s: float = Field(60.0, ge=0, le=600, description="After SessionEnd, wait this long at most for the pipeline to finish the session (its last frame decided, the responses to its last decisions, the answers to its open questions) before closing; a question still open then gets refusal not_answered.")
    consumer_poll_timeout_ms: int = Field(50, ge=1, le=5000, description="Poll timeout of the responses consumer (latency of delivery).")
    resume_window_s: float = Field(300.0, gt=0, le=86_400, description="A resumed session gets the responses of the last this-many seconds again (those the client does not hold whole; read back from the responses topic). Keep it at SH_DECISION_AWAY_KEEP_S, how long the pipeline keeps an away session.")
    end_wait_for_decision: bool = Field(True, description="After SessionEnd, wait (within SH_GATEWAY_END_GRACE_S) until the decision stage reports the session finished (its last frame decided) and the responses to its last decisions came, so that an alert raised by the session's last frames still reaches the client; false = close once the open questions are answered (a gateway in front of no decision stage).")
    replay_timeout_s: float = Field(10.0, gt=0, le=300, description="Longest a resume waits to read the session's responses back from Kafka before going on without them (logged).")
    http_host: str = Field("127.0.0.1", description="Bind address of the HTTP API (OpenAI-compatible chat completions, SSE, uploads) and the live web view at /view; the chart sets 0.0.0.0 inside pods.")
    http_port: int | None = Field(None, ge=0, le=65535, description="Port of the HTTP API (OpenAI-compatible, SSE, uploads) and the live view (0: any free port; unset: no HTTP server). The chart and the local stack set it (8080 in a pod).")
    http_idle_timeout_s: float = Field(300.0, gt=0, le=86_400, description="An HTTP session with no request and no events reader for this long is ended (SessionEnd); pulled sessions included, which have no client messages to time out on.")
    watch_queue: int = Field(1024, ge=16, le=100_000, description="Messages one live-view watcher may fall behind by; beyond, its oldest are dropped (the watcher is told), the stream never waits for a viewer.")


class SessionClosed(StreamHarnessError):
    """A session run in-process (:meth:`GatewayStage.run_session`, the HTTP API) ended with a status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _LocalContext:
    """What ``SessionService.Stream`` needs of a gRPC servicer context, for a session run in-process."""

    def __init__(self, metadata: list[tuple[str, str]], peer: str) -> None:
        self._metadata = tuple(metadata)
        self._peer = peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise SessionClosed(code, message)


@dataclass
class _Fatal:
    """Ends the call with this status (after what is queued before it)."""

    code: grpc.StatusCode
    message: str


@dataclass
class _Session:
    session_id: str
    key: common_pb2.StreamKey
    mapper: SessionMapper
    loop: asyncio.AbstractEventLoop
    bucket: TokenBucket
    outbound: asyncio.Queue = field(default_factory=asyncio.Queue)
    frames: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=64))
    open_questions: set[str] = field(default_factory=set)
    asked_ns: dict[str, int] = field(default_factory=dict)  # open question -> wall ns it arrived (time to first token)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    last_published_ms: int = -1  # media time of the last frame ingest published; -1: none (SessionEnd carries it)
    end_published: bool = False  # the pipeline was told the session is over
    # Delivery of responses, on the loop (``_offer``): each response starts at index 0 of one
    # attempt and goes on in order; a new attempt restarts it; a response delivered whole is done.
    attempts: dict[str, str] = field(default_factory=dict)  # response id -> attempt being delivered
    next_index: dict[str, int] = field(default_factory=dict)
    superseded: dict[str, set[str]] = field(default_factory=dict)
    complete: set[str] = field(default_factory=set)
    replaying: bool = False  # a resume reads the session's responses back: live ones wait in held
    held: list = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # the decision stage finished the session ...
    pending_finals: set[str] = field(default_factory=set)  # ... and these responses of it were still to come
    all_final: asyncio.Event = field(default_factory=asyncio.Event)
    # What the live view shows (streams(), latest_frame()) and how the session is fed.
    source: common_pb2.Source = field(default_factory=common_pb2.Source)  # set: frames are pulled by ingest
    want_decisions: bool = False
    opened_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    frames_seen: int = 0
    latest: tuple[int, bytes] | None = None  # (media_ts_ms, encoded image) of the newest frame
    source_ended: bool = False  # a pulled file reached its end: the session finishes by itself
    reading: bool = False  # the reader waits for the client's next message
    reader: asyncio.Task | None = None

    @property
    def pulled(self) -> bool:
        return bool(self.source.url or self.source.upload)

    def put(self, item: Any) -> None:
        self.outbound.put_nowait(item)

    def close_question(self, question_id: str) -> None:
        self.open_questions.discard(question_id)
        self.asked_ns.pop(question_id, None)
        if not self.open_questions:
            self.answered.set()

    def offer(self, r: events_pb2.ResponseEvent) -> None:
        """On the loop: a response record addressed to this session (live, or read back at a resume)."""
        if self.replaying:
            self.held.append(r)
            return
        if r.refusal in SESSION_REFUSALS:
            self.put(_Fatal(SESSION_REFUSALS[r.refusal], r.text))
            return
        if r.session_finished:
            self.pending_finals = set(r.pending_response_ids) - self.complete
            self.finished.set()
            if not self.pending_finals:
                self.all_final.set()
            return
        rid = r.response_id
        if rid in self.complete:
            return  # delivered whole already (a redelivery, a regeneration after a crash, a replay)
        restart = False
        current = self.attempts.get(rid)
        if current is None or r.attempt != current:
            if r.index != 0 or r.attempt in self.superseded.get(rid, ()):
                return  # not the start of an attempt: never begin a response in its middle
            if current is not None:
                self.superseded.setdefault(rid, set()).add(current)
                restart = True  # the chunks delivered so far are void: it is being generated again
            self.attempts[rid], self.next_index[rid] = r.attempt, 0
        if r.index != self.next_index[rid]:
            return  # a repeat of a chunk already delivered
        # In the chunk's trace (offer runs in the context of the consumer span that handed it over).
        with tracing.stage_span("gateway", "deliver", message=r, attributes={"sh.response_id": rid, "sh.index": r.index}):
            self._deliver(r, restart)

    def _deliver(self, r: events_pb2.ResponseEvent, restart: bool) -> None:
        """The next chunk of ``r``'s attempt, to the client (``gateway deliver``)."""
        rid = r.response_id
        self.next_index[rid] += 1
        if r.final:
            self.complete.add(rid)
            for book in (self.attempts, self.next_index, self.superseded):
                book.pop(rid, None)
            self.pending_finals.discard(rid)
            if self.finished.is_set() and not self.pending_finals:
                self.all_final.set()
        if r.index == 0:
            now_ns = time.time_ns()
            meters.record_hops(r.hops, "gateway_first_token", now_ns)
            if r.hops and not restart:  # a generation's first chunk (refusals and closed failures carry no hops)
                meters.record_first_chunk(r.hops, now_ns, r.trigger, self.asked_ns.get(r.question_id) if r.question_id else None)
        if r.final:
            meters.responses_delivered().add(1, {"trigger": meters.trigger_label(r.trigger), "refusal": r.refusal or "none"})
        self.outbound.put_nowait(session_pb2.ServerMessage(response=session_pb2.ResponseChunk(
            response_id=rid, index=r.index, text=r.text, final=r.final, trigger=r.trigger, question_id=r.question_id,
            instruction_id=r.instruction_id, media_ts_ms=r.media_ts_ms, refusal=r.refusal, restart=restart)))
        if r.final and r.question_id:
            self.close_question(r.question_id)

    def replayed(self, records: list[events_pb2.ResponseEvent]) -> None:
        """On the loop: the session's responses read back at a resume, then what came live meanwhile."""
        self.replaying = False
        held, self.held = self.held, []
        for r in [*records, *held]:
            self.offer(r)


def _tls_context() -> ssl.SSLContext | None:
    """The HTTP port's TLS: the gRPC port's certificate and key (``SH_GRPC_TLS_CERT_FILE`` /
    ``_KEY_FILE``; ``SH_GRPC_TLS_CLIENT_CA_FILE`` also asks clients for a certificate), or None."""
    from streamharness.settings import ServiceSettings

    s = load_settings(ServiceSettings)
    if s.grpc_tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(s.grpc_tls_cert_file, s.grpc_tls_key_file)
    if s.grpc_tls_client_ca_file is not None:
        context.load_verify_locations(s.grpc_tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _error(err: Exception, seq: int = 0, ts: int = 0) -> session_pb2.ServerMessage:
    code = getattr(err, "code", grpc.StatusCode.INVALID_ARGUMENT)
    retry = getattr(err, "retry_after_s", 0.0)
    return session_pb2.ServerMessage(error=session_pb2.SessionError(
        code=code.value[0], message=str(err), seq=seq, media_ts_ms=ts, retry_after_ms=int(retry * 1000 + 0.999)))


class _Watch:
    """A live-view subscription (:meth:`GatewayStage.watch`); use on the server's loop."""

    def __init__(self, gateway: GatewayStage, key: str) -> None:
        self._gateway, self.key = gateway, key
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=gateway.settings.watch_queue)

    def __enter__(self) -> _Watch:
        self._gateway._watchers.setdefault(self.key, set()).add(self.queue)
        return self

    def __exit__(self, *exc: object) -> None:
        queues = self._gateway._watchers.get(self.key)
        if queues is not None:
            queues.discard(self.queue)
            if not queues:
                del self._gateway._watchers[self.key]


def _view_message(r: events_pb2.ResponseEvent | events_pb2.DecisionEvent) -> session_pb2.ServerMessage:
    """A response chunk or a decided second as the public API shows it."""
    if isinstance(r, events_pb2.DecisionEvent):
        return session_pb2.ServerMessage(decision=session_pb2.DecisionStep(
            media_ts_ms=r.media_ts_ms, respond=r.action == events_pb2.DecisionEvent.ACTION_RESPOND, trigger=r.trigger,
            question_id=r.question_id, instruction_id=r.instruction_id, prompt_text=r.prompt_text, score=r.score,
            policy=r.policy, reason=r.reason))
    return session_pb2.ServerMessage(response=session_pb2.ResponseChunk(
        response_id=r.response_id, index=r.index, text=r.text, final=r.final, trigger=r.trigger, question_id=r.question_id,
        instruction_id=r.instruction_id, media_ts_ms=r.media_ts_ms, refusal=r.refusal))


class _SessionApi:
    def __init__(self, gateway: GatewayStage):
        self.g = gateway

    def handler(self) -> grpc.GenericRpcHandler:
        # Requests as bytes (no deserializer): parsed in the handler, so a bad one is answered.
        return grpc.method_handlers_generic_handler(SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(
            self.Stream, request_deserializer=None, response_serializer=session_pb2.ServerMessage.SerializeToString)})

    async def _first(self, requests: AsyncIterator[bytes]) -> session_pb2.ClientMessage | None:
        timeout = self.g.settings.first_message_timeout_s
        try:
            raw = await asyncio.wait_for(anext(requests, None), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"no SessionStart within {timeout:g} s (SH_GATEWAY_FIRST_MESSAGE_TIMEOUT_S)") from None
        return None if raw is None else parse(session_pb2.ClientMessage, raw, "the first message")

    async def Stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[session_pb2.ServerMessage]:  # noqa: N802
        g, settings = self.g, self.g.settings
        try:
            tenant = g.auth.tenant(context.invocation_metadata(), peer=context.peer())
            g.reserve(tenant)  # quotas before anything is allocated
        except StreamHarnessError:
            await drain_first(requests)  # so that the client sees this status, not INTERNAL
            raise
        session: _Session | None = None
        reader: asyncio.Task | None = None
        pump: asyncio.Task | None = None
        results = None
        try:
            mapper = SessionMapper(tenant, uuid.uuid4().hex, max_text_chars=settings.max_text_chars,
                                   max_frame_bytes=settings.max_frame_bytes, reply_to=settings.replica_id)
            first = await self._first(requests)
            start = mapper.start(first)
            resumed = bool(first.start.resume_token)
            if resumed:
                claim = g.resume_tokens.verify(first.start.resume_token, tenant, first.start.stream_id)
                start = mapper.resume(first, claim.session_id)
                mapper.decision_fps = claim.decision_fps or mapper.decision_fps
                g.displace(claim.session_id)  # the call it resumes, if this replica still holds it
            pull = None
            now_ms = int(time.time() * 1000)
            origin = claim.origin_unix_ms if resumed and claim.origin_unix_ms else now_ms
            if first.start.source.url or first.start.source.upload:
                # Ingest pulls the frames: the call's first request names the source. A resumed live
                # source goes on at the session's media time (its origin is in the resume token).
                pull = mapper.pull(first.start.source, max(0, now_ms - origin) if resumed else 0, resumed=resumed)
            session = g.open_session(mapper)
            session.want_decisions = first.start.want_decisions
            if pull is not None:
                session.source.CopyFrom(first.start.source)
                session.opened_unix_ms = origin
                session.frames.put_nowait(pull)
            if resumed:
                session.complete.update(first.start.received_response_ids)
                session.replaying = True
            log.info("session %s %s for %s (%d instructions)", session.session_id, "resumed" if resumed else "opened",
                     key_str(mapper.key), len(start.instructions))
            await g.publish_query(start)
            yield session_pb2.ServerMessage(accepted=session_pb2.SessionAccepted(
                session_id=session.session_id, key=mapper.key, decision_fps=mapper.decision_fps, resumed=resumed,
                resume_token=g.resume_tokens.mint(tenant, mapper.key.stream_id, session.session_id, mapper.decision_fps,
                                                  session.opened_unix_ms if session.pulled else 0),
                resume_window_s=settings.resume_window_s))
            if resumed:
                g.replay(session)

            results = g.ingest_stub().IngestFrames(self._frames(session), metadata=g.tokens.metadata(tenant, "ingest"))
            pump = asyncio.create_task(self._pump_ingest(results, session), name=f"ingest-{session.session_id[:8]}")
            reader = session.reader = asyncio.create_task(self._read(requests, session, pump), name=f"read-{session.session_id[:8]}")
            for task in (pump, reader):
                task.add_done_callback(lambda t, s=session: self._task_failed(t, s))
            while True:
                item = await session.outbound.get()
                if item is _DONE:
                    break
                if isinstance(item, _Fatal):
                    log.info("session %s ends: %s", session.session_id, item.message)
                    await context.abort(item.code, item.message)
                yield item
        finally:
            for task in (reader, pump):
                if task is not None and not task.done():
                    task.cancel()
            if results is not None and not results.done():
                results.cancel()  # the client left (or the session ended badly): stop the ingest call too
            if session is not None:
                g.close_session(session)
                if not session.end_published:
                    # The client left (cancel, broken connection): still tell the pipeline, so
                    # per-stream state is released; in the background, the call is over.
                    task = asyncio.get_running_loop().create_task(self._abandon(session))
                    g.background.add(task)
                    task.add_done_callback(g.background.discard)
            g.release(tenant)

    @staticmethod
    def _task_failed(task: asyncio.Task, session: _Session) -> None:
        """A session's reader or ingest pump failed: end the session with a status, never hang it."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if isinstance(exc, StreamHarnessError):  # e.g. Kafka away when the session's end was published
            session.put(_Fatal(exc.code, str(exc)))
            return
        log.error("session %s: %s failed", session.session_id, task.get_name(), exc_info=exc)
        session.put(_Fatal(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see server logs"))

    async def _frames(self, session: _Session) -> AsyncIterator[ingest_pb2.IngestFrameRequest]:
        while True:
            item = await session.frames.get()
            if item is _DONE:
                return
            yield item

    async def _read(self, requests: AsyncIterator[bytes], session: _Session, pump: asyncio.Task) -> None:
        """Client messages → ingest / queries. A bad message is answered with a non-fatal error."""
        g = self.g
        last_ts = -1
        ended = False
        mapper = session.mapper
        idle = g.settings.idle_timeout_s
        upload_done = False
        try:
            while not session.source_ended:
                # A pulled file that reaches its end cancels this wait (and only this wait): the
                # session then finishes as after SessionEnd.
                session.reading = True
                try:
                    raw = await asyncio.wait_for(anext(requests, None), idle)
                except TimeoutError:
                    if session.pulled:  # a pulled stream is fed by its source, not by the client
                        continue
                    await self._abandon(session, away=False)
                    session.put(_Fatal(grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"no message for {idle:g} s (SH_GATEWAY_IDLE_TIMEOUT_S): session closed"))
                    return
                except asyncio.CancelledError:
                    if not session.source_ended:
                        raise
                    ended = True
                    break
                finally:
                    session.reading = False
                if raw is None:
                    break
                msg: session_pb2.ClientMessage | None = None
                try:
                    msg = parse(session_pb2.ClientMessage, raw, "message")
                    kind = msg.WhichOneof("message")
                    if kind == "frame":
                        if session.pulled:
                            raise InvalidInput(f"this session pulls its frames from {session.source.url or 'its upload'}; "
                                               "Frame messages are not taken (VideoChunk for an upload)")
                        await session.frames.put(mapper.frame(msg.frame))
                        last_ts = max(last_ts, msg.frame.media_ts_ms)
                        session.frames_seen += 1
                        session.latest = (msg.frame.media_ts_ms, msg.frame.image)
                    elif kind == "video":
                        if not session.source.upload:
                            raise InvalidInput("VideoChunk is for a session whose SessionStart.source.upload is true")
                        if upload_done:
                            raise InvalidInput("the upload is complete (a VideoChunk with last=true came); this chunk is not taken")
                        upload_done = msg.video.last
                        await session.frames.put(mapper.video(msg.video))
                    elif kind == "end":
                        ended = True
                        break
                    else:
                        session.put(await g.submit(session, msg))
                except StreamHarnessError as err:
                    frame = msg is not None and msg.WhichOneof("message") == "frame"
                    session.put(_error(err, seq=msg.frame.seq if frame else 0, ts=msg.frame.media_ts_ms if frame else 0))
        except (grpc.RpcError, grpc.aio.AbortError):
            pass  # the client went away, or the call was ended with a status (a failed source)
        if session.source_ended:
            ended = True
        if session.pulled:
            last_ts = session.last_published_ms
        await session.frames.put(_DONE)
        if not ended:
            # The client went away without SessionEnd: still tell the pipeline the session is over,
            # so per-stream state is released.
            await self._abandon(session)
            session.put(_DONE)
            return
        # Every frame sent before SessionEnd gets its ack or error before the session closes.
        grace = g.settings.end_grace_s
        try:
            await asyncio.wait_for(asyncio.shield(pump), grace)
        except TimeoutError:
            log.warning("session %s: ingest did not answer every frame within %g s", session.session_id, grace)
        session.end_published = True
        await g.publish_query(mapper.end(session.last_published_ms))
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        waits = [session.finished, session.all_final] if g.settings.end_wait_for_decision else []
        if session.open_questions:
            waits.append(session.answered)
        for event in waits:  # the session finished by the decision stage, its last responses, its answers
            try:
                await asyncio.wait_for(event.wait(), max(0.0, until - loop.time()))
            except TimeoutError:
                if event is not session.answered:
                    log.info("session %s: the pipeline did not finish it within %g s of SessionEnd", session.session_id, grace)
                break
        for qid in sorted(session.open_questions):  # said, never left to vanish
            session.put(session_pb2.ServerMessage(response=session_pb2.ResponseChunk(
                response_id=f"{key_str(session.key)}/{session.session_id}/{qid}/not_answered", index=0, text=NOT_ANSWERED,
                final=True, trigger=common_pb2.TRIGGER_QUESTION, question_id=qid, refusal="not_answered")))
        session.put(session_pb2.ServerMessage(ack=session_pb2.Ack(kind=session_pb2.Ack.KIND_END, media_ts_ms=max(0, last_ts))))
        session.put(_DONE)

    async def _abandon(self, session: _Session, *, away: bool = True) -> None:
        """The client is gone without SessionEnd: tell the pipeline. ``away``: it may come back with
        its resume token (the stream's state is kept); else the session is over (idle timeout)."""
        if session.end_published:
            return
        session.end_published = True
        mapper = session.mapper
        query = mapper.away(session.last_published_ms) if away else mapper.end(session.last_published_ms)

        async def publish() -> None:
            try:
                await self.g.publish_query(query)
            except Exception:  # noqa: BLE001 - best effort on a broken session
                log.warning("could not publish the end of abandoned session %s", session.session_id)

        # A task of its own, tracked in background: the caller (a session's reader) may be cancelled
        # by the call's end while it waits, and a stopping gateway waits for these before its
        # producer closes (close() → _drain_background), so the pipeline always hears of it.
        task = asyncio.get_running_loop().create_task(publish())
        self.g.background.add(task)
        task.add_done_callback(self.g.background.discard)
        await asyncio.shield(task)

    def _source_status(self, session: _Session, status: common_pb2.SourceStatus) -> None:
        """A pulled source's news: to the client and the watchers; its end finishes the session, its
        failure ends the call with the status it names."""
        K = common_pb2.SourceStatus  # noqa: N806
        session.put(session_pb2.ServerMessage(source=status))
        self.g.fan(session.key, session_pb2.ServerMessage(source=status))
        if status.kind in (K.KIND_CONNECTED, K.KIND_GAP):
            log.info("session %s: source %s %s at %d ms%s", session.session_id, status.url, K.Kind.Name(status.kind),
                     status.media_ts_ms, f" (gap {status.gap_ms} ms)" if status.kind == K.KIND_GAP else "")
        elif status.kind == K.KIND_ENDED:
            log.info("session %s: source ended after %d frames; finishing the session", session.session_id, status.frames)
            session.source_ended = True
            if session.reader is not None and session.reading:
                session.reader.cancel()
        elif status.kind == K.KIND_FAILED:
            code = status_code(status.code) if status.code else grpc.StatusCode.UNAVAILABLE
            # Over, not away: there is nothing to resume (published before the call's end would say "away").
            task = asyncio.get_running_loop().create_task(self._abandon(session, away=False))
            self.g.background.add(task)
            task.add_done_callback(self.g.background.discard)
            session.put(_Fatal(code, status.message or "the source failed"))

    async def _pump_ingest(self, results: Any, session: _Session) -> None:
        R = ingest_pb2.IngestFrameResult  # noqa: N806
        try:
            async for r in results:
                if r.HasField("source"):
                    self._source_status(session, r.source)
                    continue
                if r.preview_jpeg:
                    session.latest = (r.media_ts_ms, r.preview_jpeg)
                    session.frames_seen += 1
                if r.status == R.STATUS_REJECTED:
                    session.put(session_pb2.ServerMessage(error=session_pb2.SessionError(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=r.error, seq=r.seq, media_ts_ms=r.media_ts_ms)))
                elif r.status == R.STATUS_UNAVAILABLE:  # the broker is away: not published (perhaps late); the session goes on
                    session.put(session_pb2.ServerMessage(error=session_pb2.SessionError(
                        code=grpc.StatusCode.UNAVAILABLE.value[0], message=r.error, seq=r.seq, media_ts_ms=r.media_ts_ms,
                        retry_after_ms=1000)))
                else:
                    if r.status == R.STATUS_PUBLISHED:
                        session.last_published_ms = max(session.last_published_ms, r.media_ts_ms)
                    if session.pulled:
                        continue  # a pulled stream's frames are the platform's own: no acks (SourceStatus says what happens)
                    session.put(session_pb2.ServerMessage(ack=session_pb2.Ack(
                        kind=session_pb2.Ack.KIND_FRAME, seq=r.seq, media_ts_ms=r.media_ts_ms,
                        sampled=r.status == R.STATUS_PUBLISHED, shed=r.status == R.STATUS_SHED)))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                log.warning("ingest call of session %s failed: %s", session.session_id, err.details())
                what = "ingest unavailable" if err.code() == grpc.StatusCode.UNAVAILABLE else "ingest refused the stream"
                session.put(session_pb2.ServerMessage(error=session_pb2.SessionError(
                    code=err.code().value[0], message=f"{what}: {err.details()}", fatal=True)))
                session.put(_DONE)


class GatewayStage(Stage):
    """The ``gateway`` row of the topology: the public session API; consumes ``responses`` in a
    group of its own per replica and delivers the records addressed to it."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings | None = None, auth: AuthSettings | None = None):
        self.settings = settings or load_settings(GatewaySettings)
        s = self.settings
        self.auth = TenantAuth(s.api_keys_file, s.jwt_issuers_file, reload_s=s.auth_reload_s, allow_anonymous=s.allow_anonymous)
        if self.auth.anonymous:
            log.warning("authentication is off (SH_GATEWAY_ALLOW_ANONYMOUS): the tenant is whatever x-tenant says")
        auth = auth or load_settings(AuthSettings)
        self.tokens = InternalTokens(auth, "gateway")
        self.resume_tokens = ResumeTokens(auth)
        #: ``read_back(topic, key, since_unix_ms, timeout_s)`` → record values (the Kafka host's reader; set at open).
        self.read_back: Any = None
        self.sessions: dict[str, _Session] = {}
        self._per_tenant: dict[str, int] = {}
        self._open = 0
        self._tenant_queries = Buckets(s.tenant_questions_per_s, s.tenant_questions_burst)
        self._publish_pool = futures.ThreadPoolExecutor(s.publish_workers, thread_name_prefix="gateway-publish")
        self.background: set[asyncio.Task] = set()  # session ends published after their call was gone
        self.out: Outbox | None = None
        self._health_channel: grpc.Channel | None = None
        self._ingest_health: health_pb2_grpc.HealthStub | None = None
        self._channel: grpc.aio.Channel | None = None
        self._channel_loop: asyncio.AbstractEventLoop | None = None
        self._ingest: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the gRPC server's loop (sessions, the HTTP API)
        self._api = _SessionApi(self)
        self._watchers: dict[str, set[asyncio.Queue]] = {}  # stream key -> live-view queues (on the loop)
        self.http: Any = None  # the HTTP API (streamharness.gateway.http), when SH_GATEWAY_HTTP_PORT is set
        self.http_port: int | None = None
        self.http_ssl_context: ssl.SSLContext | None = None

    def configure(self, spec: StageSpec) -> StageSpec:
        return replace(spec, group=f"{spec.group}-{self.settings.replica_id}",
                       poll_timeout_ms=self.settings.consumer_poll_timeout_ms)

    # -- quotas and sessions (on the server's event loop) -----------------------------------------
    def reserve(self, tenant: str) -> None:
        """Take a session slot of ``tenant`` or raise (audited); :meth:`release` gives it back."""
        s = self.settings
        count = self._per_tenant.get(tenant, 0)
        if count >= s.max_sessions_per_tenant:
            audit("quota_exceeded", quota="sessions_per_tenant", tenant=tenant, limit=s.max_sessions_per_tenant)
            raise QuotaExceeded(f"tenant {tenant} already has {count} open sessions (limit {s.max_sessions_per_tenant}, SH_GATEWAY_MAX_SESSIONS_PER_TENANT)")
        if self._open >= s.max_sessions:
            audit("quota_exceeded", quota="sessions", tenant=tenant, limit=s.max_sessions)
            raise QuotaExceeded(f"this gateway replica holds {self._open} sessions (limit {s.max_sessions}, SH_GATEWAY_MAX_SESSIONS); try again later")
        self._per_tenant[tenant] = count + 1
        self._open += 1
        meters.sessions_active().add(1, {"tenant": tenant})

    def release(self, tenant: str) -> None:
        self._per_tenant[tenant] -= 1
        if not self._per_tenant[tenant]:
            del self._per_tenant[tenant]
        self._open -= 1
        meters.sessions_active().add(-1, {"tenant": tenant})

    def take_query_token(self, session: _Session) -> None:
        """One question or instruction change of ``session``, or ``RateLimited`` (audited)."""
        s, tenant = self.settings, session.key.tenant
        wait = session.bucket.take()
        if wait:
            audit("quota_exceeded", quota="questions_per_session", tenant=tenant, session=session.session_id, limit=s.questions_per_s)
            raise RateLimited(f"questions and instruction changes are limited to {s.questions_per_s:g}/s per session "
                              f"(burst {s.questions_burst}, SH_GATEWAY_QUESTIONS_PER_S); resets in {wait:.2f} s", wait)
        wait = self._tenant_queries.take(tenant)
        if wait:
            audit("quota_exceeded", quota="questions_per_tenant", tenant=tenant, limit=s.tenant_questions_per_s)
            raise RateLimited(f"questions and instruction changes are limited to {s.tenant_questions_per_s:g}/s for tenant {tenant} "
                              f"(burst {s.tenant_questions_burst}, SH_GATEWAY_TENANT_QUESTIONS_PER_S); resets in {wait:.2f} s", wait)

    def open_session(self, mapper: SessionMapper) -> _Session:
        s = self.settings
        session = _Session(session_id=mapper.session_id, key=mapper.key, mapper=mapper, loop=asyncio.get_running_loop(),
                           bucket=TokenBucket(s.questions_per_s, s.questions_burst))
        self.sessions[session.session_id] = session
        return session

    def close_session(self, session: _Session) -> None:
        if self.sessions.get(session.session_id) is session:  # not a newer call that resumed it
            del self.sessions[session.session_id]

    def ingest_stub(self) -> Any:
        """The ingest client, on the server's event loop (made at the first session)."""
        if self._ingest is None:
            # round_robin: with ingest_address a headless service (dns:///ingest-headless:50052, as the chart
            # sets it), sessions — and so pulled streams, one puller each — spread over the ingest replicas.
            self._channel = grpc.aio.insecure_channel(self.settings.ingest_address, options=[
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.max_send_message_length", self.settings.max_frame_bytes + 65536),
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ])
            self._channel_loop = asyncio.get_running_loop()
            self._ingest = ingest_pb2_grpc.IngestServiceStub(self._channel)
        return self._ingest

    async def submit(self, session: _Session, msg: session_pb2.ClientMessage) -> session_pb2.ServerMessage:
        """A question or an instruction change of ``session`` → published (rate-limited); its Ack."""
        kind = msg.WhichOneof("message")
        if kind in ("question", "instruction"):
            self.take_query_token(session)
        query, ack = session.mapper.query(msg)
        if kind == "question":
            session.open_questions.add(query.question_id)
            session.asked_ns[query.question_id] = time.time_ns()  # time to first token from here
            session.answered.clear()
        try:
            await self.publish_query(query)
        except StreamHarnessError:
            if kind == "question":  # not sent: nothing to wait for at the end
                session.close_question(query.question_id)
            raise
        return ack

    # -- in-process sessions and the live view (the HTTP API; on the server's loop) ------------------
    async def run_session(self, requests: AsyncIterator[bytes], metadata: list[tuple[str, str]], peer: str) -> AsyncIterator[session_pb2.ServerMessage]:
        """``SessionService.Stream`` in-process: the same authentication, quotas, limits and errors.
        A refusal raises its ``StreamHarnessError``; a session ended with a status raises ``SessionClosed``."""
        async for message in self._api.Stream(requests, _LocalContext(metadata, peer)):
            yield message

    def _local(self, tenant: str, stream_id: str) -> _Session:
        for session in self.sessions.values():
            if session.key.tenant == tenant and session.key.stream_id == stream_id:
                return session
        raise NotFound(f"stream {stream_id} has no open session on this gateway replica")

    def streams(self, tenant: str) -> list[dict[str, Any]]:
        """The open sessions of ``tenant`` on this replica (what the live view lists)."""
        from streamharness.sources import redact

        return sorted(({"stream_id": s.key.stream_id, "session_id": s.session_id,
                        "source": redact(s.source.url) if s.source.url else ("upload" if s.source.upload else ""),
                        "opened_unix_ms": s.opened_unix_ms, "last_media_ts_ms": max(s.last_published_ms, s.latest[0] if s.latest else -1),
                        "frames": s.frames_seen, "decision_fps": s.mapper.decision_fps}
                       for s in self.sessions.values() if s.key.tenant == tenant), key=lambda d: d["stream_id"])

    def watch(self, tenant: str, stream_id: str) -> _Watch:
        """A live view of ``tenant``'s ``stream_id`` (``with gateway.watch(...) as w: await w.queue.get()``):
        its response chunks, decided seconds and source news, whichever replica holds the session."""
        return _Watch(self, key_str(make_key(tenant, stream_id)))

    def fan(self, key: common_pb2.StreamKey | str, message: session_pb2.ServerMessage) -> None:
        """On the loop: ``message`` to the watchers of ``key``; a watcher that fell behind loses its oldest."""
        for queue in list(self._watchers.get(key if isinstance(key, str) else key_str(key), ())):
            if queue.full():
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    pass
            queue.put_nowait(message)

    async def latest_frame(self, tenant: str, stream_id: str) -> tuple[int, bytes] | None:
        """(media_ts_ms, encoded image) of the stream's newest frame: the session's own on this
        replica, else the newest on the frames topic of the last 10 s (as ingest published it)."""
        key = make_key(tenant, stream_id)
        for session in self.sessions.values():
            if session.key == key and session.latest is not None:
                return session.latest
        if self.read_back is None:
            return None

        def read() -> tuple[int, bytes] | None:
            newest = None
            for value in self.read_back(topics.FRAMES, key, int((time.time() - 10) * 1000), 3.0):
                f = events_pb2.FrameEvent.FromString(value)
                if f.key == key and (newest is None or f.media_ts_ms > newest[0]):
                    newest = (f.media_ts_ms, bytes(f.jpeg))
            return newest

        return await asyncio.get_running_loop().run_in_executor(self._publish_pool, read)

    async def ask(self, tenant: str, stream_id: str, text: str, media_ts_ms: int | None = None) -> str:
        """A question into ``stream_id``'s open session (the live view's box); its question id."""
        session = self._local(tenant, stream_id)
        qid = f"view-{uuid.uuid4().hex[:8]}"
        ts = media_ts_ms if media_ts_ms is not None else max(0, session.last_published_ms, session.latest[0] if session.latest else 0)
        session.put(await self.submit(session, session_pb2.ClientMessage(
            question=session_pb2.Question(question_id=qid, text=text, media_ts_ms=ts))))
        return qid

    async def add_instruction(self, tenant: str, stream_id: str, text: str) -> str:
        """A standing instruction added to ``stream_id``'s open session; its instruction id."""
        session = self._local(tenant, stream_id)
        iid = f"view-{uuid.uuid4().hex[:8]}"
        ts = max(0, session.last_published_ms)
        session.put(await self.submit(session, session_pb2.ClientMessage(instruction=session_pb2.InstructionUpdate(
            add=common_pb2.StandingInstruction(instruction_id=iid, text=text), media_ts_ms=ts))))
        return iid

    async def publish_query(self, query: events_pb2.QueryEvent) -> None:
        """Publish and wait for Kafka's acknowledgement in a worker thread (the loop never blocks).
        Kafka away: ``DependencyUnavailable`` (UNAVAILABLE, retryable; inside a session the message
        is answered with it and the session goes on)."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._publish_pool, lambda: self.out.send(topics.QUERIES, query.key, query).get(timeout=10))
        except KafkaError as err:
            raise DependencyUnavailable(f"the queries topic is unavailable ({type(err).__name__}); send it again") from None

    def handle(self, event: ConsumedEvent) -> None:
        """A record of ``responses`` (on a consumer thread): to the session it is addressed to, on its loop."""
        r = event.message
        if self._watchers and self.loop is not None:  # the live view: any replica's sessions
            key = key_str(r.key)
            if key in self._watchers:
                self._call(self.loop, self.fan, key, _view_message(r))
        if isinstance(r, events_pb2.DecisionEvent):
            if r.reply_to == self.settings.replica_id:
                session = self.sessions.get(r.session_id)
                if session is not None and session.want_decisions:
                    self._call(session.loop, session.put, _view_message(r))
            return
        if r.reply_to != self.settings.replica_id:
            return  # another replica's session (a resumed one reads its responses back itself)
        session = self.sessions.get(r.session_id)
        if session is None:
            return  # the session ended; nobody to tell
        try:
            session.loop.call_soon_threadsafe(session.offer, r)
        except RuntimeError:
            pass  # the server's loop is closed: shutting down

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the server's loop is closed: shutting down

    def displace(self, session_id: str) -> None:
        """A resume of ``session_id`` arrived: an older call of it on this replica (the client saw it
        break before the server did) ends, without telling the pipeline the session went away."""
        old = self.sessions.pop(session_id, None)
        if old is not None:
            old.end_published = True
            old.put(_Fatal(grpc.StatusCode.CANCELLED, "this session was resumed on another call"))

    def replay(self, session: _Session) -> None:
        """Read the session's responses of the last SH_GATEWAY_RESUME_WINDOW_S back from Kafka (in a
        worker thread) and offer them, then what came live meanwhile, on the session's loop."""
        s = self.settings
        since = int((time.time() - s.resume_window_s) * 1000)

        def read() -> None:
            records: list[events_pb2.ResponseEvent] = []
            try:
                for value in self.read_back(topics.RESPONSES, session.key, since, s.replay_timeout_s):
                    r = events_pb2.ResponseEvent.FromString(value)
                    if r.session_id == session.session_id:
                        records.append(r)
            except Exception as err:  # noqa: BLE001 - a resume without the replay still goes on
                log.warning("session %s: responses could not be read back (%s); live ones only", session.session_id, err)
            log.info("session %s: %d response records read back for the resume", session.session_id, len(records))
            try:
                session.loop.call_soon_threadsafe(session.replayed, records)
            except RuntimeError:
                pass

        self._publish_pool.submit(read)

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.out = ctx.outbox
        self.read_back = ctx.read_back
        # Health from the readiness thread: a plain channel of its own.
        self._health_channel = grpc.insecure_channel(self.settings.ingest_address)
        self._ingest_health = health_pb2_grpc.HealthStub(self._health_channel)

    def start(self) -> None:
        # After register (which took the server's loop): open() runs before the server exists.
        if self.settings.http_port is not None and self.loop is not None:
            from streamharness.gateway.http import HttpApi

            self.http_ssl_context = _tls_context()

            self.http = HttpApi(self)
            asyncio.run_coroutine_threadsafe(self.http.start(), self.loop).result(30)
            self.http_port = self.http.port
            log.info("HTTP API and live view on http://%s:%d (/v1, /view)", self.settings.http_host, self.http_port)

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((self._api.handler(),))
        self.loop = asyncio.get_running_loop()  # register runs on the server's loop

    def healthy(self) -> bool:
        """Ingest answers. A health call rather than ``channel_ready_future``: that one leaves a
        connectivity-polling thread behind that fails when the channel is closed at shutdown."""
        if self._ingest_health is None:
            return False
        try:
            self._ingest_health.Check(health_pb2.HealthCheckRequest(), timeout=1)  # SERVING or not: it answers
            return True
        except grpc.RpcError:
            return False

    async def _drain_background(self) -> None:
        # The server's stop cancelled the calls; their handlers' ends (which publish the sessions
        # as away) run as the cancellations are processed: wait for them, then for what they started.
        while self.sessions or self.background:
            if self.background:
                await asyncio.gather(*list(self.background), return_exceptions=True)
            else:
                await asyncio.sleep(0.02)

    def close(self, deadline: float) -> None:
        # The runner already stopped taking calls; open sessions end when their clients do. The
        # pipeline is told that the sessions cut off by the stop are away (they may resume on
        # another replica) before the producer closes.
        if self.http is not None and self.loop is not None and self.loop.is_running():
            try:  # the HTTP sessions end like the gRPC ones: published as away
                asyncio.run_coroutine_threadsafe(self.http.stop(), self.loop).result(max(0.1, deadline - time.monotonic()))
            except (futures.TimeoutError, RuntimeError):
                log.warning("the HTTP API did not stop before the deadline")
        loop = self._channel_loop
        if loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._drain_background(), loop).result(max(0.1, deadline - time.monotonic()))
            except (futures.TimeoutError, RuntimeError):
                log.warning("%d session ends were not published before the deadline", len(self.background))
        if self._health_channel is not None:
            self._health_channel.close()
        if self._channel is not None and self._channel_loop is not None and self._channel_loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._channel.close(), self._channel_loop).result(max(0.1, deadline - time.monotonic()))
            except (futures.TimeoutError, RuntimeError):
                log.warning("the ingest channel did not close before the deadline")
        self._publish_pool.shutdown(wait=False)
