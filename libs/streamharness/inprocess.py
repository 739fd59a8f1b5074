"""The pipeline in one process, without Kafka: for quick evaluation runs and local experiments.

The deployment's stages — ingest, encoder (on Triton), memory (Qdrant's engine), the summariser,
decision and responder (any generation backend; the summariser shares the responder's) — run on the local host (:mod:`streamharness.hosts.local`):
the same stage classes, the same topology rows, every record serialised and parsed on the way, the
same retry and dead-letter policy as on Kafka. A session's client messages are mapped to records by
:class:`~streamharness.session.SessionMapper`, the gateway's own mapping, and the responder reads
memory through the same ``Context``/``Recall`` calls it makes over gRPC (:class:`LocalMemoryStub`
calls the memory stage's methods directly).

Order is deterministic: frames are ingested; every ``encode_batch`` frames (and before and after a
frame that a question is asked at) the host runs until idle — the encoder encodes the waiting
frames in one Triton request, memory keeps them, the decision step sees them with every question or
instruction change in media-time order, and every RESPOND decision is answered. What differs from
the deployment: no concurrency between stages (a response holds back the next frames, as one
responder partition would), and no gateway process (the session mapping is the gateway's).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from streamharness import topics
from streamharness.errors import InvalidInput, StreamHarnessError
from streamharness.hosts.local import LocalBus, LocalHost
from streamharness.keys import key_str
from streamharness.records import DLQ_ERROR, DLQ_SOURCE_TOPIC
from streamharness.replay import EncodedFrame, replay
from streamharness.session import SessionMapper
from streamharness.settings import KafkaSettings, TritonSettings, load_settings
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2, memory_pb2, session_pb2

log = logging.getLogger(__name__)
Q = events_pb2.QueryEvent


class LocalRpcError(grpc.RpcError):
    """A stage's error as the ``grpc.RpcError`` a stub raises (``code()``, ``details()``)."""

    def __init__(self, error: StreamHarnessError) -> None:
        super().__init__(str(error))
        self._error = error

    def code(self) -> grpc.StatusCode:
        return self._error.code

    def details(self) -> str:
        return str(self._error)


class LocalMemoryStub:
    """``MemoryServiceStub``'s ``Context``, ``Recall`` and ``Items`` on a memory stage in this process.

    The stage's errors are raised as the gRPC errors a stub would raise, so callers treat both alike."""

    def __init__(self, memory: Any) -> None:
        self._memory = memory

    def _call(self, fn: Callable[[Any], Any], request: Any) -> Any:
        try:
            return fn(request)
        except StreamHarnessError as err:
            raise LocalRpcError(err) from err

    def Context(self, request: memory_pb2.ContextRequest, timeout: float | None = None) -> memory_pb2.ContextResponse:  # noqa: N802
        return self._call(self._memory.context, request)

    def Recall(self, request: memory_pb2.RecallRequest, timeout: float | None = None) -> memory_pb2.RecallResponse:  # noqa: N802
        return self._call(self._memory.recall, request)

    def Items(self, request: memory_pb2.ItemsRequest, timeout: float | None = None) -> memory_pb2.ItemsResponse:  # noqa: N802
        return self._call(self._memory.items, request)


# -- what a session is given and what it gives back ---------------------------------------------
@dataclass(frozen=True)
class TimedQuery:
    """A question or an instruction change at ``media_ts_ms``."""

    kind: str  # "question", "instruction_add" or "instruction_remove"
    event_id: str
    media_ts_ms: int
    text: str = ""


@dataclass
class LocalResponse:
    """One whole response as the client would have assembled it."""

    response_id: str
    question_id: str
    instruction_id: str
    media_ts_ms: int
    text: str = ""
    first_chunk_wall: float | None = None  # monotonic
    final_wall: float | None = None
    asked_wall: float | None = None  # questions: when the question's frame entered ingest


