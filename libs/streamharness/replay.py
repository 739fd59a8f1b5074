"""Playing recorded media on media time: one replay loop for every client of the pipeline — the
player (``streamharness stream`` / ``up``), the Streaming-Eval runners (through a gateway and on the
local host) and the encoder check (``streamharness dev encode-video``).

:func:`encoded_frames` turns a video file (decoded, re-encoded as JPEG once, here) or a folder of
``<ms>.jpg|png`` frames (sent as they are) into timestamped encoded frames; :func:`replay` merges
them with timed events (questions, instruction changes) in media order — an event due at or before
a frame's time comes before that frame, the ones due after the last frame come at the end — and
paces frames on media time (``speed`` 1 = real time, N = N× faster, 0 = as fast as taken). A step
carries the monotonic time it is due at; sync callers :meth:`Step.wait`, async ones ``await
Step.await_due()``, so the same loop serves threads and asyncio.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Literal, TypeVar

from streamharness.ingest.frames import encode_jpeg
from streamharness.media import read_video

E = TypeVar("E")
JPEG_QUALITY = 90
_FRAME_NAME = re.compile(r"^(\d+)\.(jpe?g|png)$", re.IGNORECASE)


@dataclass(frozen=True)
class EncodedFrame:
    media_ts_ms: int
    image: bytes  # JPEG or PNG bytes, as a client sends them


def encoded_frames(source: Path, fps: float | None = None, limit_s: float | None = None) -> Iterator[EncodedFrame]:
    """Frames of a video file or of a folder of ``<ms>.jpg|png`` frames, at most ``fps`` per media
    second (None: all), up to ``limit_s`` of media time (None: all)."""
    limit_ms = None if limit_s is None else limit_s * 1000
    if source.is_dir():
        frames = sorted((int(m.group(1)), p) for p in source.iterdir() if (m := _FRAME_NAME.match(p.name)))
        next_ms = 0.0
        for ts, path in frames:
            if limit_ms is not None and ts > limit_ms:
                return
            if fps and ts < next_ms:
                continue
            next_ms = ts + 1000.0 / fps if fps else 0.0
            yield EncodedFrame(ts, path.read_bytes())
        return
    for frame in read_video(source, fps=fps):
        if limit_ms is not None and frame.media_ts_ms > limit_ms:
            return
        yield EncodedFrame(frame.media_ts_ms, encode_jpeg(frame.rgb, JPEG_QUALITY))


@dataclass(frozen=True)
class Step(Generic[E]):
    kind: Literal["event", "frame"]
    media_ts_ms: int
    item: EncodedFrame | E
    due: float | None = None  # monotonic time to send at; None: now

    def delay(self) -> float:
        return 0.0 if self.due is None else max(0.0, self.due - time.monotonic())

    def wait(self) -> None:
        time.sleep(self.delay())

    async def await_due(self) -> None:
        await asyncio.sleep(self.delay())


def replay(frames: Iterable[EncodedFrame], events: Iterable[tuple[int, E]] = (), *, speed: float = 0.0) -> Iterator[Step[E]]:
    """``frames`` (in media order) and ``events`` (``(media_ts_ms, event)``, any order) merged on
    media time; frames paced at ``speed`` from the moment the first step is taken."""
    if speed < 0:
        raise ValueError(f"speed {speed} is negative (0 = as fast as possible)")
    pending = sorted(events, key=lambda e: e[0])
    start: float | None = None
    for frame in frames:
        if start is None:
            start = time.monotonic()
        while pending and pending[0][0] <= frame.media_ts_ms:
            ts, event = pending.pop(0)
            yield Step("event", ts, event)
        due = start + frame.media_ts_ms / 1000 / speed if speed > 0 else None
        yield Step("frame", frame.media_ts_ms, frame, due)
    for ts, event in pending:
        yield Step("event", ts, event)
