"""Procedural synthetic streams with exact ground truth, for Streaming-Train, at any scale.

A stream is a folder of 160×120 JPEG frames at 1 FPS named by media milliseconds
(``frames/000000.jpg``) and a :class:`~streamharness.train.samples.StreamSample` whose scripted
questions and instructions get exact responses, because the scene is known second by second. The
frames look like the synthetic *evaluation* episodes (:mod:`streamharness.eval.episodes_builtin`):
the same background, palette, shapes, label and ``next:`` hint — the evaluation episodes are drawn
by :func:`draw_frame` too — so a model trained here sees the look it is evaluated on.

Scenes (``style``):

* ``single``: like the evaluation episodes: one centred shape (radius 28) per segment of 8–20 s,
  with a word label and a ``next: <shape>`` hint; consecutive segments differ in shape and colour.
* ``multi``: 0–4 shapes (radius 16) at once, each with a shape, a colour and a centre; objects
  appear, leave, drift across the frame and change colour (at most one appear / leave / colour
  change / start-or-stop-drifting event a second), in alternating busy and quiet stretches.
* ``mixed``: each stream picks one of the two by its seed.

The ground truth of every second is a :class:`State`: the objects on screen (id, shape, colour,
centre), and for ``single`` the label and the hinted next shape. An object *appears* in second
``s`` when its id is on screen at ``s`` and was not at ``s - 1``; it *leaves* in ``s`` when it was
on screen at ``s - 1`` and is not at ``s``; it *changes colour* when its id is on screen at both
with different colours. A standing instruction given at ``t`` (withdrawn at ``w``, else in force to
the end) responds to the events of seconds ``t < s < w``, at ``s``, with window
``[s, min(s + 3, end)]``; a question asked at ``t`` is answered at ``t``, window
``[t, min(t + 5, end)]``. Some instructions are chosen so that their event never happens
(negatives), some are withdrawn. Densities are keyword arguments (about one instruction per 60 s
and one question per 30 s by default), so silence dominates as in real streams.

Seeds: stream ``i`` of a batch has its own seed :func:`stream_seed` ``(seed, i)``, so any stream can
be regenerated alone (:func:`batch_stream`, :func:`render_stream`). The scene, the style choice and
the dialogue draw from separate generators, so changing a density leaves the frames alone.

:func:`synthesize` writes ``out_dir/samples.jsonl`` (one ``StreamSample`` a line; ``video_path``
``streams/<sample_id>/frames``, relative to ``out_dir``) and the frames. Frames already on disk are
kept, so an interrupted run resumes; ``samples.jsonl`` is written to a temporary file and renamed at
the end. ``metadata["states"]`` holds the full per-second ground truth run-length encoded as
``[t0, t1, objects, label, next]`` runs (seconds ``t0 .. t1 - 1``; an object is
``[id, shape, colour, x, y]``); :func:`states_of` decodes it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamharness.train.samples import StreamSample, TimedText, Trigger

# -- the look, shared with the evaluation episodes (streamharness.eval.episodes_builtin draws with draw_frame) --
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 210, 40)}  # RGB
LABELS = ("ALPHA", "BRAVO", "CEDAR", "DELTA", "EMBER", "FJORD", "GECKO", "HAZEL")
FRAME_SIZE = (160, 120)  # width, height
BACKGROUND = 40
JPEG_QUALITY = 80
SINGLE_RADIUS = 28
SINGLE_CENTRE = (FRAME_SIZE[0] // 2, FRAME_SIZE[1] // 2 - 4)

# -- multi scenes -----------------------------------------------------------------------------------
MULTI_RADIUS = 16
MAX_OBJECTS = 4
_GAP = 6  # bounding boxes of two objects stay this far apart (colour masks never touch)
_X_RANGE = (MULTI_RADIUS + 2, FRAME_SIZE[0] - MULTI_RADIUS - 3)
_Y_RANGE = (18 + MULTI_RADIUS, FRAME_SIZE[1] - MULTI_RADIUS - 3)  # below the time stamp

STYLES = ("single", "multi", "mixed")
ALERT_WINDOW_S = 3.0
QUESTION_WINDOW_S = 5.0
GENERATOR = "streamharness.train.synthetic"
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class Obj:
    """One object on screen: its id (stable while it stays), shape, colour and centre (pixels)."""

    oid: int
    shape: str
    colour: str
    x: int
    y: int


@dataclass(frozen=True)
class State:
    """The ground truth of second ``t``."""

    t: int
    objects: tuple[Obj, ...]
    label: str | None = None  # single: the word label on screen
    next_shape: str | None = None  # single: the "next: <shape>" hint (None on the last segment)
    radius: int = SINGLE_RADIUS

    @property
    def count(self) -> int:
        return len(self.objects)


# -- seeds ------------------------------------------------------------------------------------------
def _derive(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def stream_seed(seed: int, index: int) -> int:
    """The own seed of stream ``index`` of the batch with ``seed``."""
    return _derive("streamharness-synthetic", seed, index)


def stream_id(seed: int, index: int) -> str:
    """The sample id of stream ``index`` of the batch with ``seed``."""
    return f"synthetic-{seed}-{index:06d}"


def resolve_style(seed: int, style: str = "mixed") -> str:
    """``single`` or ``multi``: ``style`` itself, or for ``mixed`` the stream's pick by its seed."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if style != "mixed":
        return style
    return "single" if random.Random(_derive(seed, "style")).random() < 0.5 else "multi"


