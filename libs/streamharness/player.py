"""Play a video file through the gateway on media time and print responses live
(``streamharness stream``). Also used by ``streamharness up`` and the end-to-end tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamharness.client import Response, Session
from streamharness.replay import encoded_frames, replay
from streamharness.v1 import common_pb2, session_pb2


@dataclass(frozen=True)
class TimedQuestion:
    at_ms: int
    text: str

    @classmethod
    def parse(cls, spec: str) -> TimedQuestion:
        """``"30:what did you see?"`` → asked at 30 s of media time."""
        at, sep, text = spec.partition(":")
        try:
            seconds = float(at)
        except ValueError:
            seconds = -1
        if not sep or seconds < 0 or not text.strip():
            raise ValueError(f"--ask {spec!r}: use SECONDS:QUESTION, e.g. '30:how many people are there?'")
        return cls(int(seconds * 1000), text.strip())


@dataclass
class PlayResult:
    responses: list[Response] = field(default_factory=list)
    errors: list[session_pb2.SessionError] = field(default_factory=list)
    frames_sent: int = 0
    frames_sampled: int = 0
    question_ids: dict[str, TimedQuestion] = field(default_factory=dict)
    instruction_ids: dict[str, str] = field(default_factory=dict)
    asked_wall: dict[str, float] = field(default_factory=dict)
    session_id: str = ""


async def play(
    address: str,
    video: Path,
    *,
    stream_id: str = "cam-1",
    questions: Sequence[TimedQuestion] = (),
    watch_for: Sequence[str] = (),
    speed: float = 1.0,
    decision_fps: float = 1.0,
    send_fps: float | None = None,
    limit_s: float | None = None,
    api_key: str | None = None,
    tenant: str | None = None,
    on_response: Callable[[Response], None] | None = None,
    on_error: Callable[[session_pb2.SessionError], None] | None = None,
    **connect: Any,
) -> PlayResult:
    """Play ``video`` through the gateway at ``address``; ``connect``: more :class:`Session` options
    (``bearer_token``, ``tls``, ``root_certificates``...)."""
    result = PlayResult()
    instructions = {f"watch-{i + 1}": text for i, text in enumerate(watch_for)}
    result.instruction_ids = dict(instructions)
    # Faster than real time: a replay, never shed for lag (real time: judged like a camera).
    connect.setdefault("pace", common_pb2.PACE_REPLAY if speed != 1.0 else common_pb2.PACE_UNSPECIFIED)
    async with Session(address, stream_id=stream_id, decision_fps=decision_fps, instructions=instructions,
                       api_key=api_key, tenant=tenant, **connect) as session:
        result.session_id = session.session_id

        def seen(msg: session_pb2.ServerMessage) -> None:
            kind = msg.WhichOneof("message")
            if kind == "error":
                result.errors.append(msg.error)
                if on_error:
                    on_error(msg.error)
            elif kind == "ack" and msg.ack.kind == session_pb2.Ack.KIND_FRAME and msg.ack.sampled:
                result.frames_sampled += 1

        async def receive() -> None:
            async for response in session.responses(on_message=seen):
                result.responses.append(response)
                if on_response:
                    on_response(response)

        receiver = asyncio.create_task(receive())
        frames = await asyncio.to_thread(lambda: list(encoded_frames(video, send_fps, limit_s)))
        for step in replay(frames, [(q.at_ms, q) for q in questions], speed=speed):
            if step.kind == "event":  # a question, asked at its media time (or after the last frame)
                q = step.item
                qid = await session.ask(q.text, at_ms=q.at_ms)
                result.question_ids[qid] = q
                result.asked_wall[qid] = time.monotonic()
                continue
            await step.await_due()
            await session.send_frame(step.media_ts_ms, step.item.image)
            result.frames_sent += 1
        await session.end()
        await receiver
    return result
