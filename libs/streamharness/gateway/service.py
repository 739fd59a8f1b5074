"""The gateway: ``SessionService.Stream``, one bidirectional call per live session.

Frames go to ingest over one ``IngestFrames`` call per session; questions, standing instructions
and session start/end go to the ``queries`` topic; responses come back from the ``responses``
topic. **Routing**: every replica has an id (``SH_GATEWAY_REPLICA_ID``, the pod name in a
cluster) that it stamps into ``QueryEvent.reply_to``; decisions and responses carry it forward;
each replica consumes ``responses`` in a consumer group of its own and keeps only the records
addressed to it, delivering them to the session by ``session_id``. Chunks are de-duplicated by
``(response_id, index)`` because delivery is at least once.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness import topics
from streamharness.errors import InvalidInput, QuotaExceeded, Unauthenticated
from streamharness.keys import key_str, validate_name
from streamharness.records import ConsumedEvent
from streamharness.session import SessionMapper
from streamharness.settings import load_settings
from streamharness.stage import Outbox, Stage, StageContext, StageSpec
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc, session_pb2, session_pb2_grpc

log = logging.getLogger(__name__)
Q = events_pb2.QueryEvent
_DONE = object()


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class GatewaySettings(BaseSettings):
    """The public session API."""

    model_config = SettingsConfigDict(env_prefix="SH_GATEWAY_", frozen=True, extra="forbid")

    replica_id: str = Field(default_factory=_default_replica_id, description="This replica's id for response routing; the chart sets the pod name. Default: host-pid-random.")
    ingest_address: str = Field("127.0.0.1:50052", description="host:port of the ingest service.")
    api_keys: SecretStr | None = Field(None, description='JSON object {"<api key>": "<tenant>"}; clients send the key as metadata x-api-key. Unset: no authentication, tenant from x-tenant metadata (default "default").')
    max_sessions_per_tenant: int = Field(64, ge=1, description="Open sessions a tenant may hold at once (RESOURCE_EXHAUSTED beyond).")
    max_frame_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest encoded frame accepted from a client.")
    max_text_chars: int = Field(2000, ge=1, description="Longest question or instruction text.")
    end_grace_s: float = Field(60.0, ge=0, le=600, description="After SessionEnd, wait this long at most for answers to pending questions before closing.")
    consumer_poll_timeout_ms: int = Field(50, ge=1, le=5000, description="Poll timeout of the responses consumer (latency of delivery).")

    @field_validator("api_keys")
    @classmethod
    def _json_map(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parsed = json.loads(value.get_secret_value())
            if not isinstance(parsed, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()):
                raise ValueError('must be a JSON object of "<api key>": "<tenant>"')
        return value

    def tenants_by_key(self) -> dict[str, str] | None:
        return json.loads(self.api_keys.get_secret_value()) if self.api_keys else None


@dataclass
class _Session:
    session_id: str
    key: common_pb2.StreamKey
    mapper: SessionMapper
    outbound: queue.Queue = field(default_factory=queue.Queue)
    seen_chunks: set[tuple[str, int]] = field(default_factory=set)
    open_questions: set[str] = field(default_factory=set)
    last_published_ms: int = -1  # media time of the last frame ingest published; -1: none (SessionEnd carries it)
    answered: threading.Condition = field(default_factory=threading.Condition)


class _SessionApi(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, gateway: GatewayStage):
        self.g = gateway

    # -- authentication and quotas -------------------------------------------------------------
    def _tenant(self, context: grpc.ServicerContext) -> str:
        md = dict(context.invocation_metadata() or ())
        keys = self.g.tenants_by_key
        if keys is None:
            return validate_name("tenant", md.get("x-tenant", "default"))
        api_key = md.get("x-api-key")
        if not api_key:
            raise Unauthenticated("missing x-api-key metadata")
        tenant = keys.get(api_key)
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant

    def Stream(self, requests: Iterator[session_pb2.ClientMessage], context: grpc.ServicerContext) -> Iterator[session_pb2.ServerMessage]:  # noqa: N802
        tenant = self._tenant(context)
        settings = self.g.settings
        mapper = SessionMapper(tenant, uuid.uuid4().hex, max_text_chars=settings.max_text_chars,
                               max_frame_bytes=settings.max_frame_bytes, reply_to=settings.replica_id)
        start = mapper.start(next(requests, None))
        key = mapper.key
        session = self.g.open_session(key, mapper)
        context.add_callback(lambda: self.g.close_session(session))
        log.info("session %s opened for %s (%d instructions)", session.session_id, key_str(key), len(start.instructions))
        self.g.publish_query(start)
        yield session_pb2.ServerMessage(accepted=session_pb2.SessionAccepted(session_id=session.session_id, key=key,
                                                                             decision_fps=mapper.decision_fps))

        ingest_q: queue.Queue = queue.Queue(maxsize=256)
        results = self.g.ingest.IngestFrames(iter(ingest_q.get, _DONE))
        pump = threading.Thread(target=self._pump_ingest, args=(results, session), daemon=True, name=f"ingest-{session.session_id[:8]}")
        pump.start()
        reader = threading.Thread(target=self._read, args=(requests, session, ingest_q, pump), daemon=True, name=f"read-{session.session_id[:8]}")
        reader.start()
        try:
            while True:
                item = session.outbound.get()
                if item is _DONE:
                    break
                yield item
        finally:
            try:
                ingest_q.put_nowait(_DONE)
            except queue.Full:
                pass  # the reader's own _DONE is queued behind the backlog
            if not context.is_active():
                results.cancel()  # the client left: stop the ingest call too

    def _error(self, session: _Session, err: Exception, seq: int = 0, ts: int = 0) -> None:
        code = getattr(err, "code", grpc.StatusCode.INVALID_ARGUMENT).value[0]
        session.outbound.put(session_pb2.ServerMessage(error=session_pb2.SessionError(code=code, message=str(err), seq=seq, media_ts_ms=ts)))

    def _read(self, requests, session: _Session, ingest_q: queue.Queue, pump: threading.Thread) -> None:
        """Client messages → ingest / queries. A bad message is answered with a non-fatal error."""
        last_ts = -1
        ended = False
        mapper = session.mapper
        try:
            for msg in requests:
                kind = msg.WhichOneof("message")
                try:
                    if kind == "frame":
                        ingest_q.put(mapper.frame(msg.frame))
                        last_ts = max(last_ts, msg.frame.media_ts_ms)
                    elif kind == "end":
                        ended = True
                        break
                    else:
                        query, ack = mapper.query(msg)
                        if kind == "question":
                            session.open_questions.add(query.question_id)
                        self.g.publish_query(query)
                        session.outbound.put(ack)
                except InvalidInput as err:
                    self._error(session, err, seq=msg.frame.seq if kind == "frame" else 0)
        except grpc.RpcError:
            pass  # the client went away
        finally:
            ingest_q.put(_DONE)
        if not ended:
            # The client went away without SessionEnd: still tell the pipeline the session is over,
            # so per-stream state is released.
            try:
                self.g.publish_query(mapper.end(session.last_published_ms))
            except Exception:  # noqa: BLE001 - best effort on a broken session
                log.warning("could not publish the end of abandoned session %s", session.session_id)
        if ended:
            # Every frame sent before SessionEnd gets its ack or error before the session closes.
            pump.join(timeout=self.g.settings.end_grace_s)
            self.g.publish_query(mapper.end(session.last_published_ms))
            deadline = time.monotonic() + self.g.settings.end_grace_s
            with session.answered:
                while session.open_questions and time.monotonic() < deadline:
                    session.answered.wait(timeout=max(0.0, deadline - time.monotonic()))
            session.outbound.put(session_pb2.ServerMessage(ack=session_pb2.Ack(kind=session_pb2.Ack.KIND_END, media_ts_ms=max(0, last_ts))))
        session.outbound.put(_DONE)

    def _pump_ingest(self, results, session: _Session) -> None:
        try:
            for r in results:
                if r.status == ingest_pb2.IngestFrameResult.STATUS_REJECTED:
                    session.outbound.put(session_pb2.ServerMessage(error=session_pb2.SessionError(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=r.error, seq=r.seq, media_ts_ms=r.media_ts_ms)))
                else:
                    if r.status == ingest_pb2.IngestFrameResult.STATUS_PUBLISHED:
                        session.last_published_ms = max(session.last_published_ms, r.media_ts_ms)
                    session.outbound.put(session_pb2.ServerMessage(ack=session_pb2.Ack(
                        kind=session_pb2.Ack.KIND_FRAME, seq=r.seq, media_ts_ms=r.media_ts_ms,
                        sampled=r.status == ingest_pb2.IngestFrameResult.STATUS_PUBLISHED)))
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                log.warning("ingest call of session %s failed: %s", session.session_id, err.details())
                session.outbound.put(session_pb2.ServerMessage(error=session_pb2.SessionError(
                    code=err.code().value[0], message=f"ingest unavailable: {err.details()}", fatal=True)))
                session.outbound.put(_DONE)


class GatewayStage(Stage):
    """The ``gateway`` row of the topology: the public session API; consumes ``responses`` in a
    group of its own per replica and delivers the records addressed to it."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings | None = None):
        self.settings = settings or load_settings(GatewaySettings)
        self.tenants_by_key = self.settings.tenants_by_key()
        self.sessions: dict[str, _Session] = {}
        self._per_tenant: dict[str, int] = {}
        self._lock = threading.Lock()
        self.out: Outbox | None = None
        self._channel: grpc.Channel | None = None
        self._ingest_health: health_pb2_grpc.HealthStub | None = None
        self.ingest: ingest_pb2_grpc.IngestServiceStub | None = None

    def configure(self, spec: StageSpec) -> StageSpec:
        return replace(spec, group=f"{spec.group}-{self.settings.replica_id}",
                       poll_timeout_ms=self.settings.consumer_poll_timeout_ms)

    # -- sessions --------------------------------------------------------------------------------
    def open_session(self, key: common_pb2.StreamKey, mapper: SessionMapper) -> _Session:
        with self._lock:
            count = self._per_tenant.get(key.tenant, 0)
            if count >= self.settings.max_sessions_per_tenant:
                raise QuotaExceeded(f"tenant {key.tenant} already has {count} open sessions (limit {self.settings.max_sessions_per_tenant})")
            session = _Session(session_id=mapper.session_id, key=key, mapper=mapper)
            self.sessions[session.session_id] = session
            self._per_tenant[key.tenant] = count + 1
        meters.sessions_active().add(1, {"tenant": key.tenant})
        return session

    def close_session(self, session: _Session) -> None:
        with self._lock:
            if self.sessions.pop(session.session_id, None) is None:
                return
            self._per_tenant[session.key.tenant] -= 1
        meters.sessions_active().add(-1, {"tenant": session.key.tenant})
        session.outbound.put(_DONE)

    def publish_query(self, query: events_pb2.QueryEvent) -> None:
        self.out.send(topics.QUERIES, query.key, query).get(timeout=10)

    def handle(self, event: ConsumedEvent) -> None:
        """A record of ``responses``: to the session it is addressed to, once per chunk."""
        r: events_pb2.ResponseEvent = event.message
        if r.reply_to != self.settings.replica_id:
            return  # another replica's session
        session = self.sessions.get(r.session_id)
        if session is None:
            return  # the session ended; nobody to tell
        if (r.response_id, r.index) in session.seen_chunks:
            return  # redelivered
        session.seen_chunks.add((r.response_id, r.index))
        if r.index == 0:
            meters.record_hops(r.hops, "gateway_first_token", time.time_ns())
        session.outbound.put(session_pb2.ServerMessage(response=session_pb2.ResponseChunk(
            response_id=r.response_id, index=r.index, text=r.text, final=r.final, trigger=r.trigger,
            question_id=r.question_id, instruction_id=r.instruction_id, media_ts_ms=r.media_ts_ms)))
        if r.final and r.question_id:
            with session.answered:
                session.open_questions.discard(r.question_id)
                session.answered.notify_all()

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.out = ctx.outbox
        self._channel = grpc.insecure_channel(self.settings.ingest_address, options=[
            ("grpc.max_send_message_length", self.settings.max_frame_bytes + 65536),
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
        ])
        self.ingest = ingest_pb2_grpc.IngestServiceStub(self._channel)
        self._ingest_health = health_pb2_grpc.HealthStub(self._channel)

    def register(self, server: grpc.Server) -> None:
        session_pb2_grpc.add_SessionServiceServicer_to_server(_SessionApi(self), server)

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

    def close(self, deadline: float) -> None:
        # The runner already stopped taking calls; open sessions end when their clients do.
        if self._channel is not None:
            self._channel.close()