# -- scenes -----------------------------------------------------------------------------------------
def _single_scene(duration_s: int, rng: random.Random) -> list[State]:
    segs: list[tuple[int, int, str, str, str]] = []
    t = 0
    while t < duration_s:
        length = min(rng.randint(8, 20), duration_s - t)
        prev = segs[-1] if segs else None
        shape = rng.choice([s for s in SHAPES if not prev or s != prev[2]])
        colour = rng.choice([c for c in COLOURS if not prev or c != prev[3]])
        segs.append((t, t + length, shape, colour, rng.choice(LABELS)))
        t += length
    cx, cy = SINGLE_CENTRE
    states = []
    for k, (t0, t1, shape, colour, label) in enumerate(segs):
        obj = Obj(k, shape, colour, cx, cy)
        nxt = segs[k + 1][2] if k + 1 < len(segs) else None
        states += [State(t, (obj,), label, nxt, SINGLE_RADIUS) for t in range(t0, t1)]
    return states


@dataclass
class _Mover:
    shape: str
    colour: str
    x: int
    y: int
    vx: int = 0
    vy: int = 0


def _multi_scene(duration_s: int, rng: random.Random) -> list[State]:
    objs: dict[int, _Mover] = {}
    sep = 2 * MULTI_RADIUS + _GAP
    next_id = 0

    def free(x: int, y: int, skip: int | None = None) -> bool:
        return all(max(abs(x - o.x), abs(y - o.y)) >= sep for i, o in objs.items() if i != skip)

    def velocity() -> tuple[int, int]:
        while True:
            v = (rng.randint(-4, 4), rng.randint(-4, 4))
            if v != (0, 0):
                return v

    def appear() -> None:
        nonlocal next_id
        for _ in range(40):
            x, y = rng.randint(*_X_RANGE), rng.randint(*_Y_RANGE)
            if free(x, y):
                vx, vy = velocity() if rng.random() < 0.5 else (0, 0)
                objs[next_id] = _Mover(rng.choice(SHAPES), rng.choice(list(COLOURS)), x, y, vx, vy)
                next_id += 1
                return

    def drift(oid: int, o: _Mover) -> None:
        if (o.vx, o.vy) == (0, 0):
            return
        if not _X_RANGE[0] <= o.x + o.vx <= _X_RANGE[1]:
            o.vx = -o.vx
        if not _Y_RANGE[0] <= o.y + o.vy <= _Y_RANGE[1]:
            o.vy = -o.vy
        nx = min(max(o.x + o.vx, _X_RANGE[0]), _X_RANGE[1])
        ny = min(max(o.y + o.vy, _Y_RANGE[0]), _Y_RANGE[1])
        if free(nx, ny, skip=oid):
            o.x, o.y = nx, ny
        else:  # bounce off the other object
            o.vx, o.vy = -o.vx, -o.vy

    for _ in range(rng.randint(0, 3)):
        appear()
    busy, stretch_end = rng.random() < 0.5, rng.randint(10, 40)
    states = []
    for t in range(duration_s):
        if t > 0:
            if t >= stretch_end:
                busy, stretch_end = not busy, t + rng.randint(10, 40)
            for oid in sorted(objs):
                drift(oid, objs[oid])
            if rng.random() < (0.3 if busy else 0.04):
                n = len(objs)
                kinds = ["appear", "leave", "recolour", "drift"]
                weights = [0.0 if n >= MAX_OBJECTS else (3.0 if n == 0 else 1.0),
                           0.0 if n == 0 else (1.0 if n > 1 else 0.6),
                           0.0 if n == 0 else 0.8,
                           0.0 if n == 0 else 0.5]
                kind = rng.choices(kinds, weights)[0]
                if kind == "appear":
                    appear()
                else:
                    oid = rng.choice(sorted(objs))
                    o = objs[oid]
                    if kind == "leave":
                        del objs[oid]
                    elif kind == "recolour":
                        o.colour = rng.choice([c for c in COLOURS if c != o.colour])
                    elif (o.vx, o.vy) == (0, 0):
                        o.vx, o.vy = velocity()
                    else:
                        o.vx, o.vy = 0, 0
        states.append(State(t, tuple(Obj(i, o.shape, o.colour, o.x, o.y) for i, o in sorted(objs.items())),
                            None, None, MULTI_RADIUS))
    return states


