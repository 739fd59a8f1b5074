"""One trace per frame, through every hop: a question asked over a real gateway session, answered
by the pipeline on the real broker (gateway, ingest, encoder on tritonserver, decision, responder,
each on its Kafka host in this process), comes back as one trace per frame whose spans form one
chain from the gateway's ``gateway frame`` to the ``gateway deliver`` of the answer's chunks.

Every span of the process goes to an in-memory exporter. The batched stages (encoder, decision,
responder) take several records at once: each record's work must be in that record's own trace,
so each frame's ``encoder encode`` span must hang under that same frame's root."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace

import cv2
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamharness.client import Session
from streamharness.decision.policy import RulePolicy
from streamharness.decision.service import DecisionSettings, DecisionStage
from streamharness.encoder.service import EncoderSettings, EncoderStage
from streamharness.gateway.service import GatewaySettings, GatewayStage
from streamharness.generation import Prompt, ResponseGenerator
from streamharness.hosts.kafka import KafkaHost
from streamharness.ingest.service import IngestSettings, IngestStage
from streamharness.kafka import ensure_topics
from streamharness.media import read_video, sample_path
from streamharness.responder.service import ResponderSettings, ResponderStage
from streamharness.runner import ServiceRunner
from streamharness.settings import ServiceSettings
from streamharness.stage import Batching
from streamharness.topology import TOPOLOGY, all_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ANSWER = ("Two ", "people ", "walk ", "by.")
# The stages a frame's answer passes, in order: (span name, or its start for a topic's name).
CHAIN = ("gateway frame", "ingest frame", "send ", "process ", "encoder encode", "send ", "process ",
         "decision decide", "send ", "process ", "responder generate", "send ", "process ", "gateway deliver")


class Answer(ResponseGenerator):
    """A backend that says the same thing at once (the test is about where the chunks go)."""

    def stream(self, prompt: Prompt) -> Iterator[str]:
        yield from ANSWER

    def ready(self) -> bool:
        return True


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process ends from now on. One tracer provider per process: installed here
    unless a test before installed one (then the exporter is added to it)."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        pytest.skip("another tracer provider is installed in this process")
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()  # the provider keeps it, exporting nowhere


@pytest.fixture
def pipeline(kafka_settings, triton_settings, exported_text_encoder) -> Iterator[str]:
    """The gateway's address, with ingest, encoder, decision and responder behind it."""
    ensure_topics(kafka_settings, all_topics())
    runners: list[ServiceRunner] = []

    def serve(stage, name: str, batching: Batching | None = None) -> tuple[KafkaHost, ServiceRunner]:
        spec = TOPOLOGY[name] if batching is None else replace(TOPOLOGY[name], batching=batching)
        host = KafkaHost(stage, spec, kafka_settings)
        runner = ServiceRunner(host, ServiceSettings(service_name=name, grpc_port=0, shutdown_grace_s=5))
        runner.serve()
        runners.append(runner)
        return host, runner

    try:
        _, ingest = serve(IngestStage(IngestSettings(max_pixels=320 * 240)), "ingest")
        hosts = [
            serve(EncoderStage(EncoderSettings(max_batch=8, max_wait_ms=500, detect_people=False), triton_settings), "encoder")[0],
            serve(DecisionStage(DecisionSettings(policy="rules"), policy=RulePolicy(exported_text_encoder.encode)), "decision")[0],
            # Its fetch waits for the two decisions: one batch, two generations.
            serve(ResponderStage(ResponderSettings(memory_address="", workers=1), generator=Answer()), "responder",
                  Batching(max_wait_ms=1500, bytes_hint=64 * 1024))[0],
        ]
        gateway, runner = serve(GatewayStage(GatewaySettings(replica_id="gw-trace", ingest_address=f"127.0.0.1:{ingest.port}",
                                                             allow_anonymous=True, end_grace_s=60)), "gateway")
        hosts.append(gateway)
        deadline = time.monotonic() + 90
        # Ready, and every consumer holds its partitions: the gateway reads responses from "latest" on.
        while not all(h.ready() and all(c.assigned() for c in h.consumers) for h in hosts):
            assert time.monotonic() < deadline, "the pipeline never became ready"
            time.sleep(0.2)
        yield f"127.0.0.1:{runner.port}"
    finally:
        for r in reversed(runners):
            r.request_stop()
            r.shutdown()


