"""End to end: real videos through the running services (Kafka broker, tritonserver, KServe
generator, gateway ×2, ingest, encoder, decision, memory, summariser, responder as separate processes)."""

from __future__ import annotations

import asyncio
import time

import cv2
import pytest
from kafka import KafkaConsumer

from streamharness.devinfra.stack import LocalStack
from streamharness.media import read_video, sample_path
from streamharness.player import TimedQuestion, play
from streamharness.v1 import events_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    # Short answers keep a CPU-only run bounded; the platform's behaviour does not depend on length.
    with LocalStack(tmp_path_factory.mktemp("stack"), gateways=2,
                    extra_env={"SH_GENERATION_MAX_NEW_TOKENS": "16", "SH_DECISION_REFRACTORY_S": "30"}) as s:
        yield s


def encoded_frames(stack: LocalStack, key: str, expect: int, timeout_s: float = 180) -> list[events_pb2.EncodedFrameEvent]:
    """The encoder's output for one stream, once it has caught up (the people detector is the
    slowest hop on a CPU; a question can be answered at session end before every frame is encoded)."""
    consumer = KafkaConsumer("embeddings", bootstrap_servers=stack.broker.bootstrap_servers,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    out: dict[int, events_pb2.EncodedFrameEvent] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                for r in records:
                    if r.key.decode() == key:
                        e = events_pb2.EncodedFrameEvent.FromString(r.value)
                        out[e.media_ts_ms] = e
    finally:
        consumer.close()
    return [out[t] for t in sorted(out)]


def test_proactive_alert_and_answer_on_vtest(stack):
    question = TimedQuestion(20_000, "How many people do you see?")
    result = asyncio.run(play(stack.gateway_addresses[0], sample_path("vtest.avi"), stream_id="vtest-e2e",
                              questions=[question], watch_for=["tell me when someone walks in"],
                              speed=4.0, send_fps=2.0, limit_s=30))
    assert result.frames_sent >= 55 and 28 <= result.frames_sampled <= 32  # resampled to 1 per media second
    frames = encoded_frames(stack, "default/vtest-e2e", expect=result.frames_sampled)
    assert len(frames) == result.frames_sampled
    first_person = next(f.media_ts_ms for f in frames if f.person_count > 0)

    alerts = [r for r in result.responses if r.proactive]
    assert alerts, "no proactive response"
    assert all(r.media_ts_ms >= first_person for r in alerts), "alerted before anyone was detected"
    assert alerts[0].media_ts_ms <= first_person + 2000, "alert came too late after the first person"
    assert alerts[0].text.strip()

    (qid,) = result.question_ids
    answers = [r for r in result.responses if r.question_id == qid]
    assert len(answers) == 1 and answers[0].text.strip()
    assert answers[0].media_ts_ms >= question.at_ms, "answered before it was asked (media time)"
    assert answers[0].first_chunk_wall > result.asked_wall[qid], "first token before the question was sent"


def test_damaged_frames_are_reported_and_the_stream_goes_on(stack, tmp_path):
    # Corrupt every 7th JPEG of a real video (truncated, as a broken camera upload would be).
    async def run():
        from streamharness.client import Session

        errors, acked = [], []
        async with Session(stack.gateway_addresses[1], stream_id="damaged") as s:
            for i, frame in enumerate(read_video(sample_path("vtest.avi"), fps=1.0)):
                if i >= 12:
                    break
                jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
                await s.send_frame(frame.media_ts_ms, jpeg[: len(jpeg) // 3] if i % 7 == 3 else jpeg)
            await s.end()
            async for msg in s:
                if msg.WhichOneof("message") == "error":
                    errors.append(msg.error)
                elif msg.WhichOneof("message") == "ack" and msg.ack.kind == msg.ack.KIND_FRAME:
                    acked.append(msg.ack.seq)
        return errors, acked

    errors, acked = asyncio.run(run())
    assert sorted(e.seq for e in errors) == [4, 11]  # seq is 1-based
    assert all(not e.fatal and e.code == 3 and "cannot decode JPEG" in e.message for e in errors)
    assert set(acked) == set(range(1, 13)) - {4, 11}


def test_damaged_video_file_streams_to_the_end(stack):
    result = asyncio.run(play(stack.gateway_addresses[0], sample_path("Megamind_bugy.avi"), stream_id="bugy",
                              speed=0, send_fps=1.0))
    # OpenCV decodes the file up to its damage (9 of Megamind.avi's 12 seconds); every decoded frame
    # goes through, and the session ends normally.
    good = sum(1 for _ in read_video(sample_path("Megamind_bugy.avi"), fps=1.0))
    assert good >= 5
    assert result.frames_sent == good == result.frames_sampled
    assert not result.errors


def test_two_gateway_replicas_route_responses_to_their_own_sessions(stack):
    async def both():
        return await asyncio.gather(*[
            play(address, sample_path("vtest.avi"), stream_id=f"replica-{i}", speed=0, send_fps=1.0, limit_s=8,
                 questions=[TimedQuestion(5_000, f"What is in view, session {i}?")])
            for i, address in enumerate(stack.gateway_addresses)
        ])

    results = asyncio.run(both())
    for res in results:
        (qid,) = res.question_ids
        assert [r.question_id for r in res.responses] == [qid], "a session got another session's responses"


def test_stream_cli_prints_timed_answers(stack):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "streamharness.cli", "stream", "vtest.avi", "--gateway", stack.gateway_addresses[0],
         "--speed", "0", "--limit-s", "6", "--stream-id", "cli", "--ask", "3:what do you see?"],
        capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    import re

    answers = [float(t) for t in re.findall(r"t=\s*([0-9.]+)s answer", out)]
    assert len(answers) == 1 and answers[0] >= 3.0, out
    assert "0 rejected frames" in out


def test_bad_ask_spec_is_a_usage_error():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "streamharness.cli", "stream", "vtest.avi", "--ask", "soon:hello"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "SECONDS:QUESTION" in proc.stderr


def test_streaming_eval_replays_an_episode_through_the_services(stack, tmp_path):
    """Streaming-Eval end to end: an episode on vtest.avi through the running gateway, scored on time."""
    from streamharness.eval.episode import parse_episode
    from streamharness.eval.report import write_report
    from streamharness.eval.runner import run_episode_via_gateway
    from streamharness.eval.scoring import score_run

    episode = parse_episode({
        "episode_id": "vtest-short", "video": "opencv-doc:vtest.avi", "duration_s": 10, "source": "opencv-doc",
        "events": [
            # The detector counts people from the first second of vtest.avi.
            {"type": "instruction", "event_id": "walk-in", "given_at_s": 0, "text": "tell me when someone walks in",
             "windows": [[0, 2]], "mode": "proactive", "position": "forward"},
            {"type": "question", "event_id": "count", "ask_at_s": 5, "text": "Are there people in the street?",
             "window": [5, 10], "choices": ["yes", "no"], "answer_index": 0, "mode": "punctual", "position": "present"},
        ],
    })
    run = asyncio.run(run_episode_via_gateway(stack.gateway_addresses[0], episode, speed=0, send_fps=1.0))
    score = score_run([episode], [run])
    proactive = score.cell("proactive", "forward")
    assert (proactive.tp, proactive.fn) == (1, 0), run.responses
    punctual = score.cell("punctual", "present")
    assert punctual.tp + punctual.fn == 1  # the question was scored (a 135M model may pick either letter)
    answers = [r for r in run.responses if r.event_id == "count"]
    assert len(answers) == 1 and 5 <= answers[0].media_ts_s <= 10 and answers[0].ttft_ms > 0
    html = write_report(tmp_path / "report.html", score).read_text()
    assert "proactive" in html and "punctual" in html


def test_the_in_process_pipeline_decides_as_the_deployed_services_do(stack, tmp_path, monkeypatch):
    """Same episode through the running services (Kafka, gateway) and through the in-process
    pipeline (the same stages on the local host): the same responses at the same media times."""
    from streamharness.eval.episode import parse_episode
    from streamharness.eval.runner import run_episode_in_process, run_episode_via_gateway
    from streamharness.generation import GenerationSettings, make_generator
    from streamharness.inprocess import InProcessConfig, InProcessPipeline
    from streamharness.settings import TritonSettings, load_settings

    episode = parse_episode({
        "episode_id": "vtest-same", "video": "opencv-doc:vtest.avi", "duration_s": 12, "source": "opencv-doc",
        "events": [
            {"type": "instruction", "event_id": "walk-in", "given_at_s": 0, "text": "tell me when someone walks in",
             "windows": [[0, 2]], "mode": "proactive", "position": "forward"},
            {"type": "question", "event_id": "q3", "ask_at_s": 3, "text": "What do you see?", "window": [3, 6],
             "reference": "people walking", "mode": "punctual", "position": "present"},
            {"type": "question", "event_id": "q9", "ask_at_s": 9.5, "text": "Is it a street?", "window": [9.5, 12],
             "choices": ["yes", "no"], "answer_index": 0, "mode": "punctual", "position": "present"},
        ],
    })
    deployed = asyncio.run(run_episode_via_gateway(stack.gateway_addresses[0], episode, speed=0, send_fps=1.0))
    # The stack's services run with these; the in-process stages read the same variables.
    monkeypatch.setenv("SH_DECISION_REFRACTORY_S", "30")
    generator = make_generator(load_settings(GenerationSettings, backend="openai", max_new_tokens=16,
                                             base_url=f"http://{stack.proc('generator').address}/openai/v1"))
    config = InProcessConfig(triton=load_settings(TritonSettings, url=stack.triton.grpc_url), memory_dir=tmp_path / "memory")
    with InProcessPipeline(config, generator=generator) as pipeline:
        local = run_episode_in_process(pipeline, episode, send_fps=1.0)
    generator.close()

    def steps(run):
        return sorted((r.event_id, r.media_ts_s) for r in run.responses)

    assert steps(local) == steps(deployed), (local.responses, deployed.responses)
    assert {e for e, _ in steps(local)} == {"walk-in", "q3", "q9"}


def test_two_tenants_keep_answering_while_a_third_floods_questions_and_idles_sessions(stack):
    """Issue 13's fairness, end to end: mallory holds 50 idle sessions and floods two streams with
    questions; alpha and beta, streaming at the same time, each get their one answer within the
    stated bound (90 s of asking, CPU generator) and only their own responses."""
    from streamharness.client import Session

    address = stack.gateway_addresses[0]
    frames = [(f.media_ts_ms, cv2.imencode(".jpg", cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR))[1].tobytes())
              for f in read_video(sample_path("vtest.avi"), fps=1.0) if f.media_ts_ms < 8000]

    async def flood(i: int) -> list:
        errors = []
        async with Session(address, stream_id=f"flood-{i}", tenant="mallory") as s:
            for n, (ts, jpeg) in enumerate(frames):
                await s.send_frame(ts, jpeg)
                for k in range(25):
                    await s.ask(f"question {n}.{k}: what now?", at_ms=ts)
            await s.end()
            async for msg in s:
                if msg.WhichOneof("message") == "error":
                    errors.append(msg.error)
        return errors

    async def run():
        idle = [Session(address, stream_id=f"idle-{i}", tenant="mallory") for i in range(50)]
        for s in idle:
            await s.__aenter__()
        honest = [play(address, sample_path("vtest.avi"), stream_id="cam", tenant=t, speed=0, send_fps=1.0, limit_s=8,
                       questions=[TimedQuestion(5_000, f"What do you see, {t}?")]) for t in ("alpha", "beta")]
        results = await asyncio.gather(*honest, flood(1), flood(2))
        for s in idle:
            await s.__aexit__(None, None, None)
        return results

    alpha, beta, *floods = asyncio.run(run())
    for res in (alpha, beta):
        (qid,) = res.question_ids
        assert [r.question_id for r in res.responses if not r.proactive] == [qid], "another tenant's or session's response arrived"
        (answer,) = [r for r in res.responses if r.question_id == qid]
        assert answer.text.strip() and not answer.refusal
        assert answer.first_chunk_wall - res.asked_wall[qid] < 90, "the flood starved an honest tenant"
    refused = [e for errors in floods for e in errors]
    assert any(e.code == 8 and e.retry_after_ms > 0 and "SH_GATEWAY_QUESTIONS_PER_S" in e.message for e in refused)
