"""The responder: turns each RESPOND decision into a streamed response.

For every ``DecisionEvent`` on ``decisions`` it asks memory for the stream's context at the
decision's media time (``Context``, and ``Recall`` for questions), builds the prompt (memory's stable
prefix of long-term blocks and chunk summaries, the earlier Q&A, recent captions, the moments
recalled for a question, then the question or the triggered instruction), streams the generation
backend and publishes one ``ResponseEvent`` per chunk on ``responses``. The last record of a
response has ``final=True`` (its text may be empty) and carries the question or instruction and the
whole answer (``prompt_text``, ``answer_text``), which memory keeps as the stream's Q&A history. Every
chunk carries ``attempt``, the id of the generation it belongs to (see "Delivery").

- **Frames for a VLM.** With ``SH_RESPONDER_FRAMES_PER_REQUEST`` > 0 the responder also consumes
  ``frames`` (``configure()`` drops the topic otherwise) and keeps each stream's last few frames
  (:mod:`streamharness.responder.frames`; keeping one is cheap, no decoding). A decision's prompt
  carries the frames at or before its media time, oldest first, scaled down to
  ``SH_RESPONDER_FRAME_MAX_PIXELS``; :meth:`~streamharness.generation.Prompt.content_parts` lays
  them out after the memory block so that a server's prefix cache hits. ``frames`` and
  ``decisions`` are keyed alike with equal partition counts and read by one group with the range
  assignor, so the member that answers a stream's decisions holds its frames too. A frame that
  does not decode is skipped; a response never waits for frames.

- **Memory is optional at run time.** When it is down or slow, the response is built from the
  question or instruction (and the frames, for a VLM) alone, logged and counted. Nothing internal
  goes into a prompt: the policy's ``reason`` (and its score and name) is for people and logs, and a
  model would repeat it to the user.
- **Concurrency.** ``SH_RESPONDER_WORKERS`` consumer-group members run in one process, each on
  its own thread with its own partitions; a slow generation holds back only the streams whose
  partitions that member owns.
- **Fairness.** A member takes up to ``SH_RESPONDER_BATCH_RECORDS`` records per poll. ``handle``
  checks a decision and takes its frames (as of its place in the partition) but does not generate;
  ``end_batch`` answers the batch's decisions **round-robin by stream**: every stream's first
  decision of the batch (in the order they came), then every stream's second, and so on. So a
  stream's first decision waits for at most one decision of each other stream of the batch, not
  for all of a flooding stream's; each stream's own decisions (and so its responses) keep their
  order. The batch is per member: the Kafka host calls ``handle`` and ``end_batch`` of one batch on
  that member's own thread (``EventConsumer.poll_once``), so each member keeps its batch in a
  thread-local list and the members share nothing else but the thread-safe frame rings; that is
  why this accumulating stage may run several members (docs/architecture.md, "Fairness between
  streams").
- **Delivery.** The batch's offsets are committed only after every chunk of every response of the
  batch is acknowledged by the broker (the host commits after ``end_batch`` returns); a crash or a
  shutdown in the middle redelivers the whole batch. ``response_id`` is deterministic (=
  ``decision_id``); ``attempt`` is new for every generation (a uuid4). A redelivered decision, or one
  retried after its generation failed, is generated again, whole, from index 0 under a new attempt:
  its text need not be the text of the earlier attempt (sampling, a changed memory), so receivers
  never splice two attempts. The gateway, seeing a chunk of a new attempt of a response it has
  chunks of, drops the earlier attempt's chunks and restarts the response (``ResponseChunk.restart``);
  within one attempt it drops repeats by ``(response_id, index)``. Memory keeps one Q&A entry per
  ``response_id`` (the last final record with an answer). On shutdown the generation in hand is
  finished and no other is started: the rest of the batch goes to the partition's next owner.
- **Failures.** A malformed decision is dead-lettered by ``handle``. A generation that fails, before
  or after its first chunks, is retried (``SH_KAFKA_HANDLER_RETRIES`` attempts in all), each retry a
  new attempt; an attempt that failed is not closed (its chunks are void once the next attempt
  starts). When the last attempt failed, the response is closed with an empty ``final`` chunk at
  index 0 under an attempt of its own (``give_up``), so the client does not wait for it and drops what
  it had of the failed attempts; the decision goes to the dead-letter topic, and the rest of the batch
  goes on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc
from opentelemetry.trace import Status, StatusCode
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness import topics
from streamharness.errors import InvalidInput
from streamharness.generation import FrameImage, GenerationSettings, Prompt, ResponseGenerator, make_generator
from streamharness.keys import key_str, parse_key
from streamharness.memory.timephrases import clock
from streamharness.records import ConsumedEvent, call_with_retries, processing
from streamharness.responder.frames import FrameRings
from streamharness.settings import load_settings
from streamharness.stage import Outbox, Stage, StageContext, StageSpec
from streamharness.telemetry import meters
from streamharness.memory.client import MemoryClient
from streamharness.v1 import common_pb2, events_pb2, memory_pb2

log = logging.getLogger(__name__)

HOP_FIRST_TOKEN = "responder_first_token"
HOP_FINAL = "responder_final"

DEFAULT_SYSTEM_PROMPT = (
    "You are a live video assistant. You watch a camera stream as it happens and only know what the "
    "memory notes and the recent captions below say about it; you never see the future. Answer briefly "
    "and concretely, in plain English, about what is visible. If the notes do not say, say you cannot "
    "tell from the video so far."
)


class ResponderSettings(BaseSettings):
    """The responder service (``SH_RESPONDER_*``); the backend itself is ``SH_GENERATION_*``."""

    model_config = SettingsConfigDict(env_prefix="SH_RESPONDER_", frozen=True, extra="forbid", case_sensitive=False)

    memory_address: str = Field(
        "127.0.0.1:50052", description="Memory service gRPC host:port; empty = answer without memory."
    )
    memory_timeout_s: float = Field(
        0.5, gt=0, le=30, description="Deadline of each memory call; past it the response is built without memory."
    )
    consumer_group: str = Field("responder", min_length=1, description="Kafka consumer group on 'decisions' (gets SH_KAFKA_TOPIC_PREFIX).")
    workers: int = Field(
        4, ge=1, le=64,
        description="Consumer-group members (threads) in this process; each owns some partitions and generates "
        "one response at a time, so a slow response holds back only its own partitions' streams.",
    )
    recent_captions: int = Field(8, ge=0, le=200, description="Recent frame captions (short-term memory) put in the prompt.")
    recall_limit: int = Field(4, ge=0, le=50, description="Moments recalled from memory for a question; 0 = no recall.")
    history: int = Field(
        0, ge=0, le=200,
        description="Earlier questions and answers of the stream (memory's Q&A history) put in every prompt. 0 by default: "
        "SmolLM2-135M copies them instead of answering; questions about the dialogue ('what did you tell me at 10:05?') "
        "get the earlier answers through Recall either way.",
    )
    max_prompt_chars: int = Field(
        6000, ge=500, le=500_000,
        description="Upper bound on the prompt's length; memory is trimmed (oldest first) to fit.",
    )
    question_max_new_tokens: int = Field(128, ge=1, le=8192, description="Token budget of an answer to a question.")
    alert_max_new_tokens: int = Field(40, ge=1, le=8192, description="Token budget of a proactive alert (one line).")
    publish_timeout_s: float = Field(10.0, gt=0, le=300, description="How long to wait for the broker to acknowledge a response's chunks.")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, min_length=1, description="System prompt of every response.")
    frames_per_request: int = Field(
        0, ge=0, le=64,
        description="Recent frames (JPEG images) sent with each prompt, oldest first, after the memory block; 0 = text "
        "only, the default (SmolLM2 reads no images). Above 0 the responder also consumes 'frames' and "
        "SH_GENERATION_BASE_URL must serve a vision-language model (vLLM, SGLang, TensorRT-LLM, a hosted API).",
    )
    frame_max_pixels: int = Field(
        448 * 448, ge=32 * 32, le=4096 * 4096,
        description="Frames with more pixels than this are scaled down, keeping their aspect ratio, before they are sent.",
    )
    frame_jpeg_quality: int = Field(80, ge=30, le=100, description="JPEG quality of a frame that was scaled down to be sent.")
    frame_max_age_s: float = Field(
        30.0, gt=0, le=86_400,
        description="Frames older than this (media time) at a decision are not sent with it: frames held back, or read "
        "while the responder catches up on 'frames', are not shown as what the camera sees now.",
    )
    frame_streams: int = Field(
        1024, ge=1, le=1_000_000,
        description="Streams whose recent frames one responder process holds (about frame_streams x frames_per_request "
        "JPEGs in memory); the least recently updated stream is dropped and gets frames again as new ones arrive.",
    )
    batch_records: int = Field(
        8, ge=1, le=1000,
        description="Records (decisions, and frames when they are read) one member takes per poll. The batch's decisions "
        "are answered round-robin by stream, so a stream's first decision waits for at most one of each other stream in "
        "the batch; the batch is committed once all are answered, so keep batch_records x the slowest generation well "
        "under the consumer's max.poll.interval.ms (300 s). 1 = record order, one decision per poll.",
    )


T = TypeVar("T")


def round_robin(items: Sequence[T], stream: Callable[[T], str]) -> list[T]:
    """``items`` in turns by ``stream``: each stream's first item (in the order those came), then
    each stream's second, and so on; one stream's items keep their order."""
    taken: dict[str, int] = {}
    turns: list[tuple[int, int]] = []
    for position, item in enumerate(items):
        key = stream(item)
        turns.append((taken.get(key, 0), position))
        taken[key] = turns[-1][0] + 1
    return [items[position] for _, position in sorted(turns)]


@dataclass(frozen=True)
class _Accepted:
    """A decision ``handle`` checked, waiting in its member's batch to be answered."""

    event: ConsumedEvent[events_pb2.DecisionEvent]
    key: common_pb2.StreamKey
    is_question: bool
    images: tuple[FrameImage, ...]


