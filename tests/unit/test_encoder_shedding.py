"""The encoder's people-detector budget and its shedding under lag, with stand-in Triton clients:
which frames the detector runs on (SH_ENCODER_PEOPLE_EVERY_S on media time, SH_ENCODER_LAG_SHED_MS
on the frames' age), what the frames it skipped carry, and that every frame is still published once.

The stand-ins answer at once; the real models behind a deliberately slow detector are in
tests/integration/test_encoder_service.py.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from streamharness.encoder.service import EncoderSettings, EncoderStage
from streamharness.errors import DependencyUnavailable
from streamharness.keys import key_str, make_key
from streamharness.records import ConsumedEvent
from streamharness.settings import TritonSettings
from streamharness.stage import StageContext
from streamharness.telemetry import meters
from streamharness.v1 import common_pb2, events_pb2

TRITON = TritonSettings(url="127.0.0.1:1", timeout_s=1.0)  # never dialled: the clients are stand-ins
STREAMS = [make_key("acme", f"cam-{i}") for i in range(3)]


# -- what the encoder stage is driven with ------------------------------------------------------
@dataclass
class Delivered:
    def get(self, timeout: float | None = None) -> None:
        return None


@dataclass
class RecordingOutbox:
    """The stage's outbox: what it published and dead-lettered, in order."""

    sent: list[tuple[str, str, events_pb2.EncodedFrameEvent]] = field(default_factory=list)
    dead: list[tuple[ConsumedEvent, str]] = field(default_factory=list)

    def send(self, topic, key, message, headers=None) -> Delivered:
        self.sent.append((topic, key if isinstance(key, str) else key_str(key), message))
        return Delivered()

    def dead_letter(self, event, reason, error) -> None:
        self.dead.append((event, reason))

    def published(self) -> list[events_pb2.EncodedFrameEvent]:
        return [m for _, _, m in self.sent]


def frame_jpeg(stream: int, seq: int) -> bytes:
    """A test frame whose size names it (JPEG keeps the size exactly): 48 + 8*stream rows, 64 + 8*seq columns."""
    ok, data = cv2.imencode(".jpg", np.full((48 + 8 * stream, 64 + 8 * seq, 3), 128, np.uint8))
    assert ok
    return data.tobytes()


def named(image: np.ndarray) -> tuple[int, int]:
    """(stream, seq) of a decoded test frame."""
    return (image.shape[0] - 48) // 8, (image.shape[1] - 64) // 8


def people_in(stream: int, seq: int) -> int:
    """How many people the stand-in detector finds in a test frame (0..4, differs frame to frame)."""
    return (3 * stream + seq) % 5


def frame_record(key: common_pb2.StreamKey, seq: int, ts_ms: int, jpeg: bytes, *, age_s: float = 0.0,
                 session: str | None = None, offset: int = 0, size: tuple[int, int] = (48, 64)) -> ConsumedEvent[events_pb2.FrameEvent]:
    """A frames record as the host hands it over; ``age_s``: how long ago ingest stamped it."""
    stamped = time.time_ns() - int(age_s * 1e9)
    message = events_pb2.FrameEvent(
        key=key, session_id=session or f"session-{key.stream_id}", media_ts_ms=ts_ms, seq=seq, jpeg=jpeg,
        width=size[1], height=size[0],
        hops=[common_pb2.HopStamp(hop="gateway", wall_unix_ns=stamped - 5_000_000),
              common_pb2.HopStamp(hop="ingest", wall_unix_ns=stamped)],
    )
    return ConsumedEvent(key=key_str(key), message=message, topic="frames", partition=0, offset=offset, headers=(), timestamp_ms=0)


def open_stage(stage: EncoderStage, stopping: threading.Event | None = None) -> RecordingOutbox:
    outbox = RecordingOutbox()
    stage.open(StageContext(outbox=outbox, attempts=1, stopping=stopping or threading.Event()))
    return outbox


def feed(stage: EncoderStage, records: list[ConsumedEvent]) -> None:
    """One delivered batch: each record to ``handle``, then ``end_batch``."""
    for record in records:
        stage.handle(record)
    stage.end_batch()


# -- stand-in clients ---------------------------------------------------------------------------
@dataclass
class Encoding:
    embedding: np.ndarray
    labels: list[tuple[str, float]]


class StandInEncoder:
    def encode(self, images):
        return [Encoding(np.ones(4, np.float32) / 2, [("street sign", 0.5)]) for _ in images]

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


@dataclass
class People:
    boxes: np.ndarray
    scores: np.ndarray
    count: int


