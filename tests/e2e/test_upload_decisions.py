"""End to end: a whole video file uploaded in a session, decoded by ingest faster than real time,
gets the same per-second decisions and an answer, as the same video's frames pushed one by one
(media time makes that exact: both are decided on the frames' own timestamps)."""

from __future__ import annotations

import asyncio

import cv2
import pytest

from streamharness.client import Session
from streamharness.devinfra.stack import LocalStack
from streamharness.media import sample_path
from streamharness.sources import Puller, SourceSettings
from streamharness.v1 import common_pb2, session_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
LIMIT_MS = 30_000
QUESTION_AT = 20_000


def decoded_frames(video) -> list[tuple[int, bytes]]:
    """The file's frames at 1 per media second as the puller decodes them, PNG (lossless): pushed,
    they reach ingest as the same pixels the upload's decoder gives it."""
    import threading

    from streamharness.v1 import common_pb2 as c

    out: list[tuple[int, bytes]] = []
    puller = Puller(c.Source(upload=True, speed=0), 1.0, SourceSettings(), path=video)
    puller.run(lambda ts, rgb: out.append((ts, cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())),
               lambda status: None, threading.Event())
    return [(ts, png) for ts, png in out if ts <= LIMIT_MS]


def test_an_upload_is_decided_like_the_same_frames_pushed(tmp_path):
    video = sample_path("vtest.avi")
    # The upload: the first LIMIT_MS of vtest, cut without re-encoding by PyAV.
    clip = tmp_path / "vtest-30s.avi"
    import av

    with av.open(str(video)) as src, av.open(str(clip), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            if packet.pts is not None and float(packet.pts * stream.time_base) * 1000 > LIMIT_MS + 500:
                break
            packet.stream = out
            dst.mux(packet)
    frames = decoded_frames(clip)
    instruction = {"walk": "tell me when someone walks in"}

    async def run(stack: LocalStack):
        results = {}
        address = stack.gateway_addresses[0]
        # Pushed as fast as they go, declared a replay (as the player and the eval do): never shed for lag.
        async with Session(address, stream_id="pushed", instructions=instruction, want_decisions=True,
                           pace=common_pb2.PACE_REPLAY) as s:
            await s.ask("How many people are in the street?", at_ms=QUESTION_AT, question_id="q")
            for ts, png in frames:
                await s.send_frame(ts, png, encoding=common_pb2.IMAGE_ENCODING_PNG)
            await s.end()
            results["pushed"] = [m async for m in s]
        async with Session(address, stream_id="uploaded", instructions=instruction, want_decisions=True,
                           source=common_pb2.Source(upload=True, speed=0)) as s:
            await s.ask("How many people are in the street?", at_ms=QUESTION_AT, question_id="q")
            await s.upload(str(clip), chunk_bytes=256 * 1024)
            results["uploaded"] = [m async for m in s]  # the session finishes by itself at the file's end
        return results

    with LocalStack(tmp_path / "stack", extra_env={"SH_GENERATION_MAX_NEW_TOKENS": "12"}) as stack:
        results = asyncio.run(run(stack))

    def decided(msgs):
        return [(m.decision.media_ts_ms, m.decision.respond, m.decision.question_id, m.decision.instruction_id)
                for m in msgs if m.WhichOneof("message") == "decision"]

    def answers(msgs):
        return [m.response for m in msgs if m.WhichOneof("message") == "response" and m.response.question_id == "q" and m.response.final]

    pushed, uploaded = decided(results["pushed"]), decided(results["uploaded"])
    assert len(frames) >= 28
    assert [t for t, *_ in pushed] == [t for t, _ in frames], (pushed, uploaded)  # every second decided, once
    assert uploaded == pushed  # the same seconds, the same choices, the same triggers
    assert any(respond and iid == "walk" for _, respond, _, iid in pushed), "the instruction never fired"
    for name in ("pushed", "uploaded"):
        (answer,) = answers(results[name])
        assert answer.media_ts_ms >= QUESTION_AT and not answer.refusal, (name, answer)
    ended = [m.source for m in results["uploaded"] if m.WhichOneof("message") == "source"]
    assert ended and ended[-1].kind == common_pb2.SourceStatus.KIND_ENDED
    assert results["uploaded"][-1].ack.kind == session_pb2.Ack.KIND_END
