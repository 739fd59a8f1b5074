"""The gateway's HTTP API and live web view (aiohttp, on the gateway's own event loop).

Sessions over HTTP are the gRPC session (``SessionService.Stream``) run in-process
(:meth:`GatewayStage.run_session`): the same authentication, quotas, rate limits, checks and
statuses. The HTTP layer *holds* each session it opened (:class:`HttpSession`: a task feeding
``run_session`` from a queue of client messages and dispatching the server messages to the
requests waiting for them) until ``DELETE /v1/sessions/{id}``, the session's own end, or
``idle_s`` without a request on it.

- ``/v1/sessions...``: open a session, send frames or upload a video, ask, add instructions, read
  its server messages as server-sent events, end it;
- ``/v1/chat/completions``, ``/v1/models``: OpenAI-compatible questions to a session (the official
  ``openai`` clients work with ``base_url=http://<gateway>:<port>/v1``);
- ``/v1/streams...`` and ``/view``: the live view of any open stream of the tenant on this replica,
  whichever client opened it (:meth:`GatewayStage.watch`, ``latest_frame``, ``ask``,
  ``add_instruction``).

Every request is authenticated (``Authorization: Bearer <API key or JWT>`` or ``x-api-key``); a
session or stream of another tenant is 404, as an unknown one is. Errors are OpenAI-shaped
(``{"error": {"message", "type", "code", "param"}}``) with the gRPC status mapped to HTTP
(:data:`HTTP_STATUS`); a rate limit is 429 with ``Retry-After``. Bodies are bounded before they
are read. The API reference is in docs/api.md ("HTTP API").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web
from google.protobuf.descriptor import FieldDescriptor

from streamharness.errors import StreamHarnessError
from streamharness.v1 import common_pb2, session_pb2

if TYPE_CHECKING:
    from streamharness.gateway.service import GatewayStage

log = logging.getLogger(__name__)
CM = session_pb2.ClientMessage
Ack = session_pb2.Ack

#: gRPC status → HTTP status (Google's mapping; CANCELLED is 499, "client closed request").
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
#: OpenAI's ``error.type`` by HTTP status (clients branch on the status; the type is for people).
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
              405: "invalid_request_error", 409: "conflict_error", 410: "not_found_error", 413: "invalid_request_error",
              415: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled", 504: "timeout_error"}
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
_TIMEOUT = object()

MODEL_ID = "streamharness"
JSON_LIMIT = 1024 * 1024            # a JSON body other than a chat completion
CHAT_MAX_IMAGES = 32                # image_url parts of one chat message
VIDEO_CHUNK_BYTES = 1024 * 1024     # an upload is sent on in VideoChunk messages of up to this
REQUEST_QUEUE = 16                  # client messages buffered per session (back-pressure on uploads)
EVENTS_KEPT = 1000                  # server messages per session kept for Last-Event-ID
SUBSCRIBER_QUEUE = 2000             # server messages buffered per SSE reader (a slower one is cut off)
ACK_TIMEOUT_S = 30.0                # a frame, question or instruction not acknowledged by then: 504
UPLOAD_STATUS_WAIT_S = 10.0         # after an upload, how long to wait for its source to say it decodes
HEARTBEAT_S = 15.0                  # an SSE comment this often: proxies keep the stream, a gone client is noticed
ENDED_KEPT_S = 600.0                # an ended session answers 410 (with why) this long, then 404
ENDED_KEPT = 10_000
#: Streamed before the whole text of an answer regenerated after a responder crash, when it differs
#: from what was already streamed (an SSE stream cannot retract text); the chunk says restart.
RESTART_SEPARATOR = "\n\n"
STATIC = {"view.html": "text/html", "view.js": "text/javascript", "view.css": "text/css"}
# The page loads only itself: scripts, styles and API calls from this origin, frames as blob: URLs.
VIEW_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


# -- errors --------------------------------------------------------------------------------------
class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after_s, self.extra = retry_after_s, extra or {}

    @classmethod
    def from_status(cls, code: grpc.StatusCode, message: str, *, retry_after_s: float = 0.0, param: str | None = None,
                    reason: str | None = None) -> ApiError:
        return cls(HTTP_STATUS.get(code, 500), message, code=reason or code.name.lower(), param=param,
                   retry_after_s=retry_after_s or None)

    @classmethod
    def from_exception(cls, err: StreamHarnessError, param: str | None = None) -> ApiError:
        return cls.from_status(getattr(err, "code", grpc.StatusCode.INTERNAL), str(err),
                               retry_after_s=getattr(err, "retry_after_s", 0.0), param=param)

    @classmethod
    def from_session_error(cls, e: session_pb2.SessionError, param: str | None = None) -> ApiError:
        """A ``SessionError``; ``param`` names the request's part it is about, unless it is a rate limit."""
        return cls.from_status(_BY_NUMBER.get(e.code, grpc.StatusCode.UNKNOWN), e.message,
                               retry_after_s=e.retry_after_ms / 1000, param=None if e.retry_after_ms else param)

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": ERROR_TYPE.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error"),
                 "code": self.code, "param": self.param}
        if self.retry_after_s:
            error["retry_after_ms"] = math.ceil(self.retry_after_s * 1000)
        return {"error": {**error, **self.extra}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))} if self.retry_after_s else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, code="invalid_argument", param=param)


def _not_found(what: str) -> ApiError:
    return ApiError(404, f"{what} not found", code="not_found")


# -- protobuf → JSON -----------------------------------------------------------------------------
def _enum_name(field_: FieldDescriptor, number: int) -> str:
    """``TRIGGER_QUESTION`` → ``question``, ``KIND_CONNECTED`` → ``connected`` (the enum's common prefix dropped)."""
    names = [v.name for v in field_.enum_type.values]
    value = field_.enum_type.values_by_number.get(number)
    if value is None:
        return str(number)
    prefix = names[0].split("_")[0] + "_"
    if not all(n.startswith(prefix) for n in names):
        prefix = ""
    return value.name[len(prefix):].lower()