def frames(n: int) -> list[tuple[int, bytes]]:
    """``n`` frames of the sample video, one per media second (what the decision rate keeps)."""
    out = []
    for frame in read_video(sample_path("vtest.avi"), fps=1.0):
        out.append((frame.media_ts_ms, cv2.imencode(".jpg", cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR))[1].tobytes()))
        if len(out) == n:
            break
    return out


def chain(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    """``span`` and its ancestors, root first; stops where a parent is missing (a dropped context)."""
    path = [span]
    while path[0].parent is not None and path[0].parent.span_id in by_id:
        path.insert(0, by_id[path[0].parent.span_id])
    return path


def test_a_frame_its_decision_and_the_answer_are_one_trace_with_a_span_per_stage(pipeline, spans):
    sent = frames(6)

    async def session() -> list:
        async with Session(pipeline, stream_id="cam-trace", tenant="acme") as s:
            # Asked first: the decision holds them when the frames at 2 s and 4 s come, and answers each in
            # that frame's trace (two decisions of one batch, perhaps two generations of one batch).
            asked = [await s.ask("How many people are there?", at_ms=2000), await s.ask("And now?", at_ms=4000)]
            for ts, jpeg in sent:
                await s.send_frame(ts, jpeg)
            await s.end()
            return asked, [m async for m in s]

    asked, messages = asyncio.run(asyncio.wait_for(session(), 120))
    chunks = [m.response for m in messages if m.WhichOneof("message") == "response"]
    assert {q: "".join(c.text for c in chunks if c.question_id == q) for q in asked} == {q: "".join(ANSWER) for q in asked}
    deadline = time.monotonic() + 10  # the last spans end just after the chunks went out
    while len([s for s in spans.get_finished_spans() if s.name == "gateway deliver"]) < len(chunks) and time.monotonic() < deadline:
        time.sleep(0.1)

    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    delivered = [s for s in finished if s.name == "gateway deliver" and s.attributes.get("sh.stream") == "acme/cam-trace"]
    assert len(delivered) == len(chunks), [s.name for s in finished]

    # The answer's chunks: one chain per chunk from the gateway's frame span, one trace, a span per stage.
    for deliver in delivered:
        path = chain(deliver, by_id)
        names = [s.name for s in path]
        assert len(names) == len(CHAIN) and all(n.startswith(c) for n, c in zip(names, CHAIN)), names
        assert len({s.context.trace_id for s in path}) == 1
        root, staged = path[0], [s for s in path if "sh.stage" in s.attributes]
        assert root.parent is None and root.kind == trace.SpanKind.SERVER
        assert [s.attributes["sh.stage"] for s in staged] == [
            "gateway", "ingest", "encoder", "encoder", "decision", "decision", "responder", "responder", "gateway", "gateway"]
        assert {s.attributes.get("sh.stream") for s in staged} == {"acme/cam-trace"}
        # The frame that was decided on is the frame the trace started with (at or after the question).
        assert root.attributes["sh.media_ts_ms"] == deliver.attributes["sh.media_ts_ms"] >= 2000
        assert [s.attributes["messaging.destination.name"].rsplit(".", 1)[-1] for s in path if s.kind == trace.SpanKind.PRODUCER] == [
            "frames", "embeddings", "decisions", "responses"]

    # Every frame has a trace of its own, also inside the encoder's batches.
    roots = {s.context.trace_id: s for s in finished if s.name == "gateway frame" and s.attributes["sh.stream"] == "acme/cam-trace"}
    assert sorted(r.attributes["sh.media_ts_ms"] for r in roots.values()) == [ts for ts, _ in sent]
    encoded = [s for s in finished if s.name == "encoder encode" and s.attributes["sh.stream"] == "acme/cam-trace"]
    assert len(encoded) == len(sent)
    for span in encoded:
        root = chain(span, by_id)[0]
        assert root.name == "gateway frame" and root.attributes["sh.media_ts_ms"] == span.attributes["sh.media_ts_ms"]
    # The batched stages had several records at once (else a record's work in another's trace would pass).
    for name in ("encoder encode", "decision decide", "responder generate"):
        assert max(s.attributes["sh.batch_size"] for s in finished if s.name == name) > 1, f"{name}: no batch of several records"