class StandInPeople:
    """Finds ``people_in(stream, seq)`` people in a test frame; records (stream, seq) of each frame it saw."""

    def __init__(self, fail_first: int = 0) -> None:
        self.seen: list[tuple[int, int]] = []
        self.fail_first = fail_first
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray) -> People:
        with self._lock:
            if self.fail_first:
                self.fail_first -= 1
                raise DependencyUnavailable("the people detector is away")
            self.seen.append(named(image))
        n = people_in(*named(image))
        return People(np.tile(np.array([[1, 1, 8, 16]], np.float32), (n, 1)), np.full(n, 2.0, np.float32), n)

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass


def stage_with(people: StandInPeople, **settings) -> EncoderStage:
    return EncoderStage(EncoderSettings(**{"max_batch": 16, **settings}), TRITON,
                        encoder_client=StandInEncoder(), people_client=people)


# -- the budget on media time -------------------------------------------------------------------
@pytest.mark.parametrize(("every_s", "fps"), [(2.0, 1.0), (1.0, 2.0), (3.0, 2.0), (0.0, 1.0)])
def test_people_every_s_runs_the_detector_once_per_stream_per_that_much_media_time(every_s: float, fps: float) -> None:
    """20 media seconds of 3 streams, fed live in batches of several streams: a stream's first
    frame is measured, then one frame per ``every_s`` of media time (0: every frame); the frames in
    between carry the stream's last measured count and no boxes."""
    people = StandInPeople()
    stage = stage_with(people, people_every_s=every_s)
    out = open_stage(stage)
    step_ms, seconds = int(1000 / fps), 20
    frames = [(s, seq) for seq in range(int(seconds * fps)) for s in range(len(STREAMS))]
    records = [frame_record(STREAMS[s], seq, seq * step_ms, frame_jpeg(s, seq), offset=i) for i, (s, seq) in enumerate(frames)]
    for start in range(0, len(records), 4):  # batches cut across streams
        feed(stage, records[start:start + 4])

    published = out.published()
    assert [(m.key.stream_id, m.seq) for m in published] == [(STREAMS[s].stream_id, seq) for s, seq in frames], "every frame once, in order"
    calls = Counter(s for s, _ in people.seen)
    every_ms = every_s * 1000
    for s, key in enumerate(STREAMS):
        measured = sorted(seq * step_ms for t, seq in people.seen if t == s)
        assert measured[0] == 0, "a stream's first frame is measured"
        gaps = [b - a for a, b in zip(measured, measured[1:])]
        assert all(g >= every_ms for g in gaps), (key.stream_id, measured)
        # The second measurement comes up to one interval later (streams spread out), the rest on time.
        assert gaps[0] <= 2 * every_ms + step_ms and all(g <= every_ms + step_ms for g in gaps[1:]), (key.stream_id, measured)
        if every_s == 0:
            assert calls[s] == seconds * fps
        else:
            assert seconds / every_s - 1 <= calls[s] <= seconds / every_s + 1, calls
        last_count = None
        for m in (m for m in published if m.key == key):
            if m.media_ts_ms in measured:
                truth = people_in(s, m.seq)
                assert m.person_count == len(m.detections) == truth, (key.stream_id, m.media_ts_ms)
                last_count = truth
            else:
                assert m.person_count == last_count and not m.detections, (key.stream_id, m.media_ts_ms)
            assert m.caption.startswith({0: "no people", 1: "1 person"}.get(m.person_count, f"{m.person_count} people"))
    assert stage.stats.people_detected == len(people.seen)
    assert stage.stats.people_shed_budget == len(published) - len(people.seen)
    assert stage.stats.people_shed_lag == 0


def test_streams_that_start_together_spread_their_detections() -> None:
    """8 streams started at once, 1 FPS, one detection per 4 media seconds each: after the first
    frame, they do not all ask in the same second (the load on the detector stays even)."""
    keys = [make_key("acme", f"lobby-{i}") for i in range(8)]
    people = StandInPeople()
    stage = stage_with(people, people_every_s=4.0)
    out = open_stage(stage)
    for seq in range(16):  # each second's frames of all streams arrive together, as live
        feed(stage, [frame_record(k, seq, seq * 1000, frame_jpeg(0, seq)) for k in keys])
    per_second = Counter(seq for _, seq in people.seen)
    assert per_second[0] == len(keys)
    assert len(people.seen) >= 3 * len(keys)
    assert max(n for seq, n in per_second.items() if seq > 0) < len(keys), per_second
    assert len([seq for seq in per_second if seq > 0]) >= 4, per_second
    assert len(out.published()) == 16 * len(keys)


