"""The ``trained`` decision policy: the Streaming-Train decision head, served on Triton.

The head (``model-repository/decision_head``; trained by ``streamharness train train --trainer
head``, exported by ``streamharness train export``) scores, for one standing instruction at one
step, how likely a response is due now, from

* ``FRAMES`` float32 [W, 1280]: the frame embeddings of the last W steps, oldest first (the
  encoder stage's EfficientNet-Lite0 vectors; at the start of a stream the first is repeated);
* ``TEXT`` float32 [384]: the instruction's MiniLM embedding;
* ``TIME`` float32 [3]: :func:`time_features` — seconds since this instruction's last response
  (or since it was given), whether it has responded before, seconds since it was given.

This module builds those inputs (numpy only: the decision stage has no torch); the trainer
(:mod:`streamharness.train.head`) builds its training inputs with the same functions, so training
and serving cannot drift. One Triton request per step carries all instructions of a stream.

Questions are answered in the step they are asked, as the training data's answers are (every
reader puts the answer of a question at its ask time unless the annotation says otherwise); the head
decides the standing instructions, where the rules fail — except, by default, those about people
(``SH_DECISION_TRAINED_PEOPLE_RULES``), which the rules decide on the people detector's count: the
shipped head never saw a person, and that count is evidence it does not get. An instruction fires when the head's
probability reaches the threshold the export wrote into the model's config (or
``SH_DECISION_TRAINED_THRESHOLD``), and not again within ``SH_DECISION_TRAINED_MIN_GAP_S``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from streamharness.decision.policy import Decision, DecisionPolicy, Evidence, InstructionState, StreamState
from streamharness.v1 import common_pb2

log = logging.getLogger(__name__)

WINDOW = 8
EMBEDDING_DIM = 1280
TEXT_DIM = 384
TIME_DIM = 3
HORIZON_S = 3600.0
MODEL_NAME = "decision_head"


def time_features(since_response_s: float, responded: bool, since_given_s: float) -> np.ndarray:
    """float32 [3]: log-scaled seconds since the last response (or since given), a 0/1 flag of a
    response before, log-scaled seconds since the instruction was given (both capped at an hour)."""
    scale = math.log1p(HORIZON_S)

    def squash(s: float) -> float:
        return math.log1p(min(max(s, 0.0), HORIZON_S)) / scale

    return np.asarray([squash(since_response_s), 1.0 if responded else 0.0, squash(since_given_s)], dtype=np.float32)


def window_indices(step: int, window: int = WINDOW) -> np.ndarray:
    """Step indices of the window ending at ``step``, oldest first, clipped at 0 (the first repeats)."""
    return np.clip(np.arange(step - window + 1, step + 1), 0, None)


class HeadScorer:
    """Calls the ``decision_head`` model on Triton (gRPC): probabilities for a batch of rows."""

    def __init__(self, triton, model: str = MODEL_NAME, version: str = "") -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.model, self.version = model, version
        self.client = grpcclient.InferenceServerClient(triton.url)
        self.timeout_s = triton.timeout_s
        self.threshold: float | None = None
        self.window = WINDOW

    def ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.model, self.version))
        except Exception:  # noqa: BLE001 - not reachable is "not ready"
            return False

    def load_config(self) -> None:
        """The threshold and window the export wrote into the model's config parameters."""
        config = self.client.get_model_config(self.model, self.version, as_json=True)["config"]
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        if params.get("threshold"):
            self.threshold = float(params["threshold"])
        if params.get("window"):
            self.window = int(params["window"])

    def score(self, frames: np.ndarray, text: np.ndarray, time: np.ndarray) -> np.ndarray:
        g = self._grpc
        inputs = [g.InferInput("FRAMES", list(frames.shape), "FP32"), g.InferInput("TEXT", list(text.shape), "FP32"),
                  g.InferInput("TIME", list(time.shape), "FP32")]
        for inp, arr in zip(inputs, (frames, text, time)):
            inp.set_data_from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        result = self.client.infer(self.model, inputs, model_version=self.version,
                                   outputs=[g.InferRequestedOutput("PROBABILITY")], client_timeout=self.timeout_s)
        return result.as_numpy("PROBABILITY").reshape(-1)

    def close(self) -> None:
        self.client.close()


