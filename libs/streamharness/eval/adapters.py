"""Read the published annotation files of OVO-Bench and StreamingBench into Streaming-Eval episodes.

For users who have those benchmarks' videos: point ``video_root`` at the folder the annotation's
video paths are relative to. Each video becomes one :class:`~streamharness.eval.episode.Episode`
holding every item asked on it.

What comes from the published layouts (as read by the benchmarks' own evaluation code):

* **OVO-Bench** (``data/ovo_bench_new.json``): a JSON list of items, each with ``id``, ``video``
  (path), ``task``. Backward-tracing (EPM, ASI, HLD) and real-time (STU, OJR, ATR, ACR, OCR, FPD)
  items carry ``question``, ``options`` (list of strings), ``gt`` (index of the right option) and
  ``realtime`` (seconds: the question is asked there). Forward active-responding items carry
  ``test_info``, a list of probes each with ``realtime``: REC adds ``activity`` and per-probe
  ``count`` (repetitions so far); SSR per-probe ``step`` and ``type`` (1 = the step is being done
  now, 0 = not); CRR ``question`` (and, where present, ``answer``) and per-probe ``type`` (1 = the
  video so far suffices to answer).
* **StreamingBench** (``questions_*.json``): a JSON list of entries, each with ``video_path`` and
  ``questions``: items with ``task_type``, ``question``, ``time_stamp`` (``"HH:MM:SS"``), ``options``
  (``"A. ..."`` strings) and ``answer`` (a letter); Proactive Output items instead carry
  ``ground_truth_time_stamp`` and ``ground_truth_output``.

What is this project's assumption (the benchmarks score offline, so they define no windows):

* Task → mode × position (:data:`OVO_TASK_CELLS`, :data:`STREAMINGBENCH_TASK_CELLS`).
* A question's answer window is ``[ask, ask + answer_window_s]`` (default 5 s), clipped to the video.
* OVO forward tasks become standing instructions given at ``forward_given_at_s`` (default 0 s):
  REC: "tell me each time they <activity>", one window ``[previous probe, probe]`` per probe
  interval in which the count rose (adjacent windows merge, so several repetitions between two
  probes expect one alert); SSR: one instruction per distinct step, a window spanning each run of
  consecutive ``type == 1`` probes; CRR: one window ``[last probe with type 0, first probe with
  type 1 + answer_window_s]``, i.e. from when the clue may have appeared until shortly after the
  benchmark knows it has.
* StreamingBench Proactive Output: window ``[ground truth, ground truth + proactive_window_s]``
  (default 4 s, the benchmark's own polling horizon), reference = ``ground_truth_output``.
* ``duration_s``: read from the video file with OpenCV when it exists under ``video_root``;
  otherwise the latest event time or window end plus ``tail_s`` (flagged in ``metadata``).
* Audio (StreamingBench omni-source tasks) is not replayed by the harness; those questions are kept
  so scores can be compared, but a vision-only system is expected to do worse on them.

Errors are :class:`AdapterError` (an :class:`EpisodeFormatError`) naming the file, item and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streamharness.eval.episode import Episode, EpisodeFormatError, parse_episode

Cell = tuple[str, str]  # (mode, position)

OVO_TASK_CELLS: dict[str, Cell] = {
    # backward tracing: about what happened before the ask
    "EPM": ("punctual", "backward"),  # episodic memory
    "ASI": ("punctual", "backward"),  # action sequence identification
    "HLD": ("punctual", "backward"),  # hallucination detection
    # real-time visual perception: about now
    "STU": ("punctual", "present"),  # spatial understanding
    "OJR": ("punctual", "present"),  # object recognition
    "ATR": ("punctual", "present"),  # attribute recognition
    "ACR": ("punctual", "present"),  # action recognition
    "OCR": ("punctual", "present"),  # optical character recognition
    "FPD": ("punctual", "present"),  # future prediction (asked now, answered from now)
    # forward active responding: the answer appears later; the model must speak up by itself
    "REC": ("proactive", "forward"),  # repetition event count
    "SSR": ("proactive", "forward"),  # sequential steps recognition
    "CRR": ("proactive", "forward"),  # clues reveal responding
}

STREAMINGBENCH_TASK_CELLS: dict[str, Cell] = {
    # Real-Time Visual Understanding
    "Object Perception": ("punctual", "present"),
    "Causal Reasoning": ("punctual", "present"),
    "Clips Summarization": ("punctual", "backward"),
    "Attribute Perception": ("punctual", "present"),
    "Event Understanding": ("punctual", "present"),
    "Text-Rich Understanding": ("punctual", "present"),
    "Prospective Reasoning": ("punctual", "forward"),
    "Spatial Understanding": ("punctual", "present"),
    "Action Perception": ("punctual", "present"),
    "Counting": ("punctual", "present"),
    # Omni-Source Understanding (audio + video)
    "Emotion Recognition": ("punctual", "present"),
    "Scene Understanding": ("punctual", "present"),
    "Source Discrimination": ("punctual", "backward"),  # "who just said ..."
    "Multimodal Alignment": ("punctual", "present"),
    # Contextual Understanding
    "Misleading Context Understanding": ("contextual", "present"),
    "Anomaly Context Understanding": ("contextual", "present"),
    "Sequential Question Answering": ("contextual", "backward"),
    "Proactive Output": ("proactive", "forward"),
}

_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])[.):]\s*")


class AdapterError(EpisodeFormatError):
    """A benchmark annotation file could not be read; the message names the file, item and field."""


# -- shared helpers ----------------------------------------------------------------------------------
def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such annotation file") from None
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not JSON: {err}") from None


def parse_timestamp(value: Any) -> float:
    """``"HH:MM:SS"`` / ``"MM:SS"`` / ``"SS"`` (fractions allowed) or a number → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?(:\d+(\.\d+)?){0,2}", value.strip()):
        seconds = 0.0
        for part in value.strip().split(":"):
            seconds = seconds * 60 + float(part)
    else:
        raise ValueError(f"not a time (HH:MM:SS or seconds): {value!r}")
    if seconds < 0:
        raise ValueError(f"negative time: {value!r}")
    return seconds