def test_a_new_session_or_a_step_back_in_media_time_is_measured_at_once_and_carries_nothing_across() -> None:
    people = StandInPeople()
    stage = stage_with(people, people_every_s=10.0)
    out = open_stage(stage)
    key = STREAMS[0]
    # Frames named by seq: people_in(0, seq) = seq people.
    feed(stage, [frame_record(key, 3, 5000, frame_jpeg(0, 3), session="one"),   # measured: 3
                 frame_record(key, 4, 6000, frame_jpeg(0, 4), session="one")])  # carried: 3
    feed(stage, [frame_record(key, 1, 2000, frame_jpeg(0, 1), session="two"),   # new session: measured, 1
                 frame_record(key, 2, 3000, frame_jpeg(0, 2), session="two")])  # carried: 1
    feed(stage, [frame_record(key, 2, 1000, frame_jpeg(0, 2), session="two")])  # back before the measured frame: measured, 2
    counts = [(m.session_id, m.media_ts_ms, m.person_count, len(m.detections)) for m in out.published()]
    assert counts == [("one", 5000, 3, 3), ("one", 6000, 3, 0), ("two", 2000, 1, 1), ("two", 3000, 1, 0), ("two", 1000, 2, 2)]
    assert people.seen == [(0, 3), (0, 1), (0, 2)]


# -- shedding under lag -------------------------------------------------------------------------
def lagging_backlog(frames_per_stream: int, first_seq: int, age_s: float) -> list[ConsumedEvent]:
    """``frames_per_stream`` frames of each stream, interleaved, all stamped by ingest ``age_s`` ago."""
    return [frame_record(STREAMS[s], seq, seq * 1000, frame_jpeg(s, seq), age_s=age_s)
            for seq in range(first_seq, first_seq + frames_per_stream) for s in range(len(STREAMS))]


@pytest.mark.parametrize(("lag_shed_ms", "age_s", "shed"), [(1500, 10.0, True), (1500, 0.0, False), (0, 10.0, False)])
def test_a_lagging_batch_gets_people_detection_only_for_each_streams_newest_frame(lag_shed_ms: int, age_s: float, shed: bool) -> None:
    people = StandInPeople()
    stage = stage_with(people, people_every_s=0.0, lag_shed_ms=lag_shed_ms)
    out = open_stage(stage)
    # One frame per stream (measured), ingested a second before a backlog of 4 per stream that is
    # ``age_s`` old by the time the encoder takes it, in one batch: a live camera's timeline.
    feed(stage, lagging_backlog(1, 0, age_s + 1.0 if age_s else 0.0))
    feed(stage, lagging_backlog(4, 1, age_s))
    published = out.published()
    assert sorted((m.key.stream_id, m.seq) for m in published) == sorted((k.stream_id, q) for q in range(5) for k in STREAMS)
    backlog = published[len(STREAMS):]
    if not shed:
        assert len(people.seen) == 5 * len(STREAMS)
        assert all(len(m.detections) == m.person_count == people_in(STREAMS.index(m.key), m.seq) for m in backlog)
        assert stage.stats.people_shed_lag == 0
        return
    # Shed: the detector ran on the 3 live frames and on each stream's newest backlog frame only.
    assert sorted(people.seen) == sorted((s, seq) for s in range(len(STREAMS)) for seq in (0, 4))
    for s, key in enumerate(STREAMS):
        mine = [m for m in backlog if m.key == key]
        *older, newest = mine
        assert newest.seq == 4 and newest.person_count == len(newest.detections) == people_in(s, 4)
        for m in older:  # carried from the stream's live frame (seq 0), never from the newer one
            assert m.person_count == people_in(s, 0) and not m.detections, (key.stream_id, m.seq)
    assert stage.stats.people_shed_lag == 3 * len(STREAMS)
    assert stage.stats.frames_encoded == 5 * len(STREAMS)


def test_a_stream_lagging_before_its_first_measurement_publishes_no_count() -> None:
    people = StandInPeople()
    stage = stage_with(people, people_every_s=0.0)
    out = open_stage(stage)
    feed(stage, lagging_backlog(3, 0, 10.0))
    for m in out.published():
        s = STREAMS.index(m.key)
        if m.seq < 2:  # unknown: no count, and the caption names no people
            assert (m.person_count, len(m.detections), m.caption) == (0, 0, "street sign")
        else:
            assert m.person_count == len(m.detections) == people_in(s, 2)
            assert m.caption.startswith({0: "no people", 1: "1 person"}.get(m.person_count, f"{m.person_count} people"))
    assert sorted(people.seen) == [(s, 2) for s in range(len(STREAMS))]


