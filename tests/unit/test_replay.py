"""The one replay loop: events in media order before the frame they are due at, the rest after the
last frame, frames paced on media time at the asked speed."""

from __future__ import annotations

import time

import pytest
from streamharness.media import sample_path
from streamharness.replay import EncodedFrame, encoded_frames, replay


def frames(*ts: int) -> list[EncodedFrame]:
    return [EncodedFrame(t, b"img") for t in ts]


def test_events_come_before_the_first_frame_at_or_after_their_time_and_late_ones_at_the_end():
    steps = list(replay(frames(0, 1000, 2000), [(1000, "ask"), (2500, "late"), (0, "first"), (1500, "mid")]))
    assert [(s.kind, s.media_ts_ms, s.item if s.kind == "event" else None) for s in steps] == [
        ("event", 0, "first"), ("frame", 0, None), ("event", 1000, "ask"), ("frame", 1000, None),
        ("event", 1500, "mid"), ("frame", 2000, None), ("event", 2500, "late"),
    ]
    assert list(replay([], [(5, "only")]))[0].item == "only"


def test_frames_are_paced_on_media_time_at_the_speed_asked():
    begin = time.monotonic()
    steps = list(replay(frames(0, 2000, 4000), speed=4.0))
    dues = [s.due - begin for s in steps]
    assert dues == pytest.approx([0.0, 0.5, 1.0], abs=0.05)
    assert all(s.due is None for s in replay(frames(0, 1000)))
    with pytest.raises(ValueError, match="negative"):
        list(replay(frames(0), speed=-1))


def test_a_real_video_becomes_jpeg_frames_at_the_rate_asked():
    got = list(encoded_frames(sample_path("vtest.avi"), fps=1.0, limit_s=3))
    assert [f.media_ts_ms // 1000 for f in got] == [0, 1, 2, 3]
    assert all(f.image[:2] == b"\xff\xd8" for f in got)
