"""Frame decoding and resampling shared by ingest and the CLI. Pure functions, no I/O."""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from streamharness.errors import InvalidInput, TooLarge
from streamharness.v1 import common_pb2

_FORMATS = {common_pb2.IMAGE_ENCODING_JPEG: "JPEG", common_pb2.IMAGE_ENCODING_PNG: "PNG"}
_OPENERS = {common_pb2.IMAGE_ENCODING_JPEG: JpegImagePlugin.JpegImageFile, common_pb2.IMAGE_ENCODING_PNG: PngImagePlugin.PngImageFile}


def _sniff(data: bytes) -> str | None:
    """The format the bytes' signature names (for the error message), or None."""
    if data.startswith(b"\xff\xd8"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    return None


def decode_image(data: bytes, encoding: int, max_bytes: int, max_input_pixels: int | None = None) -> np.ndarray:
    """Decode a JPEG/PNG into RGB uint8. Truncated or damaged data is an error, not a half-grey
    frame: Pillow's strict load raises on a truncated file where libjpeg would pad it.

    The dimensions are read from the header first: an image whose header claims more than
    ``max_input_pixels`` (a decompression bomb: a few hundred bytes that say 20000x20000) is
    refused before a pixel buffer is allocated."""
    if not data:
        raise InvalidInput("frame has no image bytes")
    if len(data) > max_bytes:
        raise TooLarge(f"frame is {len(data)} bytes, above the limit of {max_bytes}")
    expected = _FORMATS.get(encoding)
    if expected is None:
        raise InvalidInput(f"unsupported image encoding {encoding}: send IMAGE_ENCODING_JPEG or IMAGE_ENCODING_PNG")
    try:
        # The format's own reader, not Image.open: it reads the header only, and leaves the pixel
        # limit to us (Image.open refuses only above Pillow's own, far larger, bound).
        try:
            img = _OPENERS[encoding](io.BytesIO(data))
        except (SyntaxError, OSError, ValueError, struct.error) as err:
            actual = _sniff(data)
            if actual is not None and actual != expected:
                raise InvalidInput(f"frame says {expected} but the bytes are {actual}") from None
            raise InvalidInput(f"cannot decode {expected} frame: {err if actual else 'the bytes are neither JPEG nor PNG'}") from None
        with img:
            width, height = img.size  # from the header; nothing decoded yet
            if max_input_pixels is not None and width * height > max_input_pixels:
                raise InvalidInput(f"frame header says {width}x{height} = {width * height} pixels, above the limit of "
                                   f"{max_input_pixels} (SH_INGEST_MAX_INPUT_PIXELS); not decoded")
            img.load()
            rgb = np.asarray(img.convert("RGB"))
    except InvalidInput:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInput(f"cannot decode {expected} frame: {err}") from None
    if rgb.ndim != 3 or rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise InvalidInput(f"frame of shape {rgb.shape} is too small (at least 8x8 pixels)")
    return rgb


def bound_pixels(rgb: np.ndarray, max_pixels: int) -> np.ndarray:
    """Scale down (keeping the aspect ratio) so that width*height <= max_pixels."""
    h, w = rgb.shape[:2]
    if h * w <= max_pixels:
        return rgb
    scale = math.sqrt(max_pixels / (h * w))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InvalidInput("frame could not be re-encoded as JPEG")
    return buf.tobytes()


@dataclass
class Resampler:
    """Keep the first frame of each 1/fps slot of media time; drop the rest.

    Runs on media time only, so a recorded stream replayed faster gives the same frames. A frame
    more than ``max_jump_ms`` after the previous one is refused and not recorded: one bad
    timestamp (ten years ahead) costs that frame, not the rest of the stream."""

    fps: float
    max_jump_ms: int | None = None
    last_ts_ms: int | None = None
    next_due_ms: float = -math.inf

    def __post_init__(self) -> None:
        if not 0 < self.fps <= 30:
            raise InvalidInput(f"decision_fps {self.fps} is out of range (0, 30]")

    def check_order(self, ts_ms: int) -> None:
        if ts_ms < 0:
            raise InvalidInput(f"media_ts_ms {ts_ms} is negative")
        if self.last_ts_ms is not None and ts_ms <= self.last_ts_ms:
            raise InvalidInput(f"media_ts_ms {ts_ms} is not after the previous frame's {self.last_ts_ms}")
        if self.last_ts_ms is not None and self.max_jump_ms is not None and ts_ms - self.last_ts_ms > self.max_jump_ms:
            raise InvalidInput(f"media_ts_ms {ts_ms} is {ts_ms - self.last_ts_ms} ms after the previous frame's {self.last_ts_ms}, "
                               f"more than the {self.max_jump_ms} ms a stream may jump (SH_INGEST_MAX_MEDIA_JUMP_MS); frame refused, the stream goes on")

    def keep(self, ts_ms: int) -> bool:
        """Call after check_order; records the frame as seen."""
        self.last_ts_ms = ts_ms
        if ts_ms < self.next_due_ms:
            return False
        step = 1000.0 / self.fps
        self.next_due_ms = (math.floor(ts_ms / step) + 1) * step
        return True
