"""Is a stream live? Shedding under lag (keep each stream's newest frame) only helps a stream sent
at the pace of its media time — a camera, a real-time replay — where a late frame is worth less
than the next one. A stream sent faster than real time (a recorded file, an evaluation replayed
at full speed) wants every frame decided the same way whatever the machine's load; lateness costs
it nothing. :class:`PaceTracker` tells them apart per (stream, session) from the first frame's
media time and wall stamp: once the media time runs ahead of the wall clock by more than
``SLACK_MS`` plus half again, the session counts as not live for good. A frame that carries its
pace (``FrameEvent.pace``: ingest sets it for pulled sources, a client may declare it in
``SessionStart.pace``) is not judged: within its first ``SLACK_MS`` of media time a fast replay
could not be told from a camera."""

from __future__ import annotations

from collections import OrderedDict

SLACK_MS = 5000
RATE = 1.5
MAX_SESSIONS = 100_000


class PaceTracker:
    """``live(stream, session, media_ts_ms, wall_ns)`` for the frames of many sessions (bounded)."""

    def __init__(self) -> None:
        self._first: OrderedDict[tuple[str, str], tuple[int, int, bool]] = OrderedDict()

    def live(self, stream: str, session: str, media_ts_ms: int, wall_ns: int, declared: int = 0) -> bool:
        """``declared``: the frame's ``Pace`` (``PACE_LIVE`` 1, ``PACE_REPLAY`` 2) when its sender or
        ingest said; it wins — a replay is never judged live in its first seconds."""
        if declared:
            return declared == 1
        key = (stream, session)
        first = self._first.get(key)
        if first is None:
            self._first[key] = first = (media_ts_ms, wall_ns, True)
            while len(self._first) > MAX_SESSIONS:
                self._first.popitem(last=False)
        media0, wall0, live = first
        if live and media_ts_ms - media0 > RATE * (wall_ns - wall0) / 1e6 + SLACK_MS:
            self._first[key] = (media0, wall0, False)  # faster than real time once: for good
            return False
        return live

    def forget(self, stream: str, session: str) -> None:
        self._first.pop((stream, session), None)