def message_json(msg: Any) -> dict[str, Any]:
    """A message as the HTTP API's JSON: every field (defaults too), int64 as numbers, enums as
    lower-case names, bytes left out (images travel as images, never inside JSON)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        if f.type == FieldDescriptor.TYPE_BYTES:
            continue
        value = getattr(msg, f.name)
        if f.containing_oneof is not None and not msg.HasField(f.name):
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.is_repeated:
            out[f.name] = [message_json(v) if f.message_type is not None else _scalar(f, v) for v in value]
        elif f.message_type is not None:
            out[f.name] = message_json(value) if msg.HasField(f.name) else None
        else:
            out[f.name] = _scalar(f, value)
    return out


def _scalar(f: FieldDescriptor, value: Any) -> Any:
    if f.type == FieldDescriptor.TYPE_ENUM:
        return _enum_name(f, value)
    if f.type == FieldDescriptor.TYPE_FLOAT:
        return round(value, 6)
    return value


def server_event(msg: session_pb2.ServerMessage) -> tuple[str, dict[str, Any]]:
    """(SSE event type, data) of a server message: the oneof's name and its fields."""
    kind = msg.WhichOneof("message") or "unknown"
    return kind, message_json(getattr(msg, kind)) if kind != "unknown" else {}


def _sse(data: Any, event: str | None = None, event_id: int | str | None = None) -> bytes:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    lines.append(f"data: {payload}")
    return ("\n".join(lines) + "\n\n").encode()


async def _sse_start(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})  # nginx: do not buffer the stream
    await resp.prepare(request)
    return resp


# -- request parsing -----------------------------------------------------------------------------
async def _read_body(request: web.Request, limit: int, what: str = "body") -> bytes:
    """The body, refused (413) above ``limit`` before more than that is read."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"{what} is {request.content_length} bytes, above the limit of {limit}", code="too_large")
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"{what} is above the limit of {limit} bytes", code="too_large")
    return bytes(data)


async def _json_body(request: web.Request, limit: int = JSON_LIMIT) -> dict[str, Any]:
    raw = await _read_body(request, limit)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(f"the body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, required: bool = False, default: Any = None,
           prefix: str = "") -> Any:
    param = prefix + name
    if name not in body or body[name] is None:
        if required:
            raise _bad(f"{param} is required", param)
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number
        raise _bad(f"{param} must be {_kind_name(kinds)}", param)
    if not isinstance(value, kinds):
        raise _bad(f"{param} must be {_kind_name(kinds)}", param)
    return value


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _int_query(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise _bad(f"query parameter {name} must be an integer", name) from None


def _instructions(raw: Any, param: str = "instructions") -> list[common_pb2.StandingInstruction]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(f"{param} must be a list of {{instruction_id?, text}} objects or strings", param)
    out = []
    for i, item in enumerate(raw):
        p = f"{param}[{i}]"
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise _bad(f"{p} must be an object {{instruction_id?, text}} or a string", p)
        text = _field(item, "text", str, required=True, prefix=p + ".")
        iid = _field(item, "instruction_id", str, prefix=p + ".") or f"i{i + 1}"
        out.append(common_pb2.StandingInstruction(instruction_id=iid, text=text))
    return out


def _source(raw: Any) -> common_pb2.Source | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("source must be an object {url, rtsp_transport?, speed?, upload?, upload_bytes?}", "source")
    src = common_pb2.Source(url=_field(raw, "url", str, default="", prefix="source."),
                            rtsp_transport=_field(raw, "rtsp_transport", str, default="", prefix="source."),
                            speed=float(_field(raw, "speed", (int, float), default=0, prefix="source.")),
                            upload=_field(raw, "upload", bool, default=False, prefix="source."),
                            upload_bytes=int(_field(raw, "upload_bytes", int, default=0, prefix="source.")))
    if not src.url and not src.upload:
        raise _bad("source needs a url, or upload: true (then PUT the file to /v1/sessions/{id}/video)", "source")
    if src.url and src.upload:
        raise _bad("source has both a url and upload: true; choose one", "source")
    return src


def session_start(body: dict[str, Any]) -> session_pb2.SessionStart:
    """The ``SessionStart`` of a ``POST /v1/sessions`` body (the gateway checks the values)."""
    labels = _field(body, "labels", dict, default={})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _bad("labels must map strings to strings", "labels")
    ids = _field(body, "received_response_ids", list, default=[])
    if not all(isinstance(i, str) for i in ids):
        raise _bad("received_response_ids must be a list of strings", "received_response_ids")
    start = session_pb2.SessionStart(
        stream_id=_field(body, "stream_id", str, required=True),
        decision_fps=float(_field(body, "decision_fps", (int, float), default=0)),
        instructions=_instructions(body.get("instructions")), labels=labels,
        resume_token=_field(body, "resume_token", str, default=""), received_response_ids=ids,
        want_decisions=_field(body, "want_decisions", bool, default=False))
    source = _source(body.get("source"))
    if source is not None:
        start.source.CopyFrom(source)
    unknown = set(body) - {"stream_id", "decision_fps", "instructions", "labels", "resume_token", "received_response_ids",
                           "want_decisions", "source"}
    if unknown:
        raise _bad(f"unknown field {sorted(unknown)[0]}", sorted(unknown)[0])
    return start


def image_encoding(data: bytes, content_type: str | None = None) -> int:
    """JPEG or PNG, from the media type or the bytes' signature; 415 for anything else."""
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in ("image/jpeg", "image/jpg"):
        return common_pb2.IMAGE_ENCODING_JPEG
    if ct == "image/png":
        return common_pb2.IMAGE_ENCODING_PNG
    if ct in ("", "application/octet-stream"):
        if data.startswith(b"\xff\xd8"):
            return common_pb2.IMAGE_ENCODING_JPEG
        if data.startswith(b"\x89PNG"):
            return common_pb2.IMAGE_ENCODING_PNG
    raise ApiError(415, f"a frame must be image/jpeg or image/png, not {ct or 'unknown bytes'}", code="unsupported_media_type")


def data_url_image(url: str, param: str) -> tuple[bytes, int]:
    """A ``data:image/jpeg;base64,...`` URL → (bytes, encoding). The gateway fetches nothing."""
    if not url.startswith("data:"):
        raise _bad("image_url must be a data: URL (data:image/jpeg;base64,... or image/png); the gateway fetches no URL", param)
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise _bad("image_url must be base64: data:image/jpeg;base64,...", param)
    media = head[: -len(";base64")]
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("image_url is not valid base64", param) from None
    try:
        return data, image_encoding(data, media)
    except ApiError as err:
        raise _bad(err.message, param) from None


