"""The ingest stage: ``IngestService.IngestFrames`` → validated, resampled, bounded frames on
the ``frames`` topic, keyed ``tenant/stream``. A bad frame gets a REJECTED result with the reason
and the call goes on; only a broken call (bad key) ends it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness import topics
from streamharness.errors import InvalidInput
from streamharness.ingest.frames import Resampler, bound_pixels, decode_image, encode_jpeg
from streamharness.keys import key_str, make_key
from streamharness.settings import load_settings
from streamharness.stage import Outbox, Stage, StageContext
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc

log = logging.getLogger(__name__)


class IngestSettings(BaseSettings):
    """Frame validation and resampling."""

    model_config = SettingsConfigDict(env_prefix="SH_INGEST_", frozen=True, extra="forbid")

    default_decision_fps: float = Field(1.0, gt=0, le=30, description="Decision rate when a session asks for none (frames kept per media second).")
    max_pixels: int = Field(640 * 480, ge=64 * 64, description="Frames above this many pixels are scaled down before publishing.")
    max_frame_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest encoded frame accepted.")
    jpeg_quality: int = Field(85, ge=30, le=100, description="Quality of the JPEG published to the frames topic.")
    publish_timeout_s: float = Field(10.0, gt=0, description="How long to wait for the broker to acknowledge a frame.")


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """``IngestFrames``; :meth:`ingest_one` is the per-frame step (also used by the local host's sessions)."""

    def __init__(self, settings: IngestSettings, outbox: Outbox, intake_open: threading.Event):
        self.settings = settings
        self.outbox = outbox
        self.intake_open = intake_open

    def IngestFrames(  # noqa: N802 - gRPC name
        self, requests: Iterator[ingest_pb2.IngestFrameRequest], context: grpc.ServicerContext
    ) -> Iterator[ingest_pb2.IngestFrameResult]:
        resampler: Resampler | None = None
        key: common_pb2.StreamKey | None = None
        for req in requests:
            if key is None:
                key = make_key(req.key.tenant, req.key.stream_id)  # bad key: the call ends (interceptor)
                resampler = Resampler(req.decision_fps or self.settings.default_decision_fps)
            elif (req.key.tenant, req.key.stream_id) != (key.tenant, key.stream_id):
                raise InvalidInput(f"one IngestFrames call carries one stream: got {key_str(req.key)} after {key_str(key)}")
            yield self.ingest_one(req, key, resampler)

    def ingest_one(self, req: ingest_pb2.IngestFrameRequest, key: common_pb2.StreamKey, resampler: Resampler) -> ingest_pb2.IngestFrameResult:
        result = ingest_pb2.IngestFrameResult(seq=req.seq, media_ts_ms=req.media_ts_ms)
        if not self.intake_open.is_set():
            result.status = ingest_pb2.IngestFrameResult.STATUS_REJECTED
            result.error = "ingest is shutting down; frame not taken"
            return result
        try:
            resampler.check_order(req.media_ts_ms)
            # Decode every frame, kept or not: a damaged frame is reported even when it would be skipped.
            rgb = decode_image(req.image, req.encoding, self.settings.max_frame_bytes)
            if not resampler.keep(req.media_ts_ms):
                result.status = ingest_pb2.IngestFrameResult.STATUS_SKIPPED
                return result
            rgb = bound_pixels(rgb, self.settings.max_pixels)
            event = events_pb2.FrameEvent(
                key=key, session_id=req.session_id, media_ts_ms=req.media_ts_ms, seq=req.seq,
                jpeg=encode_jpeg(rgb, self.settings.jpeg_quality), width=rgb.shape[1], height=rgb.shape[0],
                hops=[*req.hops, common_pb2.HopStamp(hop="ingest", wall_unix_ns=time.time_ns())],
            )
            self.outbox.send(topics.FRAMES, key, event).get(timeout=self.settings.publish_timeout_s)
            result.status = ingest_pb2.IngestFrameResult.STATUS_PUBLISHED
            meters.frames_ingested().add(1, {"status": "published"})
        except InvalidInput as err:
            result.status = ingest_pb2.IngestFrameResult.STATUS_REJECTED
            result.error = f"frame seq {req.seq} at {req.media_ts_ms} ms: {err}"
            meters.frames_ingested().add(1, {"status": "rejected"})
            log.info("%s: %s", key_str(key), result.error)
        return result


class IngestStage(Stage):
    """The ``ingest`` row of the topology: the ``IngestFrames`` API, publishing to ``frames``."""

    name = "ingest"

    def __init__(self, settings: IngestSettings | None = None):
        self.settings = settings or load_settings(IngestSettings)
        self.servicer: IngestServicer | None = None
        self._intake_open = threading.Event()

    def open(self, ctx: StageContext) -> None:
        self.servicer = IngestServicer(self.settings, ctx.outbox, self._intake_open)

    def register(self, server: grpc.Server) -> None:
        ingest_pb2_grpc.add_IngestServiceServicer_to_server(self.servicer, server)

    def start(self) -> None:
        self._intake_open.set()

    def healthy(self) -> bool:
        return self.servicer is not None and self._intake_open.is_set()

    def close(self, deadline: float) -> None:
        self._intake_open.clear()
