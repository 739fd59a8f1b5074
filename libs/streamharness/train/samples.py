"""The one form every annotation reader produces: a :class:`StreamSample` is one video and the
timed dialogue a streaming assistant should hold over it.

* A **trigger** is what the user says: a ``question`` (asked at ``time``, answered once) or a
  standing ``instruction`` (given at ``time``, in force until ``withdrawn``), with the ground-truth
  ``responses`` to it (each at its media time, in seconds) and, where the annotation has them, the
  event ``windows`` inside which a response is right (Streaming-Eval scores only inside them).
* All times are media time in seconds from the start of the video; ``duration_s`` bounds them.
* ``video_path``: a video file or a folder of frames named by media milliseconds (``000000.jpg``);
  relative paths are relative to the sample's ``base_dir`` (the annotation file's folder, or the
  ``--video-root`` given to the builder).

The public per-second release's raw layout (``video_name, video_path, task_type, source,
question[{content, time}], response[{content, time}]``) maps onto this one-to-one, with each
response linked to the latest question asked at or before it (:func:`streamharness.train.readers.read_streaming_raw`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimedText(_Strict):
    """A response of the ground truth: what is said, at which media second."""

    content: str = Field(min_length=1)
    time: float = Field(ge=0)


class Trigger(_Strict):
    """A question or a standing instruction, with the responses it should get."""

    trigger_id: str = Field(min_length=1)
    kind: Literal["question", "instruction"]
    content: str = Field(min_length=1)
    time: float = Field(ge=0, description="When it is asked or given (media seconds).")
    withdrawn: float | None = Field(None, ge=0, description="Instructions: when the user takes it back.")
    responses: list[TimedText] = Field(default_factory=list, description="Ground-truth responses, by time.")
    windows: list[tuple[float, float]] = Field(default_factory=list, description="Event windows [t0, t1] (inclusive).")
    mode: str | None = Field(None, description="Streaming-Eval mode (proactive, punctual, contextual), when known.")
    position: str | None = Field(None, description="Streaming-Eval position (backward, present, forward), when known.")

    @model_validator(mode="after")
    def _consistent(self) -> Trigger:
        if self.withdrawn is not None and self.withdrawn < self.time:
            raise ValueError(f"withdrawn at {self.withdrawn} s, before it was given at {self.time} s")
        for r in self.responses:
            if r.time < self.time:
                raise ValueError(f"a response at {r.time} s comes before the {self.kind} at {self.time} s")
        for t0, t1 in self.windows:
            if t0 < 0 or t1 < t0:
                raise ValueError(f"window [{t0}, {t1}] must satisfy 0 <= t0 <= t1")
        times = [r.time for r in self.responses]
        if times != sorted(times):
            raise ValueError("responses must be in time order")
        return self


class StreamSample(_Strict):
    """One video and its timed dialogue."""

    sample_id: str = Field(min_length=1)
    video_name: str = Field(min_length=1)
    video_path: str = Field(min_length=1)
    task_type: str = Field("", description="What kind of task (the source's own name: 'narration', 'alert', 'qa', ...).")
    source: str = Field("", description="Where it comes from: 'streaming-raw', 'activitynet', 'charades-sta', 'episode', 'synthetic', ...")
    duration_s: float | None = Field(None, gt=0)
    triggers: list[Trigger] = Field(default_factory=list)
    split: Literal["train", "val", "test"] = "train"
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fits(self) -> StreamSample:
        ids = [t.trigger_id for t in self.triggers]
        if len(ids) != len(set(ids)):
            raise ValueError(f"trigger ids repeat in sample {self.sample_id}")
        if self.duration_s is not None:
            for t in self.triggers:
                if t.time > self.duration_s + 1e-6:
                    raise ValueError(f"trigger {t.trigger_id} at {t.time} s is after the end ({self.duration_s} s)")
        return self

    def resolve_video(self, base_dir: Path | str | None = None) -> Path:
        path = Path(self.video_path).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        return path

    @property
    def last_time(self) -> float:
        """The latest time the annotation mentions (a lower bound of the duration)."""
        times = [0.0]
        for t in self.triggers:
            times += [t.time, *(r.time for r in t.responses), *(w[1] for w in t.windows)]
            if t.withdrawn is not None:
                times.append(t.withdrawn)
        return max(times)


class AnnotationFormatError(ValueError):
    """An annotation file is malformed; the message names the file, the line (or record) and the field."""

    def __init__(self, path: Path | str, line: int | None, field: str | None, problem: str) -> None:
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = self.path + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {('field ' + repr(field) + ': ') if field else ''}{problem}")
