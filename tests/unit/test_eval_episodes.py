"""The episode set the project ships: hand-annotated opencv-doc episodes and generated synthetic ones."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pytest

from streamharness.eval.episode import MODES, POSITIONS, Episode, load_episode, load_episodes
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


def test_shipped_set_covers_all_nine_cells_at_least_twice():
    per_cell = Counter((e.mode, e.position) for ep in shipped_episodes() for e in ep.events)
    assert set(per_cell) == ALL_CELLS, sorted(ALL_CELLS - set(per_cell))
    assert min(per_cell.values()) >= 2, per_cell
    # every episode has events in more than one cell, not one clip per cell
    assert all(len({(e.mode, e.position) for e in ep.events}) >= 3 for ep in shipped_episodes())


def test_docs_table_of_shipped_cells_is_current():
    doc = (SHIPPED_DIR.parents[1] / "docs" / "eval.md").read_text(encoding="utf-8")
    header = next(line for line in doc.splitlines() if line.startswith("| cell |"))
    episodes = ["opencv-doc-" + name.strip() for name in header.strip("|").split("|")[1:]]
    table = {}
    for line in doc.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) == len(episodes) + 1 and " × " in cols[0]:
            mode, position = cols[0].split(" × ")
            for ep_id, ids in zip(episodes, cols[1:]):
                table[(ep_id, mode, position)] = sorted(i.strip(" `") for i in ids.split(",") if i.strip())
    shipped = {ep.episode_id: ep for ep in shipped_episodes()}
    assert sorted(episodes) == sorted(shipped)
    for ep_id in episodes:
        for m, p in ALL_CELLS:
            want = sorted(e.event_id for e in shipped[ep_id].events if (e.mode, e.position) == (m, p))
            assert table.get((ep_id, m, p)) == want, (ep_id, m, p)


def test_shipped_windows_follow_their_position():
    """present: the answer is due from the moment of the ask; forward: only once what was asked about
    has happened (a punctual forward question's window opens after it is asked); backward: answered
    from the ask on, about what came before."""
    for ep in shipped_episodes():
        for e in ep.events:
            starts = [t0 for t0, _ in e.windows]
            assert starts and min(starts) >= e.at_s, (ep.episode_id, e.event_id)
            if e.position == "present":
                assert starts[0] == e.at_s, (ep.episode_id, e.event_id)
            if e.position == "forward" and e.type == "question":
                assert starts[0] > e.at_s, (ep.episode_id, e.event_id)
            if e.type == "question" and e.position == "backward":
                assert starts[0] == e.at_s, (ep.episode_id, e.event_id)


def test_tree_hand_events_are_annotated_from_the_video():
    ep = next(ep for ep in shipped_episodes() if ep.episode_id == "opencv-doc-tree")
    frames = list(read_video(resolve_video(ep)))
    grey = [cv2.cvtColor(f.rgb, cv2.COLOR_RGB2GRAY).astype(float) for f in frames]
    still = np.median([g for f, g in zip(frames, grey) if f.media_ts_ms < 20000], axis=0)

    def changed(g):  # fraction of pixels far from the still view
        return float((abs(g - still) > 40).mean())

    appears = ep.event("hand-appears").windows[0][0]
    before = [changed(g) for f, g in zip(frames, grey) if f.media_ts_ms / 1000.0 <= appears]
    after = [changed(g) for f, g in zip(frames, grey) if f.media_ts_ms / 1000.0 > appears + 0.5]
    assert before and after and max(before) < 0.08 < 0.1 < min(after)  # the view changes only when the hand comes in
    assert ep.event("hand-10s-ago").ask_at_s - 10.0 < appears  # ten seconds before the ask, no hand yet
    assert ep.event("hand-now").given_at_s > appears and ep.event("hand-still").ask_at_s > appears


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


def test_withdrawal_must_follow_the_instruction_and_its_windows():
    from streamharness.eval.episode import EpisodeFormatError, parse_episode

    base = {"episode_id": "w", "video": "v.mp4", "duration_s": 60, "source": "synthetic", "events": [
        {"type": "instruction", "event_id": "i", "given_at_s": 10, "text": "tell me when a cup appears",
         "windows": [[20, 25]], "mode": "proactive", "position": "forward", "withdrawn_at_s": 30}]}
    assert parse_episode(base).instructions[0].withdrawn_at_s == 30
    for bad, message in ((5, "after given_at_s"), (22, "end after the instruction is withdrawn")):
        raw = {**base, "events": [{**base["events"][0], "withdrawn_at_s": bad}]}
        with pytest.raises(EpisodeFormatError, match=message):
            parse_episode(raw)


def test_synthetic_blocks_withdraw_their_instructions_so_few_stand_at_once():
    _, ep = plan_synthetic(7200, seed=0)
    assert all(i.withdrawn_at_s is not None for i in ep.instructions)
    for t in range(0, 7200, 60):
        standing = [i for i in ep.instructions if i.given_at_s <= t < i.withdrawn_at_s]
        assert len(standing) <= 8, (t, [i.event_id for i in standing])


def test_a_built_set_loads_from_its_folder_and_every_video_resolves(tmp_path):
    """What the in-process Job does: build the set into a folder, then run the folder."""
    build_builtin_set(tmp_path / "set", short_duration_s=300, long_duration_s=0, seed=3)
    eps = load_episodes(tmp_path / "set")  # nested: opencv-doc/*.json and synthetic-300s-seed3/episode.json
    ids = {e.episode_id for e in eps}
    assert "synthetic-300s-seed3" in ids and {e.episode_id for e in shipped_episodes()} <= ids
    for ep in eps:
        # The caller's base_dir (the set's top folder) must not win over the episode file's own folder.
        assert resolve_video(ep, tmp_path / "set").exists(), ep.episode_id
    synthetic = next(e for e in eps if e.source == "synthetic")
    assert resolve_video(synthetic, tmp_path) == tmp_path / "set" / "synthetic-300s-seed3" / "frames"
