"""Replay episodes and record what a system said: through a deployed pipeline (the gateway), through
the in-process pipeline (the same services' code without Kafka), or with a built-in baseline
policy that needs no pipeline.

Replays run on media time: ``speed`` 1 is real time, N is N× faster, 0 as fast as the pipeline
takes frames. Questions are asked at their ``ask_at_s``, instructions given at ``given_at_s``
(those at 0 go into SessionStart) and taken back at ``withdrawn_at_s``. Several episodes run concurrently (``concurrency``).

Baselines (the floor any system must beat):

* ``silent``: never says anything;
* ``always``: answers every question and fires every instruction at every decision step;
* ``every-k``: the same, every k seconds;
* ``first-choice``: answers each multiple-choice question once, at its ``ask_at_s``, with
  ``"A. <first choice>"``; free-text questions and instructions get nothing;
* ``random-choice``: the same with a choice drawn uniformly at random (``"C. <third choice>"``) by a
  numpy Generator seeded from ``seed`` and the episode id, so a run is the same for the same seed.

Text of ``always`` and ``every-k``: the first choice for multiple-choice questions, else the
question or instruction itself (which a free-text matcher will rarely accept: their score is
timing, not content). ``first-choice`` and ``random-choice`` are the chance level of the content:
right timing at the ask, a guess for the answer (a question whose window opens after its ask is
answered early, as any system answering at once would be). Their responses carry no latencies.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamharness.eval.episode import Episode, EpisodeRun, InstructionEvent, QuestionEvent, ResponseRecord
from streamharness.eval.episodes_builtin import resolve_video
from streamharness.replay import EncodedFrame, encoded_frames, replay

BASELINES = ("silent", "always", "every-k", "first-choice", "random-choice")
CHOICE_BASELINES = ("first-choice", "random-choice")


def iter_frames(video: Path, fps: float | None, limit_s: float) -> Iterator[EncodedFrame]:
    """An episode's frames (see :func:`streamharness.replay.encoded_frames`)."""
    return encoded_frames(video, fps, limit_s)


async def run_episode_via_gateway(address: str, episode: Episode, *, speed: float = 0.0, send_fps: float = 2.0,
                                  decision_fps: float = 1.0, system: str = "pipeline", base_dir: Path | None = None,
                                  api_key: str | None = None) -> EpisodeRun:
    """Play one episode through a gateway and record every response with its client-side latencies."""
    from streamharness.client import Session
    from streamharness.v1 import common_pb2

    video = resolve_video(episode, base_dir)
    initial = {e.event_id: e.text for e in episode.instructions if e.given_at_s == 0}
    timeline: list[tuple[float, QuestionEvent | InstructionEvent | _Withdrawal]] = sorted(
        [(q.ask_at_s, q) for q in episode.questions] + [(i.given_at_s, i) for i in episode.instructions if i.given_at_s > 0]
        + [(i.withdrawn_at_s, _Withdrawal(i.event_id)) for i in episode.instructions if i.withdrawn_at_s is not None],
        key=lambda item: item[0],
    )
    sent_wall: dict[str, float] = {}
    records: list[ResponseRecord] = []
    async with Session(address, stream_id=f"eval-{episode.episode_id}"[:128].replace("/", "-"), decision_fps=decision_fps,
                       instructions=initial, api_key=api_key,
                       # Faster than real time: a replay, never shed for lag (the scores are the media time's alone).
                       pace=common_pb2.PACE_REPLAY if speed != 1.0 else common_pb2.PACE_UNSPECIFIED) as session:
        async def receive() -> None:
            async for r in session.responses():
                event_id = r.question_id or r.instruction_id or None
                asked = sent_wall.get(r.question_id) if r.question_id else None
                records.append(ResponseRecord(
                    event_id=event_id, media_ts_s=r.media_ts_ms / 1000, text=r.text.strip(),
                    ttft_ms=(r.first_chunk_wall - asked) * 1000 if asked else None,
                    e2e_ms=(r.final_wall - asked) * 1000 if asked else None,
                ))

        receiver = asyncio.create_task(receive())
        frames = await asyncio.to_thread(lambda: list(iter_frames(video, send_fps, episode.duration_s)))
        for step in replay(frames, [(int(at_s * 1000), (at_s, event)) for at_s, event in timeline], speed=speed):
            if step.kind == "event":
                at_s, event = step.item
                await _send_event(session, event, sent_wall, at_s)
                continue
            await step.await_due()
            await session.send_frame(step.media_ts_ms, step.item.image)
        await session.end()
        await receiver
    return EpisodeRun(episode_id=episode.episode_id, system=system, responses=records,
                      metadata={"speed": speed, "frames": len(frames)})


def question_text(event: QuestionEvent) -> str:
    """What the system is asked: the question, with lettered options for multiple choice."""
    text = event.text
    if event.choices:
        text += " Options: " + "; ".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(event.choices)) + ". Answer with the letter."
    return text


@dataclass(frozen=True)
class _Withdrawal:
    instruction_id: str


async def _send_event(session, event: QuestionEvent | InstructionEvent | _Withdrawal, sent_wall: dict[str, float],
                      at_s: float = 0.0) -> None:
    if isinstance(event, QuestionEvent):
        text = question_text(event)
        sent_wall[event.event_id] = time.monotonic()
        await session.ask(text, at_ms=int(event.ask_at_s * 1000), question_id=event.event_id)
    elif isinstance(event, _Withdrawal):
        await session.stop_watching(event.instruction_id, at_ms=int(at_s * 1000))
    else:
        await session.watch_for(event.text, at_ms=int(event.given_at_s * 1000), instruction_id=event.event_id)


