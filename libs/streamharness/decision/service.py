"""The decision stage: consumes ``queries`` and ``embeddings`` of the same streams in one
consumer group (both topics are keyed ``tenant/stream`` with equal partition counts, and the range
assignor gives one member the same partition of both), keeps per-stream state on media time, and
publishes a ``DecisionEvent`` to ``decisions`` for every step that chose to respond."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness import topics
from streamharness.decision.policy import DecisionPolicy, Evidence, PendingQuestion, RulePolicy, RuleThresholds, StreamState
from streamharness.keys import key_str
from streamharness.records import ConsumedEvent
from streamharness.settings import TritonSettings, load_settings
from streamharness.stage import Outbox, Stage, StageContext, StageSpec
from streamharness.text_encoder import TextEncoderSettings
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)
Q = events_pb2.QueryEvent


class DecisionSettings(BaseSettings):
    """The per-second speak/silence decision."""

    model_config = SettingsConfigDict(env_prefix="SH_DECISION_", frozen=True, extra="forbid")

    policy: str = Field("trained", pattern="^(rules|trained)$", description="Decision policy: 'trained' (the Streaming-Train decision head on Triton, model SH_DECISION_TRAINED_MODEL; the rules where it is not served) or 'rules' (evidence rules with MiniLM matching).")
    consumer_group: str = Field("decision", min_length=1, description="Kafka consumer group of the decision replicas.")
    refractory_s: float = Field(10.0, ge=0, le=3600, description="A standing instruction does not fire twice within this much media time.")
    object_similarity: float = Field(0.55, gt=0, le=1, description="MiniLM similarity between an object instruction and a frame label needed to fire.")
    scene_change: float = Field(0.35, gt=0, le=2, description="Frame-embedding cosine distance from the last reference that counts as a scene change.")
    min_label_score: float = Field(0.08, ge=0, le=1, description="Classifier labels below this probability are not evidence.")
    trained_model: str = Field("decision_head", min_length=1, description="Triton model of the trained policy (written by `streamharness train export`).")
    trained_threshold: float | None = Field(None, gt=0, lt=1, description="Probability at which the trained head fires; unset = the threshold its export chose on validation data.")
    trained_min_gap_s: float = Field(3.0, ge=0, le=3600, description="The trained policy fires one instruction at most once in this much media time.")
    trained_people_rules: bool = Field(True, description="With policy 'trained': instructions about people are decided by the people-detector rule (the shipped head was trained without people); false = the head decides every instruction.")
    trained_fallback: bool = Field(True, description="With policy 'trained': decide by the rules when the head is not served (logged); false = not ready until it is.")


def _thresholds(settings: DecisionSettings) -> RuleThresholds:
    return RuleThresholds(
        object_similarity=settings.object_similarity, scene_change=settings.scene_change,
        min_label_score=settings.min_label_score, refractory_ms=int(settings.refractory_s * 1000),
    )


def served_trained_policy(settings: DecisionSettings, embed, triton: TritonSettings | None = None) -> DecisionPolicy | None:
    """The trained policy on the head Triton serves now, or None when it is not served."""
    from streamharness.decision.trained import HeadScorer, TrainedPolicy

    scorer = HeadScorer(triton or load_settings(TritonSettings), settings.trained_model)
    if not scorer.ready():
        scorer.close()
        return None
    scorer.load_config()
    return TrainedPolicy(embed, scorer, threshold=settings.trained_threshold,
                         min_gap_ms=int(settings.trained_min_gap_s * 1000),
                         people_rules=RulePolicy(embed, _thresholds(settings)) if settings.trained_people_rules else None)


def make_policy(settings: DecisionSettings, embed, triton: TritonSettings | None = None) -> DecisionPolicy | None:
    """The policy ``SH_DECISION_POLICY`` names, with its thresholds; ``embed`` = MiniLM's encode.
    ``trained`` with its head not served: the rules when ``trained_fallback``, else None (not ready)."""
    thresholds = _thresholds(settings)
    if settings.policy == "trained":
        policy = served_trained_policy(settings, embed, triton)
        if policy is not None:
            return policy
        if not settings.trained_fallback:
            log.error("the trained decision head %r is not served on Triton", settings.trained_model)
            return None
        log.warning("the trained decision head %r is not served on Triton: deciding by the rules", settings.trained_model)
    return RulePolicy(embed, thresholds)


def _media_order(msg) -> tuple[int, int]:
    if isinstance(msg, events_pb2.QueryEvent):
        if msg.kind == Q.KIND_SESSION_START:
            return (-1, 0)
        if msg.kind == Q.KIND_SESSION_END:
            # Last of all: the gateway publishes it after every other query of the session, and a
            # question asked after the last frame (media time past the end's) must not be lost.
            return (2**62, 3)
        return (msg.media_ts_ms, 1)
    return (msg.media_ts_ms, 2)


class DecisionStage(Stage):
    """The ``decision`` row of the topology: per-stream state, one decision per step."""

    name = "decision"

    def __init__(self, settings: DecisionSettings | None = None, text: TextEncoderSettings | None = None,
                 triton: TritonSettings | None = None, policy: DecisionPolicy | None = None, text_encoder=None):
        """``policy``: use this one instead of the one ``SH_DECISION_POLICY`` names; ``text_encoder``:
        a loaded MiniLM encoder to share (else one is loaded at ``open``); ``triton``: where the
        trained policy's head is served (default ``SH_TRITON_*``)."""
        self.settings = settings or load_settings(DecisionSettings)
        self.text = text
        self.triton = triton
        self.policy = policy
        self._explicit_policy = policy is not None  # a policy given by the caller is never swapped
        self._text_encoder = text_encoder
        self.states: dict[str, StreamState] = {}
        self._batch: list = []
        self.out: Outbox | None = None
        self._policy_tried = 0.0

    def configure(self, spec: StageSpec) -> StageSpec:
        return replace(spec, group=self.settings.consumer_group)

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.out = ctx.outbox
        if self.policy is None:
            from streamharness.text_encoder import TextEncoder

            self._text_encoder = self._text_encoder or TextEncoder(self.text or load_settings(TextEncoderSettings)).load()
            self.policy = make_policy(self.settings, self._text_encoder.encode, self.triton)
            self._policy_tried = time.monotonic()
        log.info("decision policy: %s%s", getattr(self.policy, "name", "none (waiting for the trained head)"),
                 f" (threshold {self.policy.threshold:.2f})" if hasattr(self.policy, "threshold") else "")

    def healthy(self) -> bool:
        # A trained head that was not served at start (no fallback) is looked for again, every few seconds.
        if self.policy is None and self._text_encoder is not None and time.monotonic() - self._policy_tried > 5.0:
            self._policy_tried = time.monotonic()
            self.policy = make_policy(self.settings, self._text_encoder.encode, self.triton)
        return self.policy is not None

    # -- handling ------------------------------------------------------------------------------
    def _state(self, key: common_pb2.StreamKey, session_id: str) -> StreamState:
        name = key_str(key)
        state = self.states.get(name)
        if state is None or (session_id and state.session_id and state.session_id != session_id):
            state = StreamState(key=key, session_id=session_id)
            self.states[name] = state
        state.session_id = state.session_id or session_id
        return state

    # One poll brings records of both topics in partition order, not media-time order (after a
    # rebalance a whole backlog of frames can come before the session's start). So a polled batch
    # is collected, then applied in media-time order: session start, then queries and frames by
    # media time (queries first at equal times), session end last. Frames of a stream whose start
    # has not been seen yet are held until it arrives, for at most HOLD_S of wall time (after a
    # restart the start was consumed long ago: then the frames go on without it). Wall time, not
    # media time: a replay sends minutes of media in seconds while the queries partition may still
    # be on its way to this member after a rebalance.
    HOLD_S = 30.0

    def handle(self, event: ConsumedEvent) -> None:
        self._batch.append(event.message)

    # With policy "trained" and the head not served at start (Triton came up later, or a new head is
    # being rolled out), the rules decide; every so often the head is looked for again and, once
    # served, takes over the running streams' instructions. Done between batches, on the thread
    # that decides, so no step sees two policies.
    UPGRADE_EVERY_S = 30.0

    def end_batch(self) -> None:
        batch, self._batch = self._batch, []
        batch.sort(key=_media_order)
        for msg in batch:
            self.apply(msg)
        self._maybe_upgrade()

    def _maybe_upgrade(self) -> None:
        from streamharness.decision.trained import TrainedPolicy

        if (self._explicit_policy or self.settings.policy != "trained" or isinstance(self.policy, TrainedPolicy)
                or self._text_encoder is None or time.monotonic() - self._policy_tried < self.UPGRADE_EVERY_S):
            return
        self._policy_tried = time.monotonic()
        policy = served_trained_policy(self.settings, self._text_encoder.encode, self.triton)
        if policy is None:
            return
        for state in self.states.values():
            for inst in list(state.instructions.values()):
                policy.add_instruction(state, inst.instruction_id, inst.text)
        log.info("the trained decision head %r is served now: it decides from here on", self.settings.trained_model)
        self.policy = policy

    def apply(self, msg) -> None:
        """One query or encoded frame, in the order ``end_batch`` sorted them into."""
        log.debug("%s %s t=%d %s", key_str(msg.key), type(msg).__name__, msg.media_ts_ms,
                  getattr(msg, "person_count", "") if not isinstance(msg, events_pb2.QueryEvent) else Q.Kind.Name(msg.kind))
        if isinstance(msg, events_pb2.QueryEvent):
            self._on_query(msg)
            if msg.kind == Q.KIND_SESSION_START:
                state = self.states.get(key_str(msg.key))
                if state is not None:
                    self._release(state)
        else:
            state = self._state(msg.key, msg.session_id)
            if not state.started:
                if not state.held:
                    state.held_since = time.monotonic()
                if time.monotonic() - state.held_since < self.HOLD_S:
                    state.held.append(msg)
                    return
                log.warning("%s: no session start after %.0fs; deciding without it", key_str(msg.key), self.HOLD_S)
                self._release(state)
            self._on_frame(msg)

    def _release(self, state: StreamState) -> None:
        state.started = True
        held, state.held = state.held, []
        for frame in held:
            self._on_frame(frame)

    def _on_query(self, q: events_pb2.QueryEvent) -> None:
        state = self._state(q.key, q.session_id)
        if q.reply_to:
            state.reply_to = q.reply_to
        if q.kind == Q.KIND_SESSION_START:
            for inst in q.instructions:
                self.policy.add_instruction(state, inst.instruction_id, inst.text)
            log.info("%s session %s started: %s", key_str(q.key), q.session_id,
                     ", ".join(f"{i.instruction_id} ({i.kind})" for i in state.instructions.values()) or "no instructions")
        elif q.kind == Q.KIND_INSTRUCTION_ADD:
            self.policy.add_instruction(state, q.instruction_id, q.text)
        elif q.kind == Q.KIND_INSTRUCTION_REMOVE:
            state.instructions.pop(q.instruction_id, None)
        elif q.kind == Q.KIND_QUESTION:
            state.questions.append(PendingQuestion(q.question_id, q.text, q.media_ts_ms))
            # Frames already went past the question's time: answer now rather than at the next frame.
            if state.last is not None and state.last.media_ts_ms >= q.media_ts_ms:
                self._publish(state, self.policy.answer_pending(state, state.last.media_ts_ms), q.hops)
        elif q.kind == Q.KIND_SESSION_END:
            # The end is an event in media time too: its timestamp is the session's last published
            # frame. Frames reach us through the encoder, later than queries, so the session is
            # finished only once its last frame has been decided on.
            state.end_ms = q.media_ts_ms
            if state.held:
                self._release(state)  # the end came, so must every frame before it: decide them now
                if key_str(q.key) not in self.states:
                    return  # the released frames reached the end and finished the session
            # media_ts_ms < 0: the session published no frame at all, so nothing is coming.
            if q.media_ts_ms < 0 or (state.last is not None and state.last.media_ts_ms >= q.media_ts_ms):
                self._finish(state, q.hops)

    def _on_frame(self, f: events_pb2.EncodedFrameEvent) -> None:
        state = self._state(f.key, f.session_id)
        if state.last is not None and f.media_ts_ms <= state.last.media_ts_ms:
            return  # a redelivered or out-of-order frame: that step was already decided
        evidence = Evidence(
            media_ts_ms=f.media_ts_ms,
            embedding=np.asarray(f.embedding, dtype=np.float32),
            labels=[(label.name, label.score) for label in f.labels],
            person_count=f.person_count,
            caption=f.caption,
        )
        decisions = self.policy.step(state, evidence)
        meters.decisions().add(1, {"action": "respond" if decisions else "silent"})
        self._publish(state, decisions, f.hops)
        if state.end_ms is not None and f.media_ts_ms >= state.end_ms:
            self._finish(state, f.hops)

    def _finish(self, state: StreamState, hops) -> None:
        """Answer what is still pending (questions asked after the last frame) and forget the stream."""
        now = max([state.last.media_ts_ms if state.last else 0, *(p.media_ts_ms for p in state.questions)])
        self._publish(state, self.policy.answer_pending(state, now), hops)
        self.states.pop(key_str(state.key), None)

    def _publish(self, state: StreamState, decisions, hops) -> None:
        futures = []
        for d in decisions:
            event = events_pb2.DecisionEvent(
                key=state.key, session_id=state.session_id, media_ts_ms=d.media_ts_ms,
                action=events_pb2.DecisionEvent.ACTION_RESPOND, trigger=d.trigger,
                question_id=d.trigger_id if d.trigger == common_pb2.TRIGGER_QUESTION else "",
                instruction_id=d.trigger_id if d.trigger == common_pb2.TRIGGER_INSTRUCTION else "",
                prompt_text=d.prompt_text, reason=d.reason, score=d.score, policy=self.policy.name,
                reply_to=state.reply_to,
                decision_id=f"{key_str(state.key)}/{d.media_ts_ms}/{d.trigger_id}",
                hops=[*hops, common_pb2.HopStamp(hop="decision", wall_unix_ns=time.time_ns())],
            )
            log.info("%s t=%.1fs respond (%s): %s", key_str(state.key), d.media_ts_ms / 1000, d.trigger_id, d.reason)
            futures.append(self.out.send(topics.DECISIONS, state.key, event))
        for fut in futures:
            fut.get(timeout=30)  # durable before the offset of what caused it is committed
