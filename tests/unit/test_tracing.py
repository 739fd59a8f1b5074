"""Trace context through the hosts and records layer (streamharness.telemetry.tracing): a record's
consumer span continues its sender's trace, and a batched stage that sends at end_batch sends what
each record caused in that record's trace, not another one's of the batch. The whole pipeline on
real servers: tests/integration/test_trace.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from streamharness import records, topics
from streamharness.grpcutil import interceptors
from streamharness.hosts.local import LocalHost
from streamharness.keys import make_key
from streamharness.memory.client import MemoryClient
from streamharness.records import processing
from streamharness.session import SessionMapper
from streamharness.settings import KafkaSettings
from streamharness.stage import Batching, Stage, StageSpec
from streamharness.telemetry import tracing
from streamharness.v1 import common_pb2, events_pb2, memory_pb2, session_pb2

KEY = make_key("acme", "cam")


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """A recording tracer for the modules that make spans (no process-wide provider is installed)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(records, "_tracer", provider.get_tracer("test.records"))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test.tracing"))
    monkeypatch.setattr(interceptors, "_tracer", provider.get_tracer("test.grpc"))
    yield exporter
    provider.shutdown()


class _Batched(Stage):
    """Keeps a batch's frames, then publishes one embedding per frame at end_batch (as the encoder does)."""

    def __init__(self, spanned: bool = True) -> None:
        self.spanned = spanned
        self._batch: list = []

    def open(self, ctx) -> None:
        self.out = ctx.outbox

    def handle(self, event) -> None:
        self._batch.append(event)

    def end_batch(self) -> None:
        batch, self._batch = self._batch, []
        for event in batch:
            message = events_pb2.EncodedFrameEvent(key=KEY, session_id="s", media_ts_ms=event.message.media_ts_ms)
            if self.spanned:
                with processing(event, "batched", "work"):
                    self.out.send(topics.EMBEDDINGS, KEY, message)
            else:
                self.out.send(topics.EMBEDDINGS, KEY, message)


SPEC = StageSpec(name="batched", factory="tests:none", consumes={topics.FRAMES: events_pb2.FrameEvent},
                 produces=(topics.EMBEDDINGS,), group="batched", batching=Batching(max_records=8))


def _frames_in_their_own_traces(host: LocalHost, n: int) -> dict[int, int]:
    """``n`` frames sent as the gateway sends them, each under its own ``gateway frame`` root:
    media time -> trace id."""
    mapper = SessionMapper("acme", "s")
    mapper.start(session_pb2.ClientMessage(start=session_pb2.SessionStart(stream_id="cam")))
    traces = {}
    for i in range(n):
        request = mapper.frame(session_pb2.Frame(media_ts_ms=i * 1000, image=b"\xff\xd8jpeg", seq=i + 1))
        frame = events_pb2.FrameEvent(key=KEY, session_id="s", media_ts_ms=request.media_ts_ms, hops=request.hops)
        with tracing.received("ingest", "frame", request.trace_context, message=frame) as span:
            host.bus.send(topics.FRAMES, KEY, frame)
            traces[frame.media_ts_ms] = span.get_span_context().trace_id
    return traces


def _trace_of(record) -> int:
    return int(dict(record.headers)["traceparent"].decode().split("-")[1], 16)


def test_each_record_of_a_batch_is_worked_on_and_sent_from_in_its_own_trace(spans):
    host = LocalHost(KafkaSettings())
    host.add(_Batched(), SPEC)
    traces = _frames_in_their_own_traces(host, 4)
    assert len(set(traces.values())) == 4  # one trace per frame, not the session's
    host.run_until_idle()
    sent = host.bus.take(topics.EMBEDDINGS)
    assert {events_pb2.EncodedFrameEvent.FromString(r.value).media_ts_ms: _trace_of(r) for r in sent} == traces
    finished: list[ReadableSpan] = list(spans.get_finished_spans())
    by_id = {s.context.span_id: s for s in finished}
    for span in (s for s in finished if s.name == "batched work"):
        parent = by_id[span.parent.span_id]
        assert parent.name == "process frames" and parent.kind == SpanKind.CONSUMER
        assert parent.context.trace_id == span.context.trace_id == traces[span.attributes["sh.media_ts_ms"]]
        assert span.attributes["sh.stream"] == "acme/cam" and span.attributes["sh.stage"] == "batched"
        assert by_id[parent.parent.span_id].name == "send frames"  # the producer span of the send
    consumer = next(s for s in finished if s.name == "process frames")
    assert consumer.attributes["messaging.operation.type"] == "process"
    assert consumer.attributes["messaging.consumer.group.name"] == "batched"
    assert consumer.attributes["sh.session_id"] == "s"