class Stopping(Exception):
    """The host is stopping in the middle of a batch: the rest is redelivered, not answered here."""


def _span(item: memory_pb2.MemoryItem) -> str:
    if item.end_ms > item.start_ms:
        return f"[{clock(item.start_ms)}-{clock(item.end_ms)}]"
    return f"[{clock(item.start_ms)}]"


def _moment(item: memory_pb2.MemoryItem) -> str:
    if item.tier == memory_pb2.MEMORY_TIER_QA:
        return f"{_span(item)} you were asked: {item.prompt_text.strip()} You answered: {item.text.strip()}"
    return f"{_span(item)} {item.text.strip()}"


def _said(item: memory_pb2.MemoryItem) -> str:
    asked = "asked" if "question" in item.labels else "instruction"
    return f"{_span(item)} {asked}: {item.prompt_text.strip()} -> you said: {item.text.strip()}"


def _stamp(hop: str) -> common_pb2.HopStamp:
    return common_pb2.HopStamp(hop=hop, wall_unix_ns=time.time_ns())


def new_attempt() -> str:
    """The id of one generation of a response (``ResponseEvent.attempt``): unique per attempt."""
    return uuid.uuid4().hex


class ResponseBuilder:
    """Memory lookups and prompt assembly for one decision (no Kafka, no generation)."""

    def __init__(self, settings: ResponderSettings, memory: MemoryClient | None) -> None:
        self._settings = settings
        self._memory = memory

    def _call(self, name: str, fn: object, request: object) -> object | None:
        if self._memory is None:
            return None
        try:
            return fn(request, timeout=self._settings.memory_timeout_s)  # type: ignore[operator]
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None  # type: ignore[union-attr]
            if code == grpc.StatusCode.NOT_FOUND:
                return None  # nothing remembered of the stream yet: not a degradation
            reason = code.name if code is not None else "error"
            log.warning("memory %s failed (%s: %s); answering without it", name, reason,
                        err.details() if hasattr(err, "details") else err)  # type: ignore[union-attr]
            meters.memory_degraded().add(1, {"call": name, "reason": reason})
            return None

    def prompt(self, decision: events_pb2.DecisionEvent, key: common_pb2.StreamKey, is_question: bool,
               images: Sequence[FrameImage] = ()) -> Prompt:
        """The prompt of one decision; ``images``: the stream's recent frames, oldest first."""
        s = self._settings
        stable = ""  # memory's prefix: its bytes change only at chunk boundaries
        context_parts: list[str] = []  # what changes from one response to the next
        captions: list[str] = []
        ctx = None
        if self._memory is not None:
            ctx = self._call("Context", self._memory.Context, memory_pb2.ContextRequest(
                key=key, now_ms=decision.media_ts_ms, max_recent=s.recent_captions))
        if ctx is not None:
            # The stable prefix first (its bytes change only at chunk boundaries), then what changes.
            stable = ctx.prefix_text.strip()
            if s.history and ctx.history:
                lines = [_said(i) for i in list(ctx.history)[-s.history:]]
                context_parts.append("What you said earlier in this session (media time):\n" + "\n".join(lines))
            for item in list(ctx.recent)[-s.recent_captions:] if s.recent_captions else ():
                if item.text.strip():
                    captions.append(f"[{clock(item.start_ms)}] {item.text.strip()}")
        if is_question and s.recall_limit and self._memory is not None:
            recalled = self._call("Recall", self._memory.Recall, memory_pb2.RecallRequest(
                key=key, query=decision.prompt_text, now_ms=decision.media_ts_ms, to_ms=decision.media_ts_ms,
                limit=s.recall_limit))
            if recalled is not None and recalled.items:
                lines = [_moment(i) for i in recalled.items if i.text.strip()]
                if lines:
                    context_parts.append("Moments of the stream that match the question (best first):\n" + "\n".join(lines))
        # decision.reason, score and policy never go into the prompt, memory or not: they are notes for
        # people and logs ("a question is pending"), and a model repeats what its prompt says.
        context, captions = self._fit(stable, "\n\n".join(context_parts), captions, decision.prompt_text)
        common = dict(system=s.system_prompt, context=context, recent_captions=tuple(captions), stream=key_str(key),
                      images=tuple(images))
        if is_question:
            return Prompt(**common, question=decision.prompt_text, max_new_tokens=s.question_max_new_tokens)
        return Prompt(**common, instruction=decision.prompt_text, max_new_tokens=s.alert_max_new_tokens)

    def _fit(self, stable: str, context: str, captions: list[str], task: str) -> tuple[str, list[str]]:
        """Trim memory so that the prompt stays within max_prompt_chars: newest captions first get up
        to a third of the room; memory's stable prefix up to two thirds of the rest, trimmed by a rule
        that depends on it alone (its most recent end is kept), so that it stays byte-identical from
        one response to the next within a chunk (a prefix cache keeps hitting, see the engine and
        docs/architecture.md); what changes per response (recall, notes) gets the room left."""
        room = self._settings.max_prompt_chars - len(self._settings.system_prompt) - 200
        if stable:
            budget = (room - room // 3) * 2 // 3
            if len(stable) > budget:
                stable = "…" + stable[len(stable) - budget + 1:] if budget > 1 else ""
            room -= len(stable) + 2
        room -= len(task)
        if room <= 0:
            return stable, []
        kept: list[str] = []
        used = 0
        for caption in reversed(captions):
            if used + len(caption) + 3 > room // 3:
                break
            kept.insert(0, caption)
            used += len(caption) + 3
        left = room - used
        if len(context) > left:
            context = "…" + context[len(context) - left + 1:] if left > 1 else ""
        return "\n\n".join(part for part in (stable, context) if part), kept


class ResponderStage(Stage):
    """The ``responder`` row of the topology."""

    name = "responder"

    def __init__(
        self,
        settings: ResponderSettings | None = None,
        generation: GenerationSettings | None = None,
        generator: ResponseGenerator | None = None,
        memory: object | None = None,
    ) -> None:
        """``generator``: use this backend instead of the one ``SH_GENERATION_*`` selects (it is then
        not closed here). ``memory``: an object with the ``MemoryServiceStub`` methods ``Context``
        and ``Recall`` to use instead of a gRPC channel to ``SH_RESPONDER_MEMORY_ADDRESS``."""
        self._settings = settings or load_settings(ResponderSettings)
        self._generation = generation
        self._generator = generator
        self._owns_generator = generator is None
        self._memory_stub = memory
        self._channel: MemoryClient | None = None
        self._builder: ResponseBuilder | None = None
        s = self._settings
        self.frames: FrameRings | None = (
            FrameRings(s.frames_per_request, s.frame_streams, max_pixels=s.frame_max_pixels, jpeg_quality=s.frame_jpeg_quality)
            if s.frames_per_request else None
        )
        self.out: Outbox | None = None
        self._attempts = 1
        self._stopping: threading.Event | None = None
        self._member = threading.local()  # each member's batch (see "Fairness" above)

    def configure(self, spec: StageSpec) -> StageSpec:
        consumes = dict(spec.consumes)
        if not self._settings.frames_per_request:
            consumes.pop(topics.FRAMES, None)  # text only: the frames are not needed
        return replace(spec, group=self._settings.consumer_group, members=self._settings.workers, consumes=consumes,
                       batching=replace(spec.batching, max_records=self._settings.batch_records))

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.out = ctx.outbox
        self._attempts = max(1, ctx.attempts)
        self._stopping = ctx.stopping
        if self._generator is None:
            self._generator = make_generator(self._generation or load_settings(GenerationSettings))
        self._generator.load()
        stub = self._memory_stub
        if stub is None and self._settings.memory_address:
            self._channel = stub = MemoryClient(self._settings.memory_address, "responder")
        self._builder = ResponseBuilder(self._settings, stub)

    def healthy(self) -> bool:
        return self._generator is not None and self._generator.ready()

    def close(self, deadline: float) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._generator is not None and self._owns_generator:
            self._generator.close()

    # -- one record ----------------------------------------------------------------------------
    def handle(self, event: ConsumedEvent) -> None:
        msg = event.message
        if isinstance(msg, events_pb2.FrameEvent):
            self._keep_frame(event, msg)  # cheap: no decoding, no generation
        elif isinstance(msg, events_pb2.DecisionEvent):
            self._decide(event)
        else:
            raise InvalidInput(f"the responder does not read {type(msg).__name__} records")

    def _keep_frame(self, event: ConsumedEvent[events_pb2.FrameEvent], frame: events_pb2.FrameEvent) -> None:
        if self.frames is None:
            return  # frames_per_request is 0 (a host that delivered the topic anyway)
        key = key_str(frame.key) if frame.key.tenant and frame.key.stream_id else event.key
        self.frames.add(key, frame.session_id, int(frame.media_ts_ms), frame.jpeg)

    def _decide(self, event: ConsumedEvent[events_pb2.DecisionEvent]) -> None:
        """Check the decision and take its frames now (as of its place in the partition: frames later
        in the batch could push them out of the ring); it is answered at ``end_batch``."""
        decision = event.message
        if decision.action != events_pb2.DecisionEvent.ACTION_RESPOND:
            log.debug("skipping %s decision %s", events_pb2.DecisionEvent.Action.Name(decision.action), decision.decision_id)
            return
        if decision.answered:
            log.debug("decision %s was answered by its policy (%s)", decision.decision_id, decision.policy)
            return
        is_question = self._is_question(decision)
        if not decision.decision_id:
            raise InvalidInput("decision has no decision_id")
        if not decision.prompt_text.strip():
            raise InvalidInput(f"decision {decision.decision_id} has no prompt_text")
        key = self._stream_key(event)
        images: Sequence[FrameImage] = ()
        if self.frames is not None:
            now = int(decision.media_ts_ms)
            images = self.frames.images(key_str(key), decision.session_id, now, now - int(self._settings.frame_max_age_s * 1000))
        self._batch().append(_Accepted(event, key, is_question, tuple(images)))

    def _batch(self) -> list[_Accepted]:
        batch = getattr(self._member, "batch", None)
        if batch is None:
            batch = self._member.batch = []
        return batch

    def end_batch(self) -> None:
        """Answer this member's batch, round-robin by stream; a decision that fails for good is
        closed and dead-lettered and the others go on. Raises (nothing is committed, the batch is
        redelivered) when the host stops before the batch is done, or a dead letter cannot be written."""
        batch, self._member.batch = self._batch(), []
        order = round_robin(batch, lambda accepted: accepted.event.key)
        for done, accepted in enumerate(order):
            if self._stopping is not None and self._stopping.is_set():
                raise Stopping(f"stopping with {len(order) - done} of the batch's {len(order)} decisions not answered: "
                               "the batch is redelivered to the partition's next owner")
            # A span per decision in the decision's trace: its chunks are sent in it (streamharness.telemetry.tracing).
            with processing(accepted.event, "responder", "generate", attributes={"sh.batch_size": len(order)}) as span:
                try:
                    call_with_retries(self._answer, accepted, self._attempts)
                except Exception as err:  # noqa: BLE001 - one decision's failure must not hold back the batch
                    span.record_exception(err)
                    span.set_status(Status(StatusCode.ERROR, repr(err)))
                    try:
                        self.give_up(accepted.event, err)
                    except Exception:  # noqa: BLE001 - the dead letter matters more
                        log.exception("closing response %s failed", accepted.event.message.decision_id)
                    assert self.out is not None
                    self.out.dead_letter(accepted.event, "handler-failed", err)

    def _answer(self, accepted: _Accepted) -> None:
        """One generation attempt of a decision's response (called again for each retry)."""
        assert self._builder is not None and self._generator is not None
        decision = accepted.event.message
        prompt = self._builder.prompt(decision, accepted.key, accepted.is_question, accepted.images)
        self._respond(accepted.event.key, accepted.key, decision, prompt, new_attempt())

    def give_up(self, event: ConsumedEvent[events_pb2.DecisionEvent], error: BaseException) -> None:
        """The decision is dead-lettered next: close its response with an empty ``final`` chunk at
        index 0 under an attempt of its own (receivers drop what they had of the failed attempts), so
        that the client does not wait for it for ever."""
        decision = event.message
        if not isinstance(decision, events_pb2.DecisionEvent) or not decision.decision_id:
            return  # a frame: nobody waits for it
        if decision.action != events_pb2.DecisionEvent.ACTION_RESPOND:
            return
        log.warning("response %s failed for good (%r); closing it", decision.decision_id, error)
        meters.responses_given_up().add(1, {"trigger": meters.trigger_label(decision.trigger)})
        closing = self._chunk(self._stream_key(event), decision, 0, "", final=True, hops=[], attempt=new_attempt())
        self.out.send(topics.RESPONSES, event.key, closing).get(timeout=self._settings.publish_timeout_s)

    @staticmethod
    def _stream_key(event: ConsumedEvent[events_pb2.DecisionEvent]) -> common_pb2.StreamKey:
        decision = event.message
        return decision.key if decision.key.tenant and decision.key.stream_id else parse_key(event.key)

    @staticmethod
    def _is_question(decision: events_pb2.DecisionEvent) -> bool:
        if decision.trigger == common_pb2.TRIGGER_QUESTION:
            return True
        if decision.trigger == common_pb2.TRIGGER_INSTRUCTION:
            return False
        if decision.question_id:
            return True
        if decision.instruction_id:
            return False
        raise InvalidInput(f"decision {decision.decision_id!r} has no trigger, question_id or instruction_id")

    @staticmethod
    def _chunk(stream_key: common_pb2.StreamKey, decision: events_pb2.DecisionEvent, index: int, text: str, *,
               final: bool, hops: list[common_pb2.HopStamp], attempt: str) -> events_pb2.ResponseEvent:
        return events_pb2.ResponseEvent(
            key=stream_key, session_id=decision.session_id, response_id=decision.decision_id, index=index,
            text=text, final=final, trigger=decision.trigger, question_id=decision.question_id,
            instruction_id=decision.instruction_id, media_ts_ms=decision.media_ts_ms, reply_to=decision.reply_to,
            hops=hops, attempt=attempt,
        )

    def _respond(self, key: str, stream_key: common_pb2.StreamKey, decision: events_pb2.DecisionEvent, prompt: Prompt,
                 attempt: str) -> None:
        assert self.out is not None and self._generator is not None
        futures = []
        index = 0
        first_hops: list[common_pb2.HopStamp] = []

        def chunk(text: str, final: bool) -> events_pb2.ResponseEvent:
            nonlocal first_hops
            hops: list[common_pb2.HopStamp] = []
            if index == 0:
                first_hops = [*decision.hops, _stamp(HOP_FIRST_TOKEN)]
                hops = list(first_hops)
                self._record_hop_latency(first_hops, HOP_FIRST_TOKEN)
            if final:
                if index != 0:
                    hops = list(first_hops)
                hops.append(_stamp(HOP_FINAL))
            return self._chunk(stream_key, decision, index, text, final=final, hops=hops, attempt=attempt)

        pieces: Iterator[str] = self._generator.stream(prompt)
        answer: list[str] = []
        try:
            for text in pieces:
                futures.append(self.out.send(topics.RESPONSES, key, chunk(text, final=False)))
                answer.append(text)
                index += 1
        except Exception as err:
            meters.responses_failed().add(1, {"error": type(err).__name__, "trigger": meters.trigger_label(decision.trigger)})
            if index:
                # Not closed here: a retry generates it whole under a new attempt (receivers drop
                # these chunks then), and after the last one give_up() closes it.
                log.warning("response %s: attempt %s failed after %d chunks (%r)", decision.decision_id, attempt, index, err)
            raise
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        last = chunk("", final=True)
        last.prompt_text, last.answer_text = decision.prompt_text, "".join(answer).strip()  # memory keeps the dialogue
        futures.append(self.out.send(topics.RESPONSES, key, last))
        self._wait(futures)
        meters.responses_generated().add(1, {"trigger": meters.trigger_label(decision.trigger)})
        log.info("response %s: %d chunks (%d frames)", decision.decision_id, index, len(prompt.images))

    def _wait(self, futures: list) -> None:
        deadline = time.monotonic() + self._settings.publish_timeout_s  # type: ignore[union-attr]
        for future in futures:
            future.get(timeout=max(0.1, deadline - time.monotonic()))

    @staticmethod
    def _record_hop_latency(hops: list[common_pb2.HopStamp], hop: str) -> None:
        start = next((h.wall_unix_ns for h in hops if h.hop == "gateway"), 0)
        if start:
            meters.hop_latency().record((hops[-1].wall_unix_ns - start) / 1e9, {"hop": hop})