def run_episode_in_process(pipeline, episode: Episode, *, send_fps: float = 2.0, decision_fps: float = 1.0,
                           system: str = "in-process", base_dir: Path | None = None, on_frame=None) -> EpisodeRun:
    """Play one episode through an open :class:`~streamharness.inprocess.InProcessPipeline` (the
    services' own code without Kafka; see that module). Frames go in as fast as the pipeline takes
    them; a question's TTFT and end-to-end time run from the moment the first frame at or after its
    ``ask_at_s`` entered ingest to the first and the final chunk of its answer."""
    video = resolve_video(episode, base_dir)
    initial, queries = episode_queries(episode)
    frames = ((f.media_ts_ms, f.image) for f in iter_frames(video, send_fps, episode.duration_s))
    result = pipeline.run_session("eval", f"eval-{episode.episode_id}"[:128].replace("/", "-"), frames,
                                  instructions=initial, queries=queries, decision_fps=decision_fps, on_frame=on_frame)
    records = []
    for r in result.responses:
        asked = r.asked_wall if r.question_id else None
        records.append(ResponseRecord(
            event_id=r.question_id or r.instruction_id or None, media_ts_s=r.media_ts_ms / 1000, text=r.text.strip(),
            ttft_ms=(r.first_chunk_wall - asked) * 1000 if asked is not None and r.first_chunk_wall is not None else None,
            e2e_ms=(r.final_wall - asked) * 1000 if asked is not None and r.final_wall is not None else None,
        ))
    return EpisodeRun(episode_id=episode.episode_id, system=system, responses=records,
                      metadata={"pipeline": "in-process", "frames": result.frames_published,
                                "frame_errors": len(result.frame_errors), "dead_letters": result.dead_letters,
                                "memory_points": result.memory_points,
                                "wall_s": round(result.wall_s, 3)})


def episode_queries(episode: Episode) -> tuple[dict[str, str], list]:
    """What a session over ``episode`` is given: the standing instructions of its start (id → text)
    and the timed queries after it (questions, instructions given later and withdrawals), as
    :class:`~streamharness.inprocess.TimedQuery` (not sorted: the replay loop orders them)."""
    from streamharness.inprocess import TimedQuery

    initial = {e.event_id: e.text for e in episode.instructions if e.given_at_s == 0}
    queries = [TimedQuery("question", q.event_id, int(q.ask_at_s * 1000), question_text(q)) for q in episode.questions]
    queries += [TimedQuery("instruction_add", i.event_id, int(i.given_at_s * 1000), i.text)
                for i in episode.instructions if i.given_at_s > 0]
    queries += [TimedQuery("instruction_remove", i.event_id, int(i.withdrawn_at_s * 1000))
                for i in episode.instructions if i.withdrawn_at_s is not None]
    return initial, queries


def run_baseline(episode: Episode, policy: str, k: int = 5, step_s: float = 1.0, seed: int = 0) -> EpisodeRun:
    """A baseline run computed from the episode's own timeline (no pipeline, no model); ``k`` is
    every-k's period in steps, ``seed`` random-choice's seed."""
    if policy not in BASELINES:
        raise ValueError(f"unknown baseline {policy!r}: choose one of {', '.join(BASELINES)}")
    if k < 1:
        raise ValueError("k must be at least 1")
    if policy in CHOICE_BASELINES:
        return _choice_baseline(episode, policy, seed)
    responses: list[ResponseRecord] = []
    if policy != "silent":
        every = step_s * (k if policy == "every-k" else 1)
        for t in np.arange(0.0, episode.duration_s + 1e-9, every):
            for q in episode.questions:
                if q.ask_at_s <= t:
                    text = q.choices[0] if q.choices else q.text
                    responses.append(ResponseRecord(event_id=q.event_id, media_ts_s=float(t), text=text, ttft_ms=0.0, e2e_ms=0.0))
            for inst in episode.instructions:
                if inst.given_at_s <= t and (inst.withdrawn_at_s is None or t < inst.withdrawn_at_s):
                    responses.append(ResponseRecord(event_id=inst.event_id, media_ts_s=float(t), text=inst.text))
    return EpisodeRun(episode_id=episode.episode_id, system=f"baseline:{policy}" + (f"-{k}" if policy == "every-k" else ""),
                      responses=responses)


def _choice_baseline(episode: Episode, policy: str, seed: int) -> EpisodeRun:
    """first-choice / random-choice: one lettered guess per multiple-choice question at its ask."""
    if seed < 0:
        raise ValueError("seed must be at least 0")
    rng = None
    if policy == "random-choice":  # one stream per (seed, episode): the same episode gets the same guesses
        episode_key = int.from_bytes(hashlib.sha256(episode.episode_id.encode()).digest()[:8], "big")
        rng = np.random.default_rng([seed, episode_key])
    responses = []
    for q in episode.questions:
        if not q.choices:
            continue
        i = 0 if rng is None else int(rng.integers(len(q.choices)))
        responses.append(ResponseRecord(event_id=q.event_id, media_ts_s=q.ask_at_s, text=f"{chr(ord('A') + i)}. {q.choices[i]}"))
    system = f"baseline:{policy}" + (f"-seed{seed}" if rng is not None else "")
    return EpisodeRun(episode_id=episode.episode_id, system=system, responses=responses,
                      metadata={"seed": seed} if rng is not None else {})


async def run_many_via_gateway(address: str, episodes: list[Episode], *, concurrency: int = 2, progress=None, **kwargs) -> list[EpisodeRun]:
    """Several episodes at once (each its own session), at most ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one(ep: Episode) -> EpisodeRun:
        async with gate:
            run = await run_episode_via_gateway(address, ep, **kwargs)
            if progress is not None:
                progress(ep)
            return run

    return list(await asyncio.gather(*(one(ep) for ep in episodes)))
