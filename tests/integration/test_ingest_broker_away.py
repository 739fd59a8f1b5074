"""Ingest while the broker goes away and comes back (a broker of this test's own, stopped and
restarted on the same port and data folder): a frame that cannot be published is answered
STATUS_UNAVAILABLE with the reason and the IngestFrames call goes on; once the broker is back the
same frame can be sent again and later frames are published, in order, none twice."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator

import cv2
import grpc
import numpy as np
import pytest
from kafka import KafkaConsumer

from streamharness import topics
from streamharness.auth import AuthSettings, InternalTokens
from streamharness.devinfra.kafka_broker import KafkaBroker
from streamharness.hosts.kafka import KafkaHost
from streamharness.ingest.service import IngestSettings, IngestStage
from streamharness.kafka import ensure_topics
from streamharness.runner import ServiceRunner
from streamharness.settings import KafkaSettings, ServiceSettings, load_settings
from streamharness.topology import TOPOLOGY
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2, ingest_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

R = ingest_pb2.IngestFrameResult
KEY = common_pb2.StreamKey(tenant="acme", stream_id="cam-away")
#: How long the test waits for the restarted broker to take frames again (the producer reconnects with
#: a growing backoff, up to kafka-python's reconnect_backoff_max_ms of 30 s): a bound, not a timing assert.
BACK_WITHIN_S = 180.0


def restart(broker: KafkaBroker) -> None:
    """Start a stopped broker again on its port and data folder (the topics and records are kept)."""
    assert not broker.is_running() and broker.port and broker.work_dir is not None
    broker.start()


@pytest.fixture
def broker(tmp_path) -> Iterator[KafkaBroker]:
    """A broker of this test's own (the session's is shared: stopping it would break other tests)."""
    b = KafkaBroker(tmp_path / "kafka", show_progress=False)  # a work dir of ours: kept across stop/start
    b.start()
    try:
        yield b
    finally:
        b.stop()


def jpeg(grey: int) -> bytes:
    return cv2.imencode(".jpg", np.full((48, 64, 3), grey, np.uint8))[1].tobytes()


class Call:
    """One IngestFrames call, a frame in and its result out at a time."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.requests: queue.Queue[ingest_pb2.IngestFrameRequest | None] = queue.Queue()
        tokens = InternalTokens(AuthSettings(), "gateway")
        self.results = ingest_pb2_grpc.IngestServiceStub(self.channel).IngestFrames(
            iter(self.requests.get, None), metadata=tokens.metadata(KEY.tenant, "ingest"), timeout=500)
        self.seq = 0

    def frame(self, media_ts_ms: int) -> ingest_pb2.IngestFrameResult:
        self.seq += 1
        self.requests.put(ingest_pb2.IngestFrameRequest(
            key=KEY, session_id="s-1", media_ts_ms=media_ts_ms, image=jpeg(media_ts_ms // 1000 % 200),
            encoding=common_pb2.IMAGE_ENCODING_JPEG, seq=self.seq, decision_fps=1.0))
        result = next(self.results)
        assert (result.seq, result.media_ts_ms) == (self.seq, media_ts_ms)
        return result

    def end(self) -> list[ingest_pb2.IngestFrameResult]:
        self.requests.put(None)
        rest = list(self.results)  # raises if the call ended with a status other than OK
        self.channel.close()
        return rest


def published_media_times(kafka: KafkaSettings) -> list[int]:
    consumer = KafkaConsumer(kafka.topic(topics.FRAMES), bootstrap_servers=kafka.bootstrap_list,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=5000)
    try:
        return [events_pb2.FrameEvent.FromString(r.value).media_ts_ms for r in consumer]
    finally:
        consumer.close()


def test_the_broker_away_is_unavailable_per_frame_and_the_call_goes_on(broker: KafkaBroker) -> None:
    kafka = load_settings(KafkaSettings, bootstrap_servers=broker.bootstrap_servers, security_protocol="PLAINTEXT",
                          topic_prefix=f"t{uuid.uuid4().hex[:12]}.", partitions=1)
    ensure_topics(kafka, [topics.FRAMES])
    runner = ServiceRunner(KafkaHost(IngestStage(IngestSettings(publish_timeout_s=2.0)), TOPOLOGY["ingest"], kafka),
                           ServiceSettings(service_name="ingest", grpc_port=0, shutdown_grace_s=5))
    runner.serve()
    try:
        call = Call(f"127.0.0.1:{runner.port}")
        assert call.frame(0).status == R.STATUS_PUBLISHED

        broker.stop()
        away = call.frame(1000)  # waits SH_INGEST_PUBLISH_TIMEOUT_S, then the call goes on
        assert away.status == R.STATUS_UNAVAILABLE, away
        assert away.error.startswith("the frames topic is unavailable (KafkaTimeoutError); frame seq 2 at 1000 ms was not "
                                     "acknowledged within 2 s (SH_INGEST_PUBLISH_TIMEOUT_S)"), away.error
        assert away.error.endswith("The stream goes on: frames are published again once the broker is back")
        held = call.frame(2000)  # not sent at all while the earlier one is unresolved
        assert held.status == R.STATUS_UNAVAILABLE and "was not sent" in held.error, held
        assert call.frame(2000).status == R.STATUS_UNAVAILABLE  # the same frame again: not "out of order"

        restart(broker)
        # The client sends the frame of 2000 ms again until it is taken (a frame answered UNAVAILABLE
        # is not taken by the resampler, so the same media time is not refused as out of order).
        deadline = time.monotonic() + BACK_WITHIN_S
        answers = []
        while True:
            answers.append(call.frame(2000))
            if answers[-1].status == R.STATUS_PUBLISHED:
                break
            assert answers[-1].status == R.STATUS_UNAVAILABLE, answers[-1]
            assert time.monotonic() < deadline, f"no frame published {BACK_WITHIN_S:g} s after the broker restarted: {answers[-1].error}"
            time.sleep(0.5)
        assert call.frame(3000).status == R.STATUS_PUBLISHED
        assert call.frame(3500).status == R.STATUS_SKIPPED  # the resampler goes on as before (1 per media second)
        assert call.frame(4000).status == R.STATUS_PUBLISHED
        assert call.end() == []  # the call ended OK
    finally:
        runner.request_stop()
        runner.shutdown()

    times = published_media_times(kafka)
    # Everything answered PUBLISHED is on the topic, in order, once. The one frame whose send timed
    # out (1000 ms) may have been delivered late, when the broker came back: nothing else answered
    # UNAVAILABLE was published.
    assert times in ([0, 2000, 3000, 4000], [0, 1000, 2000, 3000, 4000]), times