@dataclass
class SessionResult:
    responses: list[LocalResponse] = field(default_factory=list)
    frames_published: int = 0
    frames_skipped: int = 0
    frame_errors: list[str] = field(default_factory=list)
    dead_letters: int = 0
    memory_points: int = 0  # frames memory holds for the stream at the end
    wall_s: float = 0.0


@dataclass(frozen=True)
class InProcessConfig:
    """Settings of the stages; each defaults to its ``SH_*`` environment like the services do."""

    memory_dir: Path | None = None  # None: SH_MEMORY_DATA_DIR if set, else a temporary folder removed at close()
    encode_batch: int = 8  # frames per Triton request
    triton: TritonSettings | None = None


class InProcessPipeline:
    """ingest → encoder → memory + summariser + decision → responder, in this process. See the module docstring.

    ``generator``: a :class:`~streamharness.generation.ResponseGenerator` to use instead of the one
    ``SH_GENERATION_*`` selects (e.g. one shared by several pipelines)."""

    SESSION_GROUP = "in-process-sessions"  # the local stand-in of the gateway's responses group

    def __init__(self, config: InProcessConfig | None = None, *, generator: Any = None, text_encoder: Any = None) -> None:
        self.config = config or InProcessConfig()
        self._generator = generator
        self._text_encoder = text_encoder
        self.kafka = KafkaSettings()  # topic names and the retry budget only: nothing connects to a broker
        self.host = LocalHost(self.kafka)
        self.bus = self.host.bus
        self._tmp: Path | None = None
        self._loaded = False
        self._owned_generator: Any = None

    def open(self) -> InProcessPipeline:
        from streamharness.decision.service import DecisionSettings, DecisionStage
        from streamharness.encoder.service import EncoderSettings, EncoderStage
        from streamharness.ingest.service import IngestSettings, IngestStage
        from streamharness.generation import GenerationSettings, make_generator
        from streamharness.memory.service import MemorySettings, MemoryStage
        from streamharness.memory.tiers import TierSettings
        from streamharness.responder.service import ResponderSettings, ResponderStage
        from streamharness.summariser.backends import make_backend
        from streamharness.summariser.settings import SummariserSettings
        from streamharness.summariser.stage import SummariserStage
        from streamharness.text_encoder import TextEncoder, TextEncoderSettings

        self._text_encoder = self._text_encoder or TextEncoder(load_settings(TextEncoderSettings)).load()
        memory_settings = load_settings(MemorySettings)
        memory_dir = self.config.memory_dir or memory_settings.data_dir
        if memory_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="sh-inprocess-memory-"))
            memory_dir = self._tmp
        memory_settings = memory_settings.model_copy(update={"store": "edge", "data_dir": memory_dir})
        encoder_settings = load_settings(EncoderSettings).model_copy(update={"max_batch": self.config.encode_batch})
        if self._generator is None:
            # One generator for the responder and the summariser (one model in memory).
            self._generator = make_generator(load_settings(GenerationSettings))
            self._owned_generator = self._generator
        tiers = load_settings(TierSettings)
        summariser_settings = load_settings(SummariserSettings)
        try:
            self.memory = self.host.add(MemoryStage(memory_settings, tiers, text_encoder=self._text_encoder))
            backend = make_backend(summariser_settings, generator=self._generator) if summariser_settings.backend == "generator" else None
            self.summariser = self.host.add(SummariserStage(summariser_settings, tiers, backend=backend, memory=LocalMemoryStub(self.memory)))
            self.decision = self.host.add(DecisionStage(load_settings(DecisionSettings), triton=self.config.triton or load_settings(TritonSettings),
                                                        tiers=tiers, text_encoder=self._text_encoder, memory=LocalMemoryStub(self.memory)))
            self.responder = self.host.add(ResponderStage(load_settings(ResponderSettings), generator=self._generator,
                                                          memory=LocalMemoryStub(self.memory)))
            self.encoder = self.host.add(EncoderStage(encoder_settings, self.config.triton or load_settings(TritonSettings)))
            self.ingest_stage = self.host.add(IngestStage(load_settings(IngestSettings)))
        except BaseException:
            self.host.close()
            raise
        self.ingest = self.ingest_stage.servicer
        self.bus.subscribe(self.SESSION_GROUP, [self.kafka.topic(topics.RESPONSES)])
        self._loaded = True
        return self

    def ready(self) -> bool:
        return self._loaded and self.host.healthy()

    def close(self) -> None:
        if self._loaded:
            self.host.close()
            self._loaded = False
        if self._owned_generator is not None:
            self._owned_generator.close()
            self._owned_generator = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> InProcessPipeline:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one session ---------------------------------------------------------------------------
    def run_session(
        self,
        tenant: str,
        stream_id: str,
        frames: Iterable[tuple[int, bytes]],
        *,
        instructions: dict[str, str] | None = None,
        queries: Iterable[TimedQuery] = (),
        decision_fps: float = 1.0,
        on_frame: Callable[[int], None] | None = None,
    ) -> SessionResult:
        """Play ``frames`` (``(media_ts_ms, encoded image)`` in media order) as one session, with the
        standing ``instructions`` of its start and the timed ``queries``; returns every response."""
        from streamharness.ingest.frames import Resampler

        if not self._loaded:
            raise RuntimeError("open() the pipeline first")
        if not 0 < decision_fps <= 30:  # on the wire 0 means "the default"; here the caller says what it wants
            raise InvalidInput(f"decision_fps {decision_fps} is out of range (0, 30]")
        pending = list(queries)  # the replay loop puts them in media order
        for q in pending:
            client_message(q)  # an unknown kind is refused before anything is sent
        mapper = SessionMapper(tenant, uuid.uuid4().hex)
        start = mapper.start(session_pb2.ClientMessage(start=session_pb2.SessionStart(
            stream_id=stream_id, decision_fps=decision_fps,
            instructions=[common_pb2.StandingInstruction(instruction_id=i, text=t) for i, t in (instructions or {}).items()])))
        key = mapper.key
        result = SessionResult()
        started = time.monotonic()
        dead_before = len(self.bus.dead_letters)
        asked: dict[str, float] = {}
        assembling: dict[str, LocalResponse] = {}
        resampler = Resampler(mapper.decision_fps)
        last_published = -1
        self.bus.send(topics.QUERIES, key, start)

        def publish(q: TimedQuery) -> None:
            query, _ack = mapper.query(client_message(q))
            if q.kind == "question":
                asked.setdefault(q.event_id, time.monotonic())
            self.bus.send(topics.QUERIES, key, query)

        attempts: dict[str, str] = {}
        done: set[str] = set()

        def run() -> None:
            """Every stage until idle; then the responses, assembled as the client would."""
            self.host.run_until_idle()
            for record in self.bus.take(topics.RESPONSES, self.SESSION_GROUP):
                r = events_pb2.ResponseEvent.FromString(record.value)
                if r.session_finished or r.response_id in done:
                    continue  # the decision stage's end-of-session record; or a response already whole
                resp = assembling.get(r.response_id)
                if resp is not None and attempts.get(r.response_id) != r.attempt:
                    if r.index != 0:
                        continue  # a late chunk of an attempt that was superseded
                    resp = None  # generated again (a retried generation): start it over, as the gateway does
                attempts[r.response_id] = r.attempt
                if resp is None:
                    resp = assembling[r.response_id] = LocalResponse(
                        r.response_id, r.question_id, r.instruction_id, r.media_ts_ms,
                        asked_wall=asked.get(r.question_id) if r.question_id else None)
                if r.index == 0:
                    resp.first_chunk_wall = record.sent_monotonic
                resp.text += r.text
                if r.final:
                    resp.final_wall = record.sent_monotonic
                    done.add(r.response_id)
                    result.responses.append(assembling.pop(r.response_id))

        def pending_frames() -> int:
            return self.bus.pending(self.encoder_group, [self.kafka.topic(topics.FRAMES)])

        seq = 0
        question_sent = False  # a question went out since the last run: the next frame runs at once
        frame_steps = (EncodedFrame(ts, image) for ts, image in frames)
        for step in replay(frame_steps, [(q.media_ts_ms, q) for q in pending]):
            if step.kind == "event":
                q = step.item
                if q.kind == "question" and not question_sent:
                    # Frames waiting for the encoder run first and the question's frame alone after
                    # it: in a live stream the earlier frames were encoded long ago, so they must not
                    # count in the answer's latency.
                    run()
                    question_sent = True
                publish(q)
                continue
            seq += 1
            ts_ms, image = step.media_ts_ms, step.item.image
            try:
                req = mapper.frame(session_pb2.Frame(media_ts_ms=ts_ms, image=image, encoding=image_encoding(image), seq=seq))
            except InvalidInput as err:
                result.frame_errors.append(str(err))
                continue
            status = self.ingest.ingest_one(req, key, resampler)
            if status.status == ingest_pb2.IngestFrameResult.STATUS_PUBLISHED:
                result.frames_published += 1
                last_published = ts_ms
            elif status.status == ingest_pb2.IngestFrameResult.STATUS_SKIPPED:
                result.frames_skipped += 1
            else:
                result.frame_errors.append(status.error)
            if question_sent or pending_frames() >= self.config.encode_batch:
                run()
                question_sent = False
                if on_frame is not None:
                    on_frame(ts_ms)
        self.bus.send(topics.QUERIES, key, mapper.end(last_published))
        run()
        if on_frame is not None and last_published >= 0:
            on_frame(last_published)
        if assembling:
            log.warning("%d responses never got their final chunk", len(assembling))
        dead = self.bus.dead_letters[dead_before:]
        result.dead_letters = len(dead)
        frames_topic = self.kafka.topic(topics.FRAMES).encode()
        for letter in dead:
            headers = dict(letter.headers)
            if headers.get(DLQ_SOURCE_TOPIC) == frames_topic:  # the encoder could not read the frame
                result.frame_errors.append(headers.get(DLQ_ERROR, b"").decode("utf-8", "replace"))
        result.memory_points = self.memory.store.count(key_str(key), ("short",))
        result.wall_s = time.monotonic() - started
        return result

    @property
    def encoder_group(self) -> str:
        return self.kafka.topic(self.encoder.settings.consumer_group)


