"""The encoder stage: ``frames`` → Triton (frame encoder + people detector) → ``embeddings``.

Frames of all streams are micro-batched: the host fetches with a bounded wait (on Kafka the broker
holds a fetch until about ``max_batch`` frames are there or ``max_wait_ms`` has passed, whichever
comes first), each batch of at most ``max_batch`` records is decoded record by record
(``handle``), then encoded in one Triton request while the people detector runs on every frame of
the batch concurrently, and the results are published — all before the batch's offsets are
committed (``end_batch``). Per-stream order is kept: one stream's frames are in one
partition, a batch keeps their order, and batches are published one after the other.

Failures:

* a frame whose JPEG does not decode is dead-lettered (by the host: the handler raises
  ``InvalidInput``) and counted; the stream goes on;
* Triton unreachable (``DependencyUnavailable`` after ``SH_KAFKA_HANDLER_RETRIES`` attempts): the
  flush raises, nothing is committed and the host redelivers the batch — frames wait for Triton
  instead of being lost, and ``ready()`` is false meanwhile;
* any other failure of one frame (the model rejects it, a malformed answer) dead-letters that frame
  only: a bad frame never stops a stream.

The people detector is the expensive part (HOG: ~0.1-0.4 s of a core per frame; the frame encoder
~10 ms), so it is budgeted per stream, on media time:

* ``SH_ENCODER_PEOPLE_EVERY_S``: a stream is measured at most once per that many seconds of media
  time. Its first frame is always measured (also after a session change, or a step back to before
  its last measured frame); the second measurement comes a fixed per-stream fraction of an interval
  later, so that streams started together do not all ask in the same second;
* ``SH_ENCODER_LAG_SHED_MS``: a frame older than that at the encoder (wall time since ingest
  stamped it) lags; of a batch's lagging frames only each stream's newest is measured (when due).
  A backlog is then worked off at the frame encoder's speed, not the detector's.

A frame that was not measured is still encoded and published (memory gets every frame once). Its
``person_count`` is the stream's last measured count — of an earlier frame of the same session,
never of a later one — and it has no ``detections`` (boxes belong to the frame they were found in;
a measured frame has one per person counted). Before a stream's first measurement the count is
unknown: 0, and the caption names no people. Skipped detections are counted in
``sh.pipeline.frames_shed`` (reason ``lag`` or ``people-budget``); the host records each frame's
age in ``sh.pipeline.stage_lag``. Each frame gets an ``encoder encode`` span in its own trace,
from the batch's start to its embedding's send.

``tritonclient.grpc`` is imported in ``load()``, not at module level, so that importing this module
(e.g. for ``build_caption``) never loads protos that clash with kserve's.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

import cv2
import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from streamharness import topics
from streamharness.errors import DependencyUnavailable, InvalidInput
from streamharness.keys import parse_key
from streamharness.pace import PaceTracker
from streamharness.records import ConsumedEvent, processing
from streamharness.settings import TritonSettings, load_settings
from streamharness.stage import Batching, Outbox, Stage, StageContext, StageSpec
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2, events_pb2

if TYPE_CHECKING:
    from streamharness.people_client import PeopleDetection, PeopleDetectorClient
    from streamharness.triton_client import FrameEncoderClient, FrameEncoding

log = logging.getLogger(__name__)
T = TypeVar("T")

PERSON_LABEL = "person"
HOP = "encoder"
# Pause before a batch is redelivered while Triton is unreachable: doubles from MIN up to MAX.
OUTAGE_PAUSE_MIN_S = 0.5
OUTAGE_PAUSE_MAX_S = 10.0
# The hop whose stamp a frame's lag at the encoder is measured from (when it was published to frames).
LAG_FROM_HOP = "ingest"
# Per frame of a batch: the people detector runs on it, or why not (the reasons of frames_shed).
MEASURE, SHED_LAG, SHED_BUDGET, NOT_COUNTED = "measure", "lag", "people-budget", "off"
# Streams whose last people count is kept (least recently measured forgotten first): bounds memory.
PEOPLE_STATE_STREAMS = 65536


class EncoderSettings(BaseSettings):
    """Micro-batching and what the encoder adds to each frame (Triton itself: ``SH_TRITON_*``)."""

    model_config = SettingsConfigDict(env_prefix="SH_ENCODER_", frozen=True, extra="forbid", case_sensitive=False)

    consumer_group: str = Field("encoder", min_length=1, description="Kafka consumer group of the encoder replicas (SH_KAFKA_TOPIC_PREFIX is put in front).")
    max_batch: int = Field(16, ge=1, le=256, description="Most frames, of all streams together, encoded in one Triton request (also the records taken per poll).")
    max_wait_ms: int = Field(20, ge=0, le=1000, description="Longest the broker holds a fetch to fill a batch; a frame waits at most this long for others. 0 = take what is there at once.")
    frame_bytes_hint: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024, description="Typical size of a frame's JPEG: a fetch returns early once max_batch times this many bytes are there.")
    detect_people: bool = Field(True, description="Count people in every frame with the people detector model.")
    people_model: str = Field("people_detector", min_length=1, description="Triton model name of the people detector.")
    people_model_version: str = Field("", description="Version of the people detector; empty = the server's latest.")
    detect_concurrency: int = Field(4, ge=1, le=64, description="People-detector requests in flight at once (the model takes one frame per request).")
    people_every_s: float = Field(5.0, ge=0, le=3600, description="Run the people detector on a stream at most once per this many seconds of media time; frames in between carry the stream's last measured person_count (and have no boxes). 0 = every frame. The default keeps 10 streams within about half a core of detection on a 640x480 feed (docs/benchmarks.md); lower it for fewer streams or more cores.")
    lag_shed_ms: int = Field(1500, ge=0, le=3_600_000, description="A frame older than this at the encoder (wall ms since ingest stamped it) is lagging: of a batch's lagging frames only each stream's newest gets people detection, the others carry the count. Every frame is still encoded and published. 0 = never shed.")
    caption_labels: int = Field(3, ge=0, le=50, description="Classifier labels named in a frame's caption (at most SH_TRITON_TOP_K).")
    publish_timeout_s: float = Field(30.0, gt=0, le=600, description="How long to wait for the broker to acknowledge a batch's embeddings before the batch is retried.")


# -- captions ------------------------------------------------------------------------------------
def first_synonym(label: str) -> str:
    """ImageNet names list synonyms: ``"street sign"`` of ``"street sign"``, ``"tabby"`` of ``"tabby, tabby cat"``."""
    return label.split(",")[0].strip()


def people_phrase(count: int) -> str:
    if count <= 0:
        return "no people"
    return "1 person" if count == 1 else f"{count} people"


def build_caption(labels: Sequence[str | tuple[str, float]], person_count: int | None, max_labels: int = 3) -> str:
    """A short caption from the classifier's labels (best first) and the people count.

    ``build_caption([("street sign", .3), ("trolleybus, trolley coach", .2)], 2)`` →
    ``"2 people; street sign, trolleybus"``. ``person_count`` None (people not counted) leaves the
    people out; labels are named by their first synonym, without repeats, at most ``max_labels``.
    """
    names: list[str] = []
    for label in labels:
        if len(names) >= max_labels:
            break
        name = first_synonym(label[0] if isinstance(label, tuple) else label)
        if name and name not in names:
            names.append(name)
    parts = [people_phrase(person_count)] if person_count is not None else []
    if names:
        parts.append(", ".join(names))
    return "; ".join(parts)


# -- frames --------------------------------------------------------------------------------------
def decode_jpeg(data: bytes) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a frame's JPEG; ``InvalidInput`` when the bytes are not an image."""
    if not data:
        raise InvalidInput("the frame has no image bytes")
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.size == 0:
        raise InvalidInput(f"the frame's {len(data)} bytes do not decode as a JPEG image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class _Frame:
    event: ConsumedEvent[events_pb2.FrameEvent]
    rgb: np.ndarray


@dataclass(frozen=True)
class _PeopleCount:
    """A stream's last measured people count: which session, at what media time, and from what
    media time on the stream's frames are due to be measured again."""

    session_id: str
    media_ts_ms: int
    count: int
    due_ms: float


def people_phase(key: str, session_id: str) -> float:
    """A stream's fixed share in [0, 1) of ``people_every_s`` by which its second measurement comes
    later: streams that start together (and so reach each media second together) then spread their
    detections over the interval instead of all asking in the same second. Stable across restarts."""
    return zlib.crc32(f"{key}\0{session_id}".encode()) / 2**32


def frame_stamp_ns(frame: events_pb2.FrameEvent) -> int | None:
    """Wall time ingest published the frame (its ``ingest`` hop stamp, else its last stamp); None without stamps."""
    stamps = [h for h in frame.hops if h.hop == LAG_FROM_HOP] or list(frame.hops[-1:])
    return stamps[-1].wall_unix_ns if stamps else None


def frame_lag_ms(frame: events_pb2.FrameEvent, now_ns: int) -> float | None:
    """Wall ms since ingest published the frame; None without stamps."""
    stamp = frame_stamp_ns(frame)
    return None if stamp is None else max(0, now_ns - stamp) / 1e6


@dataclass
class EncoderStats:
    """Counts since start (read by tests and people; written by the consumer thread only)."""

    frames_encoded: int = 0
    frames_undecodable: int = 0
    frames_failed: int = 0
    batches: int = 0
    largest_batch: int = 0
    people_detected: int = 0
    """Frames the people detector ran on."""
    people_shed_lag: int = 0
    """Frames published without people detection because they lagged (not their stream's newest)."""
    people_shed_budget: int = 0
    """Frames published without people detection because SH_ENCODER_PEOPLE_EVERY_S had not passed."""


class _Failed:
    """A per-frame failure, kept beside the results of the frames that worked."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class EncoderStage(Stage):
    """Consumes ``frames``, publishes ``embeddings`` (the ``encoder`` row of the topology)."""

    name = "encoder"

    def __init__(
        self, settings: EncoderSettings | None = None, triton: TritonSettings | None = None, *,
        encoder_client: FrameEncoderClient | None = None, people_client: PeopleDetectorClient | None = None,
    ) -> None:
        """``encoder_client`` / ``people_client``: use these (any objects with the clients'
        ``encode`` / ``detect``, ``ready`` and ``close``) instead of connecting to ``triton``."""
        self.settings = settings or load_settings(EncoderSettings)
        self.triton = triton or load_settings(TritonSettings)
        self.stats = EncoderStats()
        self.encoder: FrameEncoderClient | None = encoder_client
        self.people: PeopleDetectorClient | None = people_client
        # key -> the stream's last measured count; written only once a batch is published, so a
        # redelivered batch plans the same detections again.
        self._people_counts: OrderedDict[str, _PeopleCount] = OrderedDict()
        self._pace = PaceTracker()  # which streams are sent at the pace of their media time (lag shedding is for those)
        self.out: Outbox | None = None
        self._attempts = 1
        self._stopping = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._batch: list[_Frame] = []
        self._closed = False
        self._outage_pause_s = OUTAGE_PAUSE_MIN_S

    def configure(self, spec: StageSpec) -> StageSpec:
        s = self.settings
        # A poll takes at most one batch; end_batch encodes it before the offsets are committed.
        return replace(spec, group=s.consumer_group,
                       batching=Batching(max_records=s.max_batch, max_wait_ms=s.max_wait_ms, bytes_hint=s.frame_bytes_hint))

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self, ctx: StageContext) -> None:
        self.out, self._attempts, self._stopping = ctx.outbox, ctx.attempts, ctx.stopping
        if self.encoder is None:
            from streamharness.triton_client import FrameEncoderClient

            self.encoder = FrameEncoderClient(self.triton)
        if not self.settings.detect_people:
            self.people = None
        elif self.people is None:
            from streamharness.people_client import PeopleDetectorClient

            self.people = PeopleDetectorClient(self.triton, self.settings.people_model, self.settings.people_model_version)
        # One worker for the batch's encoder request, the others for people detection.
        self._pool = ThreadPoolExecutor(max_workers=self.settings.detect_concurrency + 1, thread_name_prefix="encoder-triton")

    def healthy(self) -> bool:
        if self._closed or self._stopping.is_set():  # stopping or stopped (the Triton channels close)
            return False
        if self.encoder is None or not self.encoder.ready():
            return False
        return not self.settings.detect_people or (self.people is not None and self.people.ready())

    def close(self, deadline: float) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for client in (self.encoder, self.people):
            if client is not None:
                client.close()

    # -- consuming -----------------------------------------------------------------------------
    def handle(self, event: ConsumedEvent[events_pb2.FrameEvent]) -> None:
        """The per-record handler: decode and keep for the batch (``end_batch`` does the rest)."""
        try:
            rgb = decode_jpeg(event.message.jpeg)
        except InvalidInput as err:
            # Raised on: the consumer dead-letters the record (InvalidInput is not retried).
            self.stats.frames_undecodable += 1
            meters.records_dead_lettered().add(1, {"topic": event.topic, "reason": "undecodable-jpeg"})
            raise InvalidInput(f"{event.key} seq {event.message.seq} at {event.message.media_ts_ms} ms: {err}") from None
        self._batch.append(_Frame(event, rgb))

    def end_batch(self) -> None:
        """Encode, detect and publish the batch; raising makes the host redeliver it."""
        frames, self._batch = self._batch, []
        for start in range(0, len(frames), self.settings.max_batch):
            self._process(frames[start:start + self.settings.max_batch])

    def _process(self, frames: list[_Frame]) -> None:
        if not frames:
            return
        started_ns = time.time_ns()  # each frame's span starts with the batch's work (one Triton request for all)
        images = [f.rgb for f in frames]
        plan, due = self._plan_people(frames)
        encoded = self._pool.submit(self._encode, images)
        detected = {i: self._pool.submit(self._retrying, self.people.detect, images[i]) for i, why in enumerate(plan) if why == MEASURE}
        encodings = encoded.result()
        detections: list[PeopleDetection | _Failed | None] = [None] * len(frames)
        for i, future in detected.items():
            try:
                detections[i] = future.result()
            except Exception as err:  # noqa: BLE001 - sorted below
                detections[i] = _Failed(err)
        for result in [*encodings, *detections]:
            if isinstance(result, _Failed) and isinstance(result.error, DependencyUnavailable):
                # Triton is not there: fail the batch, so that it is redelivered rather than lost,
                # after a pause that grows while the outage lasts (stop() cuts it short).
                self._stopping.wait(self._outage_pause_s)
                self._outage_pause_s = min(OUTAGE_PAUSE_MAX_S, self._outage_pause_s * 2)
                raise result.error
        self._outage_pause_s = OUTAGE_PAUSE_MIN_S

        sends = []
        shed: dict[str, int] = {}
        # Counts as they stand after each frame: a measured one replaces the stream's last count,
        # the others carry it (always from an earlier frame).
        counts: dict[str, _PeopleCount] = {}
        for i, (frame, encoding, detection, why) in enumerate(zip(frames, encodings, detections, plan)):
            # A span per frame in the frame's own trace: its embedding is sent in it (streamharness.telemetry.tracing).
            with processing(frame.event, HOP, "encode", start_time=started_ns,
                            attributes={"sh.batch_size": len(frames), "sh.encoder.people": why}) as span:
                failed = encoding if isinstance(encoding, _Failed) else detection if isinstance(detection, _Failed) else None
                if failed is not None:
                    # That frame alone goes to the dead-letter topic; the rest of the batch goes on.
                    span.record_exception(failed.error)
                    self.out.dead_letter(frame.event, "handler-failed", failed.error)
                    self.stats.frames_failed += 1
                    continue
                if why in (SHED_LAG, SHED_BUDGET):
                    shed[why] = shed.get(why, 0) + 1
                src = frame.event.message
                if detection is not None:
                    counts[frame.event.key] = _PeopleCount(src.session_id, src.media_ts_ms, detection.count, due[i])
                    count: int | None = detection.count
                else:
                    last = counts.get(frame.event.key) or self._people_counts.get(frame.event.key)
                    known = last is not None and last.session_id == src.session_id and last.media_ts_ms <= src.media_ts_ms
                    count = last.count if known else None
                message = self._encoded_event(frame, encoding, detection, count)
                sends.append((frame, message, self.out.send(topics.EMBEDDINGS, frame.event.key, message)))
        # Durable before the consumer commits the batch's offsets (a KafkaError here: redelivered).
        for _, _, sent in sends:
            sent.get(timeout=self.settings.publish_timeout_s)
        self._remember_counts(counts)
        self.stats.people_detected += sum(1 for d in detections if d is not None and not isinstance(d, _Failed))
        self.stats.people_shed_lag += shed.get(SHED_LAG, 0)
        self.stats.people_shed_budget += shed.get(SHED_BUDGET, 0)
        for reason, n in shed.items():
            meters.frames_shed().add(n, {"stage": HOP, "reason": reason})

        now_ns = time.time_ns()
        for frame, message, _ in sends:
            if frame.event.message.hops:
                meters.hop_latency().record(max(0, now_ns - frame.event.message.hops[0].wall_unix_ns) / 1e9, {"hop": HOP})
        self.stats.frames_encoded += len(sends)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(frames))

    def _plan_people(self, frames: list[_Frame]) -> tuple[list[str], dict[int, float]]:
        """Per frame, whether the people detector runs on it (``MEASURE``) or why not: each stream
        is measured at most once per ``people_every_s`` of media time (``SHED_BUDGET``), and of the
        lagging frames only each stream's newest (``SHED_LAG``); and for each measured frame, the
        media time from which its stream is due again. Also records each frame's lag."""
        if self.people is None:
            return [NOT_COUNTED] * len(frames), {}
        s = self.settings
        now_ns = time.time_ns()
        newest = {f.event.key: i for i, f in enumerate(frames)}  # a batch keeps each stream's order
        # Lag shedding is for live streams only: a file or an evaluation sent faster than real time
        # gets the same measurements whatever the load (streamharness.pace).
        live: dict[str, bool] = {}
        for f in frames:  # in order: the pace is judged from a session's first frame to its newest
            src, stamp = f.event.message, frame_stamp_ns(f.event.message)
            live[f.event.key] = stamp is None or self._pace.live(f.event.key, src.session_id, src.media_ts_ms, stamp, src.pace)
        planned = {key: c for key, c in self._people_counts.items() if key in newest}
        every_ms = s.people_every_s * 1000.0
        plan: list[str] = []
        due_again: dict[int, float] = {}
        for i, frame in enumerate(frames):
            key, src = frame.event.key, frame.event.message
            lag = frame_lag_ms(src, now_ns)  # the same age the host records in sh.pipeline.stage_lag
            last = planned.get(key)
            first = last is None or last.session_id != src.session_id or src.media_ts_ms < last.media_ts_ms
            due = first or src.media_ts_ms >= last.due_ms
            if not due:
                plan.append(SHED_BUDGET)
            elif s.lag_shed_ms and lag is not None and lag > s.lag_shed_ms and newest[key] != i and live[key]:
                # Behind: the stream's newest frame is measured instead (it is what is decided on now).
                plan.append(SHED_LAG)
            else:
                gap = every_ms * (1.0 + people_phase(key, src.session_id)) if first else every_ms
                due_again[i] = src.media_ts_ms + gap
                planned[key] = _PeopleCount(src.session_id, src.media_ts_ms, -1, due_again[i])
                plan.append(MEASURE)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("people plan: %s", ", ".join(f"{f.event.key}@{f.event.message.media_ts_ms}:{why}" for f, why in zip(frames, plan)))
        return plan, due_again

    def _remember_counts(self, counts: dict[str, _PeopleCount]) -> None:
        for key, count in counts.items():
            self._people_counts[key] = count
            self._people_counts.move_to_end(key)
        while len(self._people_counts) > PEOPLE_STATE_STREAMS:
            self._people_counts.popitem(last=False)

    def _encode(self, images: list[np.ndarray]) -> list[FrameEncoding | _Failed]:
        """The batch in one request; when the batch fails for another reason than Triton being
        away, frame by frame, so that one bad frame fails alone."""
        try:
            return list(self._retrying(self.encoder.encode, images))
        except DependencyUnavailable as err:
            return [_Failed(err)] * len(images)
        except Exception as err:  # noqa: BLE001
            if len(images) == 1:
                return [_Failed(err)]
            log.warning("encoding a batch of %d frames failed (%r); encoding them one by one", len(images), err)
        results: list[FrameEncoding | _Failed] = []
        for image in images:
            try:
                results += self._retrying(self.encoder.encode, [image])
            except Exception as err:  # noqa: BLE001
                results.append(_Failed(err))
        return results

    def _retrying(self, call: Callable[..., T], *args: Any) -> T:
        """``call`` with the consumer's retry budget; only an absent dependency is worth retrying."""
        for attempt in Retrying(
            stop=stop_after_attempt(max(1, self._attempts)),
            wait=wait_exponential(multiplier=0.05, max=2.0),
            retry=retry_if_exception_type(DependencyUnavailable),
            reraise=True,
        ):
            with attempt:
                return call(*args)
        raise AssertionError("unreachable")  # pragma: no cover

    def _encoded_event(
        self, frame: _Frame, encoding: FrameEncoding, people: PeopleDetection | None, person_count: int | None
    ) -> events_pb2.EncodedFrameEvent:
        """``people``: what the detector found in this frame, None when it did not run on it;
        ``person_count``: the count to publish (measured or carried), None when unknown."""
        src = frame.event.message
        key = src.key if src.HasField("key") else parse_key(frame.event.key)
        detections = []
        if people is not None:
            detections = [
                events_pb2.Detection(label=PERSON_LABEL, score=float(score), x=float(x), y=float(y), width=float(w), height=float(h))
                for (x, y, w, h), score in zip(people.boxes.tolist(), people.scores.tolist())
            ]
        return events_pb2.EncodedFrameEvent(
            key=key,
            session_id=src.session_id,
            media_ts_ms=src.media_ts_ms,
            seq=src.seq,
            embedding=encoding.embedding.tolist(),
            embedding_model=self.triton.frame_encoder_model,
            labels=[events_pb2.Label(name=name, score=score) for name, score in encoding.labels],
            detections=detections,
            person_count=person_count if person_count is not None else 0,
            caption=build_caption(encoding.labels, person_count, self.settings.caption_labels),
            hops=[*src.hops, common_pb2.HopStamp(hop=HOP, wall_unix_ns=time.time_ns())],
            pace=src.pace,
        )
