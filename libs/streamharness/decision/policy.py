"""Decision policies. A policy sees one stream's state and the newest frame evidence and returns
the decisions of that media step; it never sees a frame from the future.

``RulePolicy`` (this release's default) answers pending questions at once and fires standing
instructions when the frame evidence matches them, with a refractory period per instruction.
``TrainedPolicy`` (:mod:`streamharness.decision.trained`, Streaming-Train's decision head on Triton)
plugs in behind the same interface.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from streamharness.v1 import common_pb2

# Prototype phrasings per instruction kind; an instruction takes the kind it is most similar to.
PEOPLE_PROTOTYPES = (
    "tell me when someone walks in",
    "let me know when a person appears",
    "alert me when people enter",
    "tell me if anyone shows up",
    "notify me when there is a pedestrian",
)
SCENE_PROTOTYPES = (
    "tell me when the scene changes",
    "let me know when something changes",
    "alert me when the view is different",
    "tell me when the camera cuts to a new shot",
)
_INSTRUCTION_PREFIX = re.compile(
    r"^(please\s+)?((tell|let|alert|notify|warn|ping)\s+(me|us)\s+)?(know\s+)?"
    r"(when(ever)?|if|once|as soon as)?\s*(you\s+)?(see|spot|notice|detect|there\s+is|there\s+are|there's)?\s*",
    re.IGNORECASE,
)


def instruction_target(text: str) -> str:
    """The thing an object instruction asks about: "tell me when you see a cup" → "a cup"."""
    target = _INSTRUCTION_PREFIX.sub("", text.strip().rstrip(".!?")).strip()
    return target or text


@dataclass(frozen=True)
class Evidence:
    """What the encoder saw at one media step."""

    media_ts_ms: int
    embedding: np.ndarray  # unit-norm frame embedding
    labels: Sequence[tuple[str, float]]
    person_count: int
    caption: str
    jpeg: bytes = b""  # the frame itself, for a policy that sees frames (the model policy)


@dataclass
class InstructionState:
    instruction_id: str
    text: str
    kind: str  # "people", "scene" or "object"
    target_vec: np.ndarray
    last_fired_ms: int | None = None
    reference: np.ndarray | None = None  # scene: embedding the change is measured from
    last_count: int = 0  # people: count at the previous step
    given_ms: int | None = None  # media time of the first step it was in force (the trained policy)


@dataclass
class PendingQuestion:
    question_id: str
    text: str
    media_ts_ms: int


@dataclass
class StreamState:
    key: common_pb2.StreamKey
    session_id: str = ""
    reply_to: str = ""
    instructions: dict[str, InstructionState] = field(default_factory=dict)
    questions: list[PendingQuestion] = field(default_factory=list)
    last: Evidence | None = None
    end_ms: int | None = None  # media time of the session's last published frame, once it ended
    started: bool = False  # its SessionStart was seen (frames before it are held)
    held: list = field(default_factory=list)
    held_since: float = 0.0  # monotonic wall time the oldest held frame arrived
    policy_state: dict = field(default_factory=dict)  # what a policy keeps per stream (the trained one: its frame window)
    # Questions accepted and not answered yet (question id -> media time asked): pending here, or
    # decided and waiting for their final response (SH_DECISION_MAX_OPEN_QUESTIONS_PER_STREAM).
    open_questions: dict[str, int] = field(default_factory=dict)
    refusing: bool = False  # the last question was refused (one log line per run of refusals)
    # Durable state (the 'stream-state' changelog): which partition holds the stream, the media time
    # of the last frame decided before a restore, the owning session's last input (wall, unix s)
    # and, while its client is away, since when.
    partition: int = -1
    restored_last_ms: int = -1
    decision_fps: float = 0.0
    updated_unix: float = 0.0
    away_since: float | None = None
    # Decisions published for the responder whose final response was not seen yet (id -> wall time):
    # listed when the session finishes, so the gateway waits for them before it closes the call.
    awaiting: dict[str, float] = field(default_factory=dict)

    @property
    def last_ms(self) -> int:
        """Media time of the last frame decided on (-1: none)."""
        return max(self.last.media_ts_ms if self.last is not None else -1, self.restored_last_ms)


@dataclass(frozen=True)
class Decision:
    media_ts_ms: int
    trigger: int  # common_pb2.Trigger
    trigger_id: str
    prompt_text: str
    reason: str
    score: float
    text: str = ""  # the response itself, when the policy wrote it (the model policy)
    pieces: Iterator[str] | None = field(default=None, compare=False)  # ... or streamed as it is generated


class DecisionPolicy(abc.ABC):
    name: str = "policy"

    @abc.abstractmethod
    def add_instruction(self, state: StreamState, instruction_id: str, text: str) -> InstructionState: ...

    @abc.abstractmethod
    def step(self, state: StreamState, evidence: Evidence) -> list[Decision]:
        """Decide at ``evidence.media_ts_ms``; may update ``state``."""

    def answer_pending(self, state: StreamState, now_ms: int) -> list[Decision]:
        """Questions asked at or before ``now_ms`` are answered now, oldest first."""
        due = [q for q in state.questions if q.media_ts_ms <= now_ms]
        state.questions = [q for q in state.questions if q.media_ts_ms > now_ms]
        return [
            Decision(max(now_ms, q.media_ts_ms), common_pb2.TRIGGER_QUESTION, q.question_id, q.text, "a question is pending", 1.0)
            for q in due
        ]


@dataclass(frozen=True)
class RuleThresholds:
    kind_similarity: float = 0.45  # instruction → people/scene prototype
    object_similarity: float = 0.55  # instruction target → label text
    min_label_score: float = 0.08  # labels weaker than this are not evidence
    scene_change: float = 0.35  # 1 - cosine(frame, reference) above this is a scene change
    refractory_ms: int = 10_000  # no instruction fires twice within this much media time


class RulePolicy(DecisionPolicy):
    """Evidence rules on the encoder's outputs, with MiniLM text similarity for matching."""

    name = "rules"

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], thresholds: RuleThresholds = RuleThresholds()):
        self._embed = embed
        self.t = thresholds
        self._people = embed(list(PEOPLE_PROTOTYPES))
        self._scene = embed(list(SCENE_PROTOTYPES))
        self._label_vecs: dict[str, np.ndarray] = {}

    def classify(self, text: str) -> tuple[str, np.ndarray]:
        vec = self._embed([text])[0]
        people = float(np.max(self._people @ vec))
        scene = float(np.max(self._scene @ vec))
        if max(people, scene) >= self.t.kind_similarity:
            return ("people" if people >= scene else "scene"), vec
        return "object", self._embed([instruction_target(text)])[0]

    def add_instruction(self, state: StreamState, instruction_id: str, text: str) -> InstructionState:
        kind, vec = self.classify(text)
        inst = InstructionState(instruction_id, text, kind, vec)
        state.instructions[instruction_id] = inst
        return inst

    def _label_vec(self, label: str) -> np.ndarray:
        name = label.split(",")[0].strip()
        if name not in self._label_vecs:
            self._label_vecs[name] = self._embed([f"a {name}"])[0]
        return self._label_vecs[name]

    def _refractory(self, inst: InstructionState, now: int) -> bool:
        return inst.last_fired_ms is not None and now - inst.last_fired_ms < self.t.refractory_ms

    def _check(self, inst: InstructionState, ev: Evidence) -> tuple[bool, float, str]:
        if inst.kind == "people":
            previous, inst.last_count = inst.last_count, ev.person_count
            if ev.person_count > 0 and (previous == 0 or inst.last_fired_ms is None):
                noun = "person" if ev.person_count == 1 else "people"
                return True, float(ev.person_count), f"{ev.person_count} {noun} detected"
            return False, float(ev.person_count), ""
        if inst.kind == "scene":
            if inst.reference is None:
                inst.reference = ev.embedding
                return False, 0.0, ""
            change = 1.0 - float(np.dot(inst.reference, ev.embedding))
            if change > self.t.scene_change:
                inst.reference = ev.embedding
                return True, change, f"scene changed (distance {change:.2f})"
            return False, change, ""
        best, best_label = 0.0, ""
        for label, score in ev.labels:
            if score < self.t.min_label_score:
                continue
            sim = float(np.dot(inst.target_vec, self._label_vec(label)))
            if sim > best:
                best, best_label = sim, label.split(",")[0]
        if best >= self.t.object_similarity:
            return True, best, f"saw {best_label} (similarity {best:.2f})"
        return False, best, ""

    def check_instruction(self, inst: InstructionState, evidence: Evidence) -> Decision | None:
        """The decision about one instruction at this step (None: silent); updates its state."""
        now = evidence.media_ts_ms
        fired, score, reason = self._check(inst, evidence)
        if fired and not self._refractory(inst, now):
            inst.last_fired_ms = now
            return Decision(now, common_pb2.TRIGGER_INSTRUCTION, inst.instruction_id, inst.text, reason, score)
        return None

    def step(self, state: StreamState, evidence: Evidence) -> list[Decision]:
        decisions = self.answer_pending(state, evidence.media_ts_ms)
        for inst in state.instructions.values():
            decision = self.check_instruction(inst, evidence)
            if decision is not None:
                decisions.append(decision)
        state.last = evidence
        return decisions
