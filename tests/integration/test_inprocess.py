"""The in-process pipeline: the services' own code without Kafka, on the real tritonserver (frame
encoder + HOG people detector), Qdrant's engine, MiniLM and SmolLM2 behind the KServe generator."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from streamharness.eval.episode import parse_episode, save_episode
from streamharness.eval.runner import run_episode_in_process
from streamharness.eval.scoring import score_run
from streamharness.generation import GenerationSettings, make_generator
from streamharness.inprocess import InProcessConfig, InProcessPipeline, TimedQuery
from streamharness.keys import key_str, make_key
from streamharness.media import read_video, sample_path
from streamharness.settings import load_settings

VTEST_EPISODE = {
    "episode_id": "vtest-short", "video": "opencv-doc:vtest.avi", "duration_s": 10, "source": "opencv-doc",
    "events": [
        # The detector counts people from the first second of vtest.avi.
        {"type": "instruction", "event_id": "walk-in", "given_at_s": 0, "text": "tell me when someone walks in",
         "windows": [[0, 2]], "mode": "proactive", "position": "forward"},
        {"type": "question", "event_id": "count", "ask_at_s": 5, "text": "Are there people in the street?",
         "window": [5, 10], "choices": ["yes", "no"], "answer_index": 0, "mode": "punctual", "position": "present"},
    ],
}


@pytest.fixture(scope="module")
def pipeline(triton_settings, generator_server, tmp_path_factory):
    generator = make_generator(load_settings(
        GenerationSettings, backend="openai", base_url=generator_server.base_url, model="smollm2", api_key=None,
        max_new_tokens=24, temperature=0.0, read_timeout_s=120.0))
    pipe = InProcessPipeline(InProcessConfig(triton=triton_settings, memory_dir=tmp_path_factory.mktemp("memory")),
                             generator=generator)
    with pipe:
        assert pipe.ready()
        yield pipe
    generator.close()


def _jpegs(name: str, seconds: float, fps: float = 1.0) -> list[tuple[int, bytes]]:
    out = []
    for f in read_video(sample_path(name), fps=fps):
        if f.media_ts_ms > seconds * 1000:
            break
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR))
        out.append((f.media_ts_ms, buf.tobytes()))
    return out


def test_an_episode_scores_into_the_expected_cells(pipeline):
    episode = parse_episode(VTEST_EPISODE)
    run = run_episode_in_process(pipeline, episode, send_fps=1.0)
    assert run.metadata["pipeline"] == "in-process" and run.metadata["frames"] == 11 and run.metadata["frame_errors"] == 0
    assert run.metadata["memory_points"] == 11
    score = score_run([episode], [run])
    proactive = score.cell("proactive", "forward")
    assert (proactive.tp, proactive.fn) == (1, 0), run.responses
    punctual = score.cell("punctual", "present")
    assert punctual.tp + punctual.fn == 1  # scored (a 135M model may pick either letter)
    answers = [r for r in run.responses if r.event_id == "count"]
    assert len(answers) == 1 and 5 <= answers[0].media_ts_s <= 10
    assert answers[0].text and 0 < answers[0].ttft_ms <= answers[0].e2e_ms


def test_memory_keeps_every_frame_and_answers_use_it(pipeline):
    frames = _jpegs("vtest.avi", 6)
    result = pipeline.run_session("acme", "memory-check", frames,
                                  queries=[TimedQuery("question", "q1", 5000, "What did you see so far?")])
    key = key_str(make_key("acme", "memory-check"))
    assert result.frames_published == len(frames) == 7
    assert pipeline.memory.store.count(key, ("short",)) == result.memory_points == 7
    # The same Context call the responder makes: the recent tier holds the frames up to now.
    from streamharness.v1 import memory_pb2

    ctx = pipeline.memory.context(memory_pb2.ContextRequest(key=make_key("acme", "memory-check"), now_ms=5000, max_recent=10))
    assert [item.start_ms for item in ctx.recent] == [ts for ts, _ in frames if ts <= 5000]
    [answer] = result.responses
    assert answer.question_id == "q1" and answer.media_ts_ms == 5000 and answer.text.strip()
    # ... and the answer is remembered: the question and the whole text, once.
    [said] = ctx.history
    assert (said.prompt_text, said.text, said.start_ms) == ("What did you see so far?", answer.text.strip(), 5000)
    assert pipeline.memory.store.count(key, ("qa",)) == 1


def test_damaged_frames_are_reported_and_the_session_goes_on(pipeline):
    frames = _jpegs("vtest.avi", 4)
    ts, good = frames[2]
    frames[2] = (ts, good[: len(good) // 3])  # truncated JPEG
    frames.insert(3, (ts + 1, b"\xff\xd8 not a jpeg"))
    result = pipeline.run_session("acme", "damaged", frames,
                                  queries=[TimedQuery("question", "q", 4000, "Is anyone there?")])
    assert result.frames_published == len(frames) - 2
    assert len(result.frame_errors) == 2 and all("frame seq" in e for e in result.frame_errors)
    assert [r.question_id for r in result.responses] == ["q"]


def test_a_frame_the_encoder_cannot_read_is_dead_lettered_not_fatal(pipeline):
    # Ingest re-encodes what it publishes, so a bad frame can only reach the encoder from elsewhere:
    # hand it one directly, as a producer bypassing ingest would.
    from streamharness import topics
    from streamharness.v1 import events_pb2

    key = make_key("acme", "bad-record")
    pipeline.bus.send(topics.FRAMES, key, events_pb2.FrameEvent(key=key, session_id="s", media_ts_ms=0, seq=1, jpeg=b"garbage"))
    frames = _jpegs("vtest.avi", 2)
    result = pipeline.run_session("acme", "bad-record", frames)
    assert len(result.frame_errors) == 1 and "seq 1" in result.frame_errors[0]
    assert result.frames_published == 3
    assert pipeline.memory.store.count(key_str(key), ("short",)) == 3


def test_a_question_after_the_last_frame_is_still_answered(pipeline):
    frames = _jpegs("vtest.avi", 2)
    result = pipeline.run_session("acme", "late-question", frames,
                                  queries=[TimedQuery("question", "late", 60_000, "What happened?")])
    assert [r.question_id for r in result.responses] == ["late"]


def test_bad_input_is_refused_with_a_clear_error(pipeline):
    from streamharness.errors import InvalidInput

    with pytest.raises(InvalidInput, match="decision_fps"):
        pipeline.run_session("acme", "x", [], decision_fps=0)
    with pytest.raises(InvalidInput, match="unknown kind"):
        pipeline.run_session("acme", "x", [], queries=[TimedQuery("shout", "e", 0, "hi")])
    with pytest.raises(InvalidInput, match="tenant"):
        pipeline.run_session("", "x", [])


def test_cli_in_process_run_starts_triton_and_scores(generator_server, tmp_path):
    """``streamharness eval run --in-process --start-triton`` as a user runs it (its own tritonserver)."""
    ep = parse_episode({**VTEST_EPISODE, "duration_s": 4, "events": [
        {**VTEST_EPISODE["events"][1], "ask_at_s": 2, "window": [2, 4]}]})
    path = save_episode(ep, tmp_path / "ep.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SH_GENERATION_", "SH_TRITON_"))}
    env.update(SH_GENERATION_BACKEND="openai", SH_GENERATION_BASE_URL=generator_server.base_url,
               SH_MEMORY_DATA_DIR=str(tmp_path / "memory"))
    proc = subprocess.run(
        [sys.executable, "-m", "streamharness.cli", "eval", "run", "--episodes", str(path), "--in-process",
         "--start-triton", "--send-fps", "1", "--system", "cli-in-process", "--out", str(tmp_path / "r.json"),
         "--report", str(tmp_path / "r.html")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["system"] == "cli-in-process"
    cell = next(c for c in result["cells"] if c["mode"] == "punctual" and c["position"] == "present")
    assert cell["tp"] + cell["fn"] == 1
    assert (tmp_path / "r.html").stat().st_size > 1000


def test_cli_refuses_start_triton_without_in_process(tmp_path):
    path = save_episode(parse_episode(VTEST_EPISODE), tmp_path / "ep.json")
    proc = subprocess.run([sys.executable, "-m", "streamharness.cli", "eval", "run", "--episodes", str(path),
                           "--baseline", "silent", "--start-triton"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--start-triton goes with --in-process" in proc.stderr


def test_frames_of_synthetic_png_folders_are_accepted(pipeline, tmp_path):
    # Frame folders may hold PNGs: the wire encoding follows the bytes.
    img = np.zeros((120, 160, 3), np.uint8)
    img[30:90, 50:110] = (0, 0, 255)
    ok, png = cv2.imencode(".png", img)
    result = pipeline.run_session("acme", "png", [(0, png.tobytes()), (1000, png.tobytes())])
    assert result.frames_published == 2 and not result.frame_errors
