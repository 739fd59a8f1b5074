"""Annotation formats → :class:`~streamharness.train.samples.StreamSample`. Every reader is
``read_<format>(path, video_root=None, **options) -> Iterator[StreamSample]``; :data:`FORMATS`
names them, :func:`detect_format` tells a file's format, :func:`read_annotations` does both.

========================  ========================================================================
``streaming-raw``         the public per-second release, raw layout (JSON array or JSONL)
``streaming-converted``   the same release, converted (per-second user / assistant turns)
``activitynet``           ActivityNet Captions (``train.json``, ``val_1.json``, ``val_2.json``)
``youcook2``              YouCook2 (``youcookii_annotations_*.json``)
``charades-sta``          Charades-STA (``charades_sta_{train,test}.txt``)
``episodes``              Streaming-Eval episodes (file or folder; :mod:`streamharness.eval.episode`)
``jsonl``                 the generic format: one ``StreamSample`` JSON object per line
========================  ========================================================================

The mapping rules of each format are in docs/training-formats.md. Common to all:

* A relative video path is resolved against ``video_root`` if given, else the annotation file's
  folder. ActivityNet, YouCook2 and Charades-STA name videos by id: ``<video_root>/<id>`` plus the
  first of :data:`VIDEO_EXTENSIONS` that exists (else ``.mp4``). Readers never require a video to
  exist (the builder counts missing ones).
* Malformed input is never skipped: it raises :class:`AnnotationFormatError` naming the file, the
  line (JSONL: the line; a JSON array: the line its record starts on; a JSON object of videos: the
  line of that video's key; text: the line) and the field. A file that is not JSON gives the line
  of the JSON error.
* Readers are generators: errors surface while iterating, at the record they concern.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from streamharness.train.convert import IMAGE, RESPONSE, SILENCE
from streamharness.train.samples import (
    AnnotationFormatError,
    StreamSample,
    TimedText,
    Trigger,
)

DEFAULT_WINDOW_S = 3.0  # a response's window when the annotation gives none: [t, t + 3 s]
NARRATION_INSTRUCTION = "Describe each new step as it happens."
INSTRUCTION_TASK_WORDS = ("alert", "proactive", "narration", "dense")  # task types of standing instructions
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")
DURATION_SLACK_S = 1.0  # a segment may end up to 1 s after the annotated duration
EPISODE_RESPONSE = "Now."  # an instruction window's response when the episode gives no reference

Fail = Callable[[str | None, str], AnnotationFormatError]


# -- text, JSON and where things are ------------------------------------------------------------------
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class _Text:
    """An annotation file's text, with offsets → line numbers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise AnnotationFormatError(path, None, None, f"not UTF-8 text: {err}") from None
        self._newlines: list[int] | None = None

    def line_of(self, offset: int) -> int:
        if self._newlines is None:
            self._newlines = [m.start() for m in re.finditer("\n", self.text)]
        return bisect.bisect_left(self._newlines, offset) + 1

    def lines(self) -> Iterator[tuple[int, str]]:
        """(line number, line) of the non-blank lines (split on ``\\n`` only: JSON strings may hold U+2028)."""
        for n, line in enumerate(self.text.split("\n"), start=1):
            if line.strip():
                yield n, line.rstrip("\r")

    def json(self) -> Any:
        return _loads(self.text, self.path, None)