def client_message(q: TimedQuery) -> session_pb2.ClientMessage:
    """A timed query as the client message a gateway session would get."""
    if q.kind == "question":
        return session_pb2.ClientMessage(question=session_pb2.Question(question_id=q.event_id, text=q.text, media_ts_ms=q.media_ts_ms))
    if q.kind == "instruction_add":
        return session_pb2.ClientMessage(instruction=session_pb2.InstructionUpdate(
            add=common_pb2.StandingInstruction(instruction_id=q.event_id, text=q.text), media_ts_ms=q.media_ts_ms))
    if q.kind == "instruction_remove":
        return session_pb2.ClientMessage(instruction=session_pb2.InstructionUpdate(
            remove_instruction_id=q.event_id, media_ts_ms=q.media_ts_ms))
    raise InvalidInput(f"query {q.event_id!r}: unknown kind {q.kind!r}")


def image_encoding(image: bytes) -> int:
    """The wire encoding of a frame's bytes by their signature (PNG, else JPEG; ingest checks it)."""
    return common_pb2.IMAGE_ENCODING_PNG if image[:8] == b"\x89PNG\r\n\x1a\n" else common_pb2.IMAGE_ENCODING_JPEG


__all__ = ["InProcessConfig", "InProcessPipeline", "LocalBus", "LocalMemoryStub", "LocalResponse", "SessionResult", "TimedQuery",
           "client_message"]