# -- events -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Events:
    """What happens in each second (index ``s``; nothing in second 0)."""

    appeared: list[list[Obj]]
    left: list[list[Obj]]  # as last seen
    recoloured: list[list[tuple[Obj, Obj]]]  # (before, after)


def events_of(states: Sequence[State]) -> Events:
    appeared: list[list[Obj]] = [[]]
    left: list[list[Obj]] = [[]]
    recoloured: list[list[tuple[Obj, Obj]]] = [[]]
    for prev, cur in itertools.pairwise(states):
        before = {o.oid: o for o in prev.objects}
        now = {o.oid: o for o in cur.objects}
        appeared.append([o for i, o in now.items() if i not in before])
        left.append([o for i, o in before.items() if i not in now])
        recoloured.append([(before[i], o) for i, o in now.items() if i in before and before[i].colour != o.colour])
    return Events(appeared, left, recoloured)


# -- texts ------------------------------------------------------------------------------------------
_COLOUR_APPEARS = ("Tell me when a {colour} shape appears.", "Let me know when something {colour} shows up.",
                   "Alert me when a {colour} object comes into view.")
_SHAPE_APPEARS = ("Tell me when a {shape} appears.", "Let me know when a {shape} shows up.",
                  "Alert me when a {shape} comes into view.")
_COLOUR_SHAPE_APPEARS = ("Tell me when a {colour} {shape} appears.", "Let me know when a {colour} {shape} shows up.",
                         "Alert me when a {colour} {shape} comes into view.")
_COUNT_REACHES = ("Tell me when the number of shapes reaches {n}.", "Let me know when the shape count gets to {n}.",
                  "Alert me when the screen shows {n}.")
_LEAVES = ("Tell me when something leaves.", "Let me know when a shape disappears.",
           "Alert me when an object leaves the screen.")
_RECOLOURS = ("Tell me when a shape changes colour.", "Let me know if any shape changes colour.",
              "Alert me when an object turns a different colour.")
_PREV_COLOUR = ("Whenever a {colour} shape appears, tell me the colour of the shape before it.",
                "Each time something {colour} shows up, tell me what colour the previous shape was.")
_LABEL_NOW = ("If the label on screen says {label}, tell me now.", "Tell me right now if the label reads {label}.")
_SHAPE_NOW = ("What shape is on screen right now?", "Which shape do you see now?")
_COLOUR_OF = ("What colour is the {shape}?",)
_COUNT = ("How many shapes are there?", "How many shapes are on screen?")
_COLOUR_AGO = ("What colour was the shape {k} seconds ago?",)
_NEXT_SHAPE = ("Which shape will come next?", "What shape comes next?")