def _video_path(video: str, video_root: Path | str | None) -> Path:
    p = Path(video)
    if video.startswith("./"):
        p = Path(video[2:])
    return p if p.is_absolute() or video_root is None else Path(video_root) / p


def _probe_duration(path: Path) -> float | None:
    if not path.is_file():
        return None
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return None
        frames, fps = cap.get(cv2.CAP_PROP_FRAME_COUNT), cap.get(cv2.CAP_PROP_FPS)
        return round(frames / fps, 3) if frames > 0 and fps > 0 else None
    finally:
        cap.release()


def _episode_id(prefix: str, video: str, used: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(video).with_suffix("").as_posix().strip("./")).strip("-")
    base = f"{prefix}-{stem or 'video'}"
    eid, n = base, 2
    while eid in used:
        eid, n = f"{base}-{n}", n + 1
    used.add(eid)
    return eid


def _finish(events: list[dict], ids: list[Any], *, prefix: str, source: str, video: str, video_root: Any,
            probe: bool, tail_s: float, used: set[str], where: str) -> Episode:
    path = _video_path(video, video_root)
    duration = _probe_duration(path) if probe else None
    latest = max([e.get("ask_at_s", e.get("given_at_s", 0.0)) for e in events]
                 + [w[1] for e in events for w in ([e["window"]] if "window" in e else e["windows"])] + [0.0])
    metadata: dict[str, Any] = {"benchmark_ids": ids, "benchmark_video": video}
    if duration is None:
        duration = round(latest + tail_s, 3)
        metadata["duration_estimated"] = True
    for e in events:  # clip windows to the video
        if "window" in e:
            e["window"] = [e["window"][0], min(e["window"][1], duration)]
        else:
            e["windows"] = [[w[0], min(w[1], duration)] for w in e["windows"]]
    raw = {"format_version": 1, "episode_id": _episode_id(prefix, video, used), "video": str(path),
           "duration_s": duration, "source": source, "events": events, "metadata": metadata}
    try:
        return parse_episode(raw, where)
    except EpisodeFormatError as err:
        raise AdapterError(str(err)) from None


def _merge(windows: list[list[float]]) -> list[list[float]]:
    """Sort windows and merge those that overlap or touch (episode windows must be disjoint)."""
    out: list[list[float]] = []
    for w in sorted(windows):
        if out and w[0] <= out[-1][1]:
            out[-1][1] = max(out[-1][1], w[1])
        else:
            out.append(list(w))
    return out


