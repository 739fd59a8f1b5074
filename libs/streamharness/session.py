"""A client session's messages → the pipeline's records, with their checks. One module for the
gateway (``SessionService.Stream``) and the local host's sessions (:mod:`streamharness.inprocess`),
so both refuse the same input with the same words and publish the same records.

- :meth:`SessionMapper.start`: the ``SessionStart`` → the session's key, decision rate and the
  ``KIND_SESSION_START`` query (standing instructions checked: unique non-empty ids, text limits);
- :meth:`SessionMapper.frame`: a ``Frame`` → the ``IngestFrameRequest`` for ingest (image present,
  within the size limit), the root span of the frame's trace (``gateway frame``) and its context
  in the request's ``trace_context``;
- :meth:`SessionMapper.query`: a ``Question`` or ``InstructionUpdate`` → the query record and its
  ``Ack``;
- :meth:`SessionMapper.end`: the ``KIND_SESSION_END`` query, stamped with the media time of the
  session's last published frame (-1: none), so that the decision step knows when it has seen all.

Every problem is :class:`~streamharness.errors.InvalidInput` (or :class:`~streamharness.errors.TooLarge`, RESOURCE_EXHAUSTED,
for a field above its limit) with a message that says what was wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from streamharness.errors import InvalidInput, TooLarge
from streamharness.keys import make_key
from streamharness.telemetry import tracing
from streamharness.v1 import common_pb2, events_pb2, ingest_pb2, session_pb2

Q = events_pb2.QueryEvent
DEFAULT_DECISION_FPS = 1.0


def _stamp(hop: str) -> common_pb2.HopStamp:
    return common_pb2.HopStamp(hop=hop, wall_unix_ns=time.time_ns())


@dataclass
class SessionMapper:
    """One session's mapping; ``tenant`` comes from authentication, never from the client's message."""

    tenant: str
    session_id: str
    max_text_chars: int = 2000
    max_frame_bytes: int = 8 * 1024 * 1024
    reply_to: str = ""
    key: common_pb2.StreamKey | None = None
    decision_fps: float = DEFAULT_DECISION_FPS
    pace: int = 0  # SessionStart.pace, carried on every frame (common_pb2.Pace)

    def check_text(self, what: str, text: str) -> None:
        if not text.strip():
            raise InvalidInput(f"{what} text is empty")
        if len(text) > self.max_text_chars:
            raise TooLarge(f"{what}.text has {len(text)} characters, above the limit of {self.max_text_chars} (SH_GATEWAY_MAX_TEXT_CHARS)")

    def _query(self, **fields: object) -> events_pb2.QueryEvent:
        return Q(key=self.key, session_id=self.session_id, reply_to=self.reply_to, hops=[_stamp("gateway")], **fields)

    def start(self, message: session_pb2.ClientMessage | None) -> events_pb2.QueryEvent:
        """The session-start query of the first client message (which must be ``SessionStart``)."""
        if message is None or message.WhichOneof("message") != "start":
            raise InvalidInput("the first message of a session must be SessionStart")
        start = message.start
        self.key = make_key(self.tenant, start.stream_id)
        fps = start.decision_fps or DEFAULT_DECISION_FPS
        if not 0 < fps <= 30:
            raise InvalidInput(f"decision_fps {start.decision_fps} is out of range (0, 30]")
        self.decision_fps = fps
        self.pace = start.pace
        ids = [i.instruction_id for i in start.instructions]
        if len(set(ids)) != len(ids) or any(not i for i in ids):
            raise InvalidInput("standing instructions need unique, non-empty instruction_id values")
        for inst in start.instructions:
            self.check_text("instruction", inst.text)
        return self._query(kind=Q.KIND_SESSION_START, decision_fps=fps, instructions=start.instructions)

    def frame(self, f: session_pb2.Frame) -> ingest_pb2.IngestFrameRequest:
        if not f.image:
            raise InvalidInput(f"frame seq {f.seq} has no image bytes")
        if len(f.image) > self.max_frame_bytes:
            raise TooLarge(f"frame.image of seq {f.seq} is {len(f.image)} bytes, above the limit of {self.max_frame_bytes} (SH_GATEWAY_MAX_FRAME_BYTES)")
        request = ingest_pb2.IngestFrameRequest(
            key=self.key, session_id=self.session_id, media_ts_ms=f.media_ts_ms, image=f.image, encoding=f.encoding,
            seq=f.seq, decision_fps=self.decision_fps, hops=[_stamp("gateway")], pace=self.pace,
        )
        # The frame's own trace starts here (``gateway frame``); ingest goes on from trace_context.
        with tracing.frame_received("gateway", request, request.trace_context):
            return request

    def pull(self, source: common_pb2.Source, media_ts_ms: int = 0, *, resumed: bool = False) -> ingest_pb2.IngestFrameRequest:
        """The first request of a pulled session's ingest call: ingest pulls ``source`` itself.
        ``media_ts_ms``: where a resumed live source's media time goes on from."""
        if bool(source.url) == bool(source.upload):
            raise InvalidInput("SessionStart.source needs either url or upload = true (not both)")
        if source.upload and resumed:
            raise InvalidInput("an upload cannot be resumed (its bytes are gone with the call); upload it again in a new session")
        if source.rtsp_transport not in ("", "tcp", "udp"):
            raise InvalidInput(f"source.rtsp_transport {source.rtsp_transport!r} is not tcp or udp")
        if not 0 <= source.speed <= 1000:
            raise InvalidInput(f"source.speed {source.speed:g} is out of range [0, 1000] (0: as fast as it decodes)")
        return ingest_pb2.IngestFrameRequest(key=self.key, session_id=self.session_id, media_ts_ms=media_ts_ms,
                                             decision_fps=self.decision_fps, source=source, hops=[_stamp("gateway")])

    def video(self, chunk: session_pb2.VideoChunk) -> ingest_pb2.IngestFrameRequest:
        """A piece of an upload, as ingest takes it."""
        if len(chunk.data) > self.max_frame_bytes:
            raise TooLarge(f"video.data is {len(chunk.data)} bytes, above the limit of {self.max_frame_bytes} per chunk "
                           "(SH_GATEWAY_MAX_FRAME_BYTES); send smaller chunks")
        if not chunk.data and not chunk.last:
            raise InvalidInput("VideoChunk has no data")
        return ingest_pb2.IngestFrameRequest(key=self.key, session_id=self.session_id, video=chunk.data, video_last=chunk.last)

    def query(self, message: session_pb2.ClientMessage) -> tuple[events_pb2.QueryEvent, session_pb2.ServerMessage]:
        """A question or an instruction change → (the query record, the client's ``Ack``)."""
        kind = message.WhichOneof("message")
        if kind == "question":
            qn = message.question
            self.check_text("question", qn.text)
            if not qn.question_id:
                raise InvalidInput("question_id is empty")
            query = self._query(kind=Q.KIND_QUESTION, question_id=qn.question_id, text=qn.text, media_ts_ms=qn.media_ts_ms)
            return query, _ack(session_pb2.Ack.KIND_QUESTION, qn.media_ts_ms, qn.question_id)
        if kind == "instruction":
            upd = message.instruction
            change = upd.WhichOneof("change")
            if change == "add":
                self.check_text("instruction", upd.add.text)
                if not upd.add.instruction_id:
                    raise InvalidInput("instruction_id is empty")
                query = self._query(kind=Q.KIND_INSTRUCTION_ADD, instruction_id=upd.add.instruction_id,
                                    text=upd.add.text, media_ts_ms=upd.media_ts_ms)
            elif change == "remove_instruction_id":
                query = self._query(kind=Q.KIND_INSTRUCTION_REMOVE, instruction_id=upd.remove_instruction_id,
                                    media_ts_ms=upd.media_ts_ms)
            else:
                raise InvalidInput("instruction update has neither add nor remove_instruction_id")
            return query, _ack(session_pb2.Ack.KIND_INSTRUCTION, upd.media_ts_ms, query.instruction_id)
        if kind == "start":
            raise InvalidInput("SessionStart may be sent only once, first")
        if kind is None:
            raise InvalidInput("empty ClientMessage")
        raise InvalidInput(f"a {kind} message is not a question or an instruction update")

    def end(self, last_published_ms: int) -> events_pb2.QueryEvent:
        return self._query(kind=Q.KIND_SESSION_END, media_ts_ms=last_published_ms)

    def away(self, last_published_ms: int) -> events_pb2.QueryEvent:
        """The client went away without SessionEnd: the stream's state is kept for a resume."""
        return self._query(kind=Q.KIND_SESSION_AWAY, media_ts_ms=last_published_ms)

    def resume(self, message: session_pb2.ClientMessage, session_id: str) -> events_pb2.QueryEvent:
        """The resume query of a ``SessionStart`` that carries a (verified) resume token of ``session_id``."""
        start = message.start
        self.key = make_key(self.tenant, start.stream_id)
        self.session_id = session_id
        return self._query(kind=Q.KIND_SESSION_RESUME)


def _ack(kind: int, media_ts_ms: int, ident: str = "") -> session_pb2.ServerMessage:
    return session_pb2.ServerMessage(ack=session_pb2.Ack(kind=kind, media_ts_ms=media_ts_ms, id=ident))