# Streaming-Eval's mode × position cell of each kind.
CELLS = {
    "colour-appears": ("proactive", "forward"), "shape-appears": ("proactive", "forward"),
    "colour-shape-appears": ("proactive", "forward"), "count-reaches": ("proactive", "forward"),
    "leaves": ("proactive", "forward"), "recolours": ("proactive", "forward"),
    "prev-colour": ("proactive", "backward"), "label-now": ("proactive", "present"),
    "shape-now": ("punctual", "present"), "colour-of": ("punctual", "present"), "count": ("punctual", "present"),
    "colour-ago": ("punctual", "backward"), "next-shape": ("punctual", "forward"),
}
INSTRUCTION_KINDS = {
    "single": ("colour-appears", "shape-appears", "colour-shape-appears", "prev-colour", "label-now"),
    "multi": ("colour-appears", "shape-appears", "colour-shape-appears", "count-reaches", "leaves", "recolours"),
}
QUESTION_KINDS = {
    "single": ("shape-now", "colour-of", "colour-ago", "next-shape"),
    "multi": ("shape-now", "colour-of", "count", "colour-ago"),
}
_AGO_S = (5, 10, 15, 20, 30, 45, 60)


def shapes_text(n: int) -> str:
    """``"1 shape"``, ``"3 shapes"``."""
    return f"{n} shape" if n == 1 else f"{n} shapes"


def _appeared(objs: Sequence[Obj]) -> str | None:
    return " ".join(f"A {o.colour} {o.shape} appeared." for o in objs) or None


Hit = tuple[int, str]  # (second, response text)


def _instruction(kind: str, rng: random.Random, states: Sequence[State], ev: Events, t: int,
                 end: int) -> tuple[str, list[Hit]]:
    """The text of a ``kind`` instruction given at ``t`` and its responses in seconds ``t < s < end``."""

    def hits(f: Callable[[int], str | None]) -> list[Hit]:
        return [(s, r) for s in range(t + 1, end) if (r := f(s)) is not None]

    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    if kind == "colour-appears":
        return (rng.choice(_COLOUR_APPEARS).format(colour=colour),
                hits(lambda s: _appeared([o for o in ev.appeared[s] if o.colour == colour])))
    if kind == "shape-appears":
        return (rng.choice(_SHAPE_APPEARS).format(shape=shape),
                hits(lambda s: _appeared([o for o in ev.appeared[s] if o.shape == shape])))
    if kind == "colour-shape-appears":
        return (rng.choice(_COLOUR_SHAPE_APPEARS).format(colour=colour, shape=shape),
                hits(lambda s: _appeared([o for o in ev.appeared[s] if (o.colour, o.shape) == (colour, shape)])))
    if kind == "count-reaches":
        n = rng.randint(1, MAX_OBJECTS)
        template = rng.choice(_COUNT_REACHES)
        text = template.format(n=shapes_text(n) if template.endswith("shows {n}.") else n)
        return text, hits(lambda s: f"{shapes_text(n)} now." if states[s].count == n != states[s - 1].count else None)
    if kind == "leaves":
        return rng.choice(_LEAVES), hits(lambda s: " ".join(f"The {o.colour} {o.shape} left." for o in ev.left[s]) or None)
    if kind == "recolours":
        return rng.choice(_RECOLOURS), hits(lambda s: " ".join(
            f"The {a.colour} {a.shape} turned {b.colour}." for a, b in ev.recoloured[s]) or None)
    if kind == "prev-colour":
        return (rng.choice(_PREV_COLOUR).format(colour=colour),
                hits(lambda s: f"The previous shape was {states[s - 1].objects[0].colour}."
                     if any(o.colour == colour for o in ev.appeared[s]) and states[s - 1].objects else None))
    if kind == "label-now":
        label = states[t].label if rng.random() < 0.5 else rng.choice([x for x in LABELS if x != states[t].label])
        text = rng.choice(_LABEL_NOW).format(label=label)
        return text, ([(t, f"The label says {label}.")] if states[t].label == label else [])
    raise ValueError(f"unknown instruction kind {kind!r}")


