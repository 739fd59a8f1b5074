"""Media time of pulled frames, and what a drop looks like in it. Pure logic, no I/O: the puller
feeds it presentation timestamps and wall-clock readings, the unit tests feed it made-up ones.

**Files** (an http(s) video file, an upload): a frame's media time is its presentation time in
milliseconds from the start of the stream, exactly, so that an upload, the same file over HTTP, and
``streamharness.media.read_video`` on the file keep the same frames at a given decision rate. After
a reconnect (an HTTP file that dropped mid-way) frames at or before the last media time are skipped;
a gap is reported only if frames are really missing.

**Live** (RTSP, RTMP, a live HLS playlist): the first frame is media time 0; within one connection
media time advances with the presentation timestamps; a new connection's first frame is placed at
the wall time elapsed since the first connection's first frame (the anchor), so an outage shows as
missing media time (a gap), never papered over. Media time strictly increases.
"""

from __future__ import annotations

import heapq
import statistics
from collections import deque
from dataclasses import dataclass, field

from streamharness.ingest.frames import Resampler


@dataclass(frozen=True)
class Placed:
    """Where a decoded frame goes: its media time, and the gap before it (0: none)."""

    media_ts_ms: int
    gap_ms: int = 0
    first_of_connection: bool = False


class FileTimeline:
    """Media time = presentation time since the stream's start; frames already seen are skipped."""

    def __init__(self) -> None:
        self.last_ms: int | None = None
        self._steps: deque[int] = deque(maxlen=32)  # recent distances between frames
        self._resumed = False

    def reconnected(self) -> None:
        self._resumed = True

    def place(self, pts_ms: int | None) -> Placed | None:
        """None: drop the frame (no timestamp, or not after the last one: already seen before a
        reconnect, or a damaged file's frame out of order)."""
        if pts_ms is None or (self.last_ms is not None and pts_ms <= self.last_ms):
            return None
        placed = Placed(pts_ms, 0, self.last_ms is None)
        if self.last_ms is not None:
            delta = pts_ms - self.last_ms
            if self._resumed:
                # Resumed where it dropped: frames are missing only if this one is clearly further on
                # than the usual distance between frames.
                typical = statistics.median(self._steps) if self._steps else None
                placed = Placed(pts_ms, delta if typical is not None and delta > 1.5 * typical + 1 else 0, True)
            else:
                self._steps.append(delta)
        self._resumed = False
        self.last_ms = pts_ms
        return placed


class LiveTimeline:
    """Media time of a live source: presentation time within a connection, wall time across them.

    ``jump_ms``: a presentation timestamp that moves back, or forward by more than this, within one
    connection (the camera restarted its clock) re-anchors on wall time, as a reconnect does."""

    def __init__(self, jump_ms: int = 10_000) -> None:
        self.jump_ms = jump_ms
        self.anchor_wall_s: float | None = None  # wall time of the stream's first frame (media time 0)
        self.last_ms: int | None = None
        self._new_connection = True
        self._base_ms = 0  # media time at the segment's start (a connection, or after a clock jump)
        self._base_pts_ms: int | None = None  # its presentation time; None: the source gives none
        self._base_wall_s = 0.0
        self._last_pts_ms: int | None = None

    def reconnected(self) -> None:
        self._new_connection = True

    def _wall_ms(self, now_s: float) -> int:
        assert self.anchor_wall_s is not None
        return int(round((now_s - self.anchor_wall_s) * 1000))

    def place(self, pts_ms: int | None, now_s: float) -> Placed:
        if self.anchor_wall_s is None:  # the stream's very first frame
            self.anchor_wall_s = now_s
            self._restart(0, pts_ms, now_s)
            self.last_ms = 0
            self._new_connection = False
            return Placed(0, 0, True)
        assert self.last_ms is not None
        if self._new_connection:  # a new connection's first frame: wall time since the anchor
            self._new_connection = False
            media = max(self._wall_ms(now_s), self.last_ms + 1)
            gap = media - self.last_ms
            self._restart(media, pts_ms, now_s)
            self.last_ms = media
            return Placed(media, gap, True)
        if pts_ms is None or self._base_pts_ms is None:
            media = self._base_ms + int(round((now_s - self._base_wall_s) * 1000))
            if pts_ms is not None:  # timestamps from here on: follow them
                self._restart(max(media, self.last_ms + 1), pts_ms, now_s)
        else:
            step = pts_ms - (self._last_pts_ms if self._last_pts_ms is not None else pts_ms)
            if step < 0 or step > self.jump_ms:
                self._restart(max(self._wall_ms(now_s), self.last_ms + 1), pts_ms, now_s)
            media = self._base_ms + (pts_ms - self._base_pts_ms)
            self._last_pts_ms = pts_ms
        media = max(media, self.last_ms + 1)
        self.last_ms = media
        return Placed(media)

    def _restart(self, base_ms: int, pts_ms: int | None, now_s: float) -> None:
        self._base_ms = base_ms
        self._base_pts_ms = pts_ms
        self._base_wall_s = now_s
        self._last_pts_ms = pts_ms


@dataclass
class ReorderBuffer:
    """Hands frames back in presentation order, ``depth`` frames late. Some files are muxed with
    a reorder depth smaller than their B-frames need (opencv-doc's box.mp4): the decoder then
    returns frames out of presentation order, and without this those frames would be dropped."""

    depth: int = 4
    _heap: list = field(default_factory=list)
    _seq: int = 0

    def push(self, pts_ms: int | None, item) -> list:
        if pts_ms is None:
            return [(pts_ms, item)]
        heapq.heappush(self._heap, (pts_ms, self._seq, item))
        self._seq += 1
        out = []
        while len(self._heap) > self.depth:
            ts, _, it = heapq.heappop(self._heap)
            out.append((ts, it))
        return out

    def drain(self) -> list:
        out = []
        while self._heap:
            ts, _, it = heapq.heappop(self._heap)
            out.append((ts, it))
        return out

    def clear(self) -> None:
        self._heap.clear()


class Sampler:
    """The first frame of each 1/fps slot of media time: the rule of ingest's resampler
    (:class:`streamharness.ingest.frames.Resampler`), so a pulled stream keeps the frames a pushed
    one with the same timestamps would."""

    def __init__(self, fps: float) -> None:
        self._resampler = Resampler(fps)

    def keep(self, media_ts_ms: int) -> bool:
        return self._resampler.keep(media_ts_ms)