def _loads(text: str, path: Path, line: int | None) -> Any:
    """``json.loads``; a syntax error names its line (``line``: the line ``text`` is, for JSONL)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationFormatError(path, line if line is not None else err.lineno, None,
                                    f"not JSON: {err.msg} (column {err.colno})") from None


def _skip(text: str, i: int) -> int:
    return _WS.match(text, i).end()  # type: ignore[union-attr]  # the pattern matches the empty string


def _array_starts(text: str) -> list[int]:
    """Offsets of the elements of the (valid) top-level JSON array in ``text``."""
    i = _skip(text, _skip(text, 0) + 1)
    starts: list[int] = []
    if text[i] == "]":
        return starts
    while True:
        starts.append(i)
        _, i = _DECODER.raw_decode(text, i)
        i = _skip(text, i)
        if text[i] == "]":
            return starts
        i = _skip(text, i + 1)


def _object_members(text: str, i: int) -> list[tuple[str, int, int]]:
    """(key, offset of the key, offset of the value) of the (valid) JSON object at offset ``i``."""
    i = _skip(text, _skip(text, i) + 1)
    members: list[tuple[str, int, int]] = []
    if text[i] == "}":
        return members
    while True:
        key_at = i
        key, i = _DECODER.raw_decode(text, i)
        i = _skip(text, _skip(text, i) + 1)  # past the colon
        value_at = i
        _, i = _DECODER.raw_decode(text, i)
        members.append((key, key_at, value_at))
        i = _skip(text, i)
        if text[i] == "}":
            return members
        i = _skip(text, i + 1)


def _key_lines(src: _Text, members: list[tuple[str, int, int]]) -> dict[str, int]:
    """Key → the line it appears on; a key given twice is an error (JSON keeps only the last)."""
    lines: dict[str, int] = {}
    for key, key_at, _ in members:
        if key in lines:
            raise AnnotationFormatError(src.path, src.line_of(key_at), key,
                                        f"video id repeats (first on line {lines[key]}); JSON would keep only the last")
        lines[key] = src.line_of(key_at)
    return lines


def _records(path: Path) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(index, line, record) of a JSONL file (``.jsonl``/``.ndjson``), a JSON array or one JSON object."""
    src = _Text(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for index, (n, line) in enumerate(src.lines()):
            yield index, n, _record(_loads(line, path, n), path, n, index)
        return
    data = src.json()
    if isinstance(data, dict):
        yield 0, src.line_of(_skip(src.text, 0)), data
    elif isinstance(data, list):
        for index, (start, item) in enumerate(zip(_array_starts(src.text), data)):
            line = src.line_of(start)
            yield index, line, _record(item, path, line, index)
    else:
        raise AnnotationFormatError(path, 1, None, f"expected a JSON array of records, got {type(data).__name__}")


def _record(item: Any, path: Path, line: int, index: int) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise AnnotationFormatError(path, line, None, f"record {index} is a {type(item).__name__}, not an object")
    return item


def _failer(path: Path, line: int | None, prefix: str = "") -> Fail:
    return lambda field, problem: AnnotationFormatError(path, line, field, prefix + problem)


# -- values -------------------------------------------------------------------------------------------
def _number(value: Any, field: str, fail: Fail) -> float:
    """A finite number, given as a JSON number or a numeric string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise fail(field, f"expected a number of seconds, got {value!r}")
    try:
        t = float(value.strip()) if isinstance(value, str) else float(value)
    except ValueError:
        raise fail(field, f"expected a number of seconds, got {value!r}") from None
    if not math.isfinite(t):
        raise fail(field, f"expected a finite number of seconds, got {value!r}")
    return t


def _seconds(value: Any, field: str, fail: Fail) -> float:
    t = _number(value, field, fail)
    if t < 0:
        raise fail(field, f"a time must be >= 0 s, got {value!r}")
    return t


def _text(value: Any, field: str, fail: Fail) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(field, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _opt_text(value: Any, field: str, fail: Fail) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise fail(field, f"expected a string, got {value!r}")
    return value


def _list(value: Any, field: str, fail: Fail) -> list[Any]:
    if not isinstance(value, list):
        raise fail(field, f"expected a list, got {'nothing' if value is None else repr(value)[:60]}")
    return value


def _dict(value: Any, field: str | None, fail: Fail) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise fail(field, f"expected an object, got {repr(value)[:60]}")
    return value


def _segment(start: Any, end: Any, field: str, duration: float | None, fail: Fail,
             end_field: str | None = None) -> tuple[float, float]:
    """A [start, end] segment: 0 <= start <= end (<= duration + 1 s when the duration is known).
    ``field`` names the segment (or its start, with ``end_field`` naming its end)."""
    end_field = end_field or field
    s, e = _number(start, field, fail), _number(end, end_field, fail)
    if s < 0:
        raise fail(field, f"segment [{start}, {end}] must satisfy 0 <= start <= end")
    if e < s:
        raise fail(end_field, f"segment [{start}, {end}] must satisfy 0 <= start <= end")
    if duration is not None and e > duration + DURATION_SLACK_S:
        raise fail(end_field, f"segment [{start}, {end}] ends after the video ({duration:g} s, {DURATION_SLACK_S:g} s of slack)")
    return s, e


def _is_instruction(task_type: str, time: float, n_responses: int) -> bool:
    """The standing-instruction rule of the raw and converted layouts (docs/training-formats.md)."""
    task = task_type.lower()
    return any(word in task for word in INSTRUCTION_TASK_WORDS) or (time == 0 and n_responses > 1)


def _video(base: Path, video_path: str) -> str:
    p = Path(video_path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _video_by_id(base: Path, video_id: str) -> str:
    for ext in VIDEO_EXTENSIONS:
        candidate = base / f"{video_id}{ext}"
        if candidate.exists():
            return str(candidate)
    return str(base / f"{video_id}.mp4")


def _base(path: Path, video_root: Path | str | None) -> Path:
    """Where relative video paths start: ``video_root``, else the annotation file's folder (absolute,
    like :func:`load_episodes` makes it)."""
    return Path(video_root).expanduser().absolute() if video_root is not None else path.resolve().parent


def _split_of(path: Path) -> str:
    """The split a public benchmark's file name says (``val_1.json``, ``charades_sta_test.txt``)."""
    name = path.name.lower()
    return "test" if "test" in name else "val" if "val" in name else "train"


def _sample(fail: Fail, **fields: Any) -> StreamSample:
    """Build a sample; what :class:`StreamSample` rejects becomes an :class:`AnnotationFormatError`."""
    try:
        return StreamSample(**fields)
    except ValidationError as err:
        raise _from_validation(fail, err) from None


