"""Pulled sessions in ingest: one :class:`~streamharness.sources.Puller` per stream, on a thread of
its own, for the life of the session's ``IngestFrames`` call.

The gateway opens the call with a first request that names the source (``IngestFrameRequest.source``)
instead of carrying an image. Ingest then pulls the stream itself (a camera URL, an HLS playlist, a
file over HTTP(S), or an upload whose bytes follow in ``video`` requests), samples it to the
session's decision rate on media time, and publishes each kept frame to ``frames`` exactly as a
pushed frame (bounded, re-encoded, stamped). The call's results are one ``STATUS_PUBLISHED`` (with
the JPEG as ``preview_jpeg``, the live view's latest frame) per frame and a ``SourceStatus`` result
per connect, drop, gap, end or failure. The gateway ends the call (its request stream) when the
tenant ends the session: the puller stops and its slot is free.

Scaling: a stream has one session at a time (the decision stage refuses a second), so one puller
per stream; a gateway spreads its calls over the ingest replicas (gRPC ``round_robin`` over the
headless service in the chart), and each replica bounds what it pulls
(``SH_SOURCE_MAX_PULLED_STREAMS``, ``SH_SOURCE_MAX_PULLED_STREAMS_PER_TENANT``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import numpy as np

from streamharness.errors import InvalidInput, StreamHarnessError
from streamharness.grpcutil.wire import parse
from streamharness.ingest.frames import bound_pixels, encode_jpeg
from streamharness.keys import key_str
from streamharness.sources.puller import LIVE_SCHEMES
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2

if TYPE_CHECKING:
    from streamharness.ingest.service import IngestServicer

log = logging.getLogger(__name__)
R = ingest_pb2.IngestFrameResult
K = common_pb2.SourceStatus
_END = object()


def _failed(code, message: str, url: str = "") -> R:
    return R(source=K(kind=K.KIND_FAILED, code=code.value[0], message=message, url=url))


class PulledSession:
    """One pulled stream of one ``IngestFrames`` call."""

    def __init__(self, servicer: IngestServicer, first: ingest_pb2.IngestFrameRequest, key: common_pb2.StreamKey) -> None:
        self.servicer = servicer
        self.settings = servicer.source_settings
        self.first = first
        self.key = key
        self.source = first.source
        self.seq = 0
        self.stop = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.out: asyncio.Queue = asyncio.Queue(maxsize=64)
        self.url = ""
        # A file or an upload is a replay (never shed for lag: its decisions are exact); a camera is live.
        self.scheme = _scheme(self.source)  # the meters' label
        self.pace = common_pb2.PACE_LIVE if self.scheme in LIVE_SCHEMES else common_pb2.PACE_REPLAY

    # -- on the puller's thread ---------------------------------------------------------------------
    def _put(self, item: object) -> None:
        """Hand a result to the call (blocks the puller while the call is 64 results behind)."""
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.out.put(item), self.loop).result()
        except (RuntimeError, asyncio.CancelledError):
            self.stop.set()  # the call is gone

    def _frame(self, media_ts_ms: int, rgb: np.ndarray, offset: int) -> None:
        s = self.servicer.settings
        ts = media_ts_ms + offset
        if self.servicer.frames_over_quota(self.key):
            meters.frames_ingested().add(1, {"status": "shed"})
            return  # the tenant is over its frames/s: its own frame is shed
        rgb = bound_pixels(rgb, s.max_pixels)
        jpeg = encode_jpeg(rgb, s.jpeg_quality)
        self.seq += 1
        event = events_pb2.FrameEvent(
            key=self.key, session_id=self.first.session_id, media_ts_ms=ts, seq=self.seq, jpeg=jpeg,
            width=rgb.shape[1], height=rgb.shape[0], hops=[common_pb2.HopStamp(hop="ingest", wall_unix_ns=time.time_ns())],
            pace=self.pace)
        unavailable = self.servicer.publisher.publish(self.key, event)
        if unavailable is not None:
            meters.frames_ingested().add(1, {"status": "unavailable"})
            self._put(R(seq=self.seq, media_ts_ms=ts, status=R.STATUS_UNAVAILABLE, error=unavailable))
            return
        meters.frames_ingested().add(1, {"status": "published"})
        self._put(R(seq=self.seq, media_ts_ms=ts, status=R.STATUS_PUBLISHED, preview_jpeg=jpeg))

    def _status(self, status: common_pb2.SourceStatus, offset: int) -> None:
        if status.media_ts_ms:
            status.media_ts_ms += offset
        if status.url:
            self.url = status.url
        source_meters(status, self.scheme)
        self._put(R(source=status))

    def _run(self, puller, offset: int) -> None:
        try:
            puller.run(lambda ts, rgb: self._frame(ts, rgb, offset), lambda st: self._status(st, offset), self.stop)
        except StreamHarnessError as err:
            self._put(_failed(err.code, str(err), self.url))
        except Exception as err:  # noqa: BLE001 - a puller bug ends this stream with a status, never ingest
            log.exception("%s: the puller failed", key_str(self.key))
            self._put(_failed(grpc.StatusCode.INTERNAL, f"the puller failed ({type(err).__name__}); see ingest's logs", self.url))
        finally:
            self._put(_END)

    # -- on the loop -----------------------------------------------------------------------------
    async def _spool(self, requests: AsyncIterator[bytes]):
        """An upload: the ``video`` requests into a spool file; its path."""
        from streamharness.sources import UploadSpool

        spool = UploadSpool(self.key.tenant, self.settings, declared_bytes=self.source.upload_bytes)
        try:
            async for raw in requests:
                req = parse(ingest_pb2.IngestFrameRequest, raw, "IngestFrameRequest")
                if req.video:
                    await self.loop.run_in_executor(None, spool.write, bytes(req.video))
                if req.video_last:
                    return spool, await self.loop.run_in_executor(None, spool.finish)
            raise InvalidInput("the upload ended before its last chunk (VideoChunk.last = true)")
        except BaseException:
            spool.close()
            raise

    async def _watch_requests(self, requests: AsyncIterator[bytes]) -> None:
        """The gateway ends the request stream when the session ends: stop pulling then."""
        try:
            async for _ in requests:
                pass  # nothing else is sent on a pulled call
        except Exception:  # noqa: BLE001 - the call broke: stop too
            pass
        self.stop.set()

    async def results(self, requests: AsyncIterator[bytes]) -> AsyncIterator[R]:
        from streamharness.sources import Puller

        slots = self.servicer.pull_slots
        try:
            slots.take(self.key.tenant)
        except StreamHarnessError as err:
            yield _failed(err.code, str(err))
            return
        spool = None
        watcher: asyncio.Task | None = None
        thread: threading.Thread | None = None
        meters_up = False
        try:
            path = None
            if self.source.upload:
                try:
                    spool, path = await self._spool(requests)
                except StreamHarnessError as err:
                    yield _failed(err.code, str(err))
                    return
            try:
                puller = Puller(self.source, self.first.decision_fps or self.servicer.settings.default_decision_fps,
                                self.settings, path=path)
            except StreamHarnessError as err:
                yield _failed(err.code, str(err))
                return
            # A resumed live source goes on at the session's media time; a file's media time is its own.
            offset = self.first.media_ts_ms if getattr(puller, "live", True) and not self.source.upload else 0
            watcher = asyncio.create_task(self._watch_requests(requests), name=f"pull-watch-{key_str(self.key)}")
            thread = threading.Thread(target=self._run, args=(puller, offset), name=f"pull-{key_str(self.key)}", daemon=True)
            meters.source_streams().add(1, {"scheme": self.scheme})
            meters_up = True
            thread.start()
            while True:
                item = await self.out.get()
                if item is _END:
                    return
                yield item
        finally:
            self.stop.set()
            if watcher is not None:
                watcher.cancel()
            if thread is not None:
                # The puller sees stop within its read timeout; it may still be handing a result over.
                while thread.is_alive():
                    try:
                        self.out.get_nowait()
                    except asyncio.QueueEmpty:
                        await asyncio.sleep(0.05)
            if meters_up:
                meters.source_streams().add(-1, {"scheme": self.scheme})
            if spool is not None:
                spool.close()
            slots.release(self.key.tenant)


def _scheme(source: common_pb2.Source) -> str:
    return "upload" if source.upload else source.url.partition("://")[0].lower()


def source_meters(status: common_pb2.SourceStatus, scheme: str) -> None:
    if status.kind == K.KIND_RECONNECTING:
        meters.source_reconnects().add(1, {"scheme": scheme})
    elif status.kind == K.KIND_GAP:
        meters.source_gap().record(status.gap_ms / 1000, {"scheme": scheme})
