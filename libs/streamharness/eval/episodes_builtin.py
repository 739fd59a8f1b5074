"""The episode set the project ships with Streaming-Eval.

* **opencv-doc episodes** (``eval-jobs/episodes/*.json``): hand-annotated episodes on the real
  sample videos of Debian's ``opencv-doc`` package. Their ``video`` is ``"opencv-doc:<name>"``,
  resolved at load time through :func:`streamharness.media.sample_path` by :func:`resolve_video`.
  How they were annotated (contact sheets + OpenCV frame statistics, checked by assertions) is in
  ``eval-jobs/annotate_opencv_doc.py``.
* **synthetic episodes** (:func:`generate_synthetic`): a frame folder (160×120 JPEGs at 1 FPS,
  named by media ms) of procedurally drawn scenes — one coloured shape with a word label per
  *segment*, plus a "next: <shape>" hint — whose ground truth is known by construction. Their
  events cover all nine mode × position cells, repeated in blocks so that long episodes exercise
  memory (a question at 2 h about the first minutes). :func:`plan_synthetic` gives the plan (scene
  segments and the episode) without drawing a frame. A block's instructions are withdrawn at its end. Frames go to the cache dir
  (``SH_DEV_CACHE_DIR`` or ``~/.cache/streamharness``)/``episodes/``, never into git.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamharness.eval.episode import Episode, load_episodes, parse_episode, save_episode
from streamharness.media import cache_dir, sample_path

# One look for the evaluation episodes and Streaming-Train's procedural streams, so that a head
# trained on the latter sees what it is judged on: streamharness.train.synthetic draws both.
from streamharness.train.synthetic import COLOURS, FRAME_SIZE, LABELS, SHAPES, SINGLE_CENTRE, Obj, State, draw_frame

OPENCV_DOC_PREFIX = "opencv-doc:"
# The repository's eval-jobs/episodes; an installed package (the image) says where with SH_EVAL_EPISODES_DIR.
SHIPPED_DIR = Path(os.environ.get("SH_EVAL_EPISODES_DIR") or Path(__file__).resolve().parents[3] / "eval-jobs" / "episodes")
BLOCK_S = 300.0  # one block of events every 5 minutes of media time


# -- opencv-doc episodes ------------------------------------------------------------------------------
def resolve_video(episode: Episode, base_dir: Path | str | None = None) -> Path:
    """The episode's video as a real path: ``opencv-doc:<name>`` through :func:`sample_path`
    (decompressing ``.gz`` samples once), anything else through :meth:`Episode.video_path`."""
    if episode.video.startswith(OPENCV_DOC_PREFIX):
        return sample_path(episode.video[len(OPENCV_DOC_PREFIX):])
    return episode.video_path(base_dir)


def shipped_episodes(directory: Path | str = SHIPPED_DIR) -> list[Episode]:
    """The hand-annotated opencv-doc episodes checked into ``eval-jobs/episodes/``."""
    return load_episodes(directory)


# -- synthetic episodes -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """``[start_s, end_s)``: one shape of one colour with one label on screen."""

    start_s: float
    end_s: float
    shape: str
    colour: str
    label: str


def _segments(duration_s: int, rng: random.Random) -> list[Segment]:
    segs: list[Segment] = []
    t = 0
    while t < duration_s:
        length = min(rng.randint(8, 20), duration_s - t)
        prev = segs[-1] if segs else None
        shape = rng.choice([s for s in SHAPES if not prev or s != prev.shape])
        colour = rng.choice([c for c in COLOURS if not prev or c != prev.colour])
        segs.append(Segment(float(t), float(t + length), shape, colour, rng.choice(LABELS)))
        t += length
    return segs


def _at(segs: list[Segment], t: float) -> Segment:
    for s in segs:
        if s.start_s <= t < s.end_s:
            return s
    return segs[-1]


def _after(segs: list[Segment], t: float) -> list[Segment]:
    return [s for s in segs if s.start_s > t]


def _q(eid: str, ask: float, text: str, dur: float, mode: str, pos: str, choices: list[str], answer: str,
       window_s: float = 5.0) -> dict[str, Any]:
    return {"type": "question", "event_id": eid, "ask_at_s": ask, "text": text,
            "window": [ask, min(ask + window_s, dur)], "choices": choices,
            "answer_index": choices.index(answer), "mode": mode, "position": pos}


def _i(eid: str, given: float, text: str, windows: list[tuple[float, float]], mode: str, pos: str,
       reference: str | None = None) -> dict[str, Any] | None:
    if not windows:
        return None
    ev = {"type": "instruction", "event_id": eid, "given_at_s": given, "text": text,
          "windows": [list(w) for w in windows], "mode": mode, "position": pos}
    if reference:
        ev["reference"] = reference
    return ev


def _block_events(k: int, b0: float, b1: float, segs: list[Segment], dur: float) -> list[dict[str, Any]]:
    """The nine cells inside media time ``[b0, b1)``; every answer follows from ``segs``."""
    shapes, colours, labels = list(SHAPES), list(COLOURS), list(LABELS)
    p = f"b{k}-"
    ev: list[dict[str, Any] | None] = []

    def starts(pred, t0: float, t1: float) -> list[tuple[float, float]]:
        return [(s.start_s, min(s.start_s + 3.0, s.end_s - 0.5, dur)) for s in segs
                if t0 < s.start_s < t1 and pred(s)]

    # proactive × forward: alert on a colour appearing later in the block
    ev.append(_i(p + "red-appears", b0, "Tell me when a red shape appears.",
                 starts(lambda s: s.colour == "red", b0, b1), "proactive", "forward"))
    # proactive × present: alert about what is on screen right now
    t = b0 + 20.0
    now = _at(segs, t)
    ev.append(_i(p + "label-now", t, f"If the label on screen says {now.label}, tell me now.",
                 [(t, min(t + 3.0, dur))], "proactive", "present", reference=now.label))
    # proactive × backward: on every blue shape, say what colour the previous shape was
    blue = [s for s in segs if b0 < s.start_s < b1 and s.colour == "blue"]
    ev.append(_i(p + "prev-colour", b0, "Whenever a blue shape appears, tell me the colour of the shape before it.",
                 [(s.start_s, min(s.start_s + 3.0, s.end_s - 0.5)) for s in blue[:1]], "proactive", "backward",
                 reference=_at(segs, blue[0].start_s - 0.5).colour if blue else None))
    # punctual × present / backward / forward
    t = b0 + 60.0
    ev.append(_q(p + "shape-now", t, "What shape is on screen right now?", dur, "punctual", "present",
                 shapes, _at(segs, t).shape))
    t = b0 + 90.0
    ev.append(_q(p + "colour-30s-ago", t, "What colour was the shape 30 seconds ago?", dur, "punctual", "backward",
                 colours, _at(segs, t - 30.0).colour))
    t = b0 + 120.0
    nxt = _after(segs, t)
    if nxt:  # the "next:" hint on screen announces it
        ev.append(_q(p + "next-shape", t, "Which shape will come next?", dur, "punctual", "forward",
                     shapes, nxt[0].shape))
    # contextual: questions that lean on the dialogue so far
    t = b0 + 150.0
    asked = _at(segs, b0 + 60.0)
    ev.append(_q(p + "same-as-asked", t, "Is the shape now the same shape as when I asked you a minute and a half ago?",
                 dur, "contextual", "present", ["yes", "no"], "yes" if _at(segs, t).shape == asked.shape else "no"))
    t = b0 + 180.0
    ev.append(_q(p + "first-label", t, "What was the label of the very first shape you saw?", dur,
                 "contextual", "backward", labels, segs[0].label))
    t = b0 + 200.0
    ev.append(_i(p + "asked-shape-back", t, "Tell me when the shape I asked about earlier comes back.",
                 starts(lambda s: s.shape == asked.shape, t, b1), "contextual", "forward"))
    # A block's instructions are withdrawn when its windows are over (the last window may open just
    # before the block ends), so that the instructions in force stay few however long the episode.
    withdrawn = min(b1 + 3.0, dur)
    for e in ev:
        if e is not None and e["type"] == "instruction" and withdrawn > e["given_at_s"]:
            e["withdrawn_at_s"] = withdrawn
    return [e for e in ev if e is not None and e.get("ask_at_s", e.get("given_at_s", 0)) < dur]


def plan_synthetic(duration_s: int, seed: int = 0, video: str = "frames") -> tuple[list[Segment], Episode]:
    """The scene segments and the episode (events per :data:`BLOCK_S` block) of a synthetic
    episode, without rendering. ``duration_s`` must be at least :data:`BLOCK_S` seconds."""
    duration_s = int(duration_s)
    if duration_s < BLOCK_S:
        raise ValueError(f"a synthetic episode needs at least {BLOCK_S:.0f} s, got {duration_s}")
    rng = random.Random(seed)
    segs = _segments(duration_s, rng)
    events: list[dict[str, Any]] = []
    k, b0 = 0, 0.0
    while b0 + BLOCK_S <= duration_s:
        events.extend(_block_events(k, b0, b0 + BLOCK_S, segs, float(duration_s)))
        k, b0 = k + 1, b0 + BLOCK_S
    raw = {"format_version": 1, "episode_id": f"synthetic-{duration_s}s-seed{seed}", "video": video,
           "duration_s": float(duration_s), "source": "synthetic", "events": events,
           "metadata": {"generator": "streamharness.eval.episodes_builtin.generate_synthetic", "seed": seed,
                        "fps": 1, "frame_size": list(FRAME_SIZE),
                        "segments": [[s.start_s, s.end_s, s.shape, s.colour, s.label] for s in segs]}}
    return segs, parse_episode(raw, f"synthetic(duration_s={duration_s}, seed={seed})")


def _draw(seg: Segment, nxt: Segment | None, t: int):
    """The BGR frame of second ``t``: the segment's shape centred, its label, the next shape's hint."""
    return draw_frame(State(t, (Obj(0, seg.shape, seg.colour, *SINGLE_CENTRE),), seg.label,
                            nxt.shape if nxt is not None else None))


def generate_synthetic(out_dir: Path | str, duration_s: int, seed: int = 0) -> Path:
    """Render a synthetic episode into ``out_dir``: ``frames/<media ms>.jpg`` (one per second,
    160×120) and ``episode.json`` (``video: "frames"``, relative to the episode file). Frames already
    there are kept (rendering is resumable). Returns the episode file."""
    import cv2

    out = Path(out_dir)
    frames = out / "frames"
    frames.mkdir(parents=True, exist_ok=True)
    segs, episode = plan_synthetic(duration_s, seed)
    i = 0
    for t in range(int(duration_s)):
        while segs[i].end_s <= t:
            i += 1
        path = frames / f"{t * 1000:06d}.jpg"
        if not path.exists():
            tmp = path.with_name(path.stem + ".part.jpg")
            cv2.imwrite(str(tmp), _draw(segs[i], segs[i + 1] if i + 1 < len(segs) else None, t),
                        [cv2.IMWRITE_JPEG_QUALITY, 80])
            tmp.replace(path)
    return save_episode(episode, out / "episode.json")


def episodes_cache_dir() -> Path:
    """Where generated episodes live: ``$SH_DEV_CACHE_DIR`` (or ``~/.cache/streamharness``)/episodes."""
    d = cache_dir() / "episodes"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_builtin_set(out_dir: Path | str | None = None, *, short_duration_s: int = 600,
                      long_duration_s: int = 7200, seed: int = 0) -> list[Path]:
    """Write the whole shipped set under ``out_dir`` (default: :func:`episodes_cache_dir`): the
    opencv-doc episodes with their videos resolved to real paths (``opencv-doc/<id>.json``), a short
    synthetic episode and a multi-hour one (``synthetic-<N>s/episode.json``, frames beside it).
    Returns the episode files. Rendering is resumable, so a second call is cheap."""
    out = Path(out_dir) if out_dir is not None else episodes_cache_dir()
    paths: list[Path] = []
    (out / "opencv-doc").mkdir(parents=True, exist_ok=True)
    for ep in shipped_episodes():
        resolved = ep.model_copy(update={"video": str(resolve_video(ep))})
        paths.append(save_episode(resolved, out / "opencv-doc" / f"{ep.episode_id}.json"))
    for duration in (short_duration_s, long_duration_s):
        if duration:
            paths.append(generate_synthetic(out / f"synthetic-{duration}s-seed{seed}", duration, seed))
    return paths


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Build the shipped Streaming-Eval episode set.")
    ap.add_argument("out_dir", nargs="?", default=None, help="default: the cache dir's episodes/")
    ap.add_argument("--long-duration-s", type=int, default=7200)
    ap.add_argument("--short-duration-s", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for p in build_builtin_set(args.out_dir, short_duration_s=args.short_duration_s,
                               long_duration_s=args.long_duration_s, seed=args.seed):
        print(p)


if __name__ == "__main__":
    main()

__all__ = ["Segment", "build_builtin_set", "episodes_cache_dir", "generate_synthetic", "plan_synthetic",
           "resolve_video", "shipped_episodes"]
