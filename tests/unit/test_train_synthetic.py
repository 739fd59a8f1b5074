"""Synthetic training streams: determinism, regeneration alone, resume, ground truth against the
pixels, and responses that follow from the states (checked by an oracle written here, from the
texts alone)."""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamharness.eval import episodes_builtin
from streamharness.train import synthetic as syn
from streamharness.train.convert import to_steps
from streamharness.train.samples import StreamSample
from streamharness.train.synthetic import (
    batch_stream,
    draw_frame,
    frame_name,
    plan_stream,
    read_samples,
    render_stream,
    states_of,
    stream_id,
    synthesize,
)

SEED = 1  # streams 0..3: multi, multi, single, single
STREAMS, DURATION = 4, 90


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("batch")
    synthesize(out, STREAMS, DURATION, SEED, progress=False)
    return out


@pytest.fixture(scope="module")
def planned() -> list[tuple[list[syn.State], StreamSample]]:
    """Many streams planned without drawing (cheap), for the dialogue checks."""
    return [plan_stream(d, seed, style) for seed in range(40) for d, style in
            ((300, "single"), (300, "multi"), (120, "mixed"))]


# -- the files --------------------------------------------------------------------------------------
def test_layout_and_samples_validate(batch):
    lines = (batch / "samples.jsonl").read_text().splitlines()
    assert len(lines) == STREAMS and not (batch / "samples.jsonl.tmp").exists()
    samples = [StreamSample.model_validate_json(line) for line in lines]
    assert samples == read_samples(batch / "samples.jsonl")
    assert {s.metadata["style"] for s in samples} == {"single", "multi"}
    for i, s in enumerate(samples):
        assert s.sample_id == stream_id(SEED, i) and s.source == "synthetic" and s.split == "train"
        assert s.video_path == f"streams/{s.sample_id}/frames" and s.duration_s == DURATION
        assert s.metadata["seed"] == syn.stream_seed(SEED, i) and s.metadata["requested_style"] == "mixed"
        assert s.metadata["batch_seed"] == SEED and s.metadata["index"] == i
        frames = sorted(p.name for p in s.resolve_video(batch).iterdir())
        assert frames == [frame_name(t) for t in range(DURATION)]
        assert frames[:2] == ["000000.jpg", "001000.jpg"]
        img = cv2.imread(str(s.resolve_video(batch) / frames[0]))
        assert img.shape == (120, 160, 3)
        states = states_of(s)
        assert [st.t for st in states] == list(range(DURATION))


def test_same_seed_same_bytes_other_seed_differs(batch, tmp_path):
    synthesize(tmp_path / "again", STREAMS, DURATION, SEED, progress=False)
    assert _tree(tmp_path / "again") == _tree(batch)
    synthesize(tmp_path / "other", STREAMS, DURATION, SEED + 1, progress=False)
    other = _tree(tmp_path / "other")
    assert other["samples.jsonl"] != _tree(batch)["samples.jsonl"]
    mine = [v for k, v in _tree(batch).items() if k.endswith(".jpg")]
    theirs = [v for k, v in other.items() if k.endswith(".jpg")]
    assert len(set(mine) ^ set(theirs)) > DURATION  # most frames differ


def test_each_stream_regenerated_alone_equals_its_part_of_the_batch(batch, tmp_path):
    lines = (batch / "samples.jsonl").read_text().splitlines()
    for i in (3, 0):
        states, sample = batch_stream(i, DURATION, SEED)
        assert sample.model_dump_json() == lines[i]
        assert render_stream(tmp_path / sample.video_path, states) == DURATION
        assert _tree(tmp_path / sample.video_path) == _tree(sample.resolve_video(batch))
        assert states_of(sample) == states


def test_resume_keeps_frames_and_redraws_the_missing(tmp_path):
    out = tmp_path / "resume"
    synthesize(out, 2, 40, SEED, progress=False)
    before = _tree(out)
    frames = sorted(out.rglob("*.jpg"))
    deleted = frames[::7]
    for p in deleted:
        p.unlink()
    kept = {p: p.stat().st_mtime_ns for p in frames if p not in deleted}
    (out / "samples.jsonl").write_text("stale\n")
    synthesize(out, 2, 40, SEED, progress=False)
    assert _tree(out) == before
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # untouched
    assert not list(out.rglob("*.part")) and not (out / "samples.jsonl.tmp").exists()