def _question(kind: str, rng: random.Random, states: Sequence[State], t: int) -> tuple[str, str] | None:
    """The text and the answer of a ``kind`` question asked at ``t``, or None where it does not apply."""
    now = states[t]
    if kind == "shape-now":
        return (rng.choice(_SHAPE_NOW), f"A {now.objects[0].shape}.") if now.count == 1 else None
    if kind == "colour-of":
        unique = [o for o in now.objects if sum(p.shape == o.shape for p in now.objects) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return rng.choice(_COLOUR_OF).format(shape=o.shape), f"The {o.shape} is {o.colour}."
    if kind == "count":
        return rng.choice(_COUNT), (f"{shapes_text(now.count)}." if now.count else "No shapes.")
    if kind == "colour-ago":
        ks = [k for k in _AGO_S if k <= t and states[t - k].count == 1]
        if not ks:
            return None
        k = rng.choice(ks)
        return rng.choice(_COLOUR_AGO).format(k=k), f"It was {states[t - k].objects[0].colour}."
    if kind == "next-shape":
        return (rng.choice(_NEXT_SHAPE), f"A {now.next_shape}.") if now.next_shape else None
    raise ValueError(f"unknown question kind {kind!r}")


def _slots(n: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """``n`` integer times spread over ``[lo, hi]``, one in each of ``n`` equal slots."""
    if n <= 0 or hi < lo:
        return []
    width = (hi - lo + 1) / n
    return [min(hi, lo + int(width * j + rng.random() * width)) for j in range(n)]


def _count(duration_s: int, every_s: float) -> int:
    return 0 if every_s <= 0 else max(1, round(duration_s / every_s))


def _triggers(states: Sequence[State], style: str, rng: random.Random, *, instruction_every_s: float,
              question_every_s: float, negative_fraction: float, withdraw_fraction: float) -> list[Trigger]:
    duration = len(states)
    dur = float(duration)
    ev = events_of(states)
    triggers: list[Trigger] = []
    for j, t in enumerate(_slots(_count(duration, instruction_every_s), 0, max(0, duration - 2), rng)):
        want_negative = rng.random() < negative_fraction
        withdrawn = rng.randint(t + 10, duration - 1) if rng.random() < withdraw_fraction and t + 10 < duration else None
        chosen = None
        for _ in range(30):
            kind = rng.choice(INSTRUCTION_KINDS[style])
            w = None if kind == "label-now" else withdrawn
            text, hits = _instruction(kind, rng, states, ev, t, duration if w is None else w)
            chosen = chosen or (kind, w, text, hits)
            if (not hits) == want_negative:
                chosen = (kind, w, text, hits)
                break
        assert chosen is not None
        kind, w, text, hits = chosen
        mode, position = CELLS[kind]
        triggers.append(Trigger(
            trigger_id=f"i{j:02d}-{kind}", kind="instruction", content=text, time=float(t),
            withdrawn=None if w is None else float(w),
            responses=[TimedText(content=r, time=float(s)) for s, r in hits],
            windows=[(float(s), min(s + ALERT_WINDOW_S, dur)) for s, _ in hits], mode=mode, position=position))
    for j, t in enumerate(_slots(_count(duration, question_every_s), 1, duration - 1, rng)):
        for _ in range(10):
            kind = rng.choice(QUESTION_KINDS[style])
            qa = _question(kind, rng, states, t)
            if qa is not None:
                break
        if qa is None:
            continue
        text, answer = qa
        mode, position = CELLS[kind]
        triggers.append(Trigger(
            trigger_id=f"q{j:02d}-{kind}", kind="question", content=text, time=float(t),
            responses=[TimedText(content=answer, time=float(t))],
            windows=[(float(t), min(t + QUESTION_WINDOW_S, dur))], mode=mode, position=position))
    return sorted(triggers, key=lambda tr: (tr.time, tr.trigger_id))


# -- the ground truth in metadata -------------------------------------------------------------------
def _encode(states: Sequence[State]) -> list[list[Any]]:
    runs: list[list[Any]] = []
    for s in states:
        key = ([[o.oid, o.shape, o.colour, o.x, o.y] for o in s.objects], s.label, s.next_shape)
        if runs and (runs[-1][2], runs[-1][3], runs[-1][4]) == key:
            runs[-1][1] = s.t + 1
        else:
            runs.append([s.t, s.t + 1, *key])
    return runs


def states_of(sample: StreamSample | dict[str, Any]) -> list[State]:
    """The per-second ground truth of a synthetic sample (or of its ``metadata``)."""
    meta = sample.metadata if isinstance(sample, StreamSample) else sample
    radius = int(meta["radius"])
    states = []
    for t0, t1, objects, label, nxt in meta["states"]:
        objs = tuple(Obj(int(i), sh, c, int(x), int(y)) for i, sh, c, x, y in objects)
        states += [State(t, objs, label, nxt, radius) for t in range(int(t0), int(t1))]
    return states


# -- planning ---------------------------------------------------------------------------------------
def plan_stream(duration_s: int, seed: int, style: str = "mixed", *, sample_id: str | None = None,
                instruction_every_s: float = 60.0, question_every_s: float = 30.0, negative_fraction: float = 0.25,
                withdraw_fraction: float = 0.3, metadata: dict[str, Any] | None = None
                ) -> tuple[list[State], StreamSample]:
    """The per-second states and the sample of the stream with its own ``seed``, without drawing.

    ``instruction_every_s`` / ``question_every_s``: one instruction / question per that many
    seconds of stream (spread over it; 0: none); ``negative_fraction``: the share of instructions
    chosen so that their event never happens; ``withdraw_fraction``: the share withdrawn later."""
    duration_s = int(duration_s)
    if duration_s < 1:
        raise ValueError(f"duration_s must be at least 1, got {duration_s}")
    resolved = resolve_style(seed, style)
    scene_rng = random.Random(_derive(seed, "scene"))
    states = _single_scene(duration_s, scene_rng) if resolved == "single" else _multi_scene(duration_s, scene_rng)
    triggers = _triggers(states, resolved, random.Random(_derive(seed, "dialogue")),
                         instruction_every_s=instruction_every_s, question_every_s=question_every_s,
                         negative_fraction=negative_fraction, withdraw_fraction=withdraw_fraction)
    sid = sample_id or f"synthetic-seed{seed}"
    meta = {"generator": GENERATOR, "seed": seed, "style": resolved, "requested_style": style, "fps": 1,
            "frame_size": list(FRAME_SIZE), "radius": states[0].radius, **(metadata or {}),
            "states": _encode(states)}
    sample = StreamSample(sample_id=sid, video_name=sid, video_path=f"streams/{sid}/frames",
                          task_type=f"synthetic-{resolved}", source="synthetic", duration_s=float(duration_s),
                          triggers=triggers, split="train", metadata=meta)
    return states, sample


def batch_stream(index: int, duration_s: int, seed: int, style: str = "mixed", **density: float
                 ) -> tuple[list[State], StreamSample]:
    """Stream ``index`` of the batch :func:`synthesize` writes with ``seed``, planned alone: the
    sample equals that line of ``samples.jsonl``."""
    return plan_stream(duration_s, stream_seed(seed, index), style, sample_id=stream_id(seed, index),
                       metadata={"batch_seed": seed, "index": index}, **density)


# -- drawing ----------------------------------------------------------------------------------------
def draw_frame(state: State):
    """The BGR frame (160×120) of one second, drawn like the evaluation episodes."""
    import cv2
    import numpy as np

    w, h = FRAME_SIZE
    img = np.full((h, w, 3), BACKGROUND, np.uint8)
    r = state.radius
    for o in state.objects:
        colour = COLOURS[o.colour][::-1]  # BGR for cv2
        cx, cy = o.x, o.y
        if o.shape == "circle":
            cv2.circle(img, (cx, cy), r, colour, -1)
        elif o.shape == "square":
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
        else:
            pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
            cv2.fillPoly(img, [pts], colour)
    if state.label is not None:
        cv2.putText(img, state.label, (SINGLE_CENTRE[0] - 30, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
    if state.next_shape is not None:
        cv2.putText(img, f"next: {state.next_shape}", (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (200, 200, 200), 1)
    cv2.putText(img, f"{state.t}s", (w - 44, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (160, 160, 160), 1)
    return img


def frame_name(t: int) -> str:
    return f"{t * 1000:06d}.jpg"


def render_stream(frames_dir: Path | str, states: Sequence[State]) -> int:
    """Draw the frames of ``states`` into ``frames_dir`` (``<media ms>.jpg``), keeping those already
    there (each is written to a temporary name and renamed). Returns how many were drawn."""
    import cv2

    frames = Path(frames_dir)
    frames.mkdir(parents=True, exist_ok=True)
    drawn = 0
    for state in states:
        path = frames / frame_name(state.t)
        if path.exists():
            continue
        ok, buf = cv2.imencode(".jpg", draw_frame(state), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"cv2 could not encode {path}")
        tmp = path.with_name(path.stem + ".part")
        tmp.write_bytes(buf.tobytes())
        tmp.replace(path)
        drawn += 1
    return drawn


# -- the batch --------------------------------------------------------------------------------------
def _make_stream(job: tuple[str, int, int, int, str, dict[str, float]]) -> tuple[str, int, int]:
    out_dir, index, duration_s, seed, style, density = job
    states, sample = batch_stream(index, duration_s, seed, style, **density)
    drawn = render_stream(sample.resolve_video(out_dir), states)
    return sample.model_dump_json(), len(states), drawn


def _ordered(jobs: Iterator[Any], fn: Callable[[Any], Any], workers: int) -> Iterator[Any]:
    """``map(fn, jobs)`` in order, on ``workers`` processes with a bounded queue (any number of jobs)."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[..., None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("synthetic streams"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[frames]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled) as bar:
        task = bar.add_task("streams", total=total, frames="")
        frames = [0, 0]

        def advance(drawn: int, n_frames: int = 0) -> None:
            frames[0] += drawn
            frames[1] += n_frames
            bar.update(task, advance=1, frames=f"{frames[0]} frames drawn, {frames[1] - frames[0]} kept")

        yield advance


def synthesize(out_dir: Path | str, streams: int, duration_s: int, seed: int, style: str = "mixed",
               progress: bool = True, *, workers: int = 1, instruction_every_s: float = 60.0,
               question_every_s: float = 30.0, negative_fraction: float = 0.25,
               withdraw_fraction: float = 0.3) -> Path:
    """Write ``streams`` synthetic streams of ``duration_s`` seconds into ``out_dir``:
    ``streams/<sample_id>/frames/<media ms>.jpg`` and ``samples.jsonl`` (one sample a line, in
    stream order). Frames already there are kept (resumable); ``samples.jsonl`` is replaced
    atomically at the end. ``workers`` > 1 renders on that many processes (same bytes). Returns
    the ``samples.jsonl`` path."""
    if streams < 0:
        raise ValueError(f"streams must be >= 0, got {streams}")
    if int(duration_s) < 1:
        raise ValueError(f"duration_s must be at least 1, got {duration_s}")
    resolve_style(seed, style)  # validates the style
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    density = {"instruction_every_s": instruction_every_s, "question_every_s": question_every_s,
               "negative_fraction": negative_fraction, "withdraw_fraction": withdraw_fraction}
    jobs = ((str(out), i, int(duration_s), seed, style, density) for i in range(streams))
    final = out / SAMPLES_FILE
    tmp = final.with_name(final.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f, _progress(progress, streams) as advance:
            for line, n_frames, drawn in _ordered(jobs, _make_stream, workers):
                f.write(line + "\n")
                advance(drawn, n_frames)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def read_samples(path: Path | str) -> list[StreamSample]:
    """The samples of a ``samples.jsonl``."""
    with Path(path).open(encoding="utf-8") as f:
        return [StreamSample.model_validate_json(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Write synthetic training streams with exact ground truth.")
    ap.add_argument("out_dir")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--duration-s", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--style", choices=STYLES, default="mixed")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--instruction-every-s", type=float, default=60.0)
    ap.add_argument("--question-every-s", type=float, default=30.0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    print(synthesize(args.out_dir, args.streams, args.duration_s, args.seed, args.style, not args.no_progress,
                     workers=args.workers, instruction_every_s=args.instruction_every_s,
                     question_every_s=args.question_every_s))


if __name__ == "__main__":
    main()

__all__ = ["COLOURS", "FRAME_SIZE", "LABELS", "SHAPES", "STYLES", "Events", "Obj", "State", "batch_stream",
           "draw_frame", "events_of", "frame_name", "plan_stream", "read_samples", "render_stream", "resolve_style",
           "states_of", "stream_id", "stream_seed", "synthesize"]
