"""What the summariser asks its model, and how a chunk's frames and a block's summaries are written
into a prompt. Times are media time, rendered ``H:MM:SS``.

- a **chunk summary** (mid-term) is written from one chunk's captions (runs of equal captions, see
  :func:`caption_lines`) and, for a VLM, a few of its frames;
- a **block** (long-term) is compressed from M chunk summaries (:func:`render_block_input`).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamharness.memory.timephrases import clock  # noqa: F401 - one media clock for prompts and notes

if TYPE_CHECKING:  # the backends module imports this one
    from streamharness.summariser.backends import BlockInput, ChunkFrame, ChunkInput

#: Words a chunk summary and a block may take (the prompts ask for at most this many).
CHUNK_WORDS = 120
BLOCK_WORDS = 150
#: Time anchors a chunk summary should carry.
MIN_ANCHORS, MAX_ANCHORS = 3, 5

CHUNK_SYSTEM = (
    "You keep the written memory of a live video stream. You are shown one stretch of the video, as "
    "timestamped captions and sometimes timestamped frames, and you write a short factual record of it. "
    "The record is all that will be left of this stretch later, when someone asks what happened and when, "
    "so it must be exact about times, counts, text and how things ended up. Write plain sentences."
)

BLOCK_SYSTEM = (
    "You keep the written memory of a live video stream. Older records are merged so that the memory "
    "stays short: you are given several consecutive records of the stream and you write one record "
    "that keeps what matters from all of them. Write plain sentences."
)


def span(start_ms: int, end_ms: int) -> str:
    """``0:03:20–0:04:05``, or one time when both ends fall in the same second."""
    start, end = clock(start_ms), clock(end_ms)
    return start if start == end else f"{start}–{end}"


def chunk_task(chunk: ChunkInput) -> str:
    """The instruction under a chunk's captions (and frames)."""
    when = span(chunk.start_ms, chunk.end_ms)
    return (
        f"Write the record of the video from {when} in at most {CHUNK_WORDS} words.\n"
        f"- Tie the facts to {MIN_ANCHORS} to {MAX_ANCHORS} moments written as [H:MM:SS], "
        "using only times shown above.\n"
        f"- Say what the scene looks like at the end, at {clock(chunk.end_ms)}.\n"
        "- Say what changed and when, above all what cannot be undone: something or someone arriving "
        "or leaving, an object taken, dropped, opened or broken.\n"
        "- Copy any readable text and numbers exactly as shown; after a reading you are not sure of, "
        "write (uncertain).\n"
        "- Give counts of people and things, and say when something is seen for the first time.\n"
        "- Only what was shown: no guesses about intentions, causes or what comes next."
    )


def block_task(block: BlockInput) -> str:
    """The instruction under a block's summaries."""
    n = len(block.summaries)
    records = "record" if n == 1 else f"{n} records"
    return (
        f"Merge the {records} above, which cover {span(block.start_ms, block.end_ms)} of the video, "
        f"into one record of at most {BLOCK_WORDS} words.\n"
        "- Keep the [H:MM:SS] times of the main events, in time order.\n"
        f"- Keep how things ended up: the state at {clock(block.end_ms)}, and every change on the way.\n"
        "- Keep counts, and readable text and numbers exactly as written, (uncertain) marks included.\n"
        "- Say a thing that repeats once, with the times it was seen.\n"
        "- Add nothing that the records do not say."
    )


# -- caption runs ------------------------------------------------------------------------------
@dataclass
class CaptionRun:
    """Consecutive frames with one caption (or, once merged, neighbouring runs taken together)."""

    start_ms: int
    end_ms: int
    frames: int
    parts: list[tuple[str, int]]  # (caption, frames) in time order; one entry until runs merge
    people: int = 0  # the most people in one of its frames

    @property
    def captions(self) -> list[tuple[str, int]]:
        """(caption, frames) of each distinct caption, most seen first (the earliest on a tie)."""
        totals: Counter[str] = Counter()
        first: dict[str, int] = {}
        for caption, n in self.parts:
            first.setdefault(caption, len(first))
            totals[caption] += n
        return sorted(totals.items(), key=lambda kv: (-kv[1], first[kv[0]]))

    @property
    def merged(self) -> bool:
        return len(self.parts) > 1


def _runs(frames: Sequence[ChunkFrame]) -> list[CaptionRun]:
    runs: list[CaptionRun] = []
    for frame in frames:
        caption = " ".join(frame.caption.split())
        if not caption:
            continue
        last = runs[-1] if runs else None
        if last is not None and len(last.parts) == 1 and last.parts[0][0] == caption:
            last.end_ms = frame.media_ts_ms
            last.frames += 1
            last.parts[0] = (caption, last.frames)
            last.people = max(last.people, frame.person_count)
        else:
            runs.append(CaptionRun(frame.media_ts_ms, frame.media_ts_ms, 1, [(caption, 1)], max(0, frame.person_count)))
    return runs


