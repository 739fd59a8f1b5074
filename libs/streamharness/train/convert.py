"""A :class:`~streamharness.train.samples.StreamSample` → per-second streaming steps, the training
format of the method: a stream is a multi-turn dialogue that never sees the future.

Each step ``k`` (media time ``t = k / fps``) is one user turn and one assistant turn::

    user:      "<4.0 seconds>\\n<image>"                       (the frame at t)
    user:      "How many people?\\n<4.0 seconds>\\n<image>"    (a question asked in that step comes first)
    assistant: "</silence>"  or  "</response> About five people."

What the user says in step ``k`` is everything asked, given or withdrawn at a time in
``[t, t + 1/fps)``: questions and instructions by their text, a withdrawal as ``"Stop: <text>"``.
A ground-truth response at time ``r`` is the target of the step holding ``r``; two responses in
one step are joined. Every step has a **role** for the trigger loss
(:mod:`streamharness.train.objective`): ``response`` (the step responds), ``first_silence`` (the
first silent step of a run: at the start, or right after a response) or ``repeated_silence``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from streamharness.train.samples import StreamSample, Trigger

from streamharness.protocol import IMAGE, RESPONSE, SILENCE, time_tag, user_turn  # noqa: F401 - the protocol, re-exported
ROLES = ("first_silence", "repeated_silence", "response")




def target_text(responses: Sequence[str]) -> str:
    return f"{RESPONSE} {' '.join(r.strip() for r in responses)}" if responses else SILENCE


def roles_of(responded: Sequence[bool]) -> list[str]:
    """The trigger-loss role of each step, from whether each step responds."""
    roles, previous = [], None
    for r in responded:
        roles.append("response" if r else ("repeated_silence" if previous is False else "first_silence"))
        previous = bool(r)
    return roles


@dataclass(frozen=True)
class Step:
    """One second of a stream as the model sees it."""

    index: int
    t_s: float
    user: str
    target: str
    role: str
    said: tuple[str, ...]  # trigger ids asked / given / withdrawn in this step
    responding: tuple[str, ...]  # trigger ids a response of this step belongs to

    @property
    def responds(self) -> bool:
        return self.role == "response"


def step_count(sample: StreamSample, fps: float = 1.0, duration_s: float | None = None) -> int:
    """Steps of a sample: its duration (else its last annotated time, plus one second) at ``fps``."""
    duration = duration_s or sample.duration_s or (sample.last_time + 1.0)
    return max(1, int(math.floor(duration * fps + 1e-6)))


def _index(t: float, fps: float, n: int) -> int:
    return min(n - 1, max(0, int(math.floor(t * fps + 1e-6))))


def to_steps(sample: StreamSample, fps: float = 1.0, duration_s: float | None = None) -> list[Step]:
    """The per-second steps of ``sample`` (see the module docstring)."""
    if fps <= 0:
        raise ValueError("fps must be positive")
    n = step_count(sample, fps, duration_s)
    said: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    responses: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    for trig in sorted(sample.triggers, key=lambda t: (t.time, t.trigger_id)):
        said[_index(trig.time, fps, n)].append((trig.trigger_id, trig.content))
        if trig.withdrawn is not None and trig.withdrawn * fps < n:
            said[_index(trig.withdrawn, fps, n)].append((trig.trigger_id, f"Stop: {trig.content}"))
        for r in trig.responses:
            if r.time * fps < n + 1e-6:
                responses[_index(r.time, fps, n)].append((trig.trigger_id, r.content))
    roles = roles_of([bool(r) for r in responses])
    steps = []
    for k in range(n):
        t = k / fps
        steps.append(Step(k, t, user_turn(t, [text for _, text in said[k]]), target_text([text for _, text in responses[k]]),
                          roles[k], tuple(i for i, _ in said[k]), tuple(i for i, _ in responses[k])))
    return steps


def to_messages(steps: Sequence[Step]) -> list[dict[str, str]]:
    """The converted-sample layout of the public per-second release: alternating user / assistant turns."""
    messages: list[dict[str, str]] = []
    for s in steps:
        messages += [{"role": "user", "content": s.user}, {"role": "assistant", "content": s.target}]
    return messages


def trigger_labels(trigger: Trigger, n_steps: int, fps: float = 1.0) -> tuple[int, list[int]]:
    """For the decision head: the step a trigger starts at, and, for each step from there to its
    end (withdrawal or the stream's end), 1 where a response to it is due, else 0."""
    start = _index(trigger.time, fps, n_steps)
    end = n_steps if trigger.withdrawn is None else min(n_steps, _index(trigger.withdrawn, fps, n_steps) + 1)
    labels = [0] * max(0, end - start)
    for r in trigger.responses:
        k = _index(r.time, fps, n_steps) - start
        if 0 <= k < len(labels):
            labels[k] = 1
    return start, labels