def test_without_a_span_per_record_the_batch_loses_the_records_traces(spans):
    """What the per-record span is for: sent after the consumer spans ended, outside any record's span,
    the embeddings start traces of their own."""
    host = LocalHost(KafkaSettings())
    host.add(_Batched(spanned=False), SPEC)
    traces = _frames_in_their_own_traces(host, 3)
    host.run_until_idle()
    assert not {_trace_of(r) for r in host.bus.take(topics.EMBEDDINGS)} & set(traces.values())


def test_a_frame_starts_a_trace_of_its_own_and_ingest_goes_on_in_it(spans):
    mapper = SessionMapper("acme", "s")
    mapper.start(session_pb2.ClientMessage(start=session_pb2.SessionStart(stream_id="cam")))
    with tracing.stage_span("gateway", "session") as call:  # the long session call
        first = mapper.frame(session_pb2.Frame(media_ts_ms=0, image=b"x", seq=1))
        second = mapper.frame(session_pb2.Frame(media_ts_ms=1000, image=b"x", seq=2))
    with tracing.received("ingest", "frame", first.trace_context, message=first) as ingest:
        pass
    roots = [s for s in spans.get_finished_spans() if s.name == "gateway frame"]
    assert [r.attributes["sh.media_ts_ms"] for r in roots] == [0, 1000]
    assert all(r.parent is None and r.kind == SpanKind.SERVER for r in roots)
    assert roots[0].context.trace_id != roots[1].context.trace_id != call.get_span_context().trace_id
    assert [link.context.span_id for link in roots[0].links] == [call.get_span_context().span_id]
    assert ingest.get_span_context().trace_id == roots[0].context.trace_id and ingest.parent.span_id == roots[0].context.span_id
    assert dict(second.trace_context)["traceparent"].split("-")[1] == f"{roots[1].context.trace_id:032x}"
    # A request without context (an older gateway, a pulled source) starts a trace at ingest.
    with tracing.received("ingest", "frame", {}, message=first) as alone:
        assert alone.parent is None


def test_message_attributes_name_the_stream_session_and_media_time():
    frame = events_pb2.FrameEvent(key=KEY, session_id="s1", media_ts_ms=4000)
    assert tracing.message_attributes(frame) == {"sh.stream": "acme/cam", "sh.session_id": "s1", "sh.media_ts_ms": 4000}
    assert tracing.message_attributes(common_pb2.StreamKey(tenant="a", stream_id="b"), key="a/b") == {"sh.stream": "a/b"}


def test_a_memory_call_goes_on_in_the_callers_trace(spans):
    """The responder asks memory inside its span: memory's SERVER span (the error-mapping
    interceptor's, for every unary call) is its child, from the traceparent in the call's metadata."""
    client = MemoryClient("127.0.0.1:1", "responder")  # no call is made: only its metadata
    try:
        with tracing.stage_span("responder", "generate") as caller:
            metadata = client._md(memory_pb2.ContextRequest(key=KEY))  # noqa: SLF001 - what a call sends
        assert {"x-sh-identity", "traceparent"} <= set(dict(metadata))
        with interceptors.server_span("/streamharness.v1.MemoryService/Context", metadata) as served:
            pass
        assert served.parent.span_id == caller.get_span_context().span_id
        assert served.get_span_context().trace_id == caller.get_span_context().trace_id
        (span,) = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
        assert span.name == "streamharness.v1.MemoryService/Context"
        assert span.attributes["rpc.system"] == "grpc" and span.attributes["rpc.method"] == "Context"
        with interceptors.server_span("/streamharness.v1.MemoryService/Items", ()) as alone:  # a caller without a trace
            assert alone.parent is None
    finally:
        client.close()
