"""The encoder service against a real Kafka broker and a real tritonserver (frame encoder + people
detector): real vtest.avi frames of two streams in, EncodedFrameEvents out.

The service runs in-process through its own lifecycle (load, start, ready, stop), as the runner
would drive it.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from streamharness import topics
from streamharness.devinfra.triton_server import TritonServer
from streamharness.errors import InvalidInput
from streamharness.hosts.kafka import KafkaHost
from streamharness.topology import TOPOLOGY
from streamharness.kafka import DLQ_ERROR, DLQ_REASON, DLQ_SOURCE_OFFSET, ConsumedEvent, EventConsumer, EventProducer, client_config, ensure_topics
from streamharness.keys import key_str, make_key
from streamharness.media import read_video, sample_path
from streamharness.settings import KafkaSettings, TritonSettings
from streamharness.v1 import common_pb2, events_pb2
from tests.integration.test_people_detector import PEOPLE_DETECTOR, wait_for_model

pytestmark = pytest.mark.integration

STREAM_A = make_key("acme", "cam-a")
STREAM_B = make_key("acme", "cam-b")
SECONDS_A = range(10, 16)  # vtest.avi seconds, one frame each; people walk through every second
SECONDS_B = range(40, 46)
CORRUPT_SEQ = 3  # stream A's 4th frame is replaced by bytes that are not a JPEG


def jpeg(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def frame_event(key: common_pb2.StreamKey, seq: int, ts_ms: int, data: bytes, size: tuple[int, int]) -> events_pb2.FrameEvent:
    return events_pb2.FrameEvent(
        key=key, session_id=f"session-{key.stream_id}", media_ts_ms=ts_ms, seq=seq, jpeg=data,
        width=size[1], height=size[0],
        hops=[common_pb2.HopStamp(hop="gateway", wall_unix_ns=time.time_ns()),
              common_pb2.HopStamp(hop="ingest", wall_unix_ns=time.time_ns())],
    )


@pytest.fixture(scope="module")
def vtest_frames() -> dict[int, np.ndarray]:
    wanted = set(SECONDS_A) | set(SECONDS_B)
    return {f.media_ts_ms // 1000: f.rgb for f in read_video(sample_path("vtest.avi"), fps=1) if f.media_ts_ms // 1000 in wanted}


@pytest.fixture(scope="module")
def both_models(triton_server: TritonServer) -> TritonServer:
    wait_for_model(triton_server, PEOPLE_DETECTOR)
    return triton_server


def stream_frames(key: common_pb2.StreamKey, seconds: range, frames: dict[int, np.ndarray], corrupt_seq: int | None = None):
    out = []
    for seq, second in enumerate(seconds):
        rgb = frames[second]
        data = jpeg(rgb)
        if seq == corrupt_seq:
            data = data[: len(data) // 2][::-1]  # a real frame's bytes, cut and scrambled
        out.append(frame_event(key, seq, second * 1000, data, rgb.shape[:2]))
    return out


class Collector:
    """Reads a topic with its own consumer group, in a thread, until stopped."""

    def __init__(self, kafka: KafkaSettings, topic: str, message_type, group: str) -> None:
        self.events: list[ConsumedEvent] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._consumer = EventConsumer(kafka, group_id=group, topics=[topic], message_type=message_type, handler=self._add)
        self._thread = threading.Thread(target=self._consumer.run, args=(self._stop,), daemon=True)
        self._thread.start()

    def _add(self, event: ConsumedEvent) -> None:
        with self._lock:
            self.events.append(event)

    def wait_for(self, count: int, timeout_s: float) -> list[ConsumedEvent]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.events) >= count:
                    return list(self.events)
            time.sleep(0.2)
        with self._lock:
            return list(self.events)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def committed_offsets(kafka: KafkaSettings, group: str, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """(committed offset, end offset) per partition of ``topic`` for consumer group ``group``."""
    consumer = KafkaConsumer(**client_config(kafka), group_id=kafka.topic(group), enable_auto_commit=False)
    try:
        full = kafka.topic(topic)
        parts = [TopicPartition(full, p) for p in sorted(consumer.partitions_for_topic(full) or [])]
        ends = consumer.end_offsets(parts)
        return {tp.partition: consumer.committed(tp) or 0 for tp in parts}, {tp.partition: ends[tp] for tp in parts}
    finally:
        consumer.close()


@pytest.fixture
def encoder_service(kafka_settings: KafkaSettings, triton_settings: TritonSettings, both_models: TritonServer) -> Iterator:
    from streamharness.encoder import EncoderSettings, EncoderStage

    # People on every frame (no budget, no shedding: a backlog waits here while the service starts);
    # the budget and the shedding are tested below.
    service = KafkaHost(EncoderStage(
        EncoderSettings(max_batch=4, max_wait_ms=50, detect_concurrency=2, consumer_group="encoder", people_every_s=0, lag_shed_ms=0),
        triton_settings,
    ), TOPOLOGY["encoder"], kafka_settings)
    yield service
    service.stop(time.monotonic() + 30)  # idempotent when the test stopped it already


def test_encodes_every_frame_of_two_streams_in_order_and_dead_letters_a_corrupt_one(
    encoder_service, kafka_settings: KafkaSettings, vtest_frames: dict[int, np.ndarray]
) -> None:
    from streamharness.encoder.service import decode_jpeg

    a = stream_frames(STREAM_A, SECONDS_A, vtest_frames, corrupt_seq=CORRUPT_SEQ)
    b = stream_frames(STREAM_B, SECONDS_B, vtest_frames)
    with pytest.raises(InvalidInput):
        decode_jpeg(a[CORRUPT_SEQ].jpeg)  # the test's corrupt frame really is undecodable
    interleaved = [f for pair in zip(a, b) for f in pair]
    backlog, live = interleaved[:-4], interleaved[-4:]
    expected = {(key_str(f.key), f.seq): f for f in interleaved if not (f.key == STREAM_A and f.seq == CORRUPT_SEQ)}

    ensure_topics(kafka_settings, [topics.FRAMES, topics.EMBEDDINGS])
    embeddings = Collector(kafka_settings, topics.EMBEDDINGS, events_pb2.EncodedFrameEvent, "test-embeddings")
    dead = Collector(kafka_settings, kafka_settings.dead_letter_topic, events_pb2.FrameEvent, "test-dead-letters")
    producer = EventProducer(kafka_settings, client_id="test-frames")
    try:
        # A backlog before the service starts (it must micro-batch across both streams), the rest live.
        for f in backlog:
            producer.send(topics.FRAMES, f.key, f)
        producer.flush(30)
        encoder_service.load()
        encoder_service.start()
        deadline = time.monotonic() + 60
        while not encoder_service.ready():
            assert time.monotonic() < deadline, "the encoder service never became ready"
            time.sleep(0.2)
        for f in live:
            producer.send(topics.FRAMES, f.key, f).get(30)

        got = embeddings.wait_for(len(expected), timeout_s=240)
        dead_letters = dead.wait_for(1, timeout_s=30)
        encoder_service.stop(time.monotonic() + 60)
    finally:
        producer.close()
        embeddings.close()
        dead.close()

    # Every decodable frame arrives exactly once, keyed by its stream, each stream in order.
    received = [(e.key, e.message.seq) for e in got]
    assert sorted(received) == sorted(expected), f"missing {set(expected) - set(received)}, extra {set(received) - set(expected)}"
    per_key: dict[str, list[int]] = defaultdict(list)
    for e in got:
        per_key[e.key].append(e.message.seq)
    assert per_key[key_str(STREAM_A)] == [s for s in range(len(SECONDS_A)) if s != CORRUPT_SEQ]
    assert per_key[key_str(STREAM_B)] == list(range(len(SECONDS_B)))
    # Frames of both streams shared Triton requests.
    assert encoder_service.stage.stats.largest_batch > 1
    assert encoder_service.stage.stats.largest_batch <= 4

    for e in got:
        out: events_pb2.EncodedFrameEvent = e.message
        src = expected[(e.key, out.seq)]
        assert e.key == key_str(out.key) == key_str(src.key)
        assert (out.session_id, out.media_ts_ms) == (src.session_id, src.media_ts_ms)
        assert [h.hop for h in out.hops] == ["gateway", "ingest", "encoder"]
        assert out.hops[-1].wall_unix_ns >= out.hops[-2].wall_unix_ns
        vector = np.asarray(out.embedding, np.float32)
        assert vector.shape == (1280,) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
        assert out.embedding_model == "frame_encoder"
        assert len(out.labels) == 5 and out.labels[0].score >= out.labels[-1].score
        # Pedestrians walk through every second of vtest.avi (the detector finds 3-9 per second).
        assert out.person_count >= 1, f"{e.key} at {out.media_ts_ms} ms: nobody found"
        assert len(out.detections) == out.person_count
        for d in out.detections:
            assert d.label == "person" and d.score > 0
            assert 0 <= d.x + d.width / 2 <= src.width and 0 <= d.y + d.height / 2 <= src.height
        people = "1 person" if out.person_count == 1 else f"{out.person_count} people"
        assert out.caption.startswith(f"{people}; "), out.caption
        assert out.labels[0].name.split(",")[0].strip() in out.caption
    assert sum(e.message.person_count for e in got) >= 2 * len(got), "about 5 people per vtest second, not 1"

    # The corrupt frame went to the dead-letter topic, once, saying why.
    assert len(dead_letters) == 1, [(d.key, d.message.seq) for d in dead_letters]
    letter = dead_letters[0]
    assert (letter.key, letter.message.seq) == (key_str(STREAM_A), CORRUPT_SEQ)
    assert letter.header(DLQ_REASON) == b"handler-failed"
    assert b"JPEG" in (letter.header(DLQ_ERROR) or b"")
    assert letter.header(DLQ_SOURCE_OFFSET) is not None
    assert encoder_service.stage.stats.frames_undecodable == 1
    assert encoder_service.stage.stats.frames_encoded == len(expected)

    # stop() drained and committed: the group has nothing left to read.
    committed, ends = committed_offsets(kafka_settings, "encoder", topics.FRAMES)
    assert committed == ends and sum(ends.values()) == len(interleaved)
    assert not encoder_service.ready()


def test_frames_wait_for_triton_instead_of_being_lost(kafka_settings: KafkaSettings) -> None:
    """Triton unreachable: nothing is published, dead-lettered or committed; the batch is redelivered."""
    from streamharness.devinfra.common import free_port
    from streamharness.encoder import EncoderSettings, EncoderStage

    away = TritonSettings(url=f"127.0.0.1:{free_port()}", timeout_s=2.0)
    service = KafkaHost(EncoderStage(EncoderSettings(max_batch=4, max_wait_ms=0), away), TOPOLOGY["encoder"], kafka_settings)
    rgb = np.full((96, 128, 3), 90, np.uint8)
    frames = [frame_event(STREAM_A, seq, seq * 1000, jpeg(rgb), rgb.shape[:2]) for seq in range(3)]
    try:
        service.load()
        with EventProducer(kafka_settings, client_id="test-frames") as producer:
            for f in frames:
                producer.send(topics.FRAMES, f.key, f)
            producer.flush(30)
        service.start()
        deadline = time.monotonic() + 60
        # Each delivery decodes the 3 frames again: 6 means the failed batch came back.
        while service.processed < 2 * len(frames):
            assert time.monotonic() < deadline, f"the batch was not redelivered ({service.processed} handled)"
            time.sleep(0.2)
        assert not service.ready()
    finally:
        service.stop(time.monotonic() + 30)
    assert service.stage.stats.frames_encoded == 0 and service.stage.stats.frames_failed == 0
    assert service.dead_lettered == 0
    committed, ends = committed_offsets(kafka_settings, "encoder", topics.FRAMES)
    assert sum(ends.values()) == len(frames) and sum(committed.values()) == 0, "nothing may be committed"


def test_sigterm_finishes_the_batch_commits_and_exits_zero(
    kafka_settings: KafkaSettings, triton_settings: TritonSettings, both_models: TritonServer,
    vtest_frames: dict[int, np.ndarray], tmp_path,
) -> None:
    """The entry point under the runner: SIGTERM → the batch in hand is published, exactly what was
    published is committed, exit 0."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    frames = stream_frames(STREAM_B, SECONDS_B, vtest_frames)
    ensure_topics(kafka_settings, [topics.FRAMES, topics.EMBEDDINGS])
    with EventProducer(kafka_settings, client_id="test-frames") as producer:
        for f in frames:
            producer.send(topics.FRAMES, f.key, f)
        producer.flush(30)
    embeddings = Collector(kafka_settings, topics.EMBEDDINGS, events_pb2.EncodedFrameEvent, "test-embeddings")
    env = {
        **os.environ,
        "SH_GRPC_PORT": "0",
        "SH_SHUTDOWN_GRACE_S": "60",
        "SH_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "SH_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "SH_TRITON_URL": triton_settings.url,
        "SH_TRITON_TIMEOUT_S": "60",
        "SH_ENCODER_MAX_BATCH": "2",
        "SH_ENCODER_DETECT_CONCURRENCY": "2",
    }
    proc = subprocess.Popen([sys.executable, str(root / "services/encoder/main.py")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(embeddings.wait_for(2, timeout_s=0.5)) < 2:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the encoder service published nothing"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(2)  # let the reader see what the last batch published
    embeddings.close()
    assert proc.returncode == 0, out
    assert "encoder stopped" in out, out
    seqs = [e.message.seq for e in embeddings.events]
    assert seqs == list(range(len(seqs))), "in order, no duplicates"
    committed, _ = committed_offsets(kafka_settings, "encoder", topics.FRAMES)
    assert sum(committed.values()) == len(seqs), "committed exactly what was published"


# -- the people detector's budget and shedding, with the real models ------------------------------
class SlowPeopleDetector:
    """The real people-detector client, slowed on purpose (each call waits ``delay_s`` first, as a
    detector behind on its queue answers), counting the frames it was asked about."""

    def __init__(self, client, delay_s: float) -> None:
        self.client = client
        self.delay_s = delay_s
        self.calls = 0
        self._lock = threading.Lock()

    def detect(self, image: np.ndarray):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)
        return self.client.detect(image)

    def ready(self) -> bool:
        return self.client.ready()

    def close(self) -> None:
        self.client.close()


def encoder_stage(triton_settings: TritonSettings, delay_s: float, **settings):
    from streamharness.encoder import EncoderSettings, EncoderStage
    from streamharness.people_client import PeopleDetectorClient

    slow = SlowPeopleDetector(PeopleDetectorClient(triton_settings, PEOPLE_DETECTOR), delay_s)
    stage = EncoderStage(EncoderSettings(max_batch=16, detect_concurrency=2, **settings), triton_settings, people_client=slow)
    return stage, slow


SHED_STREAMS = [(make_key("acme", "slow-a"), SECONDS_A), (make_key("acme", "slow-b"), SECONDS_B), (make_key("acme", "slow-c"), SECONDS_A)]


def test_shedding_keeps_latency_bounded_when_the_detector_is_slowed_on_purpose(
    triton_settings: TritonSettings, both_models: TritonServer, vtest_frames: dict[int, np.ndarray]
) -> None:
    """Three streams: one live frame each, then a backlog of 5 each that ingest stamped 10 s ago,
    in one batch, with a detector that takes an extra 0.3 s a call. Shedding (the default
    SH_ENCODER_LAG_SHED_MS) runs the slow detector on each stream's newest backlog frame only — 3
    slow calls on the batch's path instead of 15 — and still publishes every frame, once, in order;
    the frames it skipped carry their stream's count from the live frame."""
    from tests.unit.test_encoder_shedding import feed, frame_record, open_stage

    def run(lag_shed_ms: int):
        stage, slow = encoder_stage(triton_settings, 0.3, people_every_s=0, lag_shed_ms=lag_shed_ms)
        out = open_stage(stage)
        live, backlog = [], []
        for key, seconds in SHED_STREAMS:
            for seq, second in enumerate(seconds):
                rgb = vtest_frames[second]
                # A live camera's timeline: the first frame ingested 11 s ago, the backlog a second later.
                record = frame_record(key, seq, seq * 1000, jpeg(rgb), age_s=11.0 if seq == 0 else 10.0, size=rgb.shape[:2])
                (live if seq == 0 else backlog).append(record)
        backlog.sort(key=lambda r: r.message.seq)  # interleaved, as partitions share a fetch
        try:
            feed(stage, live)
            calls_live = slow.calls
            started = time.perf_counter()
            feed(stage, backlog)
            wall = time.perf_counter() - started
        finally:
            stage.close(time.monotonic() + 10)
        return stage, out.published(), calls_live, slow.calls - calls_live, wall

    shed_stage, shed, shed_live, shed_calls, shed_wall = run(1500)
    full_stage, full, full_live, full_calls, full_wall = run(0)
    print(f"backlog of {len(SHED_STREAMS) * 5} frames: shed {shed_wall:.1f} s ({shed_calls} detector calls), "
          f"unshed {full_wall:.1f} s ({full_calls} calls)")

    frames_per_stream = len(SECONDS_A)
    for published in (shed, full):
        # Every frame published once, each stream in order (memory keeps them all).
        for key, _ in SHED_STREAMS:
            assert [m.seq for m in published if m.key == key] == list(range(frames_per_stream))
        assert len(published) == len(SHED_STREAMS) * frames_per_stream
    assert shed_live == full_live == len(SHED_STREAMS), "live frames are measured either way"
    assert full_calls == len(SHED_STREAMS) * (frames_per_stream - 1)
    assert shed_calls == len(SHED_STREAMS), "one slow call per stream on the lagging batch's path"
    assert shed_stage.stats.people_shed_lag == len(SHED_STREAMS) * (frames_per_stream - 2)
    assert full_stage.stats.people_shed_lag == 0

    measured_full = {(m.key.stream_id, m.seq): m.person_count for m in full}
    for key, _ in SHED_STREAMS:
        mine = [m for m in shed if m.key == key]
        first, *skipped, newest = mine
        for m in (first, newest):  # measured: the real detector's people, with their boxes
            assert m.person_count >= 1 and len(m.detections) == m.person_count
            assert m.person_count == measured_full[(key.stream_id, m.seq)]
        for m in skipped:  # carried from the live frame, no boxes; still encoded
            assert m.person_count == first.person_count and not m.detections, (key.stream_id, m.seq)
            assert len(m.embedding) == 1280 and m.caption.startswith(f"{m.person_count} people" if m.person_count > 1 else "1 person")


def test_people_every_s_bounds_detector_calls_per_stream_on_real_frames(
    triton_settings: TritonSettings, both_models: TritonServer, vtest_frames: dict[int, np.ndarray]
) -> None:
    """Two live streams of 6 vtest.avi seconds at 1 FPS with SH_ENCODER_PEOPLE_EVERY_S=2: each
    stream's detector calls are at least 2 media seconds apart (3 at most in 6 s, not 6), its first
    frame is measured, and every other frame carries the last measured count."""
    from tests.unit.test_encoder_shedding import feed, frame_record, open_stage

    stage, slow = encoder_stage(triton_settings, 0.0, people_every_s=2.0)
    out = open_stage(stage)
    streams = SHED_STREAMS[:2]
    try:
        for seq in range(len(SECONDS_A)):  # live: each second's frames of both streams together
            records = []
            for key, seconds in streams:
                rgb = vtest_frames[seconds[seq]]
                records.append(frame_record(key, seq, seq * 1000, jpeg(rgb), size=rgb.shape[:2]))
            feed(stage, records)
    finally:
        stage.close(time.monotonic() + 10)
    published = out.published()
    assert len(published) == len(streams) * len(SECONDS_A)
    assert slow.calls == stage.stats.people_detected <= len(streams) * 3
    for key, _ in streams:
        mine = [m for m in published if m.key == key]
        measured = [m for m in mine if m.detections]
        assert measured and measured[0].seq == 0
        assert all(b.media_ts_ms - a.media_ts_ms >= 2000 for a, b in zip(measured, measured[1:]))
        assert 2 <= len(measured) <= 3, [m.media_ts_ms for m in measured]
        last = None
        for m in mine:
            if m.detections:
                assert len(m.detections) == m.person_count >= 1
                last = m.person_count
            else:
                assert m.person_count == last, (key.stream_id, m.seq)