def _from_validation(fail: Fail, err: ValidationError) -> AnnotationFormatError:
    errors = err.errors()
    loc = ".".join(str(p) for p in errors[0]["loc"]) or None

    def said(e: Any) -> str:
        value = e.get("input")
        return e["msg"] + ("" if isinstance(value, (dict, list)) or value is None else f" (got {repr(value)[:60]})")

    problems = [said(errors[0])] + [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {said(e)}" for e in errors[1:5]]
    return fail(loc, "; ".join(problems) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))


def _narration(fail: Fail, segments: list[tuple[float, float, str]], instruction: str, window_s: float,
               **fields: Any) -> StreamSample:
    """A dense-caption video → one instruction at 0, a response per segment at its start."""
    segments = sorted(segments, key=lambda seg: (seg[0], seg[1]))
    trigger = Trigger(trigger_id="narrate", kind="instruction", content=instruction, time=0.0,
                      responses=[TimedText(content=text, time=s) for s, _, text in segments],
                      windows=[(s, min(s + window_s, e)) for s, e, _ in segments])
    return _sample(fail, triggers=[trigger], task_type="narration", **fields)


# -- streaming-raw ------------------------------------------------------------------------------------
_RAW_FIELDS = ("video_name", "video_path", "task_type", "source", "question", "response", "duration", "id")


def read_streaming_raw(path: Path | str, video_root: Path | str | None = None, *,
                       window_s: float = DEFAULT_WINDOW_S) -> Iterator[StreamSample]:
    """The per-second release's raw layout: a JSON array (or JSONL) of ``{video_name, video_path,
    task_type, source, question: [{content, time}], response: [{content, time}]}``.

    Each response goes to the latest question asked at or before it; a question is an
    ``instruction`` when ``task_type`` names a standing task (:data:`INSTRUCTION_TASK_WORDS`) or when
    it is asked at 0 s and gets more than one response. A response's window is
    ``[st_time, end_time]`` when the record gives them (its time then defaults to ``end_time``),
    else ``[time, time + window_s]``."""
    path = Path(path)
    base = _base(path, video_root)
    yield from _unique(path, ((line, _raw_sample(path, index, line, record, base, window_s))
                              for index, line, record in _records(path)))


def _unique(path: Path, samples: Iterator[tuple[int, StreamSample]]) -> Iterator[StreamSample]:
    """The samples of a file, whose ids must not repeat."""
    seen: dict[str, int] = {}
    for line, sample in samples:
        if sample.sample_id in seen:
            raise AnnotationFormatError(path, line, "id",
                                        f"sample id {sample.sample_id!r} repeats (first on line {seen[sample.sample_id]})")
        seen[sample.sample_id] = line
        yield sample


def _sample_id(rec: dict[str, Any], default: str, fail: Fail) -> str:
    """A record's own ``id`` (a string or an integer), else ``default``."""
    value = rec.get("id")
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise fail("id", f"expected a non-empty string or an integer, got {value!r}")
    return str(value).strip()


def _raw_sample(path: Path, index: int, line: int, rec: dict[str, Any], base: Path, window_s: float) -> StreamSample:
    name = rec.get("video_name")
    fail = _failer(path, line, f"record {index}" + (f" (video_name {name!r})" if isinstance(name, str) else "") + ": ")
    video_name, video_path = _video_fields(rec, fail)
    task_type = _opt_text(rec.get("task_type"), "task_type", fail)
    source = _opt_text(rec.get("source"), "source", fail)
    duration = _seconds(rec["duration"], "duration", fail) if rec.get("duration") not in (None, "") else None

    questions: list[tuple[float, int, str]] = []
    for j, q in enumerate(_list(rec.get("question"), "question", fail)):
        q = _dict(q, f"question[{j}]", fail)
        _known(q, ("content", "time"), f"question[{j}]", fail)
        questions.append((_seconds(q.get("time"), f"question[{j}].time", fail), j,
                          _text(q.get("content"), f"question[{j}].content", fail)))
    questions.sort(key=lambda q: q[0])  # stable: same-time questions keep their order

    responses: list[tuple[float, int, str, tuple[float, float]]] = []
    for j, r in enumerate(_list(rec.get("response"), "response", fail)):
        r = _dict(r, f"response[{j}]", fail)
        _known(r, ("content", "time", "st_time", "end_time"), f"response[{j}]", fail)
        content = _text(r.get("content"), f"response[{j}].content", fail)
        given = {k: r.get(k) not in (None, "") for k in ("time", "st_time", "end_time")}
        if given["st_time"] != given["end_time"]:
            missing = "end_time" if given["st_time"] else "st_time"
            raise fail(f"response[{j}].{missing}", "st_time and end_time come together")
        window = None
        if given["st_time"]:
            st = _seconds(r["st_time"], f"response[{j}].st_time", fail)
            end = _seconds(r["end_time"], f"response[{j}].end_time", fail)
            if end < st:
                raise fail(f"response[{j}].end_time", f"the event ends ({end} s) before it starts ({st} s)")
            window = (st, end)
        if given["time"]:
            t = _seconds(r["time"], f"response[{j}].time", fail)
        elif window is not None:
            t = window[1]
        else:
            raise fail(f"response[{j}].time", "a response needs a time (or st_time and end_time)")
        responses.append((t, j, content, window or (t, t + window_s)))
    responses.sort(key=lambda r: r[0])

    times = [q[0] for q in questions]
    linked: dict[int, list[tuple[float, str, tuple[float, float]]]] = {j: [] for _, j, _ in questions}
    for t, j, content, window in responses:
        k = bisect.bisect_right(times, t) - 1
        if k < 0:
            first = f"the first question is asked at {times[0]:g} s" if times else "the record has no question"
            raise fail(f"response[{j}].time", f"a response at {t:g} s comes before any question ({first})")
        linked[questions[k][1]].append((t, content, window))

    triggers = []
    for t, j, content in questions:
        rs = linked[j]
        triggers.append(Trigger(trigger_id=f"q{j}", kind="instruction" if _is_instruction(task_type, t, len(rs)) else "question",
                                content=content, time=t, responses=[TimedText(content=c, time=rt) for rt, c, _ in rs],
                                windows=[w for _, _, w in rs]))
    extra = {k: v for k, v in rec.items() if k not in _RAW_FIELDS}
    return _sample(fail, sample_id=_sample_id(rec, f"{video_name}#{index}", fail), video_name=video_name, video_path=_video(base, video_path),
                   task_type=task_type, source=source or "streaming-raw", duration_s=duration, triggers=triggers,
                   metadata={"format": "streaming-raw", "record": index, **({"extra": extra} if extra else {})})


