"""The pipeline in one process, without Kafka: for quick evaluation runs and local experiments.

The same service classes as the deployment — ingest's per-frame step, the encoder (on Triton),
memory (Qdrant's engine), decision and the responder (any generation backend) — run in *embedded
mode*: no consumer threads and no broker. A :class:`LocalBus` takes the place of Kafka: it
implements the producer interface the services publish with (``send``/``send_raw``) and hands
every record, serialised and parsed again exactly as Kafka would carry it, to the next stage as a
:class:`~streamharness.kafka.ConsumedEvent`. The responder reads memory through the same
``Context``/``Recall`` calls it makes over gRPC (:class:`LocalMemoryStub` calls the memory
service's methods directly).

Order is deterministic: a micro-batch of frames is ingested and encoded in one Triton request;
then, frame by frame in media time, memory keeps the frame, the decision step sees it (with every
question or instruction change due at or before it) and every RESPOND decision is answered before
the next frame. What differs from the deployment: no concurrency between stages (a response holds
back the next frame, as one responder partition would), and no gateway (its input checks are the
client's job here).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from streamharness import topics
from streamharness.errors import InvalidInput
from streamharness.kafka import ConsumedEvent
from streamharness.keys import key_str, make_key
from streamharness.settings import KafkaSettings, TritonSettings, load_settings
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2, memory_pb2

log = logging.getLogger(__name__)
Q = events_pb2.QueryEvent


class _Delivered:
    """What ``send`` returns: already durable (the ``.get(timeout)`` of kafka-python's future)."""

    def __init__(self, topic: str, offset: int) -> None:
        self.topic, self.offset = topic, offset

    def get(self, timeout: float | None = None) -> _Delivered:
        return self


@dataclass
class DeadLetter:
    topic: str
    key: bytes | None
    headers: list[tuple[str, bytes]]


class LocalBus:
    """In-memory topics with the :class:`~streamharness.kafka.EventProducer` interface.

    Each record is serialised and parsed back (so a stage sees only what the wire carries) and
    queued on its logical topic; :meth:`take` drains a topic in order. Dead letters are kept in
    :attr:`dead_letters`.
    """

    def __init__(self, kafka: KafkaSettings | None = None) -> None:
        self._kafka = kafka or KafkaSettings()
        self._queues: dict[str, deque[tuple[ConsumedEvent, float]]] = defaultdict(deque)  # (record, monotonic time sent)
        self._offsets: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.dead_letters: list[DeadLetter] = []

    def send(self, topic: str, key: common_pb2.StreamKey | str, message: Message, headers=None) -> _Delivered:
        full = self._kafka.topic(topic)
        parsed = type(message).FromString(message.SerializeToString())
        with self._lock:
            offset = self._offsets[full]
            self._offsets[full] += 1
            self._queues[topic].append((ConsumedEvent(
                key=key_str(key) if isinstance(key, common_pb2.StreamKey) else key, message=parsed, topic=full,
                partition=0, offset=offset, headers=tuple(headers or ()), timestamp_ms=int(time.time() * 1000)),
                time.monotonic()))
        return _Delivered(full, offset)

    def send_raw(self, full_topic: str, key: bytes | None, value: bytes | None, headers) -> _Delivered:
        with self._lock:
            self.dead_letters.append(DeadLetter(full_topic, key, list(headers)))
            offset = len(self.dead_letters) - 1
        return _Delivered(full_topic, offset)

    def pending(self, topic: str) -> int:
        """How many records wait on ``topic``."""
        with self._lock:
            return len(self._queues[topic])

    def take(self, topic: str) -> list[ConsumedEvent]:
        """Every record waiting on ``topic``, oldest first; the topic is left empty."""
        return [event for event, _ in self.take_timed(topic)]

    def take_timed(self, topic: str) -> list[tuple[ConsumedEvent, float]]:
        """As :meth:`take`, each record with the ``time.monotonic()`` it was sent at."""
        with self._lock:
            queue = self._queues[topic]
            out = list(queue)
            queue.clear()
        return out

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


class LocalMemoryStub:
    """``MemoryServiceStub``'s ``Context`` and ``Recall`` on a memory service in this process."""

    def __init__(self, memory: Any) -> None:
        self._memory = memory

    def Context(self, request: memory_pb2.ContextRequest, timeout: float | None = None) -> memory_pb2.ContextResponse:  # noqa: N802
        return self._memory.context(request)

    def Recall(self, request: memory_pb2.RecallRequest, timeout: float | None = None) -> memory_pb2.RecallResponse:  # noqa: N802
        return self._memory.recall(request)


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
    """ingest → encoder → memory + decision → responder, in this process. See the module docstring.

    ``generator``: a :class:`~streamharness.generation.ResponseGenerator` to use instead of the one
    ``SH_GENERATION_*`` selects (e.g. one shared by several pipelines)."""

    def __init__(self, config: InProcessConfig | None = None, *, generator: Any = None, text_encoder: Any = None) -> None:
        self.config = config or InProcessConfig()
        self._generator = generator
        self._text_encoder = text_encoder
        self.bus = LocalBus()
        self._tmp: Path | None = None
        self._loaded = False

    def open(self) -> InProcessPipeline:
        from streamharness.decision.service import DecisionService, DecisionSettings, make_policy
        from streamharness.encoder.service import EncoderService, EncoderSettings
        from streamharness.ingest.service import IngestServicer, IngestSettings
        from streamharness.memory.service import MemoryService, MemorySettings
        from streamharness.responder.service import ResponderService, ResponderSettings
        from streamharness.text_encoder import TextEncoder, TextEncoderSettings

        kafka = KafkaSettings()  # topic names only: nothing connects to a broker
        self._text_encoder = self._text_encoder or TextEncoder(load_settings(TextEncoderSettings)).load()
        memory_settings = load_settings(MemorySettings)
        memory_dir = self.config.memory_dir or memory_settings.data_dir
        if memory_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="sh-inprocess-memory-"))
            memory_dir = self._tmp
        memory_settings = memory_settings.model_copy(update={"store": "edge", "data_dir": memory_dir})
        self.memory = MemoryService(memory_settings, kafka, text_encoder=self._text_encoder, embedded=True)
        self.memory.load()
        decision_settings = load_settings(DecisionSettings)
        policy = make_policy(decision_settings, self._text_encoder.encode)
        self.decision = DecisionService(decision_settings, kafka, policy=policy, producer=self.bus)
        self.decision.load()
        self.responder = ResponderService(load_settings(ResponderSettings), kafka, generator=self._generator,
                                          producer=self.bus, memory=LocalMemoryStub(self.memory))
        self.responder.load()
        encoder_settings = load_settings(EncoderSettings)
        self.encoder = EncoderService(encoder_settings, kafka, self.config.triton or load_settings(TritonSettings), producer=self.bus)
        self.encoder.load()
        self._ingest_settings = load_settings(IngestSettings)
        self._intake = threading.Event()
        self._intake.set()
        self.ingest = IngestServicer(self._ingest_settings, self.bus, self._intake)
        self._loaded = True
        return self

    def ready(self) -> bool:
        return self._loaded and self.encoder.ready() and self.responder.ready() and self.decision.ready() and self.memory.ready()

    def close(self) -> None:
        if self._loaded:
            deadline = time.monotonic() + 10
            for stage in (self.encoder, self.decision, self.responder, self.memory):
                try:
                    stage.stop(deadline)
                except Exception:  # noqa: BLE001 - closing what is left matters more
                    log.exception("stopping %s", type(stage).__name__)
            self._loaded = False
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
        if not 0 < decision_fps <= 30:
            raise InvalidInput(f"decision_fps {decision_fps} is out of range (0, 30]")
        key = make_key(tenant, stream_id)
        session_id = uuid.uuid4().hex
        result = SessionResult()
        started = time.monotonic()
        dead_before = len(self.bus.dead_letters)
        pending = sorted(queries, key=lambda q: q.media_ts_ms)
        for q in pending:
            if q.kind not in ("question", "instruction_add", "instruction_remove"):
                raise InvalidInput(f"query {q.event_id!r}: unknown kind {q.kind!r}")
        asked: dict[str, float] = {}
        assembling: dict[str, LocalResponse] = {}
        resampler = Resampler(decision_fps)
        last_published = -1

        start = Q(key=key, session_id=session_id, kind=Q.KIND_SESSION_START, decision_fps=decision_fps,
                  instructions=[common_pb2.StandingInstruction(instruction_id=i, text=t) for i, t in (instructions or {}).items()])
        self.bus.send(topics.QUERIES, key, start)

        def publish_queries(ts_ms: int | None) -> None:
            """Queries due at or before ``ts_ms`` (None: all that are left) onto the queries topic."""
            while pending and (ts_ms is None or pending[0].media_ts_ms <= ts_ms):
                q = pending.pop(0)
                common = {"key": key, "session_id": session_id, "media_ts_ms": q.media_ts_ms}
                if q.kind == "question":
                    asked.setdefault(q.event_id, time.monotonic())
                    query = Q(kind=Q.KIND_QUESTION, question_id=q.event_id, text=q.text, **common)
                elif q.kind == "instruction_add":
                    query = Q(kind=Q.KIND_INSTRUCTION_ADD, instruction_id=q.event_id, text=q.text, **common)
                else:
                    query = Q(kind=Q.KIND_INSTRUCTION_REMOVE, instruction_id=q.event_id, **common)
                self.bus.send(topics.QUERIES, key, query)

        def decide_batch(*frames: ConsumedEvent) -> None:
            """One decision batch, as one poll of both topics: the queries waiting, then ``frames``."""
            for event in [*self.bus.take(topics.QUERIES), *frames]:
                self.decision.collect(event)
            self.decision.process_batch()
            answer_decisions()

        def answer_decisions() -> None:
            for event in self.bus.take(topics.DECISIONS):
                self.responder.handle(event)
            for event, sent in self.bus.take_timed(topics.RESPONSES):
                r = event.message
                resp = assembling.get(r.response_id)
                if resp is None:
                    resp = assembling[r.response_id] = LocalResponse(
                        r.response_id, r.question_id, r.instruction_id, r.media_ts_ms,
                        asked_wall=asked.get(r.question_id) if r.question_id else None)
                if r.index == 0:
                    resp.first_chunk_wall = sent
                resp.text += r.text
                if r.final:
                    resp.final_wall = sent
                    result.responses.append(assembling.pop(r.response_id))

        def decide(frames_in_order: list[ConsumedEvent]) -> None:
            for event in frames_in_order:
                self.memory.remember(event)
                publish_queries(event.message.media_ts_ms)
                decide_batch(event)
                if on_frame is not None:
                    on_frame(event.message.media_ts_ms)

        def encode() -> None:
            batch = self.bus.take(topics.FRAMES)
            for event in batch:
                try:
                    self.encoder.accept(event)
                except InvalidInput as err:  # the deployment dead-letters it; the stream goes on
                    result.frame_errors.append(str(err))
            self.encoder.flush_batch()
            decide(self.bus.take(topics.EMBEDDINGS))

        seq = 0
        for ts_ms, image in frames:
            seq += 1
            # A question due at this frame is "sent" with it, as a client would. Frames queued for
            # the encoder are encoded first and this frame alone after it: in a live stream the
            # earlier frames were encoded long ago, so they must not count in the answer's latency.
            due_now = [q for q in pending if q.media_ts_ms <= ts_ms and q.kind == "question" and q.event_id not in asked]
            if due_now:
                encode()
                for q in due_now:
                    asked[q.event_id] = time.monotonic()
            req = ingest_pb2.IngestFrameRequest(
                key=key, session_id=session_id, media_ts_ms=ts_ms, image=image, encoding=image_encoding(image),
                seq=seq, decision_fps=decision_fps,
                hops=[common_pb2.HopStamp(hop="gateway", wall_unix_ns=time.time_ns())])
            status = self.ingest.ingest_one(req, key, resampler)
            if status.status == ingest_pb2.IngestFrameResult.STATUS_PUBLISHED:
                result.frames_published += 1
                last_published = ts_ms
            elif status.status == ingest_pb2.IngestFrameResult.STATUS_SKIPPED:
                result.frames_skipped += 1
            else:
                result.frame_errors.append(status.error)
            if due_now or self.bus.pending(topics.FRAMES) >= self.config.encode_batch:
                encode()
        encode()
        publish_queries(None)
        self.bus.send(topics.QUERIES, key, Q(key=key, session_id=session_id, kind=Q.KIND_SESSION_END,
                                             media_ts_ms=last_published))
        decide_batch()
        if assembling:
            log.warning("%d responses never got their final chunk", len(assembling))
        result.dead_letters = len(self.bus.dead_letters) - dead_before
        result.memory_points = self.memory.store.count(key_str(key))
        result.wall_s = time.monotonic() - started
        return result


def image_encoding(image: bytes) -> int:
    """The wire encoding of a frame's bytes by their signature (PNG, else JPEG; ingest checks it)."""
    return common_pb2.IMAGE_ENCODING_PNG if image[:8] == b"\x89PNG\r\n\x1a\n" else common_pb2.IMAGE_ENCODING_JPEG


__all__ = ["InProcessConfig", "InProcessPipeline", "LocalBus", "LocalMemoryStub", "LocalResponse", "SessionResult", "TimedQuery"]