def test_workers_and_progress_give_the_same_bytes(tmp_path):
    synthesize(tmp_path / "one", 3, 20, 5, progress=True)
    synthesize(tmp_path / "two", 3, 20, 5, progress=False, workers=2)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")


def test_bad_arguments():
    with pytest.raises(ValueError, match="style"):
        plan_stream(30, 0, "sparse")
    with pytest.raises(ValueError):
        plan_stream(0, 0)
    with pytest.raises(ValueError):
        synthesize("/nonexistent/never", -1, 10, 0, progress=False)


# -- the look and the ground truth in the pixels ----------------------------------------------------
def test_palette_and_look_are_the_evaluation_episodes():
    assert syn.COLOURS == episodes_builtin.COLOURS and syn.SHAPES == episodes_builtin.SHAPES
    assert syn.LABELS == episodes_builtin.LABELS and syn.FRAME_SIZE == episodes_builtin.FRAME_SIZE
    states, _ = plan_stream(120, 4, "single")
    for st in states:
        (o,) = st.objects
        seg = episodes_builtin.Segment(0.0, 1.0, o.shape, o.colour, st.label)
        nxt = episodes_builtin.Segment(1.0, 2.0, st.next_shape, "red", "ALPHA") if st.next_shape else None
        assert np.array_equal(draw_frame(st), episodes_builtin._draw(seg, nxt, st.t)), st.t


def _components(img: np.ndarray, colour: str) -> list[tuple[float, float]]:
    """Centres of the bounding boxes of the blobs of one palette colour."""
    bgr = np.array(syn.COLOURS[colour][::-1], np.int16)
    mask = (np.abs(img.astype(np.int16) - bgr).max(axis=2) <= 50).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return [(x + (w - 1) / 2, y + (h - 1) / 2) for x, y, w, h, area in stats[1:n] if area >= 150]


def test_ground_truth_matches_the_rendered_pixels(batch):
    counts = Counter()
    for sample in read_samples(batch / "samples.jsonl"):
        frames = sample.resolve_video(batch)
        for st in states_of(sample):
            img = cv2.imread(str(frames / frame_name(st.t)))
            for o in st.objects:  # the colour at an object's centre is its palette colour
                centre = img[o.y, o.x].astype(int)
                assert np.abs(centre - syn.COLOURS[o.colour][::-1]).max() <= 30, (sample.sample_id, st.t, o)
            total = 0
            for colour in syn.COLOURS:
                blobs = _components(img, colour)
                mine = [o for o in st.objects if o.colour == colour]
                assert len(blobs) == len(mine), (sample.sample_id, st.t, colour)
                for o in mine:
                    assert any(abs(bx - o.x) <= 2 and abs(by - o.y) <= 2 for bx, by in blobs), (st.t, o)
                total += len(blobs)
            assert total == st.count
            counts[st.count] += 1
    assert set(counts) >= {1, 2, 3}  # multi scenes do change their counts


def test_multi_scenes_move_recolour_appear_and_leave(planned):
    moved = recoloured = appeared = left = 0
    for states, sample in planned:
        if sample.metadata["style"] != "multi":
            continue
        assert all(0 <= st.count <= syn.MAX_OBJECTS for st in states)
        for a, b in itertools.pairwise(states):
            pa, pb = {o.oid: o for o in a.objects}, {o.oid: o for o in b.objects}
            moved += sum((pa[i].x, pa[i].y) != (o.x, o.y) for i, o in pb.items() if i in pa)
            recoloured += sum(pa[i].colour != o.colour for i, o in pb.items() if i in pa)
            appeared += len(pb.keys() - pa.keys())
            left += len(pa.keys() - pb.keys())
    assert min(moved, recoloured, appeared, left) > 20


def test_single_segments_last_8_to_20_s_and_change_shape_and_colour(planned):
    for states, sample in planned:
        if sample.metadata["style"] != "single":
            continue
        runs = [[states[0]]]
        for st in states[1:]:
            (runs[-1].append(st) if st.objects == runs[-1][-1].objects else runs.append([st]))
        for k, run in enumerate(runs):
            assert 8 <= len(run) <= 20 or k == len(runs) - 1
            assert len({(s.label, s.next_shape) for s in run}) == 1
            (o,) = run[0].objects
            assert (o.x, o.y) == syn.SINGLE_CENTRE
            if k:
                (p,) = runs[k - 1][0].objects
                assert p.shape != o.shape and p.colour != o.colour
                assert runs[k - 1][0].next_shape == o.shape  # the hint was right


