"""Pulled sessions through the gateway and ingest on the real broker: a camera over RTSP (its
publisher killed and restarted mid-stream: the gap is reported to the client), a video file over
HTTP, an upload sent in the session; and every bad source refused with a clear status while a
pushed session beside them goes on."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from kafka import KafkaConsumer

from streamharness import topics
from streamharness.client import Session
from streamharness.devinfra.media import FileServer, Publisher, RtspServer
from streamharness.gateway.service import GatewaySettings, GatewayStage
from streamharness.hosts.kafka import KafkaHost
from streamharness.ingest.service import IngestSettings, IngestStage
from streamharness.kafka import ensure_topics
from streamharness.media import read_video, sample_path
from streamharness.runner import ServiceRunner
from streamharness.settings import ServiceSettings
from streamharness.sources import SourceSettings
from streamharness.topology import TOPOLOGY
from streamharness.v1 import common_pb2, events_pb2, session_pb2, session_pb2_grpc

pytestmark = pytest.mark.integration
K = common_pb2.SourceStatus


@pytest.fixture
def services(kafka_settings, tmp_path):
    ensure_topics(kafka_settings, topics.PIPELINE)
    runners = []

    def serve(service, name):
        runner = ServiceRunner(service, ServiceSettings(service_name=name, grpc_port=0, shutdown_grace_s=3))
        runner.serve()
        runners.append(runner)
        return runner

    sources = SourceSettings(allow_private_networks=True, connect_timeout_s=3, read_timeout_s=3, first_frame_timeout_s=5,
                             reconnect_initial_s=0.3, reconnect_max_s=1.0, max_upload_bytes=3_000_000, upload_dir=tmp_path)
    ingest_stage = IngestStage(IngestSettings(max_pixels=320 * 240), sources)
    ingest = serve(KafkaHost(ingest_stage, TOPOLOGY["ingest"], kafka_settings), "ingest")
    gateway = KafkaHost(GatewayStage(GatewaySettings(replica_id="gw-p", ingest_address=f"127.0.0.1:{ingest.port}", end_grace_s=5,
                                                     allow_anonymous=True, end_wait_for_decision=False, http_port=None)),
                        TOPOLOGY["gateway"], kafka_settings)
    runner = serve(gateway, "gateway")
    deadline = time.monotonic() + 30
    while not gateway.ready():
        assert time.monotonic() < deadline, "gateway never became ready"
        time.sleep(0.1)
    yield f"127.0.0.1:{runner.port}", ingest_stage
    for r in reversed(runners):
        r.request_stop()
        r.shutdown()


def frames_of(kafka_settings, stream: str) -> list[events_pb2.FrameEvent]:
    consumer = KafkaConsumer(kafka_settings.topic(topics.FRAMES), bootstrap_servers=kafka_settings.bootstrap_list,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        return [f for r in consumer if (f := events_pb2.FrameEvent.FromString(r.value)).key.stream_id == stream]
    finally:
        consumer.close()


async def _collect(s: Session, until, timeout: float) -> list[session_pb2.ServerMessage]:
    got: list[session_pb2.ServerMessage] = []

    async def read():
        async for m in s:
            got.append(m)
            if until(got):
                return

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        pass
    return got


def statuses(msgs) -> list[common_pb2.SourceStatus]:
    return [m.source for m in msgs if m.WhichOneof("message") == "source"]


def test_a_camera_over_rtsp_reconnects_after_its_publisher_dies_and_reports_the_gap(services, kafka_settings):
    address, ingest = services
    with RtspServer() as server:
        url = server.url("cam")
        publisher = Publisher(sample_path("vtest.avi"), url)
        publisher.start()

        async def run():
            async with Session(address, stream_id="rtsp-cam", source=common_pb2.Source(url=url, rtsp_transport="tcp")) as s:
                first = await _collect(s, lambda g: any(st.kind == K.KIND_CONNECTED for st in statuses(g)), 20)
                await asyncio.sleep(4)  # a few seconds of frames
                publisher.kill()
                await asyncio.sleep(3)
                publisher.start()
                after = await _collect(s, lambda g: any(st.kind == K.KIND_GAP for st in statuses(g)), 30)
                await asyncio.sleep(2)
                await s.end()
                rest = await _collect(s, lambda g: False, 20)
            return first + after + rest

        msgs = asyncio.run(run())
        publisher.kill()
    kinds = [st.kind for st in statuses(msgs)]
    assert kinds[0] == K.KIND_CONNECTED and K.KIND_RECONNECTING in kinds and K.KIND_GAP in kinds, kinds
    gap = next(st for st in statuses(msgs) if st.kind == K.KIND_GAP)
    assert gap.gap_ms >= 2000, gap  # the publisher was away ~3 s: the media time says so
    assert "@" not in gap.url
    assert msgs[-1].WhichOneof("message") == "ack" and msgs[-1].ack.kind == session_pb2.Ack.KIND_END
    frames = frames_of(kafka_settings, "rtsp-cam")
    ts = [f.media_ts_ms for f in frames]
    assert len(ts) >= 5 and ts == sorted(set(ts)), ts  # one per media second, strictly increasing
    assert any(b - a >= 2000 for a, b in zip(ts, ts[1:])), ts  # the gap is in the media time, not papered over
    assert all(f.width * f.height <= 320 * 240 and f.pace == common_pb2.PACE_LIVE for f in frames)  # a camera: live
    assert ingest.servicer.pull_slots.in_use() == 0  # the puller stopped with the session


def test_a_file_over_http_and_the_same_file_uploaded_give_the_same_frames(services, kafka_settings):
    address, _ = services
    video = sample_path("box.mp4")
    expected = [f.media_ts_ms for f in read_video(video, fps=1.0)]
    with FileServer(video.parent) as files:
        url = files.url(video.name)

        async def run():
            got = {}
            async with Session(address, stream_id="http-file", source=common_pb2.Source(url=url, speed=0)) as s:
                got["http"] = await _collect(s, lambda g: False, 60)  # ends by itself at the file's end
            async with Session(address, stream_id="upload", source=common_pb2.Source(upload=True, speed=0)) as s:
                await s.upload(str(video), chunk_bytes=64 * 1024)
                got["upload"] = await _collect(s, lambda g: False, 60)
            return got

        got = asyncio.run(run())
    seen = {}
    for name, stream in (("http", "http-file"), ("upload", "upload")):
        msgs = got[name]
        assert statuses(msgs)[-1].kind == K.KIND_ENDED, (name, statuses(msgs))
        assert msgs[-1].WhichOneof("message") == "ack" and msgs[-1].ack.kind == session_pb2.Ack.KIND_END
        frames = frames_of(kafka_settings, stream)
        assert all(f.pace == common_pb2.PACE_REPLAY for f in frames)  # a file: never shed for lag, its decisions exact
        seen[name] = [f.media_ts_ms for f in frames]
    # The file's own timestamps (its pts), one frame per media second: the same whichever way it came.
    assert seen["http"] == seen["upload"]
    ts = seen["http"]
    assert len(ts) == len(expected) and all(int(t // 1000) == i for i, t in enumerate(ts)), (ts, expected)


@pytest.mark.parametrize(("source", "code", "words"), [
    (common_pb2.Source(url="file:///etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "SH_SOURCE_ALLOWED_SCHEMES"),
    (common_pb2.Source(url="rtsp://127.0.0.1:9/none"), grpc.StatusCode.UNAVAILABLE, "rtsp://127.0.0.1:9/none"),
    (common_pb2.Source(url="https://example.invalid/x.mp4", upload=True), grpc.StatusCode.INVALID_ARGUMENT, "either url or upload"),
])
def test_a_bad_source_ends_its_session_with_a_clear_status_and_nothing_else(services, source, code, words):
    address, _ = services
    frame = next(iter(read_video(sample_path("vtest.avi"), fps=1.0)))
    import cv2

    jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR))[1].tobytes()

    async def run():
        async with Session(address, stream_id="pushed") as pushed:  # beside it, a pushed session goes on
            await pushed.send_frame(0, jpeg)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async with Session(address, stream_id="bad-source", source=source) as s:
                    await _collect(s, lambda g: False, 20)
            await pushed.send_frame(1000, jpeg)
            await pushed.end()
            acks = [m.ack for m in await _collect(pushed, lambda g: False, 20) if m.WhichOneof("message") == "ack"]
        return err.value, acks

    err, acks = asyncio.run(run())
    assert err.code() == code and words in err.details(), (err.code(), err.details())
    assert [a.seq for a in acks if a.kind == session_pb2.Ack.KIND_FRAME] == [1, 2]


def test_an_upload_that_is_not_a_video_or_too_large_is_refused(services, tmp_path):
    address, _ = services

    async def upload(data: bytes, declared: int = 0):
        async with Session(address, stream_id="bad-upload", source=common_pb2.Source(upload=True, upload_bytes=declared)) as s:
            await s.upload(data, chunk_bytes=256 * 1024)
            await _collect(s, lambda g: False, 20)

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(upload(b"this is not a video at all " * 100))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a video" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(upload(b"\0" * 3_500_000))  # over SH_SOURCE_MAX_UPLOAD_BYTES (3 MB here)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "SH_SOURCE_MAX_UPLOAD_BYTES" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(upload(b"\0" * 1000, declared=10_000_000))  # declared over the limit: refused before any byte is kept
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_pull_command_uploads_a_file_and_prints_what_the_source_did(services):
    from typer.testing import CliRunner

    from streamharness.cli import app

    address, _ = services
    result = CliRunner().invoke(app, ["pull", str(sample_path("box.mp4")), "--gateway", address, "--stream-id", "cli-upload"])
    assert result.exit_code == 0, result.output
    assert "source ended" in result.output and "0 responses" in result.output  # no decision stage here: nothing to say
    bad = CliRunner().invoke(app, ["pull", "/no/such/file.mp4", "--gateway", address])
    assert bad.exit_code != 0 and "neither a URL nor a file" in bad.output


def test_a_resumed_camera_session_goes_on_at_its_own_media_time(services, kafka_settings):
    # The client's call breaks (away); it resumes with its token and the same source: the new
    # puller's media time goes on from the session's origin (in the token), after the old frames.
    address, _ = services
    with RtspServer() as server:
        url = server.url("door")
        publisher = Publisher(sample_path("vtest.avi"), url)
        publisher.start()
        source = common_pb2.Source(url=url)

        async def run():
            async with Session(address, stream_id="resumed-cam", source=source) as first:
                await _collect(first, lambda g: any(st.kind == K.KIND_CONNECTED for st in statuses(g)), 20)
                await asyncio.sleep(3)
                token, session_id = first.resume_token, first.session_id
            await asyncio.sleep(2)  # away: no frames for ~2 s of wall time
            channel = grpc.aio.insecure_channel(address)
            stub = session_pb2_grpc.SessionServiceStub(channel)
            done = asyncio.Event()

            async def requests():
                yield session_pb2.ClientMessage(start=session_pb2.SessionStart(stream_id="resumed-cam", resume_token=token, source=source))
                await done.wait()
                yield session_pb2.ClientMessage(end=session_pb2.SessionEnd())

            call = stub.Stream(requests())
            got = []
            async for m in call:
                got.append(m)
                if any(st.kind == K.KIND_CONNECTED for st in statuses(got)) and len(got) > 1:
                    await asyncio.sleep(3)
                    done.set()
            await channel.close()
            return session_id, got

        session_id, got = asyncio.run(run())
        publisher.kill()
    assert got[0].accepted.resumed and got[0].accepted.session_id == session_id
    frames = frames_of(kafka_settings, "resumed-cam")
    assert {f.session_id for f in frames} == {session_id}
    ts = [f.media_ts_ms for f in frames]
    assert ts == sorted(set(ts)), ts  # strictly increasing across the two calls
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert max(gaps) >= 2000, ts  # the away time is missing media time, not folded away
