"""Real sample media from Debian's ``opencv-doc`` package, and video reading on media time."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamharness import paths

OPENCV_DOC = Path(os.environ.get("SH_OPENCV_DOC_DIR", "/usr/share/doc/opencv-doc"))


def cache_dir() -> Path:
    base = paths.cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    return base


def sample_path(name: str) -> Path:
    """Path of an opencv-doc sample (``vtest.avi``, ``box.mp4``...), decompressing ``.gz`` copies once."""
    candidates = [p for p in OPENCV_DOC.rglob(name)] + [p for p in OPENCV_DOC.rglob(name + ".gz")]
    if not candidates:
        raise FileNotFoundError(
            f"sample {name!r} not found under {OPENCV_DOC}; install Debian's opencv-doc package "
            "(apt-get install opencv-doc) or set SH_OPENCV_DOC_DIR"
        )
    found = sorted(candidates, key=lambda p: p.suffix == ".gz")[0]
    if found.suffix != ".gz":
        return found
    target = cache_dir() / "samples" / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        with gzip.open(found, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(target)
    return target


@dataclass(frozen=True)
class VideoFrame:
    media_ts_ms: int
    rgb: np.ndarray  # HxWx3 uint8


def read_video(path: Path, fps: float | None = None) -> Iterator[VideoFrame]:
    """Decode a video with OpenCV, yielding frames on media time (the container's timestamps, not
    frame index / nominal fps: some files lie about their rate). With ``fps``, keep the first frame
    of every 1/fps interval of media time."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"cannot open video {path}")
    step_ms = 1000.0 / fps if fps else 0.0
    next_ms = 0.0
    last_ts = -1
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            ts = int(round(cap.get(cv2.CAP_PROP_POS_MSEC)))
            ts = max(ts, last_ts + 1)  # decode-order timestamps can repeat or step back
            last_ts = ts
            if step_ms and ts + 1e-6 < next_ms:
                continue
            next_ms = (int(ts / step_ms) + 1) * step_ms if step_ms else 0.0
            yield VideoFrame(ts, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
