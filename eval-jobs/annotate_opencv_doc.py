"""Derive and check the facts behind the shipped opencv-doc episodes, then (with ``--write``) write
them to ``eval-jobs/episodes/``.

How these episodes were annotated: the project cannot watch a video, so every event rests on two
kinds of evidence, both reproducible here:

* looking at 1-FPS contact sheets of each clip (what the objects are: a yellow box, a black cup, a
  woman with a glass in a purple dress, a man with glasses), and
* frame statistics computed below with OpenCV and printed: mean brightness per second, scene cuts
  (large colour-histogram change between consecutive decoded frames), OpenCV's HOG people count per
  second on ``vtest.avi`` (frame upscaled 2x, non-max suppression; evidence, not truth: it merges
  groups and misses people, see infrastructure-facts.md), the fraction of yellow pixels in
  ``box.mp4`` and the tilt of the dark blob in ``cup.mp4``.

Every timed claim in an episode is asserted against these statistics, so the script fails if the
evidence stops supporting an annotation.

    python eval-jobs/annotate_opencv_doc.py            # print the evidence and check it
    python eval-jobs/annotate_opencv_doc.py --write    # ... and write eval-jobs/episodes/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from streamharness.eval.episode import parse_episode
from streamharness.media import read_video, sample_path

OUT = Path(__file__).resolve().parent / "episodes"
SOURCE = "opencv-doc"
ANNOTATION = ("hand annotation by the project from 1-FPS contact sheets; timed claims checked against "
              "OpenCV frame statistics by eval-jobs/annotate_opencv_doc.py")


def _frames(name: str, fps: float | None = None):
    return list(read_video(sample_path(name), fps=fps))


def _duration_s(name: str) -> float:
    frames = _frames(name)
    step = np.median(np.diff([f.media_ts_ms for f in frames])) if len(frames) > 1 else 0
    return round((frames[-1].media_ts_ms + step) / 1000.0, 1)


def _cuts(name: str, threshold: float = 20.0) -> list[float]:
    """Media times (s) where the mean absolute grey-level change between consecutive decoded frames
    (downscaled to 90x66) exceeds ``threshold`` (out of 255): hard scene cuts."""
    cuts, prev = [], None
    for f in _frames(name):
        g = cv2.resize(cv2.cvtColor(f.rgb, cv2.COLOR_RGB2GRAY), (90, 66)).astype(np.float32)
        if prev is not None and float(np.abs(g - prev).mean()) > threshold:
            cuts.append(round(f.media_ts_ms / 1000.0, 2))
        prev = g
    return cuts


def _brightness(name: str) -> dict[int, float]:
    return {f.media_ts_ms // 1000: round(float(f.rgb.mean()), 1) for f in _frames(name, fps=1.0)}


def _hog_people(name: str) -> dict[int, list[tuple[int, int, int, int]]]:
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
    out = {}
    for f in _frames(name, fps=1.0):
        grey = cv2.resize(cv2.cvtColor(f.rgb, cv2.COLOR_RGB2GRAY), None, fx=2, fy=2)
        rects, weights = hog.detectMultiScale(grey, winStride=(8, 8), padding=(8, 8), scale=1.05)
        boxes = [[int(v) // 2 for v in r] for r in rects]
        keep = cv2.dnn.NMSBoxes(boxes, [float(w) for w in np.ravel(weights)], 0.0, 0.4) if boxes else []
        out[f.media_ts_ms // 1000] = [tuple(boxes[i]) for i in np.ravel(keep)]
    return out


def _yellow_fraction(name: str) -> dict[int, float]:
    out = {}
    for f in _frames(name, fps=1.0):
        hsv = cv2.cvtColor(f.rgb, cv2.COLOR_RGB2HSV)
        mask = cv2.inRange(hsv, (15, 120, 120), (35, 255, 255))
        out[f.media_ts_ms // 1000] = round(float(mask.mean() / 255.0), 3)
    return out


def _dark_blob_tilt(name: str) -> dict[int, float]:
    """Tilt of the cup in degrees: the angle from horizontal of the long axis of the largest very dark
    blob, which at this threshold is the cup's black lid (wider than tall while the cup is upright)."""
    out = {}
    for f in _frames(name, fps=1.0):
        hsv = cv2.cvtColor(f.rgb, cv2.COLOR_RGB2HSV)
        mask = cv2.inRange(hsv, (0, 0, 0), (180, 255, 70))
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        pts = cv2.boxPoints(cv2.minAreaRect(max(contours, key=cv2.contourArea)))
        edges = [pts[1] - pts[0], pts[2] - pts[1]]
        dx, dy = max(edges, key=lambda e: float(np.hypot(*e)))  # the long edge
        out[f.media_ts_ms // 1000] = round(float(np.degrees(np.arctan2(abs(dy), abs(dx)))), 1)
    return out


def q(event_id, ask_at_s, text, window, mode, position, *, reference=None, choices=None, answer_index=None):
    ev = {"type": "question", "event_id": event_id, "ask_at_s": ask_at_s, "text": text,
          "window": list(window), "mode": mode, "position": position}
    if choices is not None:
        ev.update(choices=choices, answer_index=answer_index)
    else:
        ev["reference"] = reference
    return ev


def instr(event_id, given_at_s, text, windows, mode="proactive", position="forward"):
    return {"type": "instruction", "event_id": event_id, "given_at_s": given_at_s, "text": text,
            "windows": [list(w) for w in windows], "mode": mode, "position": position}


def episode(episode_id, name, events):
    return {"format_version": 1, "episode_id": episode_id, "video": f"opencv-doc:{name}",
            "duration_s": _duration_s(name), "source": SOURCE, "events": events,
            "metadata": {"annotation": ANNOTATION}}


COUNT_CHOICES = ["nobody", "one or two people", "three to ten people", "more than ten people"]


def build() -> list[dict]:
    episodes = []

    # --- vtest.avi: pedestrians on a campus path (PETS 2009), people in view throughout.
    people = _hog_people("vtest.avi")
    print("vtest.avi HOG people per second:", {t: len(b) for t, b in people.items()})
    near = {t: [b for b in bs if b[1] + b[3] > 0.8 * 576] for t, bs in people.items()}
    print("vtest.avi detections whose feet are in the bottom fifth (lawn near camera):",
          {t: len(b) for t, b in near.items() if b})
    assert all(len(people[t]) >= 1 for t in range(0, 5)), "someone must be in view at the start"
    assert all(3 <= len(people[t]) <= 10 for t in range(20, 26)), "t=20..25 must count 3..10 people"
    assert all(len(people[t]) >= 1 for t in people), "people are in view in every second"
    assert all(near[t] for t in range(55, 59)), "someone is on the lawn near the camera at t=55..58"
    episodes.append(episode("opencv-doc-vtest", "vtest.avi", [
        instr("walks-in", 0.0, "Tell me when someone walks in.", [(0.0, 5.0)]),
        q("count-20", 20.0, "How many people are in view right now?", (20.0, 25.0), "punctual", "present",
          choices=COUNT_CHOICES, answer_index=2),
        q("near-lawn", 55.0, "Is anyone walking on the grass close to the camera right now?", (55.0, 59.0),
          "punctual", "present", choices=["yes", "no"], answer_index=0),
        q("seen-30s-ago", 50.0, "What did you see 30 seconds ago?", (50.0, 56.0), "contextual", "backward",
          reference="People walking along paved paths between a lawn and a brick building."),
        q("always-people", 75.0, "Has anyone been in view during the whole video so far?", (75.0, 79.0),
          "contextual", "backward", choices=["yes", "no"], answer_index=0),
    ]))

    # --- Megamind.avi: animated film clip; black first frame, then shots of a woman and a man.
    bright = _brightness("Megamind.avi")
    cuts = _cuts("Megamind.avi")
    print("Megamind.avi brightness per second:", bright)
    print("Megamind.avi scene cuts (s):", cuts)
    assert bright[0] < 5 and all(v > 20 for t, v in bright.items() if t >= 1), "black only at the start"
    shot_cuts = [c for c in cuts if c >= 1.0]  # the cut out of the black first frame is not a shot change
    assert len(shot_cuts) == 3 and 3.5 < shot_cuts[0] < 5.0, shot_cuts  # woman -> man -> woman -> man
    duration = _duration_s("Megamind.avi")
    episodes.append(episode("opencv-doc-megamind", "Megamind.avi", [
        instr("scene-change", 0.0, "Tell me whenever the shot changes to another character.",
              [(c, round(min(c + 2.0, nxt - 0.05, duration), 2))
               for c, nxt in zip(shot_cuts, shot_cuts[1:] + [duration + 1.0])]),
        q("holding", 2.0, "What is the woman holding?", (2.0, 5.0), "punctual", "present",
          choices=["a glass", "a phone", "a book", "nothing"], answer_index=0),
        q("first-frame", 9.0, "What did the video show at its very start?", (9.0, 11.0), "contextual",
          "backward", choices=["a black screen", "a man with glasses", "a street", "a tree"], answer_index=0),
    ]))

    # --- box.mp4: a hand moves a yellow printed box over a white table.
    yellow = _yellow_fraction("box.mp4")
    print("box.mp4 yellow pixel fraction per second:", yellow)
    assert all(v > 0.05 for v in yellow.values()), "the yellow box is in view every second"
    episodes.append(episode("opencv-doc-box", "box.mp4", [
        q("box-colour", 5.0, "What colour is the box being held?", (5.0, 8.0), "punctual", "present",
          choices=["yellow", "blue", "red", "green"], answer_index=0),
        q("box-earlier", 13.0, "Was the box in view the whole time so far?", (13.0, 15.0), "contextual",
          "backward", choices=["yes", "no"], answer_index=0),
    ]))

    # --- cup.mp4: a hand holds a black cup, tilts it, then holds it upright again.
    tilt = _dark_blob_tilt("cup.mp4")
    print("cup.mp4 cup tilt (lid angle from horizontal) per second (deg):", tilt)
    tilted = [t for t, a in tilt.items() if a > 15.0]
    print("cup.mp4 seconds tilted > 15 deg:", tilted)
    assert tilted and min(tilted) >= 1, tilted
    episodes.append(episode("opencv-doc-cup", "cup.mp4", [
        instr("cup-tilt", 0.0, "Tell me when the cup is tilted.", [(float(min(tilted)), float(max(tilted)) + 1.0)]),
        q("cup-colour", 7.0, "What colour is the cup?", (7.0, 8.0), "punctual", "present",
          choices=["black", "white", "red", "yellow"], answer_index=0),
    ]))

    # --- tree.avi: a leafy tree seen through a window; 68 real frames under a 15 fps header.
    print("tree.avi brightness per second:", _brightness("tree.avi"))
    episodes.append(episode("opencv-doc-tree", "tree.avi", [
        q("tree-what", 10.0, "What is in front of the camera?", (10.0, 14.0), "punctual", "present",
          reference="A green leafy tree."),
    ]))
    return episodes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write eval-jobs/episodes/*.json")
    args = ap.parse_args()
    episodes = build()
    if args.write:
        OUT.mkdir(parents=True, exist_ok=True)
        for ep in episodes:
            path = OUT / f"{ep['episode_id']}.json"
            parse_episode(ep, ep["episode_id"])  # validate before writing
            path.write_text(json.dumps(ep, indent=2) + "\n")
            print("wrote", path)


if __name__ == "__main__":
    main()
