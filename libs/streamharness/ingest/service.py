"""The ingest stage: ``IngestService.IngestFrames`` → validated, resampled, bounded frames on
the ``frames`` topic, keyed ``tenant/stream``. A bad frame gets a REJECTED result with the reason
and the call goes on; only a broken call (no identity, a bad key, another tenant's stream) ends it.
A call whose first request names a ``source`` is a pulled session: ingest pulls the stream itself
(:mod:`streamharness.ingest.pull`, one puller per stream).

The call is a coroutine (``grpc.aio``); each frame's decode, re-encode and publish run in a pool of
``SH_INGEST_DECODE_WORKERS`` threads, at most ``SH_INGEST_TENANT_DECODE_CONCURRENCY`` of them for one
tenant, so one tenant's frames never occupy the whole pool. Before a frame costs anything:

- the caller's internal identity token is checked (UNAUTHENTICATED without one) and the stream
  must be the token's tenant's (NOT_FOUND otherwise): :mod:`streamharness.auth`;
- frames beyond the tenant's ``SH_INGEST_TENANT_MAX_FRAMES_PER_S`` are shed (STATUS_SHED, not
  decoded): a tenant over its quota loses its own frames, nobody else slows;
- the media time must move forward by at most ``SH_INGEST_MAX_MEDIA_JUMP_MS``;
- the image header's dimensions are checked against ``SH_INGEST_MAX_INPUT_PIXELS`` before decoding.

**The broker away** is per frame, not the call's end: a frame the broker does not acknowledge within
``SH_INGEST_PUBLISH_TIMEOUT_S`` is answered STATUS_UNAVAILABLE ("the frames topic is unavailable
(KafkaTimeoutError); ...") and the call goes on; once the broker is back, later frames are published
again (:class:`FramePublisher`). While a timed-out send is unresolved, later frames are answered
UNAVAILABLE at once and not sent, so that a live stream does not wait the timeout on every frame and a
stream's frames are never published out of order. A frame answered UNAVAILABLE is not taken by the
resampler: the same frame (same media time) may be sent again, or the next frame of its slot is kept.
A send that timed out (at most one per decode worker, at the outage's start) stays in the producer's
queue and may still be published late, once the broker is back (its error says so); if the client sent
that frame again, it is then on ``frames`` twice at one media time, which the consumers de-duplicate
(memory keeps one point per frame media time; the decision stage drops a frame at or before the last
one it decided on; the summariser keys frames by media time).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent import futures

import grpc
import grpc.aio
from kafka.errors import KafkaError, KafkaTimeoutError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness import topics
from streamharness.auth import AuthSettings, Identity, InternalTokens, audit, caller, check_owner
from streamharness.errors import InvalidInput, StreamHarnessError, TooLarge
from streamharness.grpcutil.wire import drain_first, parse
from streamharness.ingest.frames import Resampler, bound_pixels, decode_image, encode_jpeg
from streamharness.ingest.pull import PulledSession
from streamharness.keys import key_str, make_key
from streamharness.limits import Buckets
from streamharness.settings import load_settings
from streamharness.sources import PullSlots
from streamharness.sources.settings import SourceSettings
from streamharness.stage import Delivery, Outbox, Stage, StageContext
from streamharness.telemetry import meters, tracing
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2

log = logging.getLogger(__name__)
SERVICE = "streamharness.v1.IngestService"
R = ingest_pb2.IngestFrameResult


class IngestSettings(BaseSettings):
    """Frame validation and resampling."""

    model_config = SettingsConfigDict(env_prefix="SH_INGEST_", frozen=True, extra="forbid")

    default_decision_fps: float = Field(1.0, gt=0, le=30, description="Decision rate when a session asks for none (frames kept per media second).")
    max_pixels: int = Field(640 * 480, ge=64 * 64, description="Frames above this many pixels are scaled down before publishing.")
    max_input_pixels: int = Field(3840 * 2160, ge=64 * 64, description="Frames whose header says more pixels than this are refused before decoding (decompression bombs).")
    max_frame_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest encoded frame accepted.")
    max_media_jump_ms: int = Field(10 * 60 * 1000, ge=1000, description="Largest step of media time from one frame to the next; a frame further ahead is refused and the stream goes on.")
    tenant_max_frames_per_s: float = Field(240.0, gt=0, description="Frames per second one tenant may send to this replica, all its sessions together; beyond it frames are shed (STATUS_SHED) before decoding.")
    tenant_frames_burst: int = Field(480, ge=1, description="Burst of the per-tenant frame bucket.")
    decode_workers: int = Field(4, ge=1, le=256, description="Threads that decode, re-encode and publish frames.")
    tenant_decode_concurrency: int = Field(2, ge=1, le=256, description="Frames of one tenant in the decode pool at once (the rest of that tenant's frames wait; other tenants do not).")
    jpeg_quality: int = Field(85, ge=30, le=100, description="Quality of the JPEG published to the frames topic.")
    publish_timeout_s: float = Field(
        3.0, gt=0, le=60,
        description="How long one frame waits for the broker's acknowledgement; past it the frame is answered STATUS_UNAVAILABLE "
        "and the call goes on (later frames are answered UNAVAILABLE at once until the broker is back). Short: a live stream "
        "waits this long once per outage.",
    )


class FramePublisher:
    """Publishes frames on ``frames`` and says, per frame, when the broker is away.

    A send the broker does not acknowledge within ``timeout_s`` is *unresolved*: kafka-python keeps
    it queued (it cannot be withdrawn) and delivers it if the broker comes back before the producer's
    delivery timeout, or fails it after. While any send is unresolved, no other frame is sent: later
    frames are answered at once, not queued behind it, so the wait is paid once per outage rather than
    once per frame, the producer's queue does not grow with frames that were answered UNAVAILABLE,
    and nothing overtakes a frame that may still be published. Thread-safe (the decode pool calls it).
    """

    def __init__(self, outbox: Outbox, timeout_s: float) -> None:
        self._outbox = outbox
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._unresolved: list[Delivery] = []
        self._away_since: float | None = None  # monotonic time of the first frame the broker did not take
        self._away_error = ""  # the error that started the outage, for the frames answered meanwhile
        self._refused = 0  # frames answered UNAVAILABLE in this outage

    def publish(self, key: common_pb2.StreamKey, event: events_pb2.FrameEvent) -> str | None:
        """None once the broker acknowledged ``event``; else why it is not published (STATUS_UNAVAILABLE)."""
        what = f"frame seq {event.seq} at {event.media_ts_ms} ms"
        with self._lock:
            self._unresolved = [d for d in self._unresolved if not getattr(d, "is_done", True)]
            if self._unresolved:
                self._refused += 1
                away = self._away_error or "KafkaTimeoutError"
                return (f"the frames topic is unavailable ({away}); {what} was not sent: an earlier frame still waits for "
                        "the broker's acknowledgement. The stream goes on: frames are published again once the broker is back")
        delivery: Delivery | None = None
        try:
            delivery = self._outbox.send(topics.FRAMES, key, event)
            delivery.get(timeout=self._timeout_s)
        except KafkaError as err:
            name = type(err).__name__
            with self._lock:
                if delivery is not None and not getattr(delivery, "is_done", True):
                    self._unresolved.append(delivery)  # still queued: it may be published once the broker is back
                self._refused += 1
                if self._away_since is None:
                    self._away_since, self._away_error = time.monotonic(), name
                    log.warning("the broker did not take %s of %s (%s); frames are answered STATUS_UNAVAILABLE "
                                "until it is back", what, key_str(key), err)
            why = (f"was not acknowledged within {self._timeout_s:g} s (SH_INGEST_PUBLISH_TIMEOUT_S) and may still be "
                   "published late" if isinstance(err, KafkaTimeoutError) else f"was not published ({err})")
            return (f"the frames topic is unavailable ({name}); {what} {why}. The stream goes on: frames are published "
                    "again once the broker is back")
        with self._lock:
            if self._away_since is not None:
                log.info("the broker takes frames again after %.1f s; %d frames were answered STATUS_UNAVAILABLE meanwhile",
                         time.monotonic() - self._away_since, self._refused)
                self._away_since, self._away_error, self._refused = None, "", 0
        return None


class IngestServicer:
    """``IngestFrames``; :meth:`ingest_one` is the per-frame step (also used by the local host's sessions)."""

    def __init__(self, settings: IngestSettings, outbox: Outbox, intake_open: threading.Event, tokens: InternalTokens | None = None,
                 source_settings: SourceSettings | None = None):
        self.settings = settings
        self.source_settings = source_settings or load_settings(SourceSettings)
        self.pull_slots = PullSlots(self.source_settings)
        self.outbox = outbox
        self.intake_open = intake_open
        self.tokens = tokens
        self._frames = Buckets(settings.tenant_max_frames_per_s, settings.tenant_frames_burst)
        self._pool = futures.ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="ingest-decode")
        self._per_tenant: dict[str, asyncio.Semaphore] = {}
        self._shed_logged: dict[str, float] = {}
        self.publisher = FramePublisher(outbox, settings.publish_timeout_s)

    def handler(self) -> grpc.GenericRpcHandler:
        # Requests as bytes: a request that does not parse is answered, not the call's end.
        return grpc.method_handlers_generic_handler(SERVICE, {"IngestFrames": grpc.stream_stream_rpc_method_handler(
            self.IngestFrames, request_deserializer=None, response_serializer=R.SerializeToString)})

    def _slot(self, tenant: str) -> asyncio.Semaphore:
        sem = self._per_tenant.get(tenant)
        if sem is None:
            sem = self._per_tenant[tenant] = asyncio.Semaphore(self.settings.tenant_decode_concurrency)
        return sem

    def frames_over_quota(self, key: common_pb2.StreamKey) -> bool:
        """A pulled frame of ``key``'s tenant: True when the tenant is over its frames/s (shed it)."""
        return bool(self._frames.take(key.tenant))

    def shed(self, key: common_pb2.StreamKey, req: ingest_pb2.IngestFrameRequest) -> R | None:
        """The frame's SHED result when its tenant is over the frame quota, else None."""
        wait = self._frames.take(key.tenant)
        if not wait:
            return None
        meters.frames_ingested().add(1, {"status": "shed"})
        now = time.monotonic()
        if now - self._shed_logged.get(key.tenant, 0.0) > 10.0:  # one audit line per tenant per 10 s
            self._shed_logged[key.tenant] = now
            audit("quota_exceeded", quota="frames_per_tenant", tenant=key.tenant, limit=self.settings.tenant_max_frames_per_s)
        return R(seq=req.seq, media_ts_ms=req.media_ts_ms, status=R.STATUS_SHED,
                 error=f"tenant {key.tenant} is over its {self.settings.tenant_max_frames_per_s:g} frames/s "
                       f"(SH_INGEST_TENANT_MAX_FRAMES_PER_S); frame seq {req.seq} shed")

    async def IngestFrames(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[R]:  # noqa: N802 - gRPC name
        if self.tokens is None:
            raise RuntimeError("IngestServicer without tokens serves no calls")
        try:
            identity: Identity = caller(self.tokens, context, "ingest")
        except StreamHarnessError:
            await drain_first(requests)  # so that the caller sees this status, not INTERNAL
            raise
        resampler: Resampler | None = None
        key: common_pb2.StreamKey | None = None
        loop = asyncio.get_running_loop()
        async for raw in requests:
            try:
                req = parse(ingest_pb2.IngestFrameRequest, raw, "IngestFrameRequest")
            except InvalidInput as err:
                yield R(status=R.STATUS_REJECTED, error=str(err))
                continue
            if key is None:
                key = make_key(req.key.tenant, req.key.stream_id)  # bad key: the call ends (interceptor)
                check_owner(identity, key.tenant, key.stream_id, "ingest")
                if req.source.url or req.source.upload:  # a pulled session: ingest reads the stream itself
                    if not self.intake_open.is_set():
                        yield R(source=common_pb2.SourceStatus(kind=common_pb2.SourceStatus.KIND_FAILED, code=grpc.StatusCode.UNAVAILABLE.value[0],
                                                               message="ingest is shutting down; open the session again"))
                        return
                    async for result in PulledSession(self, req, key).results(requests):
                        yield result
                    return
                resampler = Resampler(req.decision_fps or self.settings.default_decision_fps, self.settings.max_media_jump_ms)
            elif (req.key.tenant, req.key.stream_id) != (key.tenant, key.stream_id):
                raise InvalidInput(f"one IngestFrames call carries one stream: got {key_str(req.key)} after {key_str(key)}")
            shed = self.shed(key, req)
            if shed is not None:
                yield shed
                continue
            async with self._slot(key.tenant):  # released before the result goes out: a slow reader holds no slot
                result = await loop.run_in_executor(self._pool, self.ingest_one, req, key, resampler)
            yield result

    def ingest_one(self, req: ingest_pb2.IngestFrameRequest, key: common_pb2.StreamKey, resampler: Resampler) -> R:
        # In the frame's trace (the gateway's context in trace_context): the frame is published inside.
        with tracing.received("ingest", "frame", req.trace_context, message=req) as span:
            result = self._ingest_one(req, key, resampler)
            span.set_attribute("sh.ingest.status", R.Status.Name(result.status))
            return result

    def _ingest_one(self, req: ingest_pb2.IngestFrameRequest, key: common_pb2.StreamKey, resampler: Resampler) -> R:
        result = R(seq=req.seq, media_ts_ms=req.media_ts_ms)
        if not self.intake_open.is_set():
            result.status = R.STATUS_REJECTED
            result.error = "ingest is shutting down; frame not taken"
            return result
        taken = (resampler.last_ts_ms, resampler.next_due_ms)
        try:
            resampler.check_order(req.media_ts_ms)
            # Decode every frame, kept or not: a damaged frame is reported even when it would be skipped.
            rgb = decode_image(req.image, req.encoding, self.settings.max_frame_bytes, self.settings.max_input_pixels)
            if not resampler.keep(req.media_ts_ms):
                result.status = R.STATUS_SKIPPED
                return result
            rgb = bound_pixels(rgb, self.settings.max_pixels)
            event = events_pb2.FrameEvent(
                key=key, session_id=req.session_id, media_ts_ms=req.media_ts_ms, seq=req.seq,
                jpeg=encode_jpeg(rgb, self.settings.jpeg_quality), width=rgb.shape[1], height=rgb.shape[0],
                pace=req.pace, hops=[*req.hops, common_pb2.HopStamp(hop="ingest", wall_unix_ns=time.time_ns())],
            )
            unavailable = self.publisher.publish(key, event)
            if unavailable is not None:
                # Not taken: the resampler forgets the frame, so that it (or the next of its slot) may come again.
                resampler.last_ts_ms, resampler.next_due_ms = taken
                result.status = R.STATUS_UNAVAILABLE
                result.error = unavailable
                meters.frames_ingested().add(1, {"status": "unavailable"})
                return result
            result.status = R.STATUS_PUBLISHED
            meters.frames_ingested().add(1, {"status": "published"})
        except (InvalidInput, TooLarge) as err:
            result.status = R.STATUS_REJECTED
            result.error = f"frame seq {req.seq} at {req.media_ts_ms} ms: {err}"
            meters.frames_ingested().add(1, {"status": "rejected"})
            log.info("%s: %s", key_str(key), result.error)
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class IngestStage(Stage):
    """The ``ingest`` row of the topology: the ``IngestFrames`` API, publishing to ``frames``."""

    name = "ingest"

    def __init__(self, settings: IngestSettings | None = None, sources: SourceSettings | None = None, auth: AuthSettings | None = None):
        self.settings = settings or load_settings(IngestSettings)
        self.sources = sources  # streamharness.sources.SourceSettings (read from the environment when None)
        self.auth = auth
        self.servicer: IngestServicer | None = None
        self._intake_open = threading.Event()

    def open(self, ctx: StageContext) -> None:
        self.servicer = IngestServicer(self.settings, ctx.outbox, self._intake_open, source_settings=self.sources)

    def register(self, server: grpc.aio.Server) -> None:
        # Serving the API needs the identity secret (the local host calls ingest_one directly).
        self.servicer.tokens = InternalTokens(self.auth or load_settings(AuthSettings), "ingest")
        server.add_generic_rpc_handlers((self.servicer.handler(),))

    def start(self) -> None:
        self._intake_open.set()

    def healthy(self) -> bool:
        return self.servicer is not None and self._intake_open.is_set()

    def close(self, deadline: float) -> None:
        self._intake_open.clear()
        if self.servicer is not None:
            self.servicer.close()