def _merge_to(runs: list[CaptionRun], max_lines: int) -> list[CaptionRun]:
    """Merge adjacent runs until ``max_lines`` are left: always the neighbouring pair with the fewest
    frames together (the earliest on a tie), so caption flicker goes first and long steady runs stay."""
    if len(runs) <= max_lines:
        return runs
    alive = [True] * len(runs)
    nxt = list(range(1, len(runs) + 1))
    prv = list(range(-1, len(runs) - 1))
    version = [0] * len(runs)
    heap = [(runs[i].frames + runs[i + 1].frames, i, 0, 0) for i in range(len(runs) - 1)]
    heapq.heapify(heap)
    left = len(runs)
    while left > max_lines and heap:
        _, i, vi, vj = heapq.heappop(heap)
        j = nxt[i] if i < len(runs) and alive[i] else -1
        if j < 0 or j >= len(runs) or version[i] != vi or version[j] != vj:
            continue  # stale: one side changed since this pair was pushed
        a, b = runs[i], runs[j]
        a.end_ms, a.frames = b.end_ms, a.frames + b.frames
        a.parts.extend(b.parts)
        a.people = max(a.people, b.people)
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] < len(runs):
            prv[nxt[j]] = i
        version[i] += 1
        left -= 1
        if prv[i] >= 0:
            p = prv[i]
            heapq.heappush(heap, (runs[p].frames + a.frames, p, version[p], version[i]))
        if nxt[i] < len(runs):
            n = nxt[i]
            heapq.heappush(heap, (a.frames + runs[n].frames, i, version[i], version[n]))
    return [run for run, keep in zip(runs, alive, strict=True) if keep]


def _run_text(run: CaptionRun, shown: int = 3) -> str:
    order = list(dict.fromkeys(caption for caption, _ in run.parts))
    if len(order) > shown:
        top = {c for c, _ in run.captions[:shown]}
        text = "; ".join(c for c in order if c in top) + "; …"
    else:
        text = "; ".join(order)
    unit = "frame" if run.frames == 1 else "frames"
    return f"[{span(run.start_ms, run.end_ms)}] {text} ({run.frames} {unit})"


def caption_runs(frames: Sequence[ChunkFrame], max_runs: int) -> list[CaptionRun]:
    """The runs of equal captions behind :func:`caption_lines`, merged down to ``max_runs``."""
    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    return _merge_to(_runs(frames), max_runs)


def caption_lines(frames: Sequence[ChunkFrame], max_lines: int) -> list[str]:
    """The frames' captions as runs of equal captions, oldest first, at most ``max_lines`` lines:
    ``[0:03:20–0:04:05] a car on a road (46 frames)``. When there are more runs than lines,
    neighbouring runs are merged (a merged line lists its most-seen captions in time order, ``…``
    where some were left out). Frames without a caption are skipped."""
    return [_run_text(run) for run in caption_runs(frames, max_lines)]


# -- what goes above the task --------------------------------------------------------------------
def detections_line(frames: Sequence[ChunkFrame], top: int = 6) -> str:
    """One line of what the detectors counted: the most people and when, the most-seen labels."""
    bits: list[str] = []
    most = max((f.person_count for f in frames), default=0)
    if most > 0:
        when = next(f.media_ts_ms for f in frames if f.person_count == most)
        bits.append(f"at most {most} {'person' if most == 1 else 'people'} at once, first at [{clock(when)}]")
    labels = label_frames(frames)
    if labels:
        bits.append("labels (frames seen): " + ", ".join(f"{label} {n}" for label, n in labels[:top]))
    return ("Detectors: " + "; ".join(bits) + ".") if bits else ""


def label_frames(frames: Sequence[ChunkFrame]) -> list[tuple[str, int]]:
    """(label, frames it is seen in), most seen first, then alphabetical."""
    counts: Counter[str] = Counter()
    for frame in frames:
        counts.update({label.strip() for label in frame.labels if label.strip()})
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def render_chunk_input(chunk: ChunkInput, max_lines: int) -> str:
    """The text a chunk prompt carries above its task: the caption lines and the detections."""
    lines = caption_lines(chunk.frames, max_lines)
    head = f"Captions of the video from {span(chunk.start_ms, chunk.end_ms)}, oldest first:"
    body = "\n".join(lines) if lines else "(no captions)"
    detections = detections_line(chunk.frames)
    return f"{head}\n{body}" + (f"\n\n{detections}" if detections else "")


def render_block_input(block: BlockInput) -> str:
    """The summaries a block is compressed from, oldest first, each under its time span."""
    parts = []
    for n, piece in enumerate(block.summaries, 1):
        note = " (automatic digest)" if piece.fallback else ""
        parts.append(f"Record {n}, {span(piece.start_ms, piece.end_ms)}{note}:\n{piece.text.strip() or '(empty)'}")
    return "\n\n".join(parts) if parts else "(no records)"
