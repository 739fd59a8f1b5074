"""The Streaming-Eval episode format (``format_version: 1``) and the record of a run over an episode.

An **episode** is one video and the timed events a streaming assistant is judged on. All times are
**media time** in seconds from the start of the video (never wall-clock time). One episode is one
JSON object; a set of episodes is a JSONL file (one object per line) or a folder of ``*.json``::

    {
      "format_version": 1,
      "episode_id": "vtest-people",
      "video": "/usr/share/doc/opencv-doc/examples/data/vtest.avi",
      "duration_s": 80.0,
      "source": "opencv-doc",
      "events": [
        {"type": "question", "event_id": "q1", "ask_at_s": 20.0,
         "text": "How many people are in the street?", "window": [20.0, 25.0],
         "reference": "About five people are walking in the street.",
         "mode": "punctual", "position": "present"},
        {"type": "question", "event_id": "q2", "ask_at_s": 30.0, "text": "What colour was the car?",
         "window": [30.0, 35.0], "choices": ["red", "blue", "white"], "answer_index": 2,
         "mode": "contextual", "position": "backward"},
        {"type": "instruction", "event_id": "i1", "given_at_s": 0.0,
         "text": "Tell me when someone walks in.", "windows": [[3.0, 8.0], [41.0, 46.0]],
         "mode": "proactive", "position": "forward"}
      ]
    }

Fields:

* ``video``: a video file, or a folder of frames named by their media time in milliseconds
  (``000000.jpg``, ``001000.jpg``, ...). A relative path is relative to the folder of the file the
  episode was read from (:meth:`Episode.video_path`).
* ``source``: where the episode comes from: ``opencv-doc``, ``synthetic``, ``ovo-bench``,
  ``streamingbench``, or any other short name (``KNOWN_SOURCES`` lists the project's own).
* A **question** (``type: "question"``) is asked at ``ask_at_s``; an answer counts only when its
  media time lies inside ``window = [t0, t1]`` (both ends included). It carries either a free-text
  ``reference`` or multiple ``choices`` with the ``answer_index`` of the right one (not both).
* An **instruction** (``type: "instruction"``) is a standing instruction given at ``given_at_s``;
  each of its ``windows`` expects exactly one proactive response. Windows are sorted and do not
  overlap. An optional ``reference`` describes what the alert should say; without one any
  non-empty response is a valid alert. An optional ``withdrawn_at_s`` is when the user takes the
  instruction back (it stands to the end without one); every window ends by then.
* Every event has a ``mode`` (``proactive``, ``punctual``, ``contextual``) and a ``position``
  (``backward``: about what happened before the ask; ``present``: about now; ``forward``: about
  something that has not happened yet when asked), the two axes of the 3 × 3 score table.
* ``metadata``: free-form (annotator, the original benchmark's ids, ...), ignored by scoring.

Unknown fields are errors (a typo must not silently drop a window). Loading errors are
:class:`EpisodeFormatError` naming the file, line, episode id and field.

A **run** (:class:`EpisodeRun`) is what one system said over one episode: a list of
:class:`ResponseRecord`, each at a media time, tied to the question or instruction it answers
(``event_id``), or to nothing (``event_id: null``: an unsolicited response), with the latencies the
client measured.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

FORMAT_VERSION = 1
MODES: tuple[str, ...] = ("proactive", "punctual", "contextual")
POSITIONS: tuple[str, ...] = ("backward", "present", "forward")
KNOWN_SOURCES: tuple[str, ...] = ("opencv-doc", "synthetic", "ovo-bench", "streamingbench")

Mode = Literal["proactive", "punctual", "contextual"]
Position = Literal["backward", "present", "forward"]
Window = tuple[float, float]


class EpisodeFormatError(ValueError):
    """An episode (or run) file is not valid; the message names the file, episode and field."""


def _check_window(window: Window) -> Window:
    t0, t1 = window
    if t0 < 0 or t1 < t0:
        raise ValueError(f"window [{t0}, {t1}] must satisfy 0 <= t0 <= t1")
    return window


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuestionEvent(_Strict):
    """A question asked at ``ask_at_s``; an answer counts only inside ``window`` (seconds, inclusive)."""

    type: Literal["question"] = "question"
    event_id: str = Field(min_length=1)
    ask_at_s: float = Field(ge=0)
    text: str = Field(min_length=1)
    window: Window
    reference: str | None = Field(None, description="Free-text reference answer (or use choices).")
    choices: list[str] | None = Field(None, description="Multiple-choice options, shown as A, B, C, ...")
    answer_index: int | None = Field(None, ge=0, description="Index of the right choice in choices.")
    mode: Mode
    position: Position

    @field_validator("window")
    @classmethod
    def _valid_window(cls, window: Window) -> Window:
        return _check_window(window)

    @model_validator(mode="after")
    def _answer_given_once(self) -> QuestionEvent:
        if self.window[1] < self.ask_at_s:
            raise ValueError(f"window {list(self.window)} ends before the question is asked at {self.ask_at_s}")
        if self.choices is None:
            if self.reference is None:
                raise ValueError("a question needs a reference answer or choices + answer_index")
            if self.answer_index is not None:
                raise ValueError("answer_index without choices")
        else:
            if self.reference is not None:
                raise ValueError("give either reference or choices, not both")
            if len(self.choices) < 2 or len(self.choices) > 26:
                raise ValueError("choices must list 2 to 26 options")
            if self.answer_index is None or self.answer_index >= len(self.choices):
                raise ValueError(f"answer_index must index choices (0..{len(self.choices) - 1})")
        return self

    @property
    def windows(self) -> list[Window]:
        return [self.window]

    @property
    def at_s(self) -> float:
        return self.ask_at_s


class InstructionEvent(_Strict):
    """A standing instruction given at ``given_at_s``; each window expects one proactive response."""

    type: Literal["instruction"] = "instruction"
    event_id: str = Field(min_length=1)
    given_at_s: float = Field(ge=0)
    text: str = Field(min_length=1)
    windows: list[Window]
    reference: str | None = Field(None, description="What an alert should say; None = any non-empty alert.")
    withdrawn_at_s: float | None = Field(None, description="When the user takes the instruction back; None = it stands to the end.")
    mode: Mode
    position: Position

    @model_validator(mode="after")
    def _withdrawn_after_windows(self) -> InstructionEvent:
        if self.withdrawn_at_s is not None:
            if self.withdrawn_at_s <= self.given_at_s:
                raise ValueError(f"withdrawn_at_s ({self.withdrawn_at_s}) must be after given_at_s ({self.given_at_s})")
            late = [list(w) for w in self.windows if w[1] > self.withdrawn_at_s]
            if late:
                raise ValueError(f"windows {late} end after the instruction is withdrawn at {self.withdrawn_at_s}")
        return self

    @field_validator("windows")
    @classmethod
    def _sorted_disjoint(cls, windows: list[Window]) -> list[Window]:
        for w in windows:
            _check_window(w)
        for prev, nxt in zip(windows, windows[1:]):
            if nxt[0] <= prev[1]:
                raise ValueError(f"windows must be sorted and disjoint: {list(prev)} then {list(nxt)}")
        return windows

    @property
    def at_s(self) -> float:
        return self.given_at_s


Event = Annotated[Union[QuestionEvent, InstructionEvent], Field(discriminator="type")]


class Episode(_Strict):
    """One video and its timed events (``format_version`` 1). See the module docstring."""

    format_version: Literal[1] = FORMAT_VERSION
    episode_id: str = Field(min_length=1)
    video: str = Field(min_length=1, description="Video file, or folder of frames named by media ms.")
    duration_s: float = Field(gt=0)
    source: str = Field(min_length=1, description="opencv-doc, synthetic, ovo-bench, streamingbench, ...")
    events: list[Event] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _events_fit(self) -> Episode:
        seen: set[str] = set()
        for i, event in enumerate(self.events):
            if event.event_id in seen:
                raise ValueError(f"events.{i}: duplicate event_id {event.event_id!r}")
            seen.add(event.event_id)
            if event.at_s > self.duration_s:
                raise ValueError(f"events.{i} ({event.event_id}): starts at {event.at_s} s, after the end ({self.duration_s} s)")
            for w in event.windows:
                if w[0] > self.duration_s:
                    raise ValueError(f"events.{i} ({event.event_id}): window {list(w)} starts after the end ({self.duration_s} s)")
        return self

    def event(self, event_id: str) -> QuestionEvent | InstructionEvent:
        for e in self.events:
            if e.event_id == event_id:
                return e
        raise KeyError(event_id)

    _source_dir: Path | None = PrivateAttr(default=None)  # folder of the file it was read from

    def __eq__(self, other: object) -> bool:
        # Equal content is equal, wherever the episode was read from.
        return isinstance(other, Episode) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, like any pydantic model

    def video_path(self, base_dir: Path | str | None = None) -> Path:
        """The video as a path. A relative ``video`` resolves against the folder of the file the
        episode was read from (:func:`load_episodes` remembers it), else against ``base_dir``."""
        p = Path(self.video).expanduser()
        base = self._source_dir or base_dir
        return p if p.is_absolute() or base is None else Path(base) / p

    @property
    def questions(self) -> list[QuestionEvent]:
        return [e for e in self.events if isinstance(e, QuestionEvent)]

    @property
    def instructions(self) -> list[InstructionEvent]:
        return [e for e in self.events if isinstance(e, InstructionEvent)]


class ResponseRecord(_Strict):
    """One response of the system under test, as the client saw it.

    ``event_id``: the question it answers, or the instruction a proactive response fires for;
    ``None`` for a response tied to nothing. ``media_ts_s``: the media time of the frame the
    response was decided on. ``ttft_ms`` / ``e2e_ms``: time to first token and to the end of the
    response, measured by the client (``None`` when not measured).
    """

    event_id: str | None = None
    media_ts_s: float = Field(ge=0)
    text: str = ""
    ttft_ms: float | None = Field(None, ge=0)
    e2e_ms: float | None = Field(None, ge=0)


class EpisodeRun(_Strict):
    """Everything one system said over one episode (produced by the runner)."""

    format_version: Literal[1] = FORMAT_VERSION
    episode_id: str = Field(min_length=1)
    system: str = Field(min_length=1, description="Name of the system under test (policy, model, build).")
    responses: list[ResponseRecord] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


# -- reading and writing -----------------------------------------------------------------------------
def _describe(err: ValidationError, where: str, raw: Any) -> EpisodeFormatError:
    episode_id = raw.get("episode_id", "?") if isinstance(raw, dict) else "?"
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(episode)"
        problems.append(f"{loc}: {e['msg']}")
    return EpisodeFormatError(f"{where} (episode {episode_id!r}): " + "; ".join(problems))


def _parse(model: type[BaseModel], raw: Any, where: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise _describe(err, where, raw) from None


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EpisodeFormatError(f"{where}: not JSON: {err}") from None


def parse_episode(raw: dict[str, Any] | str, where: str = "<episode>") -> Episode:
    """Validate one episode from a dict or a JSON string."""
    return _parse(Episode, _json(raw, where) if isinstance(raw, str) else raw, where)


def load_episode(path: Path | str) -> Episode:
    """Read one episode from a ``.json`` file."""
    path = Path(path)
    episode = parse_episode(path.read_text(encoding="utf-8"), str(path))
    episode._source_dir = path.resolve().parent
    return episode


def load_episodes(path: Path | str) -> list[Episode]:
    """Read a set of episodes: a ``.jsonl`` file (one per line), a ``.json`` file (one episode or a
    list of them), or a folder of ``*.json`` / ``*.jsonl`` files and of such folders (sorted by name,
    recursively; ``frames`` folders are skipped). Each episode remembers the folder of its file, so a
    relative ``video`` resolves next to it. Episode ids must be unique across the set."""
    path = Path(path)
    episodes: list[Episode] = []
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.is_dir() and child.name != "frames":
                episodes.extend(load_episodes(child))
            elif child.is_file() and child.suffix in (".json", ".jsonl"):
                episodes.extend(load_episodes(child))
    elif path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                episodes.append(parse_episode(line, f"{path}:{n}"))
    else:
        raw = _json(path.read_text(encoding="utf-8"), str(path))
        items = raw if isinstance(raw, list) else [raw]
        episodes.extend(parse_episode(item, f"{path}[{i}]" if isinstance(raw, list) else str(path)) for i, item in enumerate(items))
    if not path.is_dir():
        for episode in episodes:
            episode._source_dir = path.resolve().parent
    ids = [e.episode_id for e in episodes]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise EpisodeFormatError(f"{path}: duplicate episode_id {dupes}")
    return episodes


def save_episode(episode: Episode, path: Path | str) -> Path:
    """Write one episode as pretty JSON."""
    path = Path(path)
    path.write_text(episode.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def save_episodes(episodes: Iterable[Episode], path: Path | str) -> Path:
    """Write a set of episodes as JSONL (one episode per line)."""
    path = Path(path)
    path.write_text("".join(e.model_dump_json() + "\n" for e in episodes), encoding="utf-8")
    return path


def load_runs(path: Path | str) -> list[EpisodeRun]:
    """Read runs from a JSONL file (one :class:`EpisodeRun` per line) or a JSON file (one or a list)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [_parse(EpisodeRun, _json(line, f"{path}:{n}"), f"{path}:{n}")
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if line.strip()]
    raw = _json(path.read_text(encoding="utf-8"), str(path))
    return [_parse(EpisodeRun, item, str(path)) for item in (raw if isinstance(raw, list) else [raw])]


def save_runs(runs: Sequence[EpisodeRun], path: Path | str) -> Path:
    """Write runs as JSONL (one :class:`EpisodeRun` per line)."""
    path = Path(path)
    path.write_text("".join(r.model_dump_json() + "\n" for r in runs), encoding="utf-8")
    return path
