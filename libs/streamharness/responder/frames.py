"""The responder's recent frames: a small ring per stream, fed by the ``frames`` topic, read when a
decision is answered (``SH_RESPONDER_FRAMES_PER_REQUEST`` > 0).

Keeping a frame is cheap (no decoding): a frame is decoded, scaled down to
``SH_RESPONDER_FRAME_MAX_PIXELS`` and re-encoded only when a prompt first takes it, and the result is
kept with it, so a frame sent with several prompts is prepared once and its bytes are the same each
time (a server's prefix cache hashes images by their bytes).

The rings are best effort, like the short-term memory they stand next to: they live in this process
only (a restart or a rebalance starts them empty; they fill again at the frame rate), and the
least recently updated stream is dropped past ``SH_RESPONDER_FRAME_STREAMS``.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from streamharness.generation import FrameImage
from streamharness.memory.timephrases import clock

log = logging.getLogger(__name__)


def prepare_jpeg(jpeg: bytes, max_pixels: int, quality: int) -> bytes:
    """The frame as it is sent: decoded (a frame that does not decode raises), scaled down to at most
    ``max_pixels`` pixels keeping its aspect ratio, as an RGB JPEG. A JPEG already within the bound is
    sent as it is."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        image.load()  # decodes all of it: a truncated or corrupt JPEG raises here
        width, height = image.size
        if width * height <= max_pixels and image.format == "JPEG" and image.mode in ("RGB", "L"):
            return jpeg
        rgb = image.convert("RGB")
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        w, h = max(1, int(width * scale)), max(1, int(height * scale))
        while w * h > max_pixels:  # floating-point rounding
            if w >= h:
                w -= 1
            else:
                h -= 1
        rgb = rgb.resize((w, h), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@dataclass
class _Frame:
    media_ts_ms: int
    session_id: str
    jpeg: bytes  # as consumed until prepared, then as sent
    prepared: bool = False
    bad: bool = False


class FrameRings:
    """The last ``per_stream`` frames of up to ``streams`` streams (keyed ``tenant/stream``), in
    media-time order. Thread-safe: the responder's consumer-group members share one."""

    def __init__(self, per_stream: int, streams: int, *, max_pixels: int, jpeg_quality: int) -> None:
        self.per_stream = per_stream
        self.streams = streams
        self.max_pixels = max_pixels
        self.jpeg_quality = jpeg_quality
        self._rings: OrderedDict[str, deque[_Frame]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._rings)

    def add(self, key: str, session_id: str, media_ts_ms: int, jpeg: bytes) -> bool:
        """Keep a frame (no decoding here). A frame at or before the stream's newest one of the same
        session (a redelivery) is dropped; a frame of another session starts the ring again. Returns
        whether it was kept."""
        if media_ts_ms < 0 or not jpeg:
            return False
        with self._lock:
            ring = self._rings.get(key)
            if ring is not None and ring and ring[-1].session_id != session_id:
                ring = None  # a new session of the stream: its media time starts again
            if ring is None:
                ring = self._rings[key] = deque(maxlen=self.per_stream)
            elif ring and media_ts_ms <= ring[-1].media_ts_ms:
                return False
            ring.append(_Frame(int(media_ts_ms), session_id, bytes(jpeg)))
            self._rings.move_to_end(key)
            while len(self._rings) > self.streams:
                self._rings.popitem(last=False)
            return True

    def images(self, key: str, session_id: str, up_to_ms: int, from_ms: int | None = None) -> list[FrameImage]:
        """The stream's frames in ``[from_ms, up_to_ms]`` (of ``session_id`` when it is given), oldest
        first, prepared to be sent; a frame that does not decode is skipped with a warning."""
        low = -(1 << 62) if from_ms is None else from_ms
        with self._lock:
            ring = self._rings.get(key)
            frames = [f for f in ring or () if low <= f.media_ts_ms <= up_to_ms and not f.bad
                      and (not session_id or not f.session_id or f.session_id == session_id)]
        out: list[FrameImage] = []
        for frame in frames:  # prepared outside the lock: other members keep taking frames meanwhile
            if not frame.prepared:
                try:
                    jpeg = prepare_jpeg(frame.jpeg, self.max_pixels, self.jpeg_quality)
                except Exception as err:  # noqa: BLE001 - one bad frame must not fail the response
                    log.warning("%s: skipping the frame at %s: it does not decode as an image (%r)",
                                key, clock(frame.media_ts_ms), err)
                    frame.bad = True
                    frame.jpeg = b""
                    continue
                frame.jpeg, frame.prepared = jpeg, True
            out.append(FrameImage(frame.media_ts_ms, frame.jpeg))
        return out