# -- one session held by the HTTP layer ---------------------------------------------------------------
@dataclass(frozen=True)
class _Event:
    id: int
    kind: str
    data: dict[str, Any]
    message: session_pb2.ServerMessage | None

    def sse(self) -> bytes:
        return _sse(self.data, self.kind, self.id)


@dataclass
class _Waiter:
    """A control message (question, instruction change) waiting for its Ack or SessionError."""

    kind: int
    ident: str
    future: asyncio.Future


@dataclass
class HttpSession:
    """A session opened over HTTP: ``run_session`` in a task, fed from :attr:`requests`."""

    tenant: str
    start: session_pb2.SessionStart
    metadata: list[tuple[str, str]]
    peer: str
    loop: asyncio.AbstractEventLoop
    requests: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(REQUEST_QUEUE))
    accepted: session_pb2.SessionAccepted | None = None
    opened: asyncio.Future | None = None
    task: asyncio.Task | None = None
    seq: int = 0
    last_ts: int = -1                                       # media time of the last frame sent
    frames: dict[int, asyncio.Future] = field(default_factory=dict)
    control: _Waiter | None = None
    control_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    answers: dict[str, asyncio.Queue] = field(default_factory=dict)   # question id → its response chunks
    subscribers: set[asyncio.Queue] = field(default_factory=set)       # SSE readers
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=EVENTS_KEPT))
    next_event: int = 1
    touched: float = 0.0                                    # loop time of the last request on it
    readers: int = 0                                        # open SSE readers (activity)
    ending: bool = False                                    # SessionEnd sent
    uploaded: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    end_error: ApiError | None = None                       # how it ended, when with a status
    end_status: tuple[str, str] = ("ok", "")
    opened_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    ended_unix_ms: int = 0
    stats: collections.Counter = field(default_factory=collections.Counter)
    asked: set[str] = field(default_factory=set)

    @property
    def session_id(self) -> str:
        return self.accepted.session_id if self.accepted is not None else ""

    @property
    def stream_id(self) -> str:
        return self.start.stream_id

    @property
    def decision_fps(self) -> float:
        return self.accepted.decision_fps if self.accepted is not None and self.accepted.decision_fps else 1.0

    def touch(self) -> None:
        self.touched = self.loop.time()

    async def messages(self) -> AsyncIterator[bytes]:
        """``run_session``'s requests: serialized client messages; ends (half-close) at ``None``."""
        while True:
            raw = await self.requests.get()
            if raw is None:
                return
            yield raw

    async def send(self, msg: session_pb2.ClientMessage) -> None:
        if self.ended.is_set():
            raise self.gone()
        if self.ending:
            raise ApiError(409, f"session {self.session_id} is ending (DELETE was called)", code="session_ending")
        await self.requests.put(msg.SerializeToString())

    def gone(self) -> ApiError:
        why = f" ({self.end_status[0]}: {self.end_status[1]})" if self.end_status[0] != "ok" else ""
        return ApiError(410, f"session {self.session_id} has ended{why}", code="session_ended")

    # -- server messages -------------------------------------------------------------------------
    def dispatch(self, msg: session_pb2.ServerMessage) -> None:
        kind = msg.WhichOneof("message")
        if kind == "accepted":
            self.accepted = msg.accepted
            if self.opened is not None and not self.opened.done():
                self.opened.set_result(msg.accepted)
        elif kind == "ack":
            ack = msg.ack
            if ack.kind == Ack.KIND_FRAME:
                self.stats["frames_acked"] += 1
                self.stats["frames_sampled"] += ack.sampled
                self.stats["frames_shed"] += ack.shed
                fut = self.frames.pop(ack.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                return  # frame acks are answered to their POST; not events
            w = self.control
            if w is not None and ack.kind == w.kind and ack.id == w.ident and not w.future.done():
                w.future.set_result(msg)
        elif kind == "error":
            e = msg.error
            if e.seq:
                self.stats["frames_rejected"] += 1
                fut = self.frames.pop(e.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif not e.fatal and self.control is not None and not self.control.future.done():
                # Control messages go one at a time (control_lock) and the gateway answers each in
                # order; an error without a frame seq is the pending one's.
                self.control.future.set_result(msg)
        elif kind == "response":
            r = msg.response
            if r.final:
                self.stats["responses"] += 1
                if r.question_id and r.question_id in self.asked:
                    self.stats["not_answered" if r.refusal == "not_answered" else "refused" if r.refusal else "answered"] += 1
            if r.question_id in self.answers:
                self.answers[r.question_id].put_nowait(r)
        self.publish(msg)

    def publish(self, msg: session_pb2.ServerMessage | None, kind: str = "", data: dict[str, Any] | None = None) -> None:
        """An event of the session's SSE: (id, kind, data, message; ``None`` for the end event)."""
        if msg is not None:
            kind, data = server_event(msg)
        event = _Event(self.next_event, kind, data or {}, msg)
        self.next_event += 1
        self.events.append(event)
        for q in list(self.subscribers):
            try:
                q.put_nowait(event)
            except asyncio.QueueFull:  # a reader this far behind is cut off (it may reconnect with Last-Event-ID)
                self.subscribers.discard(q)
                with contextlib.suppress(asyncio.QueueFull):
                    q.get_nowait()
                    q.put_nowait(None)

    def finish(self, error: ApiError | None, status: tuple[str, str]) -> None:
        self.end_error, self.end_status = error, status
        self.ended_unix_ms = int(time.time() * 1000)
        self.ended.set()
        failure = error or self.gone()
        if self.opened is not None and not self.opened.done():
            self.opened.set_exception(failure)
        for fut in [*self.frames.values(), *([self.control.future] if self.control else [])]:
            if not fut.done():
                fut.set_exception(failure)
        self.frames.clear()
        for q in [*self.answers.values(), *self.subscribers]:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        while not self.requests.empty():  # nobody reads them now: a sender blocked on a full queue goes on
            self.requests.get_nowait()

    def summary(self) -> dict[str, Any]:
        s = self.stats
        out: dict[str, Any] = {
            "object": "session", "session_id": self.session_id, "stream_id": self.stream_id,
            "status": "ended" if self.ended.is_set() else "ending" if self.ending else "open",
            "decision_fps": self.decision_fps, "opened_unix_ms": self.opened_unix_ms,
            "last_media_ts_ms": self.last_ts,
            "frames": {"sent": s["frames_sent"], "acknowledged": s["frames_acked"], "sampled": s["frames_sampled"],
                       "shed": s["frames_shed"], "rejected": s["frames_rejected"]},
            "questions": {"asked": len(self.asked), "answered": s["answered"], "refused": s["refused"],
                          "not_answered": s["not_answered"]},
            "responses": s["responses"],
            "source": message_json(self.start.source) if self.start.HasField("source") else None,
        }
        if self.ended.is_set():
            out["ended_unix_ms"] = self.ended_unix_ms
            out["end"] = {"code": self.end_status[0], "message": self.end_status[1]}
        return out

    # -- client operations ------------------------------------------------------------------------
    def next_media_ts(self) -> int:
        """After the last frame by one decision step; 0 for the first."""
        return 0 if self.last_ts < 0 else self.last_ts + max(1, round(1000 / self.decision_fps))

    async def frame(self, image: bytes, encoding: int, media_ts_ms: int | None, param: str | None = None) -> session_pb2.Ack:
        """Send one frame and wait for its Ack; its SessionError as an :class:`ApiError`."""
        ts = self.next_media_ts() if media_ts_ms is None else media_ts_ms
        self.seq += 1
        seq = self.seq
        fut = self.loop.create_future()
        self.frames[seq] = fut
        self.stats["frames_sent"] += 1
        try:
            await self.send(CM(frame=session_pb2.Frame(media_ts_ms=ts, image=image, encoding=encoding, seq=seq)))
            msg = await asyncio.wait_for(asyncio.shield(fut), ACK_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(504, f"frame seq {seq} was not acknowledged within {ACK_TIMEOUT_S:g} s", code="deadline_exceeded") from None
        finally:
            self.frames.pop(seq, None)
        if msg.WhichOneof("message") == "error":
            raise ApiError.from_session_error(msg.error, param)
        self.last_ts = max(self.last_ts, ts)
        return msg.ack

    async def control_message(self, msg: session_pb2.ClientMessage, kind: int, ident: str, param: str | None = None) -> session_pb2.Ack:
        """A question or instruction change, and its Ack (its SessionError as an :class:`ApiError`)."""
        async with self.control_lock:
            waiter = _Waiter(kind, ident, self.loop.create_future())
            self.control = waiter
            try:
                await self.send(msg)
                reply = await asyncio.wait_for(asyncio.shield(waiter.future), ACK_TIMEOUT_S)
            except TimeoutError:
                raise ApiError(504, f"{ident} was not acknowledged within {ACK_TIMEOUT_S:g} s", code="deadline_exceeded") from None
            finally:
                self.control = None
        if reply.WhichOneof("message") == "error":
            raise ApiError.from_session_error(reply.error, param)
        return reply.ack

    async def ask(self, text: str, media_ts_ms: int, question_id: str | None = None) -> tuple[str, asyncio.Queue]:
        """Ask; (question id, the queue its response chunks arrive on, ``None`` at the session's end)."""
        qid = question_id or f"q-{uuid.uuid4().hex[:16]}"
        if qid in self.answers or qid in self.asked:
            raise ApiError(409, f"question_id {qid} was already asked in this session", code="already_exists", param="question_id")
        chunks: asyncio.Queue = asyncio.Queue()
        self.answers[qid] = chunks  # before it is sent: the answer cannot overtake the registration
        try:
            await self.control_message(CM(question=session_pb2.Question(question_id=qid, text=text, media_ts_ms=media_ts_ms)),
                                       Ack.KIND_QUESTION, qid, param="text")
        except BaseException:
            self.answers.pop(qid, None)
            raise
        self.asked.add(qid)
        return qid, chunks


class _AnswerRelay:
    """An answer's chunks → text for an OpenAI stream, which cannot retract what it sent. A chunk
    with ``restart`` (the response is being generated again after a responder crash) starts the
    answer over: while the new attempt repeats what was streamed nothing is sent, then the stream
    goes on from there; a new attempt that differs is streamed whole after
    :data:`RESTART_SEPARATOR` (that chunk carries ``streamharness.restart``). ``text`` is always
    the whole answer of the latest attempt."""

    def __init__(self) -> None:
        self.sent = ""
        self.text = ""

    def feed(self, chunk: session_pb2.ResponseChunk) -> tuple[str, bool]:
        if chunk.restart:
            self.text = ""
        self.text += chunk.text
        if self.text.startswith(self.sent):
            out, self.sent = self.text[len(self.sent):], self.text
            return out, False
        if self.sent.startswith(self.text):
            return "", False  # the new attempt has not caught up with what was streamed yet
        self.sent = self.text
        return RESTART_SEPARATOR + self.text, True


# -- the server ----------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpApi:
    """The HTTP session API, the OpenAI-compatible chat completions and the live view, served on
    ``gateway.settings.http_host``:``http_port`` (0: any free port; :attr:`port` after start)."""

    def __init__(self, gateway: GatewayStage) -> None:
        self.g = gateway
        s = gateway.settings
        self.host: str = getattr(s, "http_host", "127.0.0.1")
        self.requested_port: int = getattr(s, "http_port", 0) or 0
        self.idle_s: float = getattr(s, "http_idle_timeout_s", None) or s.idle_timeout_s
        #: TLS with the gRPC port's certificate (SH_GRPC_TLS_*): the public ports are both TLS or both not.
        self.ssl_context = getattr(gateway, "http_ssl_context", None)
        self.max_frame_bytes: int = s.max_frame_bytes
        self.chat_limit = 4 * self.max_frame_bytes + JSON_LIMIT  # room for a few base64 images
        self.port: int | None = None
        self.sessions: dict[str, HttpSession] = {}
        self.ended: collections.OrderedDict[str, tuple[float, HttpSession]] = collections.OrderedDict()
        self.closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._watchdog: asyncio.Task | None = None
        self._static: dict[str, bytes] = {}

    # -- lifecycle --------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=JSON_LIMIT)
        r = app.router
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_post("/v1/sessions", self.open_session)
        r.add_get("/v1/sessions", self.list_sessions)
        r.add_get("/v1/sessions/{session_id}", self.get_session)
        r.add_delete("/v1/sessions/{session_id}", self.end_session)
        r.add_post("/v1/sessions/{session_id}/frames", self.post_frame)
        r.add_put("/v1/sessions/{session_id}/video", self.put_video)
        r.add_post("/v1/sessions/{session_id}/questions", self.session_question)
        r.add_post("/v1/sessions/{session_id}/instructions", self.session_instruction)
        r.add_delete("/v1/sessions/{session_id}/instructions/{instruction_id}", self.session_remove_instruction)
        r.add_get("/v1/sessions/{session_id}/events", self.session_events)
        r.add_get("/v1/streams", self.list_streams)
        r.add_get("/v1/streams/{stream_id}/frame.jpg", self.stream_frame)
        r.add_get("/v1/streams/{stream_id}/events", self.stream_events)
        r.add_post("/v1/streams/{stream_id}/questions", self.stream_question)
        r.add_post("/v1/streams/{stream_id}/instructions", self.stream_instruction)
        r.add_get("/", self.root)
        r.add_get("/view", self.view)
        r.add_get("/view/{name}", self.view)
        return app

    async def start(self) -> None:
        pkg = resources.files("streamharness.gateway") / "static"
        self._static = {name: (pkg / name).read_bytes() for name in STATIC}
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._watchdog = asyncio.get_running_loop().create_task(self._idle_watchdog(), name="http-idle")
        log.info("HTTP API on http://%s:%d (sessions idle after %g s)", self.host, self.port, self.idle_s)

    async def stop(self) -> None:
        """Stop taking requests; the sessions held are cut off as a dropped gRPC call is (published
        as away: a client may resume them with its token), and their end is awaited."""
        self.closing.set()
        if self._watchdog is not None:
            self._watchdog.cancel()
        tasks = [s.task for s in self.sessions.values() if s.task is not None and not s.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- plumbing ---------------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        try:
            resp = await handler(request)
        except ApiError as err:
            resp = err.response()
        except StreamHarnessError as err:
            resp = ApiError.from_exception(err).response()
        except web.HTTPException as err:
            if err.status < 400:
                raise
            what = {404: f"no route {request.method} {request.path}", 405: f"{request.method} is not allowed on {request.path}"}
            resp = ApiError(err.status, what.get(err.status, err.reason), code=err.reason.lower().replace(" ", "_")).response()
            if err.status == 405:
                resp.headers["Allow"] = err.headers.get("Allow", "")
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as err:  # noqa: BLE001 - a bug: said to the caller by type, logged whole
            log.exception("HTTP %s %s failed", request.method, request.path)
            resp = ApiError(500, f"internal error ({type(err).__name__}); see server logs", code="internal").response()
        log.debug("HTTP %s %s → %d in %.1f ms", request.method, request.path, resp.status, (time.monotonic() - started) * 1000)
        return resp

    @staticmethod
    def metadata(request: web.Request) -> list[tuple[str, str]]:
        """The credentials of a request as call metadata (lower-case keys), as a gRPC call carries them."""
        return [(name, request.headers[name]) for name in ("authorization", "x-api-key", "x-tenant") if name in request.headers]

    @staticmethod
    def peer(request: web.Request) -> str:
        return f"http:{request.remote or 'unknown'}"

    def tenant(self, request: web.Request) -> str:
        return self.g.auth.tenant(self.metadata(request), peer=self.peer(request))

    def held(self, request: web.Request, session_id: str | None = None, *, ended_ok: bool = False) -> HttpSession:
        """The tenant's session by id; another tenant's is "not found", as an unknown one is."""
        tenant = self.tenant(request)
        sid = session_id or request.match_info["session_id"]
        s = self.sessions.get(sid)
        if s is not None and s.tenant == tenant:
            s.touch()
            return s
        gone = self.ended.get(sid)
        if gone is not None and gone[1].tenant == tenant:
            if ended_ok:
                return gone[1]
            raise gone[1].gone()
        raise _not_found(f"session {sid}")

    def _forget(self, s: HttpSession) -> None:
        if self.sessions.get(s.session_id) is s:
            del self.sessions[s.session_id]
        self.ended[s.session_id] = (time.monotonic(), s)
        self.ended.move_to_end(s.session_id)
        cutoff = time.monotonic() - ENDED_KEPT_S
        while self.ended and (len(self.ended) > ENDED_KEPT or next(iter(self.ended.values()))[0] < cutoff):
            self.ended.popitem(last=False)

    async def _idle_watchdog(self) -> None:
        """A session with no request on it (and no SSE reader) for ``idle_s`` is ended with SessionEnd."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(5.0, self.idle_s / 4))
            now = loop.time()
            for s in list(self.sessions.values()):
                if s.readers:
                    s.touch()
                elif not s.ending and not s.ended.is_set() and now - s.touched > self.idle_s:
                    log.info("HTTP session %s: no request for %g s; ending it", s.session_id, self.idle_s)
                    with contextlib.suppress(ApiError):
                        await self._end(s)

    async def _run(self, s: HttpSession) -> None:
        """The session: ``run_session``'s messages to the requests waiting for them, until it ends."""
        error: ApiError | None = None
        status = ("ok", "")
        try:
            async for msg in self.g.run_session(s.messages(), s.metadata, s.peer):
                s.dispatch(msg)
        except StreamHarnessError as err:
            error = ApiError.from_exception(err)
            status = (err.code.name, str(err))
        except asyncio.CancelledError:
            status = ("CANCELLED", "the gateway is stopping")
            error = ApiError(503, f"session {s.session_id} was cut off: the gateway is stopping; resume it with its resume_token", code="unavailable")
            raise
        except Exception as err:  # noqa: BLE001 - a bug: the session ends with INTERNAL, never hangs
            log.exception("HTTP session %s failed", s.session_id)
            status = ("INTERNAL", f"internal error ({type(err).__name__}); see server logs")
            error = ApiError(500, status[1], code="internal")
        finally:
            if s.accepted is not None:
                s.publish(None, "end", {"code": status[0].lower(), "message": status[1], "session_id": s.session_id})
            s.finish(error, status)
            if s.accepted is not None:
                self._forget(s)

    async def _end(self, s: HttpSession) -> dict[str, Any]:
        """SessionEnd, then wait until the session is over (open questions answered or not_answered)."""
        if not s.ending and not s.ended.is_set():
            await s.send(CM(end=session_pb2.SessionEnd()))
            s.ending = True
            await s.requests.put(None)  # and no more messages: the call is half-closed
        grace = getattr(self.g.settings, "end_grace_s", 60.0) + ACK_TIMEOUT_S
        try:
            await asyncio.wait_for(s.ended.wait(), grace)
        except TimeoutError:
            raise ApiError(504, f"session {s.session_id} did not end within {grace:g} s of SessionEnd", code="deadline_exceeded") from None
        return s.summary()

    def _last_media_ts(self, s: HttpSession) -> int:
        """The session's newest media time: frames sent here, or those its pulled source published."""
        last = s.last_ts
        if s.start.HasField("source"):
            for st in self.g.streams(s.tenant):
                if st.get("session_id") == s.session_id:
                    last = max(last, int(st.get("last_media_ts_ms", -1)))
        return last

    # -- routes: sessions ---------------------------------------------------------------------------
    async def open_session(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)  # 401 before the body is read
        if self.closing.is_set():
            raise ApiError(503, "the gateway is stopping; open the session on another replica", code="unavailable")
        start = session_start(await _json_body(request))
        loop = asyncio.get_running_loop()
        s = HttpSession(tenant=tenant, start=start, metadata=self.metadata(request), peer=self.peer(request), loop=loop)
        s.opened = loop.create_future()
        s.touch()
        await s.requests.put(CM(start=start).SerializeToString())
        s.task = loop.create_task(self._run(s), name=f"http-session-{start.stream_id[:16]}")
        try:
            accepted = await asyncio.shield(s.opened)
        except asyncio.CancelledError:
            s.task.cancel()
            raise
        self.sessions[accepted.session_id] = s
        if s.ended.is_set():  # ended between the accept and now (a refusal right away)
            self._forget(s)
        body = {**self._session_body(s), "resume_token": accepted.resume_token, "resumed": accepted.resumed,
                "resume_window_s": accepted.resume_window_s}
        return web.json_response(body, status=201, headers={"Location": f"/v1/sessions/{accepted.session_id}"})

    def _session_body(self, s: HttpSession) -> dict[str, Any]:
        sid = s.session_id
        return {**s.summary(), "instructions": [message_json(i) for i in s.start.instructions],
                "labels": dict(s.start.labels), "want_decisions": s.start.want_decisions,
                "urls": {"self": f"/v1/sessions/{sid}", "frames": f"/v1/sessions/{sid}/frames", "video": f"/v1/sessions/{sid}/video",
                         "events": f"/v1/sessions/{sid}/events", "questions": f"/v1/sessions/{sid}/questions",
                         "instructions": f"/v1/sessions/{sid}/instructions", "chat": "/v1/chat/completions"}}

    async def list_sessions(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        return web.json_response({"object": "list", "data": [self._session_body(s) for s in self.sessions.values() if s.tenant == tenant]})

    async def get_session(self, request: web.Request) -> web.Response:
        return web.json_response(self._session_body(self.held(request, ended_ok=True)))

    async def end_session(self, request: web.Request) -> web.Response:
        s = self.held(request, ended_ok=True)
        return web.json_response(await self._end(s))

    async def post_frame(self, request: web.Request) -> web.Response:
        s = self.held(request)
        ts = _int_query(request, "media_ts_ms")
        if s.start.HasField("source"):
            raise ApiError(400, "this session pulls its frames from its source; it takes no frames", code="failed_precondition")
        image = await _read_body(request, self.max_frame_bytes, "the frame")
        if not image:
            raise _bad("the body is empty: send the JPEG or PNG bytes")
        ack = await s.frame(image, image_encoding(image, request.content_type), ts)
        return web.json_response({"seq": ack.seq, "media_ts_ms": ack.media_ts_ms, "sampled": ack.sampled, "shed": ack.shed})

    async def put_video(self, request: web.Request) -> web.Response:
        s = self.held(request)
        if not s.start.source.upload:
            raise ApiError(400, "this session was not opened with source.upload: true", code="failed_precondition")
        if s.uploaded:
            raise ApiError(409, "this session's video was uploaded already", code="already_exists")
        s.uploaded = True
        watch: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        s.subscribers.add(watch)
        sent = chunks = 0
        piece = min(VIDEO_CHUNK_BYTES, self.max_frame_bytes)  # a VideoChunk is bounded as a frame is
        try:
            buf = bytearray()
            async for data in request.content.iter_chunked(256 * 1024):
                buf += data
                while len(buf) >= piece:
                    await s.send(CM(video=session_pb2.VideoChunk(data=bytes(buf[:piece]))))
                    sent, chunks, buf = sent + piece, chunks + 1, buf[piece:]
                    self._upload_refused(watch)
                s.touch()
            await s.send(CM(video=session_pb2.VideoChunk(data=bytes(buf), last=True)))
            sent, chunks = sent + len(buf), chunks + 1
            source = await self._upload_status(s, watch)
        finally:
            s.subscribers.discard(watch)
        return web.json_response({"session_id": s.session_id, "bytes": sent, "chunks": chunks,
                                  "source": message_json(source) if source is not None else None}, status=202)

    @staticmethod
    def _upload_problem(event: _Event | None) -> ApiError | None:
        """A refusal of the upload among the session's events: an error that is no frame's, its source failed."""
        if event is None:
            return ApiError(410, "the session ended during the upload", code="session_ended")
        msg = event.message
        if msg is None:
            return None
        if msg.WhichOneof("message") == "error" and not msg.error.seq:
            return ApiError.from_session_error(msg.error)
        if msg.WhichOneof("message") == "source" and msg.source.kind == common_pb2.SourceStatus.KIND_FAILED:
            return ApiError.from_status(_BY_NUMBER.get(msg.source.code, grpc.StatusCode.UNKNOWN), msg.source.message)
        return None

    def _upload_refused(self, watch: asyncio.Queue) -> None:
        """While the file goes up: a refusal of it (its size, the tenant's bytes) stops the upload."""
        while not watch.empty():
            problem = self._upload_problem(watch.get_nowait())
            if problem is not None:
                raise problem

    async def _upload_status(self, s: HttpSession, watch: asyncio.Queue) -> common_pb2.SourceStatus | None:
        """The first source status after the upload (connected: it decodes; failed: the error)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + UPLOAD_STATUS_WAIT_S
        while True:
            try:
                event = await asyncio.wait_for(watch.get(), max(0.0, until - loop.time()))
            except TimeoutError:
                return None
            if event is None and s.end_error is not None:
                raise s.end_error
            problem = self._upload_problem(event)
            if problem is not None:
                raise problem
            if event.message is not None and event.message.WhichOneof("message") == "source":
                return event.message.source

    async def session_question(self, request: web.Request) -> web.Response:
        s = self.held(request)
        body = await _json_body(request)
        text = _field(body, "text", str, required=True)
        ts = _field(body, "media_ts_ms", int)
        qid, _ = await s.ask(text, max(0, self._last_media_ts(s)) if ts is None else ts, _field(body, "question_id", str))
        s.answers.pop(qid, None)  # the answer goes to the session's events
        return web.json_response({"question_id": qid, "session_id": s.session_id}, status=202)

    async def session_instruction(self, request: web.Request) -> web.Response:
        s = self.held(request)
        body = await _json_body(request)
        text = _field(body, "text", str, required=True)
        iid = _field(body, "instruction_id", str) or f"i-{uuid.uuid4().hex[:12]}"
        ts = _field(body, "media_ts_ms", int)
        at = max(0, self._last_media_ts(s)) if ts is None else ts
        await s.control_message(CM(instruction=session_pb2.InstructionUpdate(
            add=common_pb2.StandingInstruction(instruction_id=iid, text=text), media_ts_ms=at)),
            Ack.KIND_INSTRUCTION, iid, param="text")
        return web.json_response({"instruction_id": iid, "session_id": s.session_id}, status=201)

    async def session_remove_instruction(self, request: web.Request) -> web.Response:
        s = self.held(request)
        iid = request.match_info["instruction_id"]
        at = max(0, self._last_media_ts(s))
        await s.control_message(CM(instruction=session_pb2.InstructionUpdate(remove_instruction_id=iid, media_ts_ms=at)),
                                Ack.KIND_INSTRUCTION, iid)
        return web.json_response({"instruction_id": iid, "session_id": s.session_id, "removed": True})

    async def session_events(self, request: web.Request) -> web.StreamResponse:
        """The session's server messages as SSE (``event:`` the message kind, ``id:`` its number),
        frame acks left out (each frame's POST has its own), ``event: end`` last. ``Last-Event-ID``
        (or ``?after=``) first replays the kept events after it (the last 1000; ``after=0``: all kept)."""
        s = self.held(request, ended_ok=True)
        after = request.headers.get("Last-Event-ID") or request.query.get("after")
        try:
            after_id = int(after) if after else None
        except ValueError:
            raise _bad("Last-Event-ID must be an event id (an integer)", "Last-Event-ID") from None
        q: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        if not s.ended.is_set():
            s.subscribers.add(q)  # before the backlog is taken: nothing falls between the two
        backlog = [e for e in s.events if after_id is not None and e.id > after_id]
        resp = await _sse_start(request)
        s.readers += 1
        last = 0
        try:
            for event in backlog:
                await resp.write(event.sse())
                last = event.id
            while not s.ended.is_set() or not q.empty():
                event = await self._next(q, HEARTBEAT_S)
                if event is _TIMEOUT:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                if event.id > last:
                    last = event.id
                    await resp.write(event.sse())
            end = s.events[-1] if s.events and s.events[-1].kind == "end" else None
            if s.ended.is_set() and end is not None and end.id > last:
                await resp.write(end.sse())
        except ConnectionResetError:
            pass  # the reader left
        finally:
            s.subscribers.discard(q)
            s.readers -= 1
            s.touch()
        return resp

    async def _next(self, q: asyncio.Queue, timeout: float) -> Any:
        """The next item of ``q``; :data:`_TIMEOUT` after ``timeout``; ``None`` once the API stops."""
        if self.closing.is_set():
            return None
        get = asyncio.ensure_future(q.get())
        stop = asyncio.ensure_future(self.closing.wait())
        try:
            await asyncio.wait((get, stop), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not get.done():
                get.cancel()
        if get.done() and not get.cancelled():
            return get.result()
        return None if self.closing.is_set() else _TIMEOUT

    # -- routes: OpenAI-compatible ------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        self.tenant(request)
        return web.json_response({"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "streamharness"}]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """The last user message of a chat completion, asked in a session: its text parts are the
        question, its ``image_url`` parts (data: URLs) frames of the session sent first."""
        self.tenant(request)  # 401 before the body is read
        body = await _json_body(request, self.chat_limit)
        sid = _field(body, "session_id", str) or request.headers.get("x-session-id")
        if not sid:
            raise _bad('session_id is required: extra_body={"session_id": ...} or header x-session-id '
                       "(open a session with POST /v1/sessions)", "session_id")
        s = self.held(request, sid)
        model = _field(body, "model", str, default=MODEL_ID)
        stream = _field(body, "stream", bool, default=False)
        text, images = self._last_user_message(_field(body, "messages", list, required=True))
        ts = _field(body, "media_ts_ms", int)
        if images and s.start.HasField("source"):
            raise ApiError(400, "this session pulls its frames from its source; send no images", code="failed_precondition",
                           param="messages")
        if images:  # frames one decision step apart, from media_ts_ms or the step after the session's last
            first = s.next_media_ts() if ts is None else ts
            for i, (param, data, encoding) in enumerate(images):
                ack = await s.frame(data, encoding, first + round(i * 1000 / s.decision_fps), param=param)
            asked_at = ack.media_ts_ms  # the question is about what the images show
        else:
            asked_at = ts if ts is not None else self._last_media_ts(s)
        qid, chunks = await s.ask(text, max(0, asked_at), _field(body, "question_id", str))
        ids = {"id": f"chatcmpl-{qid}", "created": int(time.time()), "model": model}
        ext = {"session_id": s.session_id, "question_id": qid, "media_ts_ms": max(0, asked_at)}
        try:
            if stream:
                return await self._stream_answer(request, s, chunks, ids, ext)
            return await self._whole_answer(s, chunks, ids, ext)
        finally:
            s.answers.pop(qid, None)

    def _last_user_message(self, messages: list[Any]) -> tuple[str, list[tuple[str, bytes, int]]]:
        if not messages:
            raise _bad("messages is empty", "messages")
        i = len(messages) - 1
        last = messages[i]
        if not isinstance(last, dict) or last.get("role") != "user":
            raise _bad("the last message must be the user's (role: user): it is the question", f"messages[{i}]")
        content = last.get("content")
        texts: list[str] = []
        images: list[tuple[str, bytes, int]] = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                p = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(_field(part, "text", str, required=True, prefix=p + "."))
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str):
                        raise _bad("image_url.url must be a data: URL", p + ".image_url.url")
                    data, encoding = data_url_image(url, p + ".image_url")
                    if len(data) > self.max_frame_bytes:
                        raise ApiError(413, f"{p}.image_url is {len(data)} bytes, above the limit of {self.max_frame_bytes} "
                                       "(SH_GATEWAY_MAX_FRAME_BYTES)", code="too_large", param=p + ".image_url")
                    images.append((p + ".image_url", data, encoding))
                else:
                    raise _bad(f"content part type {kind!r} is not supported (text, image_url)", p + ".type")
        else:
            raise _bad("content must be a string or a list of parts", f"messages[{i}].content")
        if len(images) > CHAT_MAX_IMAGES:
            raise _bad(f"{len(images)} images in one message, above the limit of {CHAT_MAX_IMAGES}", f"messages[{i}].content")
        text = "\n".join(t for t in texts if t.strip())
        if not text.strip():
            raise _bad("the last user message has no text: it is the question", f"messages[{i}].content")
        return text, images

    @staticmethod
    async def _next_chunk(s: HttpSession, chunks: asyncio.Queue) -> session_pb2.ResponseChunk:
        item = await chunks.get()
        if item is None:  # the session ended without the answer (with a status; else not_answered came)
            raise s.end_error or s.gone()
        return item

    async def _whole_answer(self, s: HttpSession, chunks: asyncio.Queue, ids: dict, ext: dict) -> web.Response:
        relay = _AnswerRelay()
        while True:
            chunk = await self._next_chunk(s, chunks)
            relay.feed(chunk)
            if chunk.final:
                break
        message: dict[str, Any] = {"role": "assistant", "content": None if chunk.refusal else relay.text,
                                   "refusal": relay.text if chunk.refusal else None}
        return web.json_response({
            **ids, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "streamharness": {**ext, "response_id": chunk.response_id, "media_ts_ms": chunk.media_ts_ms, "refusal": chunk.refusal or None},
        })

    async def _stream_answer(self, request: web.Request, s: HttpSession, chunks: asyncio.Queue, ids: dict, ext: dict) -> web.StreamResponse:
        def event(delta: dict, finish: str | None = None, **extra: Any) -> bytes:
            return _sse({**ids, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                         "streamharness": {**ext, **extra}})

        resp = await _sse_start(request)
        relay = _AnswerRelay()
        try:
            await resp.write(event({"role": "assistant", "content": ""}))
            while True:
                chunk = await self._next(chunks, HEARTBEAT_S)
                if chunk is _TIMEOUT:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if chunk is None:  # after the 200 the error is said in the stream (the openai client raises APIError)
                    err = ApiError(503, "the gateway is stopping", code="unavailable") if self.closing.is_set() else s.end_error or s.gone()
                    await resp.write(_sse(err.body()))
                    return resp
                meta = {"response_id": chunk.response_id, "media_ts_ms": chunk.media_ts_ms}
                if chunk.refusal:
                    await resp.write(event({"refusal": chunk.text}, "stop", refusal=chunk.refusal, **meta))
                    break
                text, restart = relay.feed(chunk)
                if text or restart:
                    await resp.write(event({"content": text}, **meta, **({"restart": True} if restart else {})))
                if chunk.final:
                    await resp.write(event({}, "stop", **meta))
                    break
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass  # the client left; the question stays open in the session (its answer reaches the events)
        return resp

    # -- routes: streams (the live view) --------------------------------------------------------------
    async def list_streams(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        return web.json_response({"object": "list", "data": sorted(self.g.streams(tenant), key=lambda st: st["stream_id"])})

    async def stream_frame(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        stream_id = request.match_info["stream_id"]
        latest = await self.g.latest_frame(tenant, stream_id)
        if latest is None:
            raise _not_found(f"a frame of stream {stream_id}")
        ts, image = latest
        ctype = "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"  # a client's own frame may be a PNG
        return web.Response(body=image, content_type=ctype,
                            headers={"Cache-Control": "no-store", "X-Media-Ts-Ms": str(ts), "X-Content-Type-Options": "nosniff"})

    async def stream_events(self, request: web.Request) -> web.StreamResponse:
        """The stream's server messages as they happen (decided seconds, response chunks as published,
        source status), as SSE, whichever client and replica hold its session; ``event: stream``
        first and whenever its session on this replica changes (``null``: none here)."""
        tenant = self.tenant(request)
        stream_id = request.match_info["stream_id"]
        info = next((st for st in self.g.streams(tenant) if st["stream_id"] == stream_id), None)
        with self.g.watch(tenant, stream_id) as watch:
            resp = await _sse_start(request)
            try:
                await resp.write(_sse(info, "stream"))
                while not self.closing.is_set():
                    msg = await self._next(watch.queue, HEARTBEAT_S)
                    if msg is _TIMEOUT:  # a keep-alive, and the stream's session as this replica sees it now
                        now = next((st for st in self.g.streams(tenant) if st["stream_id"] == stream_id), None)
                        if (now or {}).get("session_id") != (info or {}).get("session_id"):
                            info = now
                            await resp.write(_sse(info, "stream"))
                        else:
                            await resp.write(b": keep-alive\n\n")
                        continue
                    if msg is None:
                        break  # the API is stopping
                    kind, data = server_event(msg)
                    await resp.write(_sse(data, kind))
            except ConnectionResetError:
                pass  # the viewer left
        return resp

    async def stream_question(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        stream_id = request.match_info["stream_id"]
        text = _field(await _json_body(request), "text", str, required=True)
        qid = await self.g.ask(tenant, stream_id, text)
        return web.json_response({"question_id": qid, "stream_id": stream_id}, status=202)

    async def stream_instruction(self, request: web.Request) -> web.Response:
        tenant = self.tenant(request)
        stream_id = request.match_info["stream_id"]
        text = _field(await _json_body(request), "text", str, required=True)
        iid = await self.g.add_instruction(tenant, stream_id, text)
        return web.json_response({"instruction_id": iid, "stream_id": stream_id}, status=201)

    # -- the page -------------------------------------------------------------------------------------
    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/view")

    async def view(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "view.html")
        if name not in STATIC:
            raise _not_found(f"/view/{name}")
        return web.Response(body=self._static[name], content_type=STATIC[name], charset="utf-8",
                            headers={"Content-Security-Policy": VIEW_CSP, "X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"})


__all__ = ["HTTP_STATUS", "ApiError", "HttpApi", "HttpSession", "message_json", "session_start"]
