"""The decision stage: consumes ``queries`` and ``embeddings`` of the same streams in one
consumer group (both topics are keyed ``tenant/stream`` with equal partition counts, and the range
assignor gives one member the same partition of both), keeps per-stream state on media time, and
publishes a ``DecisionEvent`` to ``decisions`` for every step that chose to respond, and one to
``decision-log`` for every decided second (silent ones too: the live view's timeline).

**Fairness.** A stream may have at most ``SH_DECISION_MAX_OPEN_QUESTIONS_PER_STREAM`` questions open
(accepted and not answered yet: pending here, or decided and waiting for their final response). The
stage then also reads ``responses`` (co-partitioned like the rest) to see answers close them. A
question beyond the bound is refused at once with a final ``ResponseEvent`` that says so (never
dropped): one stream's flood cannot put more than that many of its questions in its partition's
queue ahead of the other streams there (docs/architecture.md, "Fairness between streams")."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness import topics
from streamharness.engine.settings import EngineSettings
from streamharness.memory.tiers import TierSettings
from streamharness.decision.policy import DecisionPolicy, Evidence, PendingQuestion, RulePolicy, RuleThresholds, StreamState
from streamharness.keys import key_str, parse_key
from streamharness.pace import PaceTracker
from streamharness.records import ConsumedEvent, processing
from streamharness.settings import TritonSettings, load_settings
from streamharness.stage import Outbox, Stage, StageContext, StageSpec
from streamharness.text_encoder import TextEncoderSettings
from streamharness.telemetry import meters, tracing
from streamharness.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)
Q = events_pb2.QueryEvent


class DecisionSettings(BaseSettings):
    """The per-second speak/silence decision."""

    model_config = SettingsConfigDict(env_prefix="SH_DECISION_", frozen=True, extra="forbid")

    policy: str = Field("trained", pattern="^(rules|trained|model)$", description="Decision policy: 'trained' (the Streaming-Train decision head on Triton, model SH_DECISION_TRAINED_MODEL; the rules where it is not served), 'rules' (evidence rules with MiniLM matching) or 'model' (the model of SH_ENGINE_MODEL_PATH decides each second in the streaming protocol on the stream's KV cache and writes the response itself; the stage then reads 'frames' and publishes on 'responses').")
    consumer_group: str = Field("decision", min_length=1, description="Kafka consumer group of the decision replicas.")
    refractory_s: float = Field(10.0, ge=0, le=3600, description="A standing instruction does not fire twice within this much media time (the rules and the model policy).")
    object_similarity: float = Field(0.55, gt=0, le=1, description="MiniLM similarity between an object instruction and a frame label needed to fire.")
    scene_change: float = Field(0.35, gt=0, le=2, description="Frame-embedding cosine distance from the last reference that counts as a scene change.")
    min_label_score: float = Field(0.08, ge=0, le=1, description="Classifier labels below this probability are not evidence.")
    trained_model: str = Field("decision_head", min_length=1, description="Triton model of the trained policy (written by `streamharness train export`).")
    trained_threshold: float | None = Field(None, gt=0, lt=1, description="Probability at which the trained head fires; unset = the threshold its export chose on validation data.")
    trained_min_gap_s: float = Field(3.0, ge=0, le=3600, description="The trained policy fires one instruction at most once in this much media time.")
    trained_people_rules: bool = Field(True, description="With policy 'trained': instructions about people are decided by the people-detector rule (the shipped head was trained without people); false = the head decides every instruction.")
    trained_fallback: bool = Field(True, description="With policy 'trained': decide by the rules when the head is not served (logged); false = not ready until it is.")
    memory_address: str = Field("127.0.0.1:50052", description="With policy 'model': memory's gRPC host:port, for the stable context the stream's cache is built on; empty = no memory (the cache holds the protocol, the instructions and the recent turns).")
    memory_timeout_s: float = Field(0.5, gt=0, le=30, description="With policy 'model': deadline of a memory Context call; past it the cache keeps its prefix.")
    model_carry_turns: int = Field(15, ge=1, le=3600, description="With policy 'model': the last turns (seconds) carried into a rebuilt cache (a new chunk's prefix, or a full cache).")
    model_overflow: Literal["drop", "rebuild"] = Field(
        "drop", description="With policy 'model': what a stream's cache past 80 % of SH_ENGINE_CAPACITY_TOKENS does: drop = its oldest "
        "turns are dropped in place down to 60 % (no re-prefill, the kept turns' keys rotated back: a step costs the same hour after "
        "hour; an approximation above the first layer, as StreamingLLM/StreamingVLM make), rebuild = it is rebuilt from its prefix "
        "and the carried turns in the background (exact, a prefill each time).")
    model_prefix_share: float = Field(0.5, gt=0, lt=1, description="With policy 'model': the share of SH_ENGINE_CAPACITY_TOKENS memory's prefix may take in the cache (its newest end is kept).")
    model_lead_s: float = Field(15.0, ge=0, le=3600, description="With policy 'model': the next chunk's prefix is read and built in the background this long before the boundary.")
    model_answer_questions: bool = Field(True, description="With policy 'model': a second holding a question must respond (a prompted model may not); false = the model may wait (a trained model answering forward questions when the event comes).")
    model_alert_max_new_tokens: int = Field(40, ge=1, le=4096, description="With policy 'model': token budget of a proactive response.")
    model_question_max_new_tokens: int = Field(128, ge=1, le=4096, description="With policy 'model': token budget of an answer.")
    max_open_questions_per_stream: int = Field(
        8, ge=0, le=10_000,
        description="Questions one stream may have open at once: accepted and not answered yet (pending, or decided and "
        "waiting for their final response, which the stage then reads on 'responses'). A question beyond it is answered "
        "at once with a final response refusing it and saying why (never dropped), so one stream's flood cannot queue "
        "more than this many generations ahead of the other streams of its partition; 0 = no bound (and 'responses' is "
        "not read).")
    away_keep_s: float = Field(300.0, gt=0, le=7 * 86_400, description="A session whose client went away without SessionEnd (a dropped call, a gateway that stopped) keeps its stream's state (instructions, questions) this long for a resume with its token; then the stream is finished.")
    session_lease_s: float = Field(120.0, gt=0, le=86_400, description="A session with no input (frame or query) for this long no longer holds its stream: a new session may take the stream over. Before that a second session on the stream is refused (refusal 'stream_in_use', ALREADY_EXISTS at the client).")
    shed_lag_ms: int = Field(2000, ge=0, le=3_600_000, description="Per-stream frame shedding when the stage lags: a frame older than this (wall time since the gateway stamped it) is not decided when a newer frame of its stream is in the same batch (the newest is kept; counted in sh.pipeline.frames_shed). Only for live frames (FrameEvent.pace PACE_LIVE, or undeclared and sent at the pace of their media time): a pulled file, an upload, a replay declared PACE_REPLAY (the player and the eval faster than real time) is never shed. 0 = decide every frame.")


#: Refusals that are about the session itself, not a question: the gateway ends the call with them.
REFUSAL_STREAM_IN_USE = ("Stream {stream} is already open in another session (its last input {age:.0f} s ago); end that "
                         "session, resume it with its resume token, or wait {lease:.0f} s after its last input.")
REFUSAL_SESSION_EXPIRED = ("Session {session} of stream {stream} can no longer be resumed (ended, or away longer than "
                           "SH_DECISION_AWAY_KEEP_S); start a new session.")

#: The text of the final response that refuses a question past SH_DECISION_MAX_OPEN_QUESTIONS_PER_STREAM.
REFUSAL_TOO_MANY_OPEN = ("Not answered: this stream already has {limit} questions waiting for an answer, the most one "
                         "stream may have open at once. Ask again once one of them has been answered.")


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


def model_policy(settings: DecisionSettings, embed, memory=None, tiers: TierSettings | None = None,
                 engine: EngineSettings | None = None) -> DecisionPolicy:
    """The ``model`` policy on this process's streaming engine (``SH_ENGINE_*``); ``memory``: an
    object with the ``MemoryServiceStub.Context`` method (None: no memory)."""
    import grpc

    from streamharness.decision.model_policy import ModelPolicy, ModelPolicyConfig
    from streamharness.engine.settings import shared_engine
    from streamharness.v1 import memory_pb2

    failing = [False]

    def context(key, now_ms):
        if memory is None:
            return None
        try:
            reply = memory.Context(memory_pb2.ContextRequest(key=key, now_ms=now_ms), timeout=settings.memory_timeout_s)
        except Exception as err:  # noqa: BLE001 - a grpc.RpcError, or the in-process stub's own error with code()
            code = err.code() if callable(getattr(err, "code", None)) else None
            if code == grpc.StatusCode.NOT_FOUND:
                return ""  # nothing remembered of the stream yet
            if not failing[0]:
                log.warning("memory Context failed (%s); the model keeps its cached prefix", code.name if code else repr(err))
            failing[0] = True
            return None
        failing[0] = False
        return reply.prefix_text

    config = ModelPolicyConfig(carry_turns=settings.model_carry_turns, min_gap_s=settings.refractory_s, lead_s=settings.model_lead_s,
                               chunk_s=(tiers or load_settings(TierSettings)).chunk_s, answer_questions=settings.model_answer_questions,
                               alert_max_new_tokens=settings.model_alert_max_new_tokens,
                               question_max_new_tokens=settings.model_question_max_new_tokens,
                               overflow=settings.model_overflow, prefix_share=settings.model_prefix_share)
    return ModelPolicy(shared_engine(engine or load_settings(EngineSettings)), config, context=context, embed=embed)


def make_policy(settings: DecisionSettings, embed, triton: TritonSettings | None = None, memory=None,
                tiers: TierSettings | None = None, engine: EngineSettings | None = None) -> DecisionPolicy | None:
    """The policy ``SH_DECISION_POLICY`` names, with its thresholds; ``embed`` = MiniLM's encode.
    ``trained`` with its head not served: the rules when ``trained_fallback``, else None (not ready)."""
    thresholds = _thresholds(settings)
    if settings.policy == "model":
        return model_policy(settings, embed, memory, tiers, engine)
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
                 triton: TritonSettings | None = None, tiers: TierSettings | None = None, engine: EngineSettings | None = None,
                 policy: DecisionPolicy | None = None, text_encoder=None, memory: object | None = None):
        """``policy``: use this one instead of the one ``SH_DECISION_POLICY`` names; ``text_encoder``:
        a loaded MiniLM encoder to share (else one is loaded at ``open``); ``triton``: where the
        trained policy's head is served (default ``SH_TRITON_*``); ``memory``: an object with the
        ``MemoryServiceStub.Context`` method for the model policy (else a channel to
        ``SH_DECISION_MEMORY_ADDRESS``); ``tiers`` (memory's chunk length) and ``engine`` (the
        model and its KV budget): the model policy's (default ``SH_TIERS_*``, ``SH_ENGINE_*``)."""
        self.settings = settings or load_settings(DecisionSettings)
        self.tiers, self.engine_settings = tiers, engine
        self._memory = memory
        self._channel = None
        self._round: dict[str, tuple] = {}
        self.text = text
        self.triton = triton
        self.policy = policy
        self._explicit_policy = policy is not None  # a policy given by the caller is never swapped
        self._text_encoder = text_encoder
        self.states: dict[str, StreamState] = {}
        self._batch: list = []
        self._records: dict[int, ConsumedEvent] = {}  # id of a batch's message -> its record (its trace)
        self._answers: list[events_pb2.ResponseEvent] = []  # final responses to questions, from 'responses'
        self._durable_sends: list = []  # this batch's refusals and end-of-session records: durable before its commit
        self._dirty: set[str] = set()  # streams whose durable state this batch changed
        self._partition_of: dict[str, int] = {}  # stream -> the partition its records come from
        self._pace = PaceTracker()  # which streams are sent at the pace of their media time
        self._refused: dict[str, set[str]] = {}  # stream -> sessions refused on it (their records are ignored)
        self._restoring = False
        self._swept = 0.0
        self.out: Outbox | None = None
        self.ctx: StageContext | None = None
        self._policy_tried = 0.0

    @property
    def takes_frames(self) -> bool:
        """The policy reads the frames themselves (the model policy on a VLM): the stage then
        consumes ``frames`` instead of ``embeddings`` (whose captions a text model reads)."""
        if self.policy is not None:
            return bool(getattr(self.policy, "takes_frames", False))
        return self.settings.policy == "model" and (self.engine_settings or load_settings(EngineSettings)).takes_images

    @property
    def writes_responses(self) -> bool:
        """The policy writes the responses itself (the model policy): the stage publishes them."""
        if self.policy is not None:
            return self.policy.name == "model"
        return self.settings.policy == "model"

    def configure(self, spec: StageSpec) -> StageSpec:
        consumes = dict(spec.consumes)
        consumes.pop(topics.EMBEDDINGS if self.takes_frames else topics.FRAMES, None)
        if self.settings.max_open_questions_per_stream:
            # Answers close open questions. Keyed tenant/stream with the same partition count as
            # queries (every host creates all topics alike) and read with the range assignor: the
            # member that holds a stream's queries holds its responses too.
            consumes.setdefault(topics.RESPONSES, events_pb2.ResponseEvent)
        else:
            consumes.pop(topics.RESPONSES, None)
        # Refusals go to 'responses' with every policy (the topology row lists it); for a policy that
        # writes no answers it stays out of the configured row, so its metadata comes at the first refusal.
        produces = spec.produces if self.writes_responses else tuple(t for t in spec.produces if t != topics.RESPONSES)
        return replace(spec, group=self.settings.consumer_group, consumes=consumes, produces=produces)

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.out = ctx.outbox
        self.ctx = ctx
        if self.policy is None:
            from streamharness.text_encoder import TextEncoder

            self._text_encoder = self._text_encoder or TextEncoder(self.text or load_settings(TextEncoderSettings)).load()
            memory = self._memory
            if memory is None and self.settings.policy == "model" and self.settings.memory_address:
                from streamharness.memory.client import MemoryClient

                self._channel = memory = MemoryClient(self.settings.memory_address, "decision")
            self.policy = make_policy(self.settings, self._text_encoder.encode, self.triton, memory, self.tiers, self.engine_settings)
            self._policy_tried = time.monotonic()
        log.info("decision policy: %s%s", getattr(self.policy, "name", "none (waiting for the trained head)"),
                 f" (threshold {self.policy.threshold:.2f})" if hasattr(self.policy, "threshold") else "")

    def close(self, deadline: float) -> None:
        if self._channel is not None:
            self._channel.close()

    def healthy(self) -> bool:
        # A trained head that was not served at start (no fallback) is looked for again, every few seconds.
        if self.policy is None and self._text_encoder is not None and time.monotonic() - self._policy_tried > 5.0:
            self._policy_tried = time.monotonic()
            self.policy = make_policy(self.settings, self._text_encoder.encode, self.triton)
        return self.policy is not None and not self._restoring

    # -- handling ------------------------------------------------------------------------------
    def _state(self, key: common_pb2.StreamKey, session_id: str) -> StreamState:
        """The stream's state; a new one when none is held. Only a session start (``_on_start``)
        gives a held stream to another session: never a silent reset."""
        name = key_str(key)
        state = self.states.get(name)
        if state is None:
            state = StreamState(key=key, session_id=session_id, updated_unix=time.time())
            self.states[name] = state
        state.session_id = state.session_id or session_id
        return state

    def _foreign(self, msg) -> bool:
        """A record of a session that does not hold its stream (refused, or an earlier one's late records)."""
        if not msg.session_id:
            return False
        name = key_str(msg.key)
        if msg.session_id in self._refused.get(name, ()):
            return True
        state = self.states.get(name)
        return state is not None and bool(state.session_id) and state.session_id != msg.session_id

    # -- durable state (the stream-state changelog) -----------------------------------------------
    def assigned(self, partitions: dict[str, set[int]]) -> None:
        """Restore the streams of newly assigned ``queries`` partitions from the changelog (those
        kept across the rebalance stay as they are in memory, newer than or equal to it)."""
        parts = set(partitions.get(topics.QUERIES, ()))
        held = {s.partition for s in self.states.values()}
        new = sorted(parts - held)
        if not new or self.ctx is None:
            return
        self._restoring = True
        started = time.monotonic()
        try:
            table = self.ctx.read_table(topics.STREAM_STATE, new)
            restored = 0
            for partition, rows in table.items():
                for raw_key, value in rows.items():
                    rec = events_pb2.StreamStateRecord.FromString(value)
                    if key_str(rec.key) not in self.states:
                        self.states[key_str(rec.key)] = self._restored(rec, partition)
                        restored += 1
            log.info("restored %d streams of partitions %s from %s in %.2f s", restored, new, topics.STREAM_STATE,
                     time.monotonic() - started)
        finally:
            self._restoring = False

    def revoked(self, partitions: dict[str, set[int]]) -> None:
        """Forget the streams of revoked partitions (their state is in the changelog, as of the last
        committed batch; the partition's next owner restores it)."""
        parts = set(partitions.get(topics.QUERIES, ()))
        for name, state in list(self.states.items()):
            if state.partition in parts:
                del self.states[name]
                forget = getattr(self.policy, "forget", None)
                if forget is not None:
                    forget(state)

    def _restored(self, rec: events_pb2.StreamStateRecord, partition: int) -> StreamState:
        state = StreamState(key=rec.key, session_id=rec.session_id, reply_to=rec.reply_to, started=True,
                            partition=partition, restored_last_ms=rec.last_decision_ms, decision_fps=rec.decision_fps,
                            updated_unix=rec.updated_unix_ms / 1000, end_ms=rec.end_ms if rec.end_ms >= 0 else None,
                            away_since=rec.away_since_unix_ms / 1000 if rec.away_since_unix_ms else None)
        for inst in rec.instructions:
            added = self.policy.add_instruction(state, inst.instruction_id, inst.text)
            if inst.instruction_id in rec.last_fired_ms:
                added.last_fired_ms = rec.last_fired_ms[inst.instruction_id]
        state.questions = [PendingQuestion(q.question_id, q.text, q.media_ts_ms) for q in rec.questions]
        state.open_questions = dict(rec.open_questions)
        return state

    def _record_of(self, state: StreamState) -> events_pb2.StreamStateRecord:
        return events_pb2.StreamStateRecord(
            key=state.key, session_id=state.session_id, reply_to=state.reply_to, decision_fps=state.decision_fps,
            instructions=[common_pb2.StandingInstruction(instruction_id=i.instruction_id, text=i.text)
                          for i in state.instructions.values()],
            questions=[events_pb2.PendingQuestionRecord(question_id=q.question_id, text=q.text, media_ts_ms=q.media_ts_ms)
                       for q in state.questions],
            open_questions=state.open_questions, last_decision_ms=state.last_ms,
            end_ms=state.end_ms if state.end_ms is not None else -1,
            last_fired_ms={i.instruction_id: i.last_fired_ms for i in state.instructions.values() if i.last_fired_ms is not None},
            updated_unix_ms=int(state.updated_unix * 1000),
            away_since_unix_ms=int(state.away_since * 1000) if state.away_since else 0)

    def _persist(self) -> list:
        """The changed streams' state (or a tombstone for a finished one) to the changelog."""
        dirty, self._dirty = self._dirty, set()
        sent = []
        for name in sorted(dirty):
            state = self.states.get(name)
            if state is None:
                sent.append(self.out.delete(topics.STREAM_STATE, name))
            else:
                sent.append(self.out.send(topics.STREAM_STATE, state.key, self._record_of(state)))
        return sent

    def _sweep(self) -> None:
        """Finish streams whose client has been away longer than SH_DECISION_AWAY_KEEP_S."""
        now = time.time()
        if now - self._swept < 5.0:
            return
        self._swept = now
        for state in list(self.states.values()):
            if state.away_since is not None and now - state.away_since > self.settings.away_keep_s:
                log.info("%s: session %s away for %.0f s: finished", key_str(state.key), state.session_id, now - state.away_since)
                self._finish(state, [])

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
        msg = event.message
        if isinstance(msg, events_pb2.ResponseEvent):
            if msg.final and not msg.session_finished:
                if not (msg.key.tenant and msg.key.stream_id):
                    msg.key.CopyFrom(parse_key(event.key))
                self._answers.append(msg)
            return  # the other chunks of a response say nothing to the decision
        self._partition_of[key_str(msg.key)] = event.partition
        self._batch.append(msg)
        self._records[id(msg)] = event

    # With policy "trained" and the head not served at start (Triton came up later, or a new head is
    # being rolled out), the rules decide; every so often the head is looked for again and, once
    # served, takes over the running streams' instructions. Done between batches, on the thread
    # that decides, so no step sees two policies.
    UPGRADE_EVERY_S = 30.0

    def end_batch(self) -> None:
        batch, self._batch = self._batch, []
        records, self._records = self._records, {}
        answers, self._answers = self._answers, []
        self._durable_sends = []
        # Answers first: a slot they free is free for the questions of this batch (a question
        # redelivered with its own answer in one poll is simply decided and answered again).
        for answer in answers:
            self._on_answer(answer)
        # Media-time order within each session; a stream's sessions in the order they came (the end
        # of one, then the start of the next that takes the stream over).
        first_seen: dict[tuple[str, str], int] = {}
        for msg in batch:
            first_seen.setdefault((key_str(msg.key), msg.session_id), len(first_seen))
        batch.sort(key=lambda m: (first_seen[(key_str(m.key), m.session_id)], *_media_order(m)))
        for msg in self._shed(batch):
            # Each record in its own trace: what it makes the stage send (its decisions) goes on in it.
            record = records.get(id(msg))
            with processing(record, "decision", "decide", attributes={"sh.batch_size": len(batch)}) if record is not None else nullcontext():
                self.apply(msg)
        self._flush_round()
        self._sweep()
        sends, self._durable_sends = self._durable_sends, []
        # Durable before the offsets of what caused them are committed: refusals and end-of-session records, then the state.
        for fut in [*sends, *self._persist()]:
            fut.get(timeout=30)
        self._maybe_upgrade()

    def _shed(self, batch: list) -> list:
        """Per-stream shedding when the stage lags: a frame of a live stream older than
        SH_DECISION_SHED_LAG_MS (wall time since the gateway stamped it) is dropped when a newer
        frame of its stream is in the batch. Queries are never shed; the newest frame of each stream
        is always decided; a stream sent faster than real time is never shed (:mod:`streamharness.pace`)."""
        lag_ms = self.settings.shed_lag_ms
        if not lag_ms:
            return batch
        newest: dict[str, Any] = {}
        live: dict[str, bool] = {}
        for msg in batch:  # in media order per stream: the pace is judged from a session's first frame to its newest
            if not isinstance(msg, events_pb2.QueryEvent) and msg.hops:
                name = key_str(msg.key)
                if name not in newest or msg.media_ts_ms > newest[name].media_ts_ms:
                    newest[name] = msg
                live[name] = self._pace.live(name, msg.session_id, msg.media_ts_ms, msg.hops[0].wall_unix_ns, msg.pace)
        now_ns = time.time_ns()
        kept, shed = [], 0
        for msg in batch:
            if (not isinstance(msg, events_pb2.QueryEvent) and msg.hops and msg.media_ts_ms < newest[key_str(msg.key)].media_ts_ms
                    and (now_ns - msg.hops[0].wall_unix_ns) / 1e6 > lag_ms and live[key_str(msg.key)]):
                shed += 1
                continue
            kept.append(msg)
        if shed:
            meters.frames_shed().add(shed, {"stage": "decision", "reason": "lag"})
            log.info("decision lags more than %d ms: %d older frames shed (each stream's newest kept)", lag_ms, shed)
        return kept

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
        """One query or (encoded) frame, in the order ``end_batch`` sorted them into. A policy that
        steps many streams in one forward (the model policy) gets the frames of a batch in rounds:
        one frame per stream, a round flushed before a stream's next frame or query."""
        if self._round and key_str(msg.key) in self._round:
            self._flush_round()
        name = key_str(msg.key)
        session_kinds = (Q.KIND_SESSION_START, Q.KIND_SESSION_RESUME)
        if not (isinstance(msg, events_pb2.QueryEvent) and msg.kind in session_kinds) and self._foreign(msg):
            log.debug("%s: a record of session %s, which does not hold the stream: ignored", name, msg.session_id)
            return
        self._dirty.add(name)
        state = self.states.get(name)
        if state is not None and (not msg.session_id or msg.session_id == state.session_id):
            state.updated_unix = time.time()
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
                    state.held.append((msg, tracing.current()))  # decided later, in its own trace
                    return
                log.warning("%s: no session start after %.0fs; deciding without it", key_str(msg.key), self.HOLD_S)
                self._release(state)
            self._on_frame(msg)

    def _release(self, state: StreamState) -> None:
        state.started = True
        held, state.held = state.held, []
        for frame, trace_context in held:
            with tracing.attached(trace_context):
                self._on_frame(frame)

    def _refuse_session(self, q: events_pb2.QueryEvent, reason: str, text: str) -> None:
        """Tell session ``q.session_id`` (a final response with ``refusal=reason``) that it may not
        go on; its later records on the stream are ignored. The gateway ends its call."""
        name = key_str(q.key)
        self._refused.setdefault(name, set()).add(q.session_id)
        log.warning("%s: session %s refused (%s)", name, q.session_id, reason)
        event = events_pb2.ResponseEvent(
            key=q.key, session_id=q.session_id, response_id=f"{name}/{q.session_id}/{reason}", index=0, text=text,
            final=True, reply_to=q.reply_to, refusal=reason, media_ts_ms=q.media_ts_ms)
        self._durable_sends.append(self.out.send(topics.RESPONSES, q.key, event))

    def _on_session(self, q: events_pb2.QueryEvent) -> StreamState | None:
        """A session start or resume: who holds the stream. None when the session is refused."""
        name = key_str(q.key)
        state = self.states.get(name)
        now = time.time()
        if q.kind == Q.KIND_SESSION_RESUME:
            if state is None or state.session_id != q.session_id:
                self._refuse_session(q, "session_expired", REFUSAL_SESSION_EXPIRED.format(session=q.session_id, stream=name))
                return None
            if state.away_since is not None:
                log.info("%s: session %s resumed after %.1f s away", name, q.session_id, now - state.away_since)
            state.away_since = None
            return state
        if state is not None and state.session_id and state.session_id != q.session_id:
            idle = now - state.updated_unix
            if state.away_since is None and idle < self.settings.session_lease_s:
                self._refuse_session(q, "stream_in_use", REFUSAL_STREAM_IN_USE.format(
                    stream=name, age=idle, lease=self.settings.session_lease_s))
                return None
            log.info("%s: session %s takes the stream over from session %s (%s)", name, q.session_id, state.session_id,
                     f"away for {now - state.away_since:.0f} s" if state.away_since is not None else f"no input for {idle:.0f} s")
            self.states.pop(name)
            forget = getattr(self.policy, "forget", None)
            if forget is not None:
                forget(state)
        state = self._state(q.key, q.session_id)
        state.decision_fps = q.decision_fps or state.decision_fps
        state.away_since = None
        return state

    def _on_query(self, q: events_pb2.QueryEvent) -> None:
        if q.kind in (Q.KIND_SESSION_START, Q.KIND_SESSION_RESUME):
            state = self._on_session(q)
            if state is None:
                return
        else:
            state = self._state(q.key, q.session_id)
        if state.partition < 0:
            state.partition = self._partition_of.get(key_str(q.key), -1)
        if q.reply_to:
            state.reply_to = q.reply_to
        if q.kind == Q.KIND_SESSION_RESUME:
            return
        if q.kind == Q.KIND_SESSION_AWAY:
            # Nobody is there to see the answers now; they are produced now (and delivered at a resume)
            # rather than left waiting for frames that will not come.
            state.away_since = time.time()
            if state.questions:
                now = max([state.last_ms, *(p.media_ts_ms for p in state.questions)])
                self._answer_pending(state, now, q.hops)
            log.info("%s session %s: the client went away; its state is kept %.0f s for a resume", key_str(q.key),
                     q.session_id, self.settings.away_keep_s)
            return
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
            if q.question_id in state.open_questions or any(p.question_id == q.question_id for p in state.questions):
                return  # redelivered (or sent again after a reconnect): it is already open
            limit = self.settings.max_open_questions_per_stream
            if limit:
                if q.question_id not in state.open_questions and len(state.open_questions) >= limit:
                    self._refuse(state, q, limit)
                    return
                state.open_questions[q.question_id] = q.media_ts_ms
                state.refusing = False
            state.questions.append(PendingQuestion(q.question_id, q.text, q.media_ts_ms))
            # Frames already went past the question's time: answer now rather than at the next frame.
            if state.last is not None and state.last.media_ts_ms >= q.media_ts_ms:
                self._answer_pending(state, state.last.media_ts_ms, q.hops)
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

    def _on_answer(self, r: events_pb2.ResponseEvent) -> None:
        """A question's final response (an answer, a closed failure, a refusal): it is not open any more."""
        state = self.states.get(key_str(r.key))
        if state is None or (r.session_id and state.session_id and r.session_id != state.session_id):
            return  # a stream this member does not hold (any more), or an earlier session's answer
        state.awaiting.pop(r.response_id, None)
        if r.question_id and state.open_questions.pop(r.question_id, None) is not None:
            self._dirty.add(key_str(r.key))

    def _refuse(self, state: StreamState, q: events_pb2.QueryEvent, limit: int) -> None:
        """Answer ``q`` at once with a final response that refuses it (the stream has ``limit`` open)."""
        if not state.refusing:
            log.warning("%s: %d questions open (SH_DECISION_MAX_OPEN_QUESTIONS_PER_STREAM); refusing new ones until "
                        "one is answered", key_str(state.key), limit)
        state.refusing = True
        event = events_pb2.ResponseEvent(
            key=state.key, session_id=state.session_id or q.session_id,
            # Its own id: the question may be asked again (or redelivered) and then be answered.
            response_id=f"{key_str(state.key)}/{q.media_ts_ms}/{q.question_id}/refused",
            index=0, text=REFUSAL_TOO_MANY_OPEN.format(limit=limit), final=True, trigger=common_pb2.TRIGGER_QUESTION,
            question_id=q.question_id, media_ts_ms=q.media_ts_ms, reply_to=state.reply_to or q.reply_to,
            refusal="too_many_open_questions",
            # No hops: a refusal is not a generation, it must not count in time-to-first-token.
            # No answer_text: memory keeps no dialogue turn for it.
        )
        self._durable_sends.append(self.out.send(topics.RESPONSES, state.key, event))

    def _on_frame(self, f) -> None:
        state = self._state(f.key, f.session_id)
        if state.partition < 0:
            state.partition = self._partition_of.get(key_str(f.key), -1)
        if f.media_ts_ms <= state.last_ms:
            return  # a redelivered or out-of-order frame: that step was already decided
        if isinstance(f, events_pb2.FrameEvent):
            evidence = Evidence(media_ts_ms=f.media_ts_ms, embedding=np.zeros(0, np.float32), labels=(), person_count=0,
                                caption="", jpeg=bytes(f.jpeg))
        else:
            evidence = Evidence(
                media_ts_ms=f.media_ts_ms,
                embedding=np.asarray(f.embedding, dtype=np.float32),
                labels=[(label.name, label.score) for label in f.labels],
                person_count=f.person_count,
                caption=f.caption,
            )
        if getattr(self.policy, "batched", False):
            self._round[key_str(f.key)] = (state, evidence, f, tracing.current())  # stepped later, in its own trace
            return
        self._decided(state, f, self.policy.step(state, evidence))

    def _flush_round(self) -> None:
        """Step the round's streams in one batch — except that streams with a question due jump the
        queue: they are stepped first, in a small batch of their own, and their answers published,
        before the rest of the round is stepped."""
        if not self._round:
            return
        urgent, rest = [], []
        for state, ev, f, trace_context in self._round.values():
            (urgent if any(q.media_ts_ms <= ev.media_ts_ms for q in state.questions) else rest).append((state, ev, f, trace_context))
        self._round = {}
        for group in (urgent, rest):
            if not group:
                continue
            results = self.policy.step_many([(state, ev) for state, ev, _, _ in group])
            for (state, _, f, trace_context), decisions in zip(group, results):
                with tracing.attached(trace_context):
                    self._decided(state, f, decisions)

    def _decided(self, state: StreamState, f, decisions) -> None:
        meters.record_decision_step([d.trigger for d in decisions], self.policy.name)
        self._publish(state, decisions, f.hops)
        self._log_step(state, f.media_ts_ms, decisions)
        if state.end_ms is not None and f.media_ts_ms >= state.end_ms:
            self._finish(state, f.hops)

    def _answer_pending(self, state: StreamState, now: int, hops) -> None:
        """Answer the questions due at ``now`` (asked after the frames went past them, or at an
        away/end): published, and logged on the timeline of the second they were answered at."""
        decisions = list(self.policy.answer_pending(state, now))
        self._publish(state, decisions, hops)
        if decisions:
            self._log_step(state, now, decisions, silent=False)

    def _log_step(self, state: StreamState, media_ts_ms: int, decisions, *, silent: bool = True) -> None:
        """One ``decision-log`` record per decided second (one per trigger when it responds): what
        the live view's timeline shows. Not waited for: a view, not a record anything depends on."""
        D = events_pb2.DecisionEvent  # noqa: N806
        common = dict(key=state.key, session_id=state.session_id, policy=self.policy.name, reply_to=state.reply_to)
        steps = [D(action=D.ACTION_RESPOND, media_ts_ms=d.media_ts_ms, trigger=d.trigger, prompt_text=d.prompt_text, reason=d.reason, score=d.score,
                   question_id=d.trigger_id if d.trigger == common_pb2.TRIGGER_QUESTION else "",
                   instruction_id=d.trigger_id if d.trigger == common_pb2.TRIGGER_INSTRUCTION else "",
                   decision_id=f"{key_str(state.key)}/{d.media_ts_ms}/{d.trigger_id}", **common)
                 for d in decisions]
        if not steps and silent:
            steps = [D(action=D.ACTION_SILENT, media_ts_ms=media_ts_ms, decision_id=f"{key_str(state.key)}/{media_ts_ms}/", **common)]
        for step in steps:
            try:
                self.out.send(topics.DECISION_LOG, state.key, step)
            except Exception as err:  # noqa: BLE001 - the view misses a second; the decision stands
                log.debug("decision-log record not sent: %s", err)

    def _finish(self, state: StreamState, hops) -> None:
        """Answer what is still pending (questions asked after the last frame) and forget the stream."""
        now = max([max(state.last_ms, 0), *(p.media_ts_ms for p in state.questions)])
        self._answer_pending(state, now, hops)
        # The gateway closes the call once it has this and the responses it lists (an alert raised
        # by the session's last frames still reaches the client).
        recent = time.time() - 600
        self._durable_sends.append(self.out.send(topics.RESPONSES, state.key, events_pb2.ResponseEvent(
            key=state.key, session_id=state.session_id, response_id=f"{key_str(state.key)}/{state.session_id}/finished",
            index=0, final=True, reply_to=state.reply_to, media_ts_ms=state.last_ms, session_finished=True,
            pending_response_ids=sorted(i for i, t in state.awaiting.items() if t > recent))))
        self.states.pop(key_str(state.key), None)
        self._refused.pop(key_str(state.key), None)
        self._pace.forget(key_str(state.key), state.session_id)
        self._dirty.add(key_str(state.key))  # a tombstone in the changelog
        forget = getattr(self.policy, "forget", None)
        if forget is not None:
            forget(state)

    def _publish(self, state: StreamState, decisions, hops) -> None:
        futures = []
        for d in decisions:
            text = d.text
            pieces = d.pieces if d.pieces is not None else (iter([d.text]) if d.text else None)
            if pieces is not None:  # the policy's own response: published before its decision
                text, sent = self._stream(state, d, pieces, hops)
                futures += sent
                if d.trigger == common_pb2.TRIGGER_QUESTION:
                    state.open_questions.pop(d.trigger_id, None)  # answered here (or never will be)
                if not text:
                    log.info("%s t=%.1fs: the model chose to respond but wrote nothing", key_str(state.key), d.media_ts_ms / 1000)
                    continue
            event = events_pb2.DecisionEvent(
                key=state.key, session_id=state.session_id, media_ts_ms=d.media_ts_ms,
                action=events_pb2.DecisionEvent.ACTION_RESPOND, trigger=d.trigger,
                question_id=d.trigger_id if d.trigger == common_pb2.TRIGGER_QUESTION else "",
                instruction_id=d.trigger_id if d.trigger == common_pb2.TRIGGER_INSTRUCTION else "",
                prompt_text=d.prompt_text, reason=d.reason, score=d.score, policy=self.policy.name,
                reply_to=state.reply_to,
                decision_id=f"{key_str(state.key)}/{d.media_ts_ms}/{d.trigger_id}",
                hops=[*hops, common_pb2.HopStamp(hop="decision", wall_unix_ns=time.time_ns())],
                answered=bool(text),
            )
            log.info("%s t=%.1fs respond (%s): %s", key_str(state.key), d.media_ts_ms / 1000, d.trigger_id, d.reason)
            futures.append(self.out.send(topics.DECISIONS, state.key, event))
            if not event.answered:
                state.awaiting[event.decision_id] = time.time()
                if len(state.awaiting) > 256:  # answers not read back (SH_DECISION_MAX_OPEN_QUESTIONS_PER_STREAM=0): the newest
                    for old in sorted(state.awaiting, key=state.awaiting.get)[:-256]:
                        del state.awaiting[old]
        for fut in futures:
            fut.get(timeout=30)  # durable before the offset of what caused it is committed

    def _record(self, state: StreamState, d, index: int, body: str, final: bool, hops, attempt: str) -> events_pb2.ResponseEvent:
        return events_pb2.ResponseEvent(attempt=attempt,
            key=state.key, session_id=state.session_id, response_id=f"{key_str(state.key)}/{d.media_ts_ms}/{d.trigger_id}",
            index=index, text=body, final=final, trigger=d.trigger,
            question_id=d.trigger_id if d.trigger == common_pb2.TRIGGER_QUESTION else "",
            instruction_id=d.trigger_id if d.trigger == common_pb2.TRIGGER_INSTRUCTION else "",
            media_ts_ms=d.media_ts_ms, reply_to=state.reply_to, hops=hops)

    def _stream(self, state: StreamState, d, pieces, hops) -> tuple[str, list]:
        """The policy's response as it is generated (or whole, as one piece): one record per piece
        (the first stamped as the first token), then the final record with the question or
        instruction and the whole answer (memory keeps the dialogue). Nothing is sent when no text
        came."""
        futures, parts = [], []
        first: list = []
        attempt = uuid.uuid4().hex  # a redelivered frame generates it again: a new attempt (the gateway restarts it)
        for piece in pieces:
            if not parts:
                first = [*hops, common_pb2.HopStamp(hop="decision", wall_unix_ns=time.time_ns()),
                         common_pb2.HopStamp(hop="responder_first_token", wall_unix_ns=time.time_ns())]
            futures.append(self.out.send(topics.RESPONSES, state.key, self._record(state, d, len(parts), piece, False,
                                                                                   first if not parts else [], attempt)))
            parts.append(piece)
        text = "".join(parts).strip()
        if parts:
            last = self._record(state, d, len(parts), "", True,
                                [*first, common_pb2.HopStamp(hop="responder_final", wall_unix_ns=time.time_ns())], attempt)
            last.prompt_text, last.answer_text = d.prompt_text, text
            futures.append(self.out.send(topics.RESPONSES, state.key, last))
        return text, futures