# -- the dialogue, checked from the texts by an oracle ----------------------------------------------
C, S = "(red|green|blue|yellow)", "(circle|square|triangle)"
INSTRUCTIONS = [
    ("colour-shape-appears", rf"(?:Tell me when|Let me know when|Alert me when) a {C} {S} (?:appears|shows up|comes into view)\."),
    ("colour-appears", rf"Tell me when a {C} shape appears\."),
    ("colour-appears", rf"Let me know when something {C} shows up\."),
    ("colour-appears", rf"Alert me when a {C} object comes into view\."),
    ("shape-appears", rf"(?:Tell me when|Let me know when|Alert me when) a {S} (?:appears|shows up|comes into view)\."),
    ("count-reaches", r"(?:Tell me when the number of shapes reaches|Let me know when the shape count gets to) (\d)\."),
    ("count-reaches", r"Alert me when the screen shows (\d) shapes?\."),
    ("leaves", r"Tell me when something leaves\.|Let me know when a shape disappears\.|Alert me when an object leaves the screen\."),
    ("recolours", (r"Tell me when a shape changes colour\.|Let me know if any shape changes colour\.|"
                   r"Alert me when an object turns a different colour\.")),
    ("prev-colour", (rf"(?:Whenever a {C} shape appears, tell me the colour of the shape before it|"
                     rf"Each time something {C} shows up, tell me what colour the previous shape was)\.")),
    ("label-now", r"(?:If the label on screen says ([A-Z]+), tell me now|Tell me right now if the label reads ([A-Z]+))\."),
]
QUESTIONS = [
    ("shape-now", r"What shape is on screen right now\?|Which shape do you see now\?"),
    ("colour-of", rf"What colour is the {S}\?"),
    ("count", r"How many shapes are (?:there|on screen)\?"),
    ("colour-ago", r"What colour was the shape (\d+) seconds ago\?"),
    ("next-shape", r"Which shape will come next\?|What shape comes next\?"),
]


def _parse(text: str, table) -> tuple[str, list[str]]:
    for kind, pattern in table:
        m = re.fullmatch(pattern, text)
        if m:
            return kind, [g for g in m.groups() if g is not None]
    raise AssertionError(f"no phrasing matches {text!r}")


def _noun(n: int) -> str:
    return f"{n} shape" if n == 1 else f"{n} shapes"


def _expected_instruction(kind: str, args: list[str], states, t: int, end: int) -> list[tuple[float, str]]:
    if kind == "label-now":
        return [(float(t), f"The label says {args[0]}.")] if states[t].label == args[0] else []
    out = []
    for s in range(t + 1, end):
        before, now = {o.oid: o for o in states[s - 1].objects}, {o.oid: o for o in states[s].objects}
        new = [o for i, o in now.items() if i not in before]
        gone = [o for i, o in before.items() if i not in now]
        changed = [(before[i], o) for i, o in now.items() if i in before and before[i].colour != o.colour]
        if kind == "colour-appears":
            texts = [f"A {o.colour} {o.shape} appeared." for o in new if o.colour == args[0]]
        elif kind == "shape-appears":
            texts = [f"A {o.colour} {o.shape} appeared." for o in new if o.shape == args[0]]
        elif kind == "colour-shape-appears":
            texts = [f"A {o.colour} {o.shape} appeared." for o in new if [o.colour, o.shape] == args]
        elif kind == "count-reaches":
            n = int(args[0])
            texts = [f"{_noun(n)} now."] if len(now) == n and len(before) != n else []
        elif kind == "leaves":
            texts = [f"The {o.colour} {o.shape} left." for o in gone]
        elif kind == "recolours":
            texts = [f"The {a.colour} {a.shape} turned {b.colour}." for a, b in changed]
        elif kind == "prev-colour":
            texts = ([f"The previous shape was {states[s - 1].objects[0].colour}."]
                     if any(o.colour == args[0] for o in new) else [])
        else:
            raise AssertionError(kind)
        if texts:
            out.append((float(s), " ".join(texts)))
    return out


