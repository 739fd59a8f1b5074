"""One puller per pulled stream: open the source with PyAV, decode, sample frames to the decision
rate on media time, reconnect on drops, and say what happens in :class:`SourceStatus` messages.

Ingest runs :meth:`Puller.run` in a thread of the replica serving the session's IngestFrames call.
What the statuses mean (``common_pb2.SourceStatus.Kind``):

- ``CONNECTED``: the first decoded frame of a connection (``media_ts_ms``: its media time);
- ``RECONNECTING``: the source dropped (no packet for ``SH_SOURCE_READ_TIMEOUT_S``, the connection
  closed, a read failed); ``attempt`` n of the backoff, ``message`` says why;
- ``GAP``: back after a drop with media time missing: no frames for ``gap_ms`` before ``media_ts_ms``
  (a live source always, a file only if frames are really missing);
- ``ENDED``: a file or an upload reached its end; ``FAILED``: given up, with a google.rpc ``code``.

Failing rather than retrying: a source that never connected within ``SH_SOURCE_CONNECT_TIMEOUT_S``
(UNAVAILABLE), one that never gave a decodable frame within ``SH_SOURCE_FIRST_FRAME_TIMEOUT_S`` of
its first connect (INVALID_ARGUMENT), a URL the policy refuses (INVALID_ARGUMENT, PERMISSION_DENIED —
also at a reconnect: DNS rebinding), and a source offline ``SH_SOURCE_GIVE_UP_AFTER_S`` in a row
(UNAVAILABLE). A damaged packet is skipped (debug log), never the end of the stream.

Stopping: ``stop`` is checked between packets, in every http(s) read and during every wait; a
source that stalls holds the thread at most ``SH_SOURCE_CONNECT_TIMEOUT_S`` while connecting and
``SH_SOURCE_READ_TIMEOUT_S`` while reading (PyAV's interrupt callback ends FFmpeg's wait).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import av
import av.error
import grpc
import numpy as np

from streamharness.errors import DependencyUnavailable, InvalidInput, PermissionDenied, StreamHarnessError
from streamharness.sources.http_io import FirstFrameOverdue, HttpOpener, SourceStopped
from streamharness.sources.policy import check_url, redact
from streamharness.sources.settings import SourceSettings
from streamharness.sources.timeline import FileTimeline, LiveTimeline, Placed, ReorderBuffer, Sampler
from streamharness.sources.uploads import UPLOAD_OPEN_OPTIONS
from streamharness.v1 import common_pb2

log = logging.getLogger(__name__)
S = common_pb2.SourceStatus

LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps"})
# Live sources: probe briefly (RTSP's SDP and RTMP's metadata already name the codec); the
# defaults (5 s, 5 MB) would hold the first frame back for seconds.
_LIVE_PROBE = {"analyzeduration": "500000", "probesize": "500000"}

EmitFrame = Callable[[int, np.ndarray], None]
EmitStatus = Callable[[common_pb2.SourceStatus], None]


def rpc_code(code: grpc.StatusCode) -> int:
    """The google.rpc integer of a gRPC status code (14 for UNAVAILABLE)."""
    return int(code.value[0])


class _Failed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Drop(Exception):
    """The connection ended or broke; reconnect (or fail, before the first frame)."""


class _NoFirstFrame(Exception):
    pass


@dataclass
class _Outcome:
    ended: bool = False
    message: str = ""


class Puller:
    """Pulls one source. ``path``: a spooled upload (:class:`~streamharness.sources.uploads.UploadSpool`),
    read instead of ``source.url`` and not checked against the URL policy (it is a local file ingest
    wrote itself). Invalid arguments (decision rate, transport, speed) raise InvalidInput here."""

    def __init__(self, source: common_pb2.Source, decision_fps: float, settings: SourceSettings, *,
                 path: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.settings = settings
        self.path = Path(path) if path is not None else None
        self.clock = clock
        if self.path is None and not source.url:
            raise InvalidInput("the source has neither a url nor an upload")
        self.scheme = "upload" if self.path is not None else urlsplit(source.url).scheme.lower()
        self.url_shown = "" if self.path is not None else redact(source.url)
        self.transport = (source.rtsp_transport or "tcp").lower()
        if self.transport not in ("tcp", "udp"):
            raise InvalidInput(f"rtsp_transport {source.rtsp_transport!r} is neither 'tcp' nor 'udp'")
        if not source.speed >= 0:
            raise InvalidInput(f"speed {source.speed} is negative: 0 is as fast as it decodes, 1 real time")
        self.sampler = Sampler(decision_fps)  # InvalidInput outside (0, 30]
        self.live: bool | None = None if self.scheme not in LIVE_SCHEMES else True  # http(s): known once open
        self.frames = 0  # frames emitted
        self._decoded = 0  # frames placed on media time
        self._last_ms: int | None = None  # media time of the last frame decoded
        self._file_timeline = FileTimeline()
        self._live_timeline = LiveTimeline(jump_ms=int(settings.read_timeout_s * 1000))
        self._file_start_pts: int | None = None
        self._pace: tuple[float, int] | None = None  # (wall, media) the pacing of a file is anchored at

    # -- the loop ------------------------------------------------------------------------------
    def run(self, emit_frame: EmitFrame, emit_status: EmitStatus, stop: threading.Event) -> None:
        """Pull until ``stop`` is set, the file ends (ENDED) or the puller gives up (FAILED)."""
        try:
            outcome = self._run(emit_frame, emit_status, stop)
        except _Failed as failed:
            log.warning("source %s failed: %s", self.url_shown or "upload", failed)
            emit_status(self._status(S.KIND_FAILED, message=str(failed), code=rpc_code(failed.code)))
            return
        except Exception as err:  # a bug, not the source: fail the stream with what it was
            log.exception("puller of %s crashed", self.url_shown or "upload")
            emit_status(self._status(S.KIND_FAILED, message=f"the puller failed: {type(err).__name__}: {err}",
                                     code=rpc_code(grpc.StatusCode.INTERNAL)))
            return
        if outcome is not None and outcome.ended:
            emit_status(self._status(S.KIND_ENDED, message=outcome.message))

    def _run(self, emit_frame: EmitFrame, emit_status: EmitStatus, stop: threading.Event) -> _Outcome | None:
        started = self.clock()
        attempt = 0  # failed attempts since the last connection that gave frames
        offline_since: float | None = None  # when the current outage began
        while not stop.is_set():
            opened_at = self.clock()
            decoded_before = self._decoded
            try:
                container, opener = self._open(stop, time.monotonic() + self.settings.first_frame_timeout_s)
            except SourceStopped:
                return None
            except FirstFrameOverdue:  # still probing a stream that never decodes
                why = self._no_first_frame()
                if self._last_ms is None:
                    raise _Failed(grpc.StatusCode.INVALID_ARGUMENT, why) from None
            except PermissionDenied as err:  # also at a reconnect: the name now resolves somewhere forbidden
                raise _Failed(err.code, str(err)) from None
            except InvalidInput as err:
                if self._last_ms is None:
                    raise _Failed(err.code, str(err)) from None
                why = str(err)  # a name that stopped resolving may come back: retried until the give-up
            except av.error.ExitError:  # PyAV's open timeout interrupted FFmpeg
                why = (f"cannot open {self._shown()}: no answer within {self.settings.connect_timeout_s:g} s "
                       "(SH_SOURCE_CONNECT_TIMEOUT_S)")
            except (DependencyUnavailable, av.error.FFmpegError, OSError) as err:
                why = f"cannot open {self._shown()}: {self._describe(err)}"
            else:
                try:
                    return self._read(container, opener, emit_frame, emit_status, stop, opened_at,
                                      reconnect=self._last_ms is not None)
                except _NoFirstFrame:
                    why = self._no_first_frame()
                    if self._last_ms is None:
                        raise _Failed(grpc.StatusCode.INVALID_ARGUMENT, why) from None
                except _Drop as drop:
                    why = str(drop)
                finally:
                    self._close(container, opener)
            if stop.is_set():
                return None
            if self._last_ms is None:
                # The very first connect: retried within one SH_SOURCE_CONNECT_TIMEOUT_S window, then
                # given up on (a URL that never worked is a wrong URL more often than a late camera).
                left = self.settings.connect_timeout_s - (self.clock() - started)
                if left <= 0:
                    raise _Failed(grpc.StatusCode.UNAVAILABLE,
                                  f"{why} (the first connect was tried for {self.settings.connect_timeout_s:g} s, "
                                  "SH_SOURCE_CONNECT_TIMEOUT_S; a source that never connected is not retried further)")
                attempt += 1
                delay = min(self._backoff(attempt), left)
                log.debug("first connect to %s, attempt %d: %s; again in %.1f s", self._shown(), attempt, why, delay)
            else:
                if self._decoded > decoded_before or offline_since is None:
                    offline_since, attempt = self.clock(), 0  # this connection gave frames: a new outage
                attempt += 1
                offline = self.clock() - offline_since
                if offline >= self.settings.give_up_after_s:
                    raise _Failed(grpc.StatusCode.UNAVAILABLE,
                                  f"{self._shown()} has been offline for {offline:.0f} s (SH_SOURCE_GIVE_UP_AFTER_S "
                                  f"{self.settings.give_up_after_s:g}): {why}")
                delay = min(self._backoff(attempt), self.settings.give_up_after_s - offline)
                log.info("source %s: %s; reconnect attempt %d in %.1f s", self._shown(), why, attempt, delay)
                emit_status(self._status(S.KIND_RECONNECTING, attempt=attempt, message=f"{why}; reconnecting in {delay:.1f} s"))
            if stop.wait(delay):
                return None
            self._live_timeline.reconnected()
            self._file_timeline.reconnected()
        return None

    def _no_first_frame(self) -> str:
        return (f"{self._shown()} gave no decodable video frame within {self.settings.first_frame_timeout_s:g} s "
                "of connecting (SH_SOURCE_FIRST_FRAME_TIMEOUT_S): the stream may have no keyframe, or a codec "
                "FFmpeg cannot decode")

    def _backoff(self, attempt: int) -> float:
        """Exponential from SH_SOURCE_RECONNECT_INITIAL_S, capped at SH_SOURCE_RECONNECT_MAX_S, with
        jitter (half to all of it), so that cameras that dropped together do not come back together."""
        ceiling = min(self.settings.reconnect_max_s, self.settings.reconnect_initial_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    # -- one connection ------------------------------------------------------------------------
    def _open(self, stop: threading.Event, deadline: float):
        """(container, opener or None); the URL is checked first, every time (DNS rebinding).
        ``deadline`` (time.monotonic()): an http(s) source probed this long without a frame stops."""
        if self.path is not None:
            return av.open(str(self.path), mode="r", options=dict(UPLOAD_OPEN_OPTIONS)), None
        s = self.settings
        check_url(self.source.url, s)
        options: dict[str, str] = {}
        opener = None
        if self.scheme in ("rtsp", "rtsps"):
            # FFmpeg 5+ names the RTSP socket timeout `timeout` (µs; `stimeout` is gone).
            options |= {"rtsp_transport": self.transport, "timeout": str(int(s.read_timeout_s * 1e6))} | _LIVE_PROBE
        elif self.scheme in ("rtmp", "rtmps"):
            options |= {"rw_timeout": str(int(s.read_timeout_s * 1e6))} | _LIVE_PROBE
        else:
            opener = HttpOpener(s, stop)
            opener.deadline = deadline
            # HLS's persistent-connection path assumes FFmpeg's own HTTP client under the AVIOContext
            # (it asserts on ours); each playlist reload and segment is a request of its own.
            options |= {"http_persistent": "0"}
        try:
            container = av.open(self.source.url, mode="r", options=options, timeout=(s.connect_timeout_s, s.read_timeout_s),
                                io_open=opener)
        except BaseException as err:
            if opener is not None:
                opener.close()
                if opener.refused is not None:
                    raise opener.refused from None  # a redirect hop or a playlist entry the policy refuses
                if isinstance(err, (av.error.FFmpegError, OSError)) and opener.error is not None:
                    raise opener.error from None
            raise
        return container, opener

    @staticmethod
    def _close(container, opener) -> None:
        try:
            container.close()
        except Exception:  # closing a broken connection can fail; nothing is left to save
            log.debug("closing the source failed", exc_info=True)
        if opener is not None:
            opener.close()

    def _read(self, container, opener: HttpOpener | None, emit_frame: EmitFrame, emit_status: EmitStatus,
              stop: threading.Event, opened_at: float, *, reconnect: bool) -> _Outcome | None:
        if not container.streams.video:
            raise _Failed(grpc.StatusCode.INVALID_ARGUMENT, f"{self._shown()} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if self.settings.decode_threads:
            stream.codec_context.thread_count = self.settings.decode_threads
        if self.live is None:
            # An HLS playlist without an end (no duration) is live; any other http(s) resource is a file.
            self.live = container.format.name == "hls" and container.duration is None
        time_base = stream.time_base or Fraction(1, 1000)
        if not self.live:
            if self._file_start_pts is None:
                self._file_start_pts = stream.start_time or 0
            if reconnect and self._last_ms is not None:
                self._seek_near(container, stream, time_base, self._last_ms)
        reorder = None if self.live else ReorderBuffer()
        got_frame = False
        demux = container.demux(stream)
        while True:
            if stop.is_set():
                return None
            if opener is not None and opener.refused is not None:
                raise _Failed(opener.refused.code, str(opener.refused))
            if not got_frame and self.clock() - opened_at > self.settings.first_frame_timeout_s:
                raise _NoFirstFrame()
            try:
                packet = next(demux)
            except StopIteration:
                break
            except SourceStopped:
                return None
            except FirstFrameOverdue:
                raise _NoFirstFrame() from None
            except av.error.ExitError:
                raise _Drop(f"{self._shown()} sent nothing for {self.settings.read_timeout_s:g} s (SH_SOURCE_READ_TIMEOUT_S)") from None
            except (av.error.FFmpegError, OSError) as err:
                error = opener.take_error() if opener is not None else None
                if self.live or error is not None:
                    raise _Drop(f"{self._shown()} dropped: {self._describe(error or err)}") from None
                return self._damaged(err)  # a file that cannot be read on: its data, not the network
            if opener is not None and opener.error is not None:
                # A read failed and FFmpeg went on (it may seek past the hole): reconnect and resume
                # from the last frame decoded, rather than lose what the failed read held.
                raise _Drop(f"{self._shown()} dropped: {self._describe(opener.take_error())}")
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:
                log.debug("source %s: skipping a damaged packet at %s: %s", self._shown(), packet.pts, err)
                continue
            for frame in frames:
                if not got_frame and opener is not None:
                    opener.deadline = None
                got_frame = True  # decodable (frames skipped after a resume count: they prove it)
                pts = frame.pts if frame.pts is not None else frame.dts
                for pts, item in ([(pts, frame)] if reorder is None else reorder.push(pts, frame)):
                    self._handle(item, pts, time_base, emit_frame, emit_status, stop, reconnect)
        if reorder is not None:
            for pts, item in reorder.drain():
                self._handle(item, pts, time_base, emit_frame, emit_status, stop, reconnect)
        if opener is not None and opener.refused is not None:
            raise _Failed(opener.refused.code, str(opener.refused))
        error = opener.take_error() if opener is not None else None
        if self.live or error is not None:
            raise _Drop(f"{self._shown()} dropped: {self._describe(error)}" if error is not None
                        else f"{self._shown()} closed the connection")
        if self._last_ms is None:
            raise _Failed(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{self._shown()} ended without a decodable video frame (no keyframe, or a codec FFmpeg cannot decode)")
        return _Outcome(ended=True, message=f"the end of {self._shown()} at media time {self._last_ms} ms")

    def _damaged(self, err: BaseException) -> _Outcome:
        if self._last_ms is None:
            raise _Failed(grpc.StatusCode.INVALID_ARGUMENT, f"{self._shown()} cannot be read: {self._describe(err)}")
        log.warning("source %s cannot be read after %d ms: %s; ending it there", self._shown(), self._last_ms, err)
        return _Outcome(ended=True, message=f"{self._shown()} is damaged after media time {self._last_ms} ms "
                                            f"({self._describe(err)}); it ends there")

    def _seek_near(self, container, stream, time_base: Fraction, media_ms: int) -> None:
        """Resume a file just before where it dropped (the keyframe at or before it); the timeline
        skips what was already decoded. Without a seekable source it decodes again from the start."""
        target = int((self._file_start_pts or 0) + Fraction(media_ms, 1000) / time_base)
        try:
            container.seek(target, backward=True, any_frame=False, stream=stream)
        except (av.error.FFmpegError, OSError) as err:
            log.info("source %s: cannot seek to %d ms (%s); decoding again from the start", self._shown(), media_ms, err)

    def _handle(self, frame, pts: int | None, time_base: Fraction, emit_frame: EmitFrame, emit_status: EmitStatus,
                stop: threading.Event, reconnect: bool) -> None:
        """Place one decoded frame on media time, report a (re)connection, pace, emit if sampled."""
        placed: Placed | None
        if self.live:
            placed = self._live_timeline.place(None if pts is None else int(round(pts * time_base * 1000)), self.clock())
        else:
            placed = self._file_timeline.place(None if pts is None else int(round((pts - (self._file_start_pts or 0)) * time_base * 1000)))
            if placed is None:
                return  # already decoded before the drop, or out of order
        media = placed.media_ts_ms
        self._decoded += 1
        if placed.first_of_connection:
            extra = f", {self.transport}" if self.scheme in ("rtsp", "rtsps") else ""
            emit_status(self._status(S.KIND_CONNECTED, media_ts_ms=media,
                                     message=f"connected to {self._shown()} ({frame.width}x{frame.height}{extra})"))
            if reconnect and placed.gap_ms > 0:
                emit_status(self._status(S.KIND_GAP, media_ts_ms=media, gap_ms=placed.gap_ms,
                                         message=f"no frames for {placed.gap_ms} ms of media time before {media} ms (the source was away)"))
            self._pace = (self.clock(), media)
        self._last_ms = media
        if self.sampler.keep(media):
            if not self.live and self.source.speed > 0 and self._pace is not None:
                wall, base = self._pace
                wait = wall + (media - base) / 1000.0 / self.source.speed - self.clock()
                if wait > 0 and stop.wait(wait):
                    return
            self.frames += 1
            emit_frame(media, frame.to_ndarray(format="rgb24"))

    # -- messages ------------------------------------------------------------------------------
    def _shown(self) -> str:
        return self.url_shown or "the upload"

    def _describe(self, err: BaseException | None) -> str:
        if err is None:
            return "unknown error"
        if isinstance(err, av.error.FFmpegError) and err.strerror:
            text = err.strerror
        elif isinstance(err, StreamHarnessError):
            text = str(err)
        else:
            text = str(err) or type(err).__name__
        if self.source.url and self.source.url in text:
            text = text.replace(self.source.url, self.url_shown)  # never the credentials
        return text

    def _status(self, kind: int, **fields) -> common_pb2.SourceStatus:
        fields.setdefault("media_ts_ms", self._last_ms or 0)
        return S(kind=kind, url=self.url_shown, frames=self.frames, **fields)