def test_a_stream_sent_faster_than_real_time_is_never_lag_shed() -> None:
    people = StandInPeople()
    stage = stage_with(people, people_every_s=0.0, lag_shed_ms=1500)
    open_stage(stage)
    # A recorded file at full speed: a minute of media ingested at once, 10 s ago. Every frame is
    # measured (the same as on an idle machine), none shed for lag.
    feed(stage, [frame_record(STREAMS[0], seq, seq * 1000, frame_jpeg(0, seq), age_s=10.0) for seq in range(60)])
    assert len(people.seen) == 60 and stage.stats.people_shed_lag == 0


def test_shed_work_is_metered(monkeypatch: pytest.MonkeyPatch) -> None:
    """By stage and reason (each frame's lag is the host's to record: tests/unit/test_meters.py)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(meters, "_meter", lambda: provider.get_meter("test"))
    meters.frames_shed.cache_clear()
    try:
        people = StandInPeople()
        stage = stage_with(people, people_every_s=2.0, lag_shed_ms=1500)
        open_stage(stage)
        # Live frames at 0 s and 100 s (both measured: the second is past any first interval), then
        # a batch of 4 lagging ones, 1 s apart: 101 s is not due (people-budget), 102 s and 103 s
        # are due but lag (lag), 104 s is the newest and due: measured.
        # Stamped as a live camera's frames are (media time and ingest stamps advance together).
        feed(stage, [frame_record(STREAMS[0], 0, 0, frame_jpeg(0, 0), age_s=106.0)])
        feed(stage, [frame_record(STREAMS[0], 0, 100_000, frame_jpeg(0, 0), age_s=6.0)])
        feed(stage, [frame_record(STREAMS[0], seq, 100_000 + seq * 1000, frame_jpeg(0, seq), age_s=5.0) for seq in range(1, 5)])
        data = reader.get_metrics_data()
        metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        shed = {(p.attributes["stage"], p.attributes["reason"]): p.value for p in metrics["sh.pipeline.frames_shed"].data.data_points}
        assert shed == {("encoder", "lag"): 2, ("encoder", "people-budget"): 1}
        assert people.seen == [(0, 0), (0, 0), (0, 4)]
    finally:
        meters.frames_shed.cache_clear()


def test_a_redelivered_batch_plans_the_same_detections() -> None:
    """Triton away for the batch's first detection: the batch fails and comes back; the stream's
    budget must not count the failed attempt as a measurement."""
    people = StandInPeople(fail_first=1)
    stopping = threading.Event()
    stopping.set()  # the outage pause returns at once
    stage = stage_with(people, people_every_s=5.0)
    out = open_stage(stage, stopping)
    batch = [frame_record(STREAMS[0], seq + 1, seq * 1000, frame_jpeg(0, seq + 1)) for seq in range(3)]
    with pytest.raises(DependencyUnavailable):
        feed(stage, batch)
    assert out.published() == []
    feed(stage, batch)
    published = out.published()
    assert [m.seq for m in published] == [1, 2, 3]
    assert [len(m.detections) for m in published] == [1, 0, 0]
    assert [m.person_count for m in published] == [1, 1, 1]  # measured at seq 1, carried
    assert people.seen == [(0, 1)]


def test_without_the_people_detector_nothing_is_counted_or_shed() -> None:
    stage = EncoderStage(EncoderSettings(detect_people=False), TRITON, encoder_client=StandInEncoder())
    out = open_stage(stage)
    feed(stage, lagging_backlog(2, 0, 10.0))
    assert [(m.person_count, m.caption) for m in out.published()] == [(0, "street sign")] * 2 * len(STREAMS)
    assert (stage.stats.people_shed_lag, stage.stats.people_shed_budget, stage.stats.people_detected) == (0, 0, 0)


def test_budget_settings_are_described_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamharness.errors import SettingsError
    from streamharness.settings import load_settings

    defaults = EncoderSettings()
    assert defaults.people_every_s > 0 and defaults.lag_shed_ms > 0
    for name in ("people_every_s", "lag_shed_ms"):
        assert EncoderSettings.model_fields[name].description
    monkeypatch.setenv("SH_ENCODER_PEOPLE_EVERY_S", "-1")
    with pytest.raises(SettingsError, match="SH_ENCODER_PEOPLE_EVERY_S"):
        load_settings(EncoderSettings)
    monkeypatch.setenv("SH_ENCODER_PEOPLE_EVERY_S", "0")
    monkeypatch.setenv("SH_ENCODER_LAG_SHED_MS", "2500")
    loaded = load_settings(EncoderSettings)
    assert (loaded.people_every_s, loaded.lag_shed_ms) == (0.0, 2500)
