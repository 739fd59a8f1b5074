"""The responder: turns each RESPOND decision into a streamed response.

For every ``DecisionEvent`` on ``decisions`` it asks memory for the stream's context at the
decision's media time (``Context``, and ``Recall`` for questions), builds the prompt (memory prefix,
recent captions, the question or the triggered instruction), streams the generation backend and
publishes one ``ResponseEvent`` per chunk on ``responses``. The last record of a response has
``final=True`` (its text may be empty).

- **Memory is optional at run time.** When it is down or slow, the response is built from what the
  decision carries (the question or instruction, the policy's reason), logged and counted.
- **Concurrency.** ``SH_RESPONDER_WORKERS`` consumer-group members run in this process, each on
  its own thread with its own partitions; a slow generation holds back only the streams whose
  partitions that member owns. Within a member, records (and so each stream's responses) are
  handled in order.
- **Delivery.** A record's offset is committed only after every chunk of its response is
  acknowledged by the broker (EventConsumer commits after the handler returns). A redelivered
  decision is answered again under the same ``response_id`` (= ``decision_id``) and the same
  indexes; with greedy decoding the text is the same too, and the gateway drops repeats by
  ``(response_id, index)``.
- **Failures.** A decision that cannot be answered (malformed, or the backend keeps failing) goes to
  the dead-letter topic after ``SH_KAFKA_HANDLER_RETRIES`` attempts; on the last attempt the
  response is closed with an empty ``final`` chunk so the client does not wait for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness import topics
from streamharness.errors import InvalidInput
from streamharness.generation import GenerationSettings, Prompt, ResponseGenerator, make_generator
from streamharness.generation.local_smollm2 import LocalSmolLM2Generator
from streamharness.kafka import ConsumedEvent, EventConsumer, EventProducer, ensure_topics
from streamharness.keys import parse_key
from streamharness.runner import Service
from streamharness.settings import KafkaSettings, load_settings
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2, events_pb2, memory_pb2, memory_pb2_grpc

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
    max_prompt_chars: int = Field(
        6000, ge=500, le=500_000,
        description="Upper bound on the prompt's length; memory is trimmed (oldest first) to fit.",
    )
    question_max_new_tokens: int = Field(128, ge=1, le=8192, description="Token budget of an answer to a question.")
    alert_max_new_tokens: int = Field(40, ge=1, le=8192, description="Token budget of a proactive alert (one line).")
    publish_timeout_s: float = Field(10.0, gt=0, le=300, description="How long to wait for the broker to acknowledge a response's chunks.")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, min_length=1, description="System prompt of every response.")


def _clock(ms: int) -> str:
    seconds = max(0, ms) // 1000
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _stamp(hop: str) -> common_pb2.HopStamp:
    return common_pb2.HopStamp(hop=hop, wall_unix_ns=time.time_ns())


class ResponseBuilder:
    """Memory lookups and prompt assembly for one decision (no Kafka, no generation)."""

    def __init__(self, settings: ResponderSettings, memory: memory_pb2_grpc.MemoryServiceStub | None) -> None:
        self._settings = settings
        self._memory = memory

    def _call(self, name: str, fn: object, request: object) -> object | None:
        if self._memory is None:
            return None
        try:
            return fn(request, timeout=self._settings.memory_timeout_s)  # type: ignore[operator]
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None  # type: ignore[union-attr]
            reason = code.name if code is not None else "error"
            log.warning("memory %s failed (%s: %s); answering without it", name, reason,
                        err.details() if hasattr(err, "details") else err)  # type: ignore[union-attr]
            meters.memory_degraded().add(1, {"call": name, "reason": reason})
            return None

    def prompt(self, decision: events_pb2.DecisionEvent, key: common_pb2.StreamKey, is_question: bool) -> Prompt:
        s = self._settings
        context_parts: list[str] = []
        captions: list[str] = []
        ctx = None
        if self._memory is not None:
            ctx = self._call("Context", self._memory.Context, memory_pb2.ContextRequest(
                key=key, now_ms=decision.media_ts_ms, max_recent=s.recent_captions))
        if ctx is not None:
            if ctx.prefix_text.strip():
                context_parts.append(ctx.prefix_text.strip())
            for item in list(ctx.recent)[-s.recent_captions:] if s.recent_captions else ():
                if item.text.strip():
                    captions.append(f"[{_clock(item.start_ms)}] {item.text.strip()}")
        if is_question and s.recall_limit and self._memory is not None:
            recalled = self._call("Recall", self._memory.Recall, memory_pb2.RecallRequest(
                key=key, query=decision.prompt_text, to_ms=decision.media_ts_ms, limit=s.recall_limit))
            if recalled is not None and recalled.items:
                lines = [f"[{_clock(i.start_ms)}-{_clock(i.end_ms)}] {i.text.strip()}" for i in recalled.items if i.text.strip()]
                if lines:
                    context_parts.append("Moments that match the question:\n" + "\n".join(lines))
        if ctx is None and decision.reason.strip():
            # Memory is unavailable: what the decision step saw is all there is.
            context_parts.append(f"What the decision step noted at {_clock(decision.media_ts_ms)}: {decision.reason.strip()}")
        context, captions = self._fit("\n\n".join(context_parts), captions, decision.prompt_text)
        if is_question:
            return Prompt(system=s.system_prompt, context=context, recent_captions=tuple(captions),
                          question=decision.prompt_text, max_new_tokens=s.question_max_new_tokens)
        return Prompt(system=s.system_prompt, context=context, recent_captions=tuple(captions),
                      instruction=decision.prompt_text, max_new_tokens=s.alert_max_new_tokens)

    def _fit(self, context: str, captions: list[str], task: str) -> tuple[str, list[str]]:
        """Trim memory so that the prompt stays within max_prompt_chars: newest captions first get up
        to a third of the room, the memory text keeps its most recent end."""
        room = self._settings.max_prompt_chars - len(self._settings.system_prompt) - len(task) - 200
        if room <= 0:
            return "", []
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
        return context, kept


class ResponderService(Service):
    grpc_service_names = ()

    def __init__(
        self,
        settings: ResponderSettings | None = None,
        kafka: KafkaSettings | None = None,
        generation: GenerationSettings | None = None,
        generator: ResponseGenerator | None = None,
        producer: EventProducer | None = None,
        memory: object | None = None,
    ) -> None:
        """``producer`` given: embedded mode (the in-process pipeline): no Kafka consumers, the
        caller hands decisions to :meth:`handle` and responses go to that producer. ``memory``: an
        object with the ``MemoryServiceStub`` methods ``Context`` and ``Recall`` to use instead of a
        gRPC channel to ``SH_RESPONDER_MEMORY_ADDRESS``."""
        self.embedded = producer is not None
        self._memory_stub = memory
        self._settings = settings
        self._kafka = kafka
        self._generation = generation
        self._generator = generator
        self._owns_generator = generator is None
        self._channel: grpc.Channel | None = None
        self._builder: ResponseBuilder | None = None
        self._producer: EventProducer | None = producer
        self._consumers: list[EventConsumer[events_pb2.DecisionEvent]] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._attempts: dict[tuple[str, int, int], int] = {}
        self._attempts_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        self._settings = self._settings or load_settings(ResponderSettings)
        self._kafka = self._kafka or load_settings(KafkaSettings)
        self._generation = self._generation or load_settings(GenerationSettings)
        if self._generator is None:
            self._generator = make_generator(self._generation)
        if isinstance(self._generator, LocalSmolLM2Generator):
            self._generator.load()
        stub = self._memory_stub
        if stub is None and self._settings.memory_address:
            self._channel = grpc.insecure_channel(self._settings.memory_address)
            stub = memory_pb2_grpc.MemoryServiceStub(self._channel)
        self._builder = ResponseBuilder(self._settings, stub)
        if self.embedded:
            return
        if self._kafka.create_topics:
            ensure_topics(self._kafka, [topics.DECISIONS, topics.RESPONSES])
        self._producer = EventProducer(self._kafka, client_id="responder")
        # One generation takes seconds: each member takes one decision per poll and commits it once
        # answered, so it never sits on a queue of decisions past max.poll.interval.ms (which would
        # get it evicted from the group and its decisions answered twice).
        consumer_kafka = self._kafka.model_copy(update={"consumer_max_records": 1})
        for i in range(self._settings.workers):
            self._consumers.append(EventConsumer(
                consumer_kafka,
                group_id=self._settings.consumer_group,
                topics=[topics.DECISIONS],
                message_type=events_pb2.DecisionEvent,
                handler=self.handle,
                client_id=f"responder-{i}",
                # 'earliest' on purpose: a decision made while no responder was running (first deploy,
                # a crash) is still a question a user waits for; committed offsets win afterwards.
                auto_offset_reset="earliest",
            ))

    def start(self) -> None:
        for i, consumer in enumerate(self._consumers):
            thread = threading.Thread(target=consumer.run, args=(self._stop,), name=f"responder-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def ready(self) -> bool:
        if self.embedded:
            return self._generator is not None and self._generator.ready()
        if self._generator is None or not self._threads:
            return False
        return all(t.is_alive() for t in self._threads) and self._generator.ready()

    def stop(self, deadline: float) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.error("responses still generating at the deadline (%s): their decisions will be redelivered", stuck)
        if self._producer is not None and not self.embedded:
            self._producer.close(timeout=max(0.1, deadline - time.monotonic()))
        if self._channel is not None:
            self._channel.close()
        if self._generator is not None and self._owns_generator:
            self._generator.close()
        if stuck:
            raise TimeoutError(f"drain did not finish: {stuck}")

    @property
    def processed(self) -> int:
        return sum(c.processed for c in self._consumers)

    @property
    def dead_lettered(self) -> int:
        return sum(c.dead_lettered for c in self._consumers)

    # -- one decision --------------------------------------------------------------------------
    def handle(self, event: ConsumedEvent[events_pb2.DecisionEvent]) -> None:
        decision = event.message
        if decision.action != events_pb2.DecisionEvent.ACTION_RESPOND:
            log.debug("skipping %s decision %s", events_pb2.DecisionEvent.Action.Name(decision.action), decision.decision_id)
            return
        is_question = self._is_question(decision)
        if not decision.decision_id:
            raise InvalidInput("decision has no decision_id")
        if not decision.prompt_text.strip():
            raise InvalidInput(f"decision {decision.decision_id} has no prompt_text")
        key = decision.key if decision.key.tenant and decision.key.stream_id else parse_key(event.key)
        assert self._builder is not None and self._generator is not None
        prompt = self._builder.prompt(decision, key, is_question)

        # EventConsumer retries a failing handler; on its last attempt the response gets closed.
        record = (event.topic, event.partition, event.offset)
        with self._attempts_lock:
            attempt = self._attempts[record] = self._attempts.get(record, 0) + 1
        last_attempt = attempt >= max(1, self._kafka.handler_retries)  # type: ignore[union-attr]
        try:
            self._respond(event.key, key, decision, prompt, last_attempt=last_attempt)
        except InvalidInput:  # not retried by EventConsumer
            self._forget(record)
            raise
        except Exception:
            if last_attempt:
                self._forget(record)
            raise
        self._forget(record)

    def _forget(self, record: tuple[str, int, int]) -> None:
        with self._attempts_lock:
            self._attempts.pop(record, None)

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

    def _respond(self, key: str, stream_key: common_pb2.StreamKey, decision: events_pb2.DecisionEvent, prompt: Prompt,
                 *, last_attempt: bool) -> None:
        assert self._producer is not None and self._generator is not None and self._settings is not None
        futures = []
        index = 0
        first_hops: list[common_pb2.HopStamp] = []

        def chunk(text: str, final: bool) -> events_pb2.ResponseEvent:
            nonlocal first_hops
            message = events_pb2.ResponseEvent(
                key=stream_key, session_id=decision.session_id, response_id=decision.decision_id, index=index,
                text=text, final=final, trigger=decision.trigger, question_id=decision.question_id,
                instruction_id=decision.instruction_id, media_ts_ms=decision.media_ts_ms, reply_to=decision.reply_to,
            )
            if index == 0:
                first_hops = [*decision.hops, _stamp(HOP_FIRST_TOKEN)]
                message.hops.extend(first_hops)
                self._record_hop_latency(first_hops, HOP_FIRST_TOKEN)
            if final:
                if index != 0:
                    message.hops.extend(first_hops)
                message.hops.append(_stamp(HOP_FINAL))
            return message

        pieces: Iterator[str] = self._generator.stream(prompt)
        try:
            for text in pieces:
                futures.append(self._producer.send(topics.RESPONSES, key, chunk(text, final=False)))
                index += 1
        except Exception as err:
            meters.responses_failed().add(1, {"error": type(err).__name__})
            if last_attempt or index or isinstance(err, InvalidInput):
                # Close what the client has started to read (or will never get otherwise).
                log.warning("response %s failed after %d chunks (%r); closing it", decision.decision_id, index, err)
                futures.append(self._producer.send(topics.RESPONSES, key, chunk("", final=True)))
                self._wait(futures)
            raise
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        futures.append(self._producer.send(topics.RESPONSES, key, chunk("", final=True)))
        self._wait(futures)
        log.info("response %s: %d chunks", decision.decision_id, index)

    def _wait(self, futures: list) -> None:
        deadline = time.monotonic() + self._settings.publish_timeout_s  # type: ignore[union-attr]
        for future in futures:
            future.get(timeout=max(0.1, deadline - time.monotonic()))

    @staticmethod
    def _record_hop_latency(hops: list[common_pb2.HopStamp], hop: str) -> None:
        start = next((h.wall_unix_ns for h in hops if h.hop == "gateway"), 0)
        if start:
            meters.hop_latency().record((hops[-1].wall_unix_ns - start) / 1e9, {"hop": hop})