class TrainedPolicy(DecisionPolicy):
    """Standing instructions decided by the trained head (see the module docstring)."""

    name = "trained"

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], scorer, *, threshold: float | None = None,
                 min_gap_ms: int = 3000, people_rules=None) -> None:
        """``scorer``: ``score(frames [n, W, 1280], text [n, 384], time [n, 3]) -> probabilities [n]``
        with a ``window`` attribute (a :class:`HeadScorer`, or the trainer's model in tests).
        ``people_rules``: a :class:`~streamharness.decision.policy.RulePolicy` that takes the
        instructions it classifies as being about people (decided on the people detector's count,
        evidence the head does not see); None: the head decides every instruction."""
        self._embed = embed
        self.people_rules = people_rules
        self.scorer = scorer
        self.threshold = threshold if threshold is not None else (getattr(scorer, "threshold", None) or 0.5)
        self.min_gap_ms = min_gap_ms
        self.window = int(getattr(scorer, "window", WINDOW))
        self._failing = False

    def add_instruction(self, state: StreamState, instruction_id: str, text: str) -> InstructionState:
        if self.people_rules is not None:
            kind, vec = self.people_rules.classify(text)
            if kind == "people":
                inst = InstructionState(instruction_id, text, kind, vec)
                state.instructions[instruction_id] = inst
                return inst
        inst = InstructionState(instruction_id, text, "trained", self._embed([text])[0])
        state.instructions[instruction_id] = inst
        return inst

    def _window(self, state: StreamState, embedding: np.ndarray) -> np.ndarray:
        buf = state.policy_state.setdefault("frames", deque(maxlen=self.window))
        buf.append(np.asarray(embedding, np.float32))
        frames = list(buf)
        frames = [frames[0]] * (self.window - len(frames)) + frames
        return np.stack(frames)

    def step(self, state: StreamState, evidence: Evidence) -> list[Decision]:
        now = evidence.media_ts_ms
        decisions = self.answer_pending(state, now)
        window = self._window(state, evidence.embedding)
        instructions = [i for i in state.instructions.values() if i.kind == "trained"]
        for inst in state.instructions.values():
            if inst.kind != "trained" and self.people_rules is not None:
                decision = self.people_rules.check_instruction(inst, evidence)
                if decision is not None:
                    decisions.append(decision)
        if instructions:
            rows_time = []
            for inst in instructions:
                if inst.given_ms is None:
                    inst.given_ms = now
                given = inst.given_ms
                last = inst.last_fired_ms if inst.last_fired_ms is not None else given
                rows_time.append(time_features((now - last) / 1000, inst.last_fired_ms is not None, (now - given) / 1000))
            try:
                probs = self.scorer.score(np.repeat(window[None], len(instructions), axis=0),
                                          np.stack([inst.target_vec for inst in instructions]).astype(np.float32),
                                          np.stack(rows_time))
            except Exception as err:  # noqa: BLE001 - a head that cannot answer this step must not stop the stream
                # Silent on those instructions for this step (questions are still answered); the
                # next step asks again. Logged once per outage.
                if not self._failing:
                    log.warning("the decision head did not answer (%s); standing instructions stay silent until it does", err)
                self._failing = True
                probs = np.zeros(len(instructions), np.float32)
            else:
                if self._failing:
                    log.info("the decision head answers again")
                self._failing = False
            for inst, p in zip(instructions, probs):
                gap_ok = inst.last_fired_ms is None or now - inst.last_fired_ms >= self.min_gap_ms
                if p >= self.threshold and gap_ok:
                    inst.last_fired_ms = now
                    decisions.append(Decision(now, common_pb2.TRIGGER_INSTRUCTION, inst.instruction_id, inst.text,
                                              f"decision head p={p:.2f}", float(p)))
        state.last = evidence
        return decisions