def _field(item: dict, name: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    if name not in item:
        raise AdapterError(f"{where}: missing field {name!r}")
    value = item[name]
    if kind is not None and not isinstance(value, kind):
        raise AdapterError(f"{where}: field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _time(item: dict, name: str, where: str) -> float:
    try:
        return parse_timestamp(_field(item, name, where))
    except ValueError as err:
        raise AdapterError(f"{where}: field {name!r}: {err}") from None


# -- OVO-Bench ---------------------------------------------------------------------------------------
def read_ovo_bench(annotation: Path | str, video_root: Path | str | None = None, *,
                   answer_window_s: float = 5.0, forward_given_at_s: float = 0.0,
                   probe_duration: bool = True, tail_s: float = 5.0,
                   tasks: set[str] | None = None) -> list[Episode]:
    """Episodes from OVO-Bench's ``ovo_bench_new.json`` layout, one per video (see module docstring)."""
    path = Path(annotation)
    data = _load_json(path)
    if not isinstance(data, list):
        raise AdapterError(f"{path}: expected a JSON list of OVO-Bench items, got {type(data).__name__}")
    by_video: dict[str, tuple[list[dict], list[Any]]] = {}
    for n, item in enumerate(data):
        where = f"{path}: item {n}" + (f" (id {item.get('id')!r})" if isinstance(item, dict) else "")
        if not isinstance(item, dict):
            raise AdapterError(f"{where}: expected an object")
        task = _field(item, "task", where, str)
        if task not in OVO_TASK_CELLS:
            raise AdapterError(f"{where}: unknown task {task!r} (known: {', '.join(OVO_TASK_CELLS)})")
        if tasks is not None and task not in tasks:
            continue
        video = _field(item, "video", where, str)
        item_id = item.get("id", n)
        events = _ovo_events(item, task, f"{task}-{item_id}", where, answer_window_s, forward_given_at_s)
        evs, ids = by_video.setdefault(video, ([], []))
        evs.extend(events)
        ids.append(item_id)
    used: set[str] = set()
    return [_finish(evs, ids, prefix="ovo", source="ovo-bench", video=video, video_root=video_root,
                    probe=probe_duration, tail_s=tail_s, used=used, where=f"{path} (video {video!r})")
            for video, (evs, ids) in by_video.items()]


def _ovo_events(item: dict, task: str, event_id: str, where: str, answer_window_s: float,
                given_at: float) -> list[dict]:
    mode, position = OVO_TASK_CELLS[task]
    if mode != "proactive":
        ask = _time(item, "realtime", where)
        options = _field(item, "options", where, list)
        gt = _field(item, "gt", where, int)
        if not 0 <= gt < len(options):
            raise AdapterError(f"{where}: field 'gt' = {gt} does not index the {len(options)} options")
        return [{"type": "question", "event_id": event_id, "ask_at_s": ask,
                 "text": _field(item, "question", where, str), "window": [ask, ask + answer_window_s],
                 "choices": [str(o) for o in options], "answer_index": gt, "mode": mode, "position": position}]
    probes = _field(item, "test_info", where, list)
    if not probes:
        raise AdapterError(f"{where}: field 'test_info' is empty")
    for k, p in enumerate(probes):
        if not isinstance(p, dict):
            raise AdapterError(f"{where}: test_info[{k}] is not an object")
    times = [_time(p, "realtime", f"{where}: test_info[{k}]") for k, p in enumerate(probes)]
    order = sorted(range(len(probes)), key=lambda k: times[k])
    base = {"type": "instruction", "given_at_s": given_at, "mode": mode, "position": position}
    if task == "REC":
        activity = _field(item, "activity", where, str)
        windows, prev_t, prev_count = [], given_at, 0
        for k in order:
            count = _field(probes[k], "count", f"{where}: test_info[{k}]", int)
            if count > prev_count:
                windows.append([prev_t, times[k]])
            prev_t, prev_count = times[k], count
        return [{**base, "event_id": event_id, "text": f"Tell me each time they {activity}.",
                 "windows": _merge(windows)}]
    if task == "SSR":
        steps: dict[str, list[list[float]]] = {}
        runs: dict[str, list[float] | None] = {}
        for k in order:
            pw = f"{where}: test_info[{k}]"
            step = _field(probes[k], "step", pw, str)
            kind = _field(probes[k], "type", pw, int)
            steps.setdefault(step, [])
            run = runs.get(step)
            if kind == 1:
                if run is None:
                    runs[step] = run = [times[k], times[k]]
                    steps[step].append(run)
                run[1] = times[k]
            else:
                runs[step] = None
        return [{**base, "event_id": f"{event_id}-step{i + 1}",
                 "text": f"Tell me when they do this step: {step}", "windows": _merge(ws)}
                for i, (step, ws) in enumerate(steps.items()) if ws]
    # CRR
    question = _field(item, "question", where, str)
    last0, first1 = given_at, None
    for k in order:
        kind = _field(probes[k], "type", f"{where}: test_info[{k}]", int)
        if kind == 1:
            first1 = times[k]
            break
        last0 = times[k]
    if first1 is None:
        raise AdapterError(f"{where}: test_info has no probe with type 1 (the clue never appears)")
    event = {**base, "event_id": event_id, "text": f"Answer as soon as the video shows enough: {question}",
             "windows": [[last0, first1 + answer_window_s]]}
    if isinstance(item.get("answer"), str) and item["answer"]:
        event["reference"] = item["answer"]
    return [event]


# -- StreamingBench ----------------------------------------------------------------------------------
def read_streamingbench(annotation: Path | str, video_root: Path | str | None = None, *,
                        answer_window_s: float = 5.0, proactive_window_s: float = 4.0,
                        probe_duration: bool = True, tail_s: float = 5.0,
                        tasks: set[str] | None = None) -> list[Episode]:
    """Episodes from a StreamingBench ``questions_*.json`` file, one per video (see module docstring)."""
    path = Path(annotation)
    data = _load_json(path)
    if isinstance(data, dict):  # a file holding a single entry
        data = [data]
    if not isinstance(data, list):
        raise AdapterError(f"{path}: expected a JSON list of StreamingBench entries, got {type(data).__name__}")
    by_video: dict[str, tuple[list[dict], list[Any]]] = {}
    for n, entry in enumerate(data):
        where = f"{path}: entry {n}"
        if not isinstance(entry, dict):
            raise AdapterError(f"{where}: expected an object")
        video = _field(entry, "video_path", where, str)
        questions = _field(entry, "questions", where, list)
        evs, ids = by_video.setdefault(video, ([], []))
        for m, q in enumerate(questions):
            qwhere = f"{where} ({video}): questions[{m}]"
            if not isinstance(q, dict):
                raise AdapterError(f"{qwhere}: expected an object")
            task = _field(q, "task_type", qwhere, str)
            if task not in STREAMINGBENCH_TASK_CELLS:
                raise AdapterError(f"{qwhere}: unknown task_type {task!r}")
            if tasks is not None and task not in tasks:
                continue
            event_id = f"{re.sub(r'[^a-z0-9]+', '-', task.lower()).strip('-')}-{n}-{m}"
            evs.append(_streamingbench_event(q, task, event_id, qwhere, answer_window_s, proactive_window_s))
            ids.append(f"{n}/{m}")
    used: set[str] = set()
    return [_finish(evs, ids, prefix="streamingbench", source="streamingbench", video=video,
                    video_root=video_root, probe=probe_duration, tail_s=tail_s, used=used,
                    where=f"{path} (video {video!r})")
            for video, (evs, ids) in by_video.items() if evs]


def _streamingbench_event(q: dict, task: str, event_id: str, where: str, answer_window_s: float,
                          proactive_window_s: float) -> dict:
    mode, position = STREAMINGBENCH_TASK_CELLS[task]
    ask = _time(q, "time_stamp", where)
    text = _field(q, "question", where, str)
    if task == "Proactive Output":
        gt = _time(q, "ground_truth_time_stamp", where)
        if gt < ask:
            raise AdapterError(f"{where}: ground_truth_time_stamp is before time_stamp")
        return {"type": "instruction", "event_id": event_id, "given_at_s": ask, "text": text,
                "windows": [[gt, gt + proactive_window_s]],
                "reference": str(_field(q, "ground_truth_output", where)), "mode": mode, "position": position}
    options = _field(q, "options", where, list)
    letters, choices = [], []
    for k, opt in enumerate(options):
        if not isinstance(opt, str):
            raise AdapterError(f"{where}: options[{k}] is not a string")
        m = _OPTION_PREFIX.match(opt)
        letters.append(m.group(1) if m else chr(65 + k))
        choices.append(opt[m.end():].strip() if m else opt.strip())
    answer = str(_field(q, "answer", where)).strip().upper()[:1]
    if answer not in letters:
        raise AdapterError(f"{where}: answer {q['answer']!r} is not one of the option letters {letters}")
    return {"type": "question", "event_id": event_id, "ask_at_s": ask, "text": text,
            "window": [ask, ask + answer_window_s], "choices": choices, "answer_index": letters.index(answer),
            "mode": mode, "position": position}


READERS: dict[str, Callable[..., list[Episode]]] = {
    "ovo-bench": read_ovo_bench,
    "streamingbench": read_streamingbench,
}


def read_benchmark(name: str, annotation: Path | str, video_root: Path | str | None = None, **kw: Any) -> list[Episode]:
    """Dispatch by benchmark name (``ovo-bench`` or ``streamingbench``)."""
    try:
        reader = READERS[name]
    except KeyError:
        raise AdapterError(f"unknown benchmark {name!r} (known: {', '.join(READERS)})") from None
    return reader(annotation, video_root, **kw)