def _expected_answer(kind: str, args: list[str], states, t: int) -> str:
    now = states[t].objects
    if kind == "shape-now":
        assert len(now) == 1
        return f"A {now[0].shape}."
    if kind == "colour-of":
        (o,) = [o for o in now if o.shape == args[0]]
        return f"The {o.shape} is {o.colour}."
    if kind == "count":
        return f"{_noun(len(now))}." if now else "No shapes."
    if kind == "colour-ago":
        (o,) = states[t - int(args[0])].objects
        return f"It was {o.colour}."
    if kind == "next-shape":
        return f"A {states[t].next_shape}."
    raise AssertionError(kind)


def test_instruction_responses_follow_from_the_states(planned):
    kinds, negatives, withdrawn = Counter(), 0, 0
    for states, sample in planned:
        for trig in sample.triggers:
            if trig.kind != "instruction":
                continue
            kind, args = _parse(trig.content, INSTRUCTIONS)
            assert trig.trigger_id.endswith(kind)
            assert kind in syn.INSTRUCTION_KINDS[sample.metadata["style"]]
            end = len(states) if trig.withdrawn is None else int(trig.withdrawn)
            got = [(r.time, r.content) for r in trig.responses]
            assert got == _expected_instruction(kind, args, states, int(trig.time), end), (sample.sample_id, trig)
            kinds[kind] += 1
            negatives += not got
            withdrawn += trig.withdrawn is not None
            if trig.withdrawn is not None:
                assert trig.time < trig.withdrawn < len(states)
    assert set(kinds) == {k for ks in syn.INSTRUCTION_KINDS.values() for k in ks}
    total = sum(kinds.values())
    assert 0.1 * total < negatives < 0.6 * total and 0.1 * total < withdrawn < 0.5 * total


def test_question_answers_equal_the_state(planned):
    kinds = Counter()
    for states, sample in planned:
        for trig in sample.triggers:
            if trig.kind != "question":
                continue
            kind, args = _parse(trig.content, QUESTIONS)
            assert kind in syn.QUESTION_KINDS[sample.metadata["style"]]
            (r,) = trig.responses
            assert r.time == trig.time and r.content == _expected_answer(kind, args, states, int(trig.time))
            kinds[kind] += 1
    assert set(kinds) == {k for ks in syn.QUESTION_KINDS.values() for k in ks}


def test_every_response_lies_in_its_window_after_its_trigger(planned):
    for states, sample in planned:
        dur = sample.duration_s
        for trig in sample.triggers:
            assert len(trig.windows) == len(trig.responses)
            width = syn.QUESTION_WINDOW_S if trig.kind == "question" else syn.ALERT_WINDOW_S
            for r, (t0, t1) in zip(trig.responses, trig.windows):
                assert trig.time <= r.time and t0 == r.time and t1 == min(r.time + width, dur)
                assert r.time < (trig.withdrawn if trig.withdrawn is not None else dur)
                assert r.time == int(r.time) and r.time < dur


def test_density_is_configurable():
    _, default = plan_stream(600, 9, "multi")
    n = Counter(t.kind for t in default.triggers)
    assert n["instruction"] == 10 and 15 <= n["question"] <= 20
    _, dense = plan_stream(600, 9, "multi", instruction_every_s=20, question_every_s=0)
    n = Counter(t.kind for t in dense.triggers)
    assert n["instruction"] == 30 and n["question"] == 0
    assert states_of(dense) == states_of(default)  # the scene does not depend on the dialogue


def test_steps_respond_where_the_responses_are_and_silence_dominates(planned, batch):
    responding = steps_total = 0
    samples = [s for _, s in planned] + read_samples(batch / "samples.jsonl")
    for sample in samples:
        steps = to_steps(sample)
        assert len(steps) == sample.duration_s
        due = {int(r.time) for t in sample.triggers for r in t.responses}
        assert {s.index for s in steps if s.role == "response"} == due
        for trig in sample.triggers:
            assert trig.content in steps[int(trig.time)].user
            for r in trig.responses:
                assert trig.trigger_id in steps[int(r.time)].responding and r.content in steps[int(r.time)].target
        responding += len(due)
        steps_total += len(steps)
    fraction = responding / steps_total
    print(f"response fraction: {fraction:.3f} ({responding} of {steps_total} steps)")
    assert 0.01 < fraction < 0.15