def _video_fields(rec: dict[str, Any], fail: Fail) -> tuple[str, str]:
    """``video_name`` and ``video_path`` (one may stand for the other; at least one is needed)."""
    name, vpath = rec.get("video_name"), rec.get("video_path")
    for field, value in (("video_name", name), ("video_path", vpath)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise fail(field, f"expected a non-empty string, got {value!r}")
    if name is None and vpath is None:
        raise fail("video_path", "a record needs video_path or video_name")
    return (name or Path(vpath).name).strip(), (vpath or name).strip()


def _known(obj: dict[str, Any], allowed: tuple[str, ...], field: str, fail: Fail) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise fail(f"{field}.{unknown[0]}", f"unknown field(s) {unknown} (known: {list(allowed)})")


# -- streaming-converted ------------------------------------------------------------------------------
_USER_TURN = re.compile(r"\A(?:(?P<said>.*)\n)?<(?P<t>[0-9]+(?:\.[0-9]+)?) seconds>\n" + re.escape(IMAGE) + r"\Z", re.DOTALL)
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_CONVERTED_FIELDS = ("video_name", "video_path", "id", "task_type", "source", "conversations", "messages", "duration")


def read_streaming_converted(path: Path | str, video_root: Path | str | None = None, *,
                             window_s: float = DEFAULT_WINDOW_S) -> Iterator[StreamSample]:
    """The release's converted samples: ``{video_name / video_path, id?, task_type?, source?,
    conversations | messages: [{role | from, content | value}]}``, one user turn
    (``"<T seconds>\\n<image>"``, or ``"text\\n<T seconds>\\n<image>"``) and one assistant turn
    (``"</silence>"`` or ``"</response> text"``) per step. The text before a time tag is a trigger
    at ``T`` (a line ``Stop: <text>`` withdraws an earlier one instead); a response goes to the
    latest trigger, with the window ``[T, T + window_s]``; kinds follow the raw layout's rule."""
    path = Path(path)
    base = _base(path, video_root)
    yield from _unique(path, ((line, _converted_sample(path, index, line, record, base, window_s))
                              for index, line, record in _records(path)))


def _converted_sample(path: Path, index: int, line: int, rec: dict[str, Any], base: Path, window_s: float) -> StreamSample:
    name = rec.get("video_name", rec.get("id"))
    fail = _failer(path, line, f"record {index}" + (f" ({name!r})" if isinstance(name, str) else "") + ": ")
    video_name, video_path = _video_fields(rec, fail)
    task_type = _opt_text(rec.get("task_type"), "task_type", fail)
    source = _opt_text(rec.get("source"), "source", fail)
    if "conversations" in rec and "messages" in rec:
        raise fail("messages", "give conversations or messages, not both")
    key = "messages" if "messages" in rec else "conversations"
    turns = _list(rec.get(key), key, fail)

    system: list[str] = []
    triggers: list[dict[str, Any]] = []  # mutable while reading: content, time, withdrawn, responses
    step_times: list[float] = []
    expect = "user"
    for i, turn in enumerate(turns):
        field = f"{key}[{i}]"
        turn = _dict(turn, field, fail)
        role_key = "role" if "role" in turn else "from"
        content_key = "content" if "content" in turn else "value"
        role = _ROLES.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
        if role is None:
            raise fail(f"{field}.{role_key}", f"expected user/human, assistant/gpt or system, got {turn.get(role_key)!r}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise fail(f"{field}.{content_key}", f"expected a string, got {content!r}")
        if role == "system":
            if step_times:
                raise fail(f"{field}.{role_key}", "a system turn after the first step")
            system.append(content)
        elif role != expect:
            raise fail(f"{field}.{role_key}", "an assistant turn with no user turn before it" if role == "assistant"
                       else f"a user turn where the assistant turn of step {len(step_times) - 1} should be")
        elif role == "user":
            m = _USER_TURN.match(content.strip())
            if m is None:
                raise fail(f"{field}.{content_key}", f"a user turn must end with '<T seconds>\\n{IMAGE}', got {content[:80]!r}")
            t = float(m["t"])
            if step_times and t <= step_times[-1]:
                raise fail(f"{field}.{content_key}", f"step time {t:g} s does not come after the previous step ({step_times[-1]:g} s)")
            step_times.append(t)
            new: list[str] = []
            for said in (m["said"] or "").split("\n"):
                target = said[len("Stop: "):].strip() if said.startswith("Stop: ") else None
                open_ = [tr for tr in triggers if tr["content"] == target and tr["withdrawn"] is None]
                if open_:
                    open_[-1]["withdrawn"] = t
                elif said.strip():
                    new.append(said.strip())
            if new:
                triggers.append({"content": "\n".join(new), "time": t, "withdrawn": None, "responses": []})
            expect = "assistant"
        else:
            text = content.strip()
            if text != SILENCE:
                if not text.startswith(RESPONSE):
                    raise fail(f"{field}.{content_key}",
                               f"an assistant turn must be {SILENCE!r} or '{RESPONSE} text', got {content[:80]!r}")
                said = text[len(RESPONSE):].strip()
                if not said:
                    raise fail(f"{field}.{content_key}", f"{RESPONSE} with no text")
                if not triggers:
                    raise fail(f"{field}.{content_key}", "a response before any question or instruction")
                triggers[-1]["responses"].append(TimedText(content=said, time=step_times[-1]))
            expect = "user"
    if not step_times:
        raise fail(key, "no steps (no user turn)")
    if expect == "assistant":
        raise fail(f"{key}[{len(turns) - 1}]", "the last user turn has no assistant turn")

    gaps = [b - a for a, b in itertools.pairwise(step_times)]
    step = min(gaps) if gaps else 1.0
    built = []
    for k, tr in enumerate(triggers):
        standing = tr["withdrawn"] is not None or _is_instruction(task_type, tr["time"], len(tr["responses"]))
        kind = "instruction" if standing else "question"
        built.append(Trigger(trigger_id=f"t{k}", kind=kind, content=tr["content"], time=tr["time"], withdrawn=tr["withdrawn"],
                             responses=tr["responses"], windows=[(r.time, r.time + window_s) for r in tr["responses"]]))
    extra = {k: v for k, v in rec.items() if k not in _CONVERTED_FIELDS}
    sample_id = _sample_id(rec, f"{video_name}#{index}", fail)
    duration = _seconds(rec["duration"], "duration", fail) if rec.get("duration") not in (None, "") else step_times[-1] + step
    metadata: dict[str, Any] = {"format": "streaming-converted", "record": index, "steps": len(step_times)}
    if system:
        metadata["system"] = system
    if extra:
        metadata["extra"] = extra
    return _sample(fail, sample_id=sample_id, video_name=video_name, video_path=_video(base, video_path), task_type=task_type,
                   source=source or "streaming-converted", duration_s=duration, triggers=built, metadata=metadata)


# -- dense timed captions -----------------------------------------------------------------------------
def read_activitynet(path: Path | str, video_root: Path | str | None = None, *, instruction: str = NARRATION_INSTRUCTION,
                     window_s: float = DEFAULT_WINDOW_S) -> Iterator[StreamSample]:
    """ActivityNet Captions: ``{video_id: {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}``.
    Each video is a narration sample (:func:`_narration`); the split comes from the file name."""
    path = Path(path)
    base = _base(path, video_root)
    src = _Text(path)
    data = src.json()
    if not isinstance(data, dict):
        raise AnnotationFormatError(path, 1, None, "expected an object of video id → {duration, timestamps, sentences}")
    lines = _key_lines(src, _object_members(src.text, 0))
    for vid, ann in data.items():
        fail = _failer(path, lines[vid])
        ann = _dict(ann, vid, fail)
        duration = _number(ann.get("duration"), f"{vid}.duration", fail)
        if duration <= 0:
            raise fail(f"{vid}.duration", f"a duration must be > 0 s, got {ann.get('duration')!r}")
        stamps = _list(ann.get("timestamps"), f"{vid}.timestamps", fail)
        sentences = _list(ann.get("sentences"), f"{vid}.sentences", fail)
        if len(stamps) != len(sentences):
            raise fail(f"{vid}.sentences", f"{len(sentences)} sentences for {len(stamps)} timestamps")
        segments = []
        for k, (stamp, sentence) in enumerate(zip(stamps, sentences)):
            if not isinstance(stamp, list) or len(stamp) != 2:
                raise fail(f"{vid}.timestamps[{k}]", f"expected [start, end], got {stamp!r}")
            s, e = _segment(stamp[0], stamp[1], f"{vid}.timestamps[{k}]", duration, fail)
            segments.append((s, e, _text(sentence, f"{vid}.sentences[{k}]", fail)))
        extra = {k: v for k, v in ann.items() if k not in ("duration", "timestamps", "sentences")}
        yield _narration(fail, segments, instruction, window_s, sample_id=vid, video_name=vid,
                         video_path=_video_by_id(base, vid), source="activitynet", duration_s=duration,
                         split=_split_of(path), metadata={"format": "activitynet", **({"extra": extra} if extra else {})})


_YOUCOOK_SPLITS = {"training": "train", "validation": "val", "testing": "test"}


def read_youcook2(path: Path | str, video_root: Path | str | None = None, *, instruction: str = NARRATION_INSTRUCTION,
                  window_s: float = DEFAULT_WINDOW_S) -> Iterator[StreamSample]:
    """YouCook2 (``youcookii_annotations_*.json``): ``{"database": {id: {"duration", "subset",
    "recipe_type", "video_url", "annotations": [{"segment": [s, e], "id", "sentence"}]}}}``.
    Each video is a narration sample; ``subset`` gives the split."""
    path = Path(path)
    base = _base(path, video_root)
    src = _Text(path)
    data = src.json()
    if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
        raise AnnotationFormatError(path, 1, "database", 'expected {"database": {video id: annotation}}')
    database_at = next(value_at for key, _, value_at in _object_members(src.text, 0) if key == "database")
    lines = _key_lines(src, _object_members(src.text, database_at))
    for vid, ann in data["database"].items():
        fail = _failer(path, lines[vid])
        ann = _dict(ann, vid, fail)
        duration = _number(ann.get("duration"), f"{vid}.duration", fail)
        if duration <= 0:
            raise fail(f"{vid}.duration", f"a duration must be > 0 s, got {ann.get('duration')!r}")
        subset = ann.get("subset", "training")
        if subset not in _YOUCOOK_SPLITS:
            raise fail(f"{vid}.subset", f"expected one of {list(_YOUCOOK_SPLITS)}, got {subset!r}")
        segments = []
        for k, a in enumerate(_list(ann.get("annotations"), f"{vid}.annotations", fail)):
            field = f"{vid}.annotations[{k}]"
            a = _dict(a, field, fail)
            seg = a.get("segment")
            if not isinstance(seg, list) or len(seg) != 2:
                raise fail(f"{field}.segment", f"expected [start, end], got {seg!r}")
            s, e = _segment(seg[0], seg[1], f"{field}.segment", duration, fail)
            if "sentence" not in a:
                raise fail(f"{field}.sentence", "missing (YouCook2's test split has segments only: nothing to train on)")
            segments.append((s, e, _text(a["sentence"], f"{field}.sentence", fail)))
        metadata = {"format": "youcook2", **{k: ann[k] for k in ("recipe_type", "video_url", "subset") if k in ann}}
        yield _narration(fail, segments, instruction, window_s, sample_id=vid, video_name=vid,
                         video_path=_video_by_id(base, vid), source="youcook2", duration_s=duration,
                         split=_YOUCOOK_SPLITS[subset], metadata=metadata)


_CHARADES_LINE = re.compile(r"^\s*\S+\s+\S+\s+\S+\s*##")
_PERSON = re.compile(r"\b(?:(?:a|the)\s+)?person\b", re.IGNORECASE)


def charades_query(sentence: str) -> str:
    """``"person turn a light on."`` → ``"Tell me when someone turn a light on"``: the trailing
    period goes, and every "person" ("a person", "the person") becomes "someone"."""
    return "Tell me when " + _PERSON.sub("someone", sentence.strip().rstrip(".").strip())


def read_charades_sta(path: Path | str, video_root: Path | str | None = None) -> Iterator[StreamSample]:
    """Charades-STA: lines ``VIDEOID start end##sentence``. One sample per video (its lines in file
    order, wherever they are in the file), one instruction per line, given at 0 s: ``Tell me when
    <sentence>`` (:func:`charades_query`), with one response at ``start`` and the window
    ``[start, end]``. The duration is not in the file (``None``)."""
    path = Path(path)
    base = _base(path, video_root)
    src = _Text(path)
    videos: dict[str, list[tuple[int, float, float, str]]] = {}
    for n, line in src.lines():
        fail = _failer(path, n)
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3:
            raise fail("line", f"expected 'VIDEOID start end##sentence', got {line[:80]!r}")
        vid = parts[0]
        s, e = _segment(parts[1], parts[2], f"{vid}.start", None, fail, end_field=f"{vid}.end")
        videos.setdefault(vid, []).append((n, s, e, _text(sentence, f"{vid}.sentence", fail)))
    for vid, queries in videos.items():
        triggers = [Trigger(trigger_id=f"q{k}", kind="instruction", content=charades_query(sentence), time=0.0,
                            responses=[TimedText(content=sentence.strip(), time=s)], windows=[(s, e)])
                    for k, (_, s, e, sentence) in enumerate(queries)]
        yield _sample(_failer(path, queries[0][0]), sample_id=vid, video_name=vid, video_path=_video_by_id(base, vid),
                      task_type="grounding", source="charades-sta", duration_s=None, triggers=triggers, split=_split_of(path),
                      metadata={"format": "charades-sta", "lines": [q[0] for q in queries]})


# -- Streaming-Eval episodes --------------------------------------------------------------------------
def read_episodes(path: Path | str, video_root: Path | str | None = None) -> Iterator[StreamSample]:
    """Streaming-Eval episodes (a ``.json``/``.jsonl`` file or a folder), via :func:`load_episodes`.
    A question becomes a ``question`` trigger with its window and one response at the window's
    start (the ask time, if the window starts before it): the reference, or ``"<letter>. <choice>"``;
    its text is what the eval runner asks (lettered options included). An instruction becomes an
    ``instruction`` trigger with its windows and withdrawal, and a response at each window's start:
    the reference, or ``"Now."``. Mode and position are kept; ``task_type`` is ``streaming-eval``."""
    from streamharness.eval.episode import (
        EpisodeFormatError,
        QuestionEvent,
        load_episodes,
    )
    from streamharness.eval.episodes_builtin import OPENCV_DOC_PREFIX, resolve_video
    from streamharness.eval.runner import question_text
    from streamharness.media import OPENCV_DOC

    path = Path(path)
    try:
        episodes = load_episodes(path)
    except EpisodeFormatError as err:
        raise _episode_error(path, err) from None
    for ep in episodes:
        fail = _failer(path, None, f"episode {ep.episode_id!r}: ")
        if ep.video.startswith(OPENCV_DOC_PREFIX):
            name = ep.video[len(OPENCV_DOC_PREFIX):]
            try:
                video = str(resolve_video(ep))
            except FileNotFoundError:  # opencv-doc not installed: the builder counts it missing
                video = str(OPENCV_DOC / name)
        else:
            name = ep.video
            p = Path(ep.video).expanduser()
            video = str(_base(path, video_root) / p if video_root is not None and not p.is_absolute() else resolve_video(ep))
        triggers = []
        for e in ep.events:
            if isinstance(e, QuestionEvent):
                if e.reference is not None:
                    answer = e.reference
                else:  # a multiple-choice question: the validator made sure the index fits the choices
                    answer = f"{chr(65 + e.answer_index)}. {e.choices[e.answer_index]}"  # type: ignore[index,operator]
                triggers.append(Trigger(trigger_id=e.event_id, kind="question", content=question_text(e), time=e.ask_at_s,
                                        responses=[TimedText(content=answer, time=max(e.window[0], e.ask_at_s))],
                                        windows=[e.window], mode=e.mode, position=e.position))
            else:
                said = e.reference or EPISODE_RESPONSE
                triggers.append(Trigger(trigger_id=e.event_id, kind="instruction", content=e.text, time=e.given_at_s,
                                        withdrawn=e.withdrawn_at_s, windows=list(e.windows), mode=e.mode, position=e.position,
                                        responses=[TimedText(content=said, time=max(w[0], e.given_at_s)) for w in e.windows]))
        metadata: dict[str, Any] = {"format": "episodes"}
        if ep.metadata:
            metadata["episode"] = ep.metadata
        yield _sample(fail, sample_id=ep.episode_id, video_name=Path(name).name or name, video_path=video,
                      task_type="streaming-eval", source=ep.source, duration_s=ep.duration_s, triggers=triggers, metadata=metadata)


def _episode_error(path: Path, err: Exception) -> AnnotationFormatError:
    """An :class:`EpisodeFormatError` as an :class:`AnnotationFormatError`: find the file, line and
    field again by validating each episode of the set in the order :func:`load_episodes` reads them."""
    from streamharness.eval.episode import Episode

    seen: dict[str, tuple[Path, int]] = {}
    for file in _episode_files(path):
        src = _Text(file)
        if file.suffix == ".jsonl":
            items = [(n, _loads(line, file, n)) for n, line in src.lines()]
        else:
            data = src.json()
            starts = _array_starts(src.text) if isinstance(data, list) else [_skip(src.text, 0)]
            items = [(src.line_of(s), item) for s, item in zip(starts, data if isinstance(data, list) else [data])]
        for line, item in items:
            episode_id = item.get("episode_id", "?") if isinstance(item, dict) else "?"
            try:
                Episode.model_validate(item)
            except ValidationError as verr:
                return _from_validation(_failer(file, line, f"episode {episode_id!r}: "), verr)
            if episode_id in seen:
                first_file, first_line = seen[episode_id]
                return AnnotationFormatError(file, line, "episode_id",
                                             f"episode id {episode_id!r} repeats (first at {first_file}:{first_line})")
            seen[episode_id] = (file, line)
    return AnnotationFormatError(path, None, None, str(err))


def _episode_files(path: Path) -> list[Path]:
    """The files of an episode set, in the order :func:`load_episodes` reads them."""
    if not path.is_dir():
        return [path]
    files: list[Path] = []
    for child in sorted(path.iterdir()):
        if child.is_dir() and child.name != "frames":
            files += _episode_files(child)
        elif child.is_file() and child.suffix in (".json", ".jsonl"):
            files.append(child)
    return files


# -- the generic JSONL --------------------------------------------------------------------------------
def read_jsonl(path: Path | str, video_root: Path | str | None = None) -> Iterator[StreamSample]:
    """The generic format: one :class:`StreamSample` JSON object per line (exactly its fields).
    Sample ids must be unique in the file."""
    path = Path(path)
    base = _base(path, video_root)
    seen: dict[str, int] = {}
    for n, line in _Text(path).lines():
        try:
            sample = StreamSample.model_validate_json(line)
        except ValidationError as err:
            if err.errors()[0]["type"] == "json_invalid":
                raise AnnotationFormatError(path, n, None, f"not JSON: {err.errors()[0]['msg']}") from None
            raise _from_validation(_failer(path, n), err) from None
        if sample.sample_id in seen:
            raise AnnotationFormatError(path, n, "sample_id",
                                        f"sample id {sample.sample_id!r} repeats (first on line {seen[sample.sample_id]})")
        seen[sample.sample_id] = n
        video = _video(base, sample.video_path)
        yield sample if video == sample.video_path else sample.model_copy(update={"video_path": video})


# -- formats ------------------------------------------------------------------------------------------
Reader = Callable[..., Iterator[StreamSample]]
FORMATS: dict[str, Reader] = {
    "streaming-raw": read_streaming_raw,
    "streaming-converted": read_streaming_converted,
    "activitynet": read_activitynet,
    "youcook2": read_youcook2,
    "charades-sta": read_charades_sta,
    "episodes": read_episodes,
    "jsonl": read_jsonl,
}


def _record_format(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "events" in obj and "episode_id" in obj:
        return "episodes"
    if "sample_id" in obj and "triggers" in obj:
        return "jsonl"
    if "conversations" in obj or "messages" in obj:
        return "streaming-converted"
    if "question" in obj and "response" in obj:
        return "streaming-raw"
    return None


def detect_format(path: Path | str) -> str:
    """The format of an annotation file or folder (a key of :data:`FORMATS`), from its content: a
    folder is episodes; a ``.txt`` of ``ID start end##sentence`` lines is Charades-STA; JSON with a
    ``database`` is YouCook2, an object of ``{timestamps, sentences}`` is ActivityNet Captions; a
    record (the first line of JSONL, the first element of an array) tells the rest."""
    path = Path(path)
    if path.is_dir():
        return "episodes"
    unknown = AnnotationFormatError(path, None, None, f"cannot tell the annotation format; pass one of {sorted(FORMATS)}")
    src = _Text(path)
    first = next(src.lines(), None)
    if first is None:
        raise AnnotationFormatError(path, None, None, "empty file: cannot tell the annotation format")
    if path.suffix.lower() not in (".json", ".jsonl", ".ndjson"):
        if _CHARADES_LINE.match(first[1]):
            return "charades-sta"
        raise unknown
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        fmt = _record_format(_loads(first[1], path, first[0]))
        if fmt is None:
            raise unknown
        return fmt
    data = src.json()
    if isinstance(data, dict):
        if isinstance(data.get("database"), dict):
            return "youcook2"
        if "format_version" in data or "events" in data:
            return "episodes"
        fmt = _record_format(data)
        if fmt == "jsonl":
            raise AnnotationFormatError(path, 1, None, "StreamSample objects go one per line, in a .jsonl file")
        if fmt is not None:
            return fmt
        values = list(data.values())[:1]
        if values and isinstance(values[0], dict) and ("timestamps" in values[0] or "sentences" in values[0]):
            return "activitynet"
        raise unknown
    if isinstance(data, list) and data:
        fmt = _record_format(data[0])
        if fmt == "jsonl":
            raise AnnotationFormatError(path, 1, None, "StreamSample objects go one per line, in a .jsonl file")
        if fmt is not None:
            return fmt
    raise unknown


def read_annotations(path: Path | str, fmt: str = "auto", video_root: Path | str | None = None,
                     **options: Any) -> Iterator[StreamSample]:
    """Read an annotation file (or episode folder) of format ``fmt`` (``auto``: :func:`detect_format`).
    ``options`` go to the reader (``window_s``, ``instruction``, where it takes them)."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; known: {sorted(FORMATS)} or 'auto'")
    return FORMATS[fmt](path, video_root, **options)
