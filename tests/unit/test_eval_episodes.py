"""The episode set the project ships: hand-annotated opencv-doc episodes and generated synthetic ones."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import pytest

from streamharness.eval.episode import MODES, POSITIONS, Episode, load_episode
from streamharness.eval.episodes_builtin import (
    SHIPPED_DIR,
    build_builtin_set,
    generate_synthetic,
    plan_synthetic,
    resolve_video,
    shipped_episodes,
)
from streamharness.media import read_video

ALL_CELLS = {(m, p) for m in MODES for p in POSITIONS}


def test_shipped_episodes_validate_and_resolve_to_real_videos():
    files = sorted(SHIPPED_DIR.glob("*.json"))
    assert len(files) >= 5
    episodes = shipped_episodes()
    assert {e.episode_id for e in episodes} == {load_episode(f).episode_id for f in files}
    for ep in episodes:
        assert ep.source == "opencv-doc" and ep.video.startswith("opencv-doc:")
        path = resolve_video(ep)
        assert path.is_file() and path.stat().st_size > 0, path
        frames = list(read_video(path, fps=1.0))
        # the annotated duration matches the real media time within a second
        assert abs(frames[-1].media_ts_ms / 1000.0 - ep.duration_s) <= 1.5, ep.episode_id
        for e in ep.events:
            for t0, t1 in e.windows:
                assert t1 <= ep.duration_s + 1e-6, (ep.episode_id, e.event_id)


def test_shipped_set_covers_the_interaction_modes():
    cells = {(e.mode, e.position) for ep in shipped_episodes() for e in ep.events}
    assert {m for m, _ in cells} == set(MODES)
    vtest = next(ep for ep in shipped_episodes() if ep.episode_id == "opencv-doc-vtest")
    walk_in = vtest.event("walks-in")
    assert walk_in.mode == "proactive" and walk_in.windows[0][0] == 0.0  # people are in view from the start
    assert vtest.event("seen-30s-ago").position == "backward"


def test_megamind_black_first_frame_is_annotated_from_the_video():
    ep = next(ep for ep in shipped_episodes() if ep.episode_id == "opencv-doc-megamind")
    first = next(read_video(resolve_video(ep)))
    assert first.rgb.mean() < 5  # the fact the "first-frame" question rests on
    q = ep.event("first-frame")
    assert q.choices[q.answer_index] == "a black screen"


def test_resolve_video_passes_plain_paths_through(tmp_path):
    ep = Episode(episode_id="x", video="clip.mp4", duration_s=1.0, source="synthetic")
    assert resolve_video(ep, tmp_path) == tmp_path / "clip.mp4"


def test_synthetic_episode_renders_frames_and_covers_all_nine_cells(tmp_path):
    path = generate_synthetic(tmp_path / "syn", 300, seed=3)
    ep = load_episode(path)
    frames = sorted((tmp_path / "syn" / "frames").glob("*.jpg"))
    assert len(frames) == 300 == ep.duration_s
    assert frames[0].name == "000000.jpg" and frames[-1].name == "299000.jpg"
    img = cv2.imread(str(frames[0]))
    assert img.shape == (120, 160, 3)
    assert ep.video_path(path.parent).is_dir()
    assert {(e.mode, e.position) for e in ep.events} == ALL_CELLS
    assert ep.source == "synthetic"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_every_seed_covers_all_nine_cells(seed):
    _, ep = plan_synthetic(600, seed)
    assert {(e.mode, e.position) for e in ep.events} == ALL_CELLS


def test_ground_truth_matches_what_is_drawn(tmp_path):
    path = generate_synthetic(tmp_path, 300, seed=1)
    ep = load_episode(path)
    segs, _ = plan_synthetic(300, 1)
    q = ep.event("b0-shape-now")
    t = int(q.ask_at_s)
    seg = next(s for s in segs if s.start_s <= t < s.end_s)
    assert q.choices[q.answer_index] == seg.shape
    # the drawn colour at the centre of the frame is the segment's colour
    from streamharness.eval.episodes_builtin import COLOURS

    bgr = cv2.imread(str(tmp_path / "frames" / f"{t * 1000:06d}.jpg"))[56, 80]
    want = COLOURS[seg.colour][::-1]
    assert max(abs(int(a) - int(b)) for a, b in zip(bgr, want)) < 40, (bgr, seg.colour)
    back = ep.event("b0-colour-30s-ago")
    then = next(s for s in segs if s.start_s <= back.ask_at_s - 30 < s.end_s)
    assert back.choices[back.answer_index] == then.colour


def test_multi_hour_plan_without_rendering():
    segs, ep = plan_synthetic(7200, 0)
    assert ep.duration_s == 7200.0 and segs[0].start_s == 0.0 and segs[-1].end_s == 7200.0
    assert all(a.end_s == b.start_s for a, b in zip(segs, segs[1:]))
    per_cell = Counter((e.mode, e.position) for e in ep.events)
    assert set(per_cell) == ALL_CELLS and min(per_cell.values()) >= 10  # 24 blocks of 5 minutes
    late = [e for e in ep.events if e.event_id.endswith("first-label") and e.at_s > 7000]
    assert late and late[0].choices[late[0].answer_index] == segs[0].label  # memory over ~2 hours


def test_synthetic_refuses_too_short():
    with pytest.raises(ValueError, match="at least"):
        plan_synthetic(60, 0)


def test_build_builtin_set_is_resumable(tmp_path):
    paths = build_builtin_set(tmp_path, short_duration_s=300, long_duration_s=0)
    assert len(paths) == len(shipped_episodes()) + 1
    for p in paths:
        ep = load_episode(p)
        assert ep.video_path(p.parent).exists(), p
    frames = sorted((tmp_path / "synthetic-300s-seed0" / "frames").glob("*.jpg"))
    mtime = frames[10].stat().st_mtime_ns
    again = build_builtin_set(tmp_path, short_duration_s=300, long_duration_s=0)
    assert again == paths and frames[10].stat().st_mtime_ns == mtime
    assert json.loads(paths[-1].read_text())["source"] == "synthetic"
