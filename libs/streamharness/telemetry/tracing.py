"""Spans of the pipeline: one trace per frame, a span per stage it passes through.

A frame's trace starts when the gateway receives it (``gateway frame``, a new trace per frame, not
the session call's) and goes on wherever the frame or what was made of it goes:

- gateway → ingest: one gRPC stream carries a session's frames, so call metadata cannot carry a
  frame's context; each ``IngestFrameRequest`` carries it in ``trace_context`` (W3C keys,
  ``traceparent``/``tracestate``), written by :func:`inject` and read by :func:`received`;
- every Kafka record: the sender's context in the headers (:func:`streamharness.records.message_headers`),
  a ``send <topic>`` PRODUCER span around the send, a ``process <topic>`` CONSUMER span around the
  handler (:func:`streamharness.records.process_record`, both hosts);
- batched stages (encoder, decision, responder) work at ``end_batch``, after the records' consumer
  spans ended: they open a span per record with :func:`streamharness.records.processing`, parented
  on that record's consumer span, and send what the record caused inside it, so the next stage's
  records continue the record's trace and not another one's of the batch.

Span names follow the OpenTelemetry messaging conventions where they apply (``send``/``process``
+ destination, ``messaging.*`` attributes); the stages' own spans are ``<stage> <operation>``
(``encoder encode``, ``decision decide``, ``responder generate``, ``gateway deliver``). Every
stage span carries ``sh.stage``, ``sh.stream`` (``tenant/stream``), ``sh.session_id`` and
``sh.media_ts_ms`` when the message has them. Without an SDK installed (no
``setup_telemetry``) the spans are non-recording and only the context travels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind

STAGE = "sh.stage"
STREAM = "sh.stream"
SESSION_ID = "sh.session_id"
MEDIA_TS_MS = "sh.media_ts_ms"

_tracer = trace.get_tracer("streamharness")


def message_attributes(message: Any = None, key: str | None = None) -> dict[str, Any]:
    """``sh.stream``, ``sh.session_id``, ``sh.media_ts_ms`` of a pipeline message (the fields it has)."""
    attributes: dict[str, Any] = {}
    fields = getattr(getattr(message, "DESCRIPTOR", None), "fields_by_name", {})
    if key is None and "key" in fields and message.HasField("key") and message.key.tenant and message.key.stream_id:
        key = f"{message.key.tenant}/{message.key.stream_id}"
    if key:
        attributes[STREAM] = key
    if "session_id" in fields and message.session_id:
        attributes[SESSION_ID] = message.session_id
    if "media_ts_ms" in fields:
        attributes[MEDIA_TS_MS] = int(message.media_ts_ms)
    return attributes


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context into ``carrier`` (a ``map<string, string>`` field, a dict)."""
    propagate.inject(carrier)


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context ``carrier`` holds; an empty one (a new trace) when it holds none."""
    return propagate.extract(dict(carrier or {}), context=otel_context.Context())


@contextmanager
def stage_span(stage: str, operation: str, *, message: Any = None, key: str | None = None,
               parent: otel_context.Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
               start_time: int | None = None, links: Sequence[Link] = (),
               attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """``<stage> <operation>`` as the current span; ``parent``: its parent context (None: the current
    one; ``Context()``: the root of a new trace). An exception is recorded and raised on."""
    with _tracer.start_as_current_span(
        f"{stage} {operation}", context=parent, kind=kind, start_time=start_time, links=list(links),
        attributes={STAGE: stage, **message_attributes(message, key), **(attributes or {})},
    ) as span:
        yield span


@contextmanager
def received(stage: str, operation: str, carrier: Mapping[str, str] | None, *, message: Any = None,
             kind: SpanKind = SpanKind.CONSUMER) -> Iterator[Span]:
    """A stage span for a message that came with its sender's context in ``carrier`` (ingest's
    frames from the gateway): a child of that context, or a new trace when it carried none."""
    with stage_span(stage, operation, message=message, parent=extract(carrier), kind=kind) as span:
        yield span


@contextmanager
def frame_received(stage: str, message: Any, carrier: MutableMapping[str, str] | None = None) -> Iterator[Span]:
    """The root span of a frame's trace (``<stage> frame``, SERVER: the platform received it), a new
    trace; the session call's span, if any, is linked rather than the parent (a session lasts
    hours, a frame's trace a second). Its context is written into ``carrier`` (the request that
    takes the frame on)."""
    current = trace.get_current_span().get_span_context()
    links = [Link(current)] if current.is_valid else []
    with stage_span(stage, "frame", message=message, parent=otel_context.Context(), kind=SpanKind.SERVER,
                    links=links) as span:
        if carrier is not None:
            inject(carrier)
        yield span


@contextmanager
def attached(ctx: otel_context.Context | None) -> Iterator[None]:
    """``ctx`` as the current context inside (None: leave the current one)."""
    if ctx is None:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


def current() -> otel_context.Context:
    """The current context, to resume later with :func:`attached` (work deferred past its record)."""
    return otel_context.get_current()
