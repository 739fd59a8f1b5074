"""The pipeline's topology: one row per stage, the single source for

- which topics exist (every host creates :func:`all_topics` at start, so co-partitioned topics get
  equal partition counts whoever starts first),
- what each stage consumes and produces, its consumer group, batching and offset-reset policy,
- which settings each stage reads (the settings table in docs/operations.md, and the entry points,
  which load them before anything starts),
- which services exist (``services/<name>/main.py``), which the local stack starts
  (:mod:`streamharness.devinfra.stack`) and which components the chart deploys
  (``tests/unit/test_topology.py`` checks they agree).

Topic names here are logical; ``SH_KAFKA_TOPIC_PREFIX`` is put in front by the hosts.
"""

from __future__ import annotations

from streamharness import topics
from streamharness.stage import Batching, StageSpec
from streamharness.v1 import events_pb2, ingest_pb2, memory_pb2, session_pb2

_KAFKA = "streamharness.settings:KafkaSettings"
_TRITON = "streamharness.settings:TritonSettings"
_TEXT = "streamharness.text_encoder:TextEncoderSettings"
_TIERS = "streamharness.memory.tiers:TierSettings"
_GENERATION = "streamharness.generation.settings:GenerationSettings"
_AUTH = "streamharness.auth:AuthSettings"

TOPOLOGY: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="gateway",
            factory="streamharness.gateway.service:GatewayStage",
            settings=("streamharness.gateway.service:GatewaySettings", _AUTH),
            # decision-log: every decided second, for the live view and sessions that want_decisions.
            consumes={topics.RESPONSES: events_pb2.ResponseEvent, topics.DECISION_LOG: events_pb2.DecisionEvent},
            produces=(topics.QUERIES,),
            group="gateway",  # one group per replica: gateway-<replica id> (configure())
            offset_reset="latest",
            offset_reset_reason="a replica's group is new at every start and only its own live sessions' "
            "responses matter; replaying the topic's history would deliver nothing useful",
            needs_assignment=True,
            grpc_services=(session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,),
        ),
        StageSpec(
            name="ingest",
            factory="streamharness.ingest.service:IngestStage",
            settings=("streamharness.ingest.service:IngestSettings", "streamharness.sources.settings:SourceSettings", _AUTH),
            produces=(topics.FRAMES,),
            grpc_services=(ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,),
        ),
        StageSpec(
            name="encoder",
            factory="streamharness.encoder.service:EncoderStage",
            settings=("streamharness.encoder.service:EncoderSettings", _TRITON),
            consumes={topics.FRAMES: events_pb2.FrameEvent},
            produces=(topics.EMBEDDINGS,),
            group="encoder",
            offset_reset="earliest",
            offset_reset_reason="a new encoder group (first deploy, a renamed group) must encode the frames "
            "produced before it joined; 'latest' would silently drop them",
            batching=Batching(max_records=16, max_wait_ms=20, bytes_hint=64 * 1024),
        ),
        StageSpec(
            name="memory",
            factory="streamharness.memory.service:MemoryStage",
            settings=("streamharness.memory.service:MemorySettings", _TIERS, _TEXT, _AUTH),
            # Frames (short-term), summaries (mid/long-term) and finished answers (the Q&A history).
            consumes={
                topics.EMBEDDINGS: events_pb2.EncodedFrameEvent,
                topics.SUMMARIES: events_pb2.SummaryEvent,
                topics.RESPONSES: events_pb2.ResponseEvent,
            },
            group="memory",
            offset_reset="earliest",
            offset_reset_reason="a new memory group must remember the frames, summaries and answers produced before "
            "it joined (the first deploy, or a replica that lost its volume replaying the topics); 'latest' would leave holes",
            grpc_services=(memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name,),
        ),
        StageSpec(
            name="summariser",
            factory="streamharness.summariser.stage:SummariserStage",
            settings=("streamharness.summariser.settings:SummariserSettings", _TIERS, _GENERATION),
            # Captions always; the frames' JPEGs only for a backend that sees images (configure()).
            consumes={topics.EMBEDDINGS: events_pb2.EncodedFrameEvent, topics.FRAMES: events_pb2.FrameEvent},
            produces=(topics.SUMMARIES,),
            group="summariser",
            offset_reset="earliest",
            offset_reset_reason="a new summariser group must summarise the chunks whose frames were produced "
            "before it joined; 'latest' would leave chunks without a summary",
            # A summary is written inside the handler of the frame at its chunk's cut: at most one
            # summary and one block per batch keeps a batch well under max.poll.interval.ms.
            batching=Batching(max_records=16),
        ),
        StageSpec(
            name="decision",
            factory="streamharness.decision.service:DecisionStage",
            settings=("streamharness.decision.service:DecisionSettings", _TEXT, _TRITON, _TIERS,
                      "streamharness.engine.settings:EngineSettings"),
            # Co-partitioned: all keyed tenant/stream with equal partition counts, read by one group
            # with the range assignor, so one member holds a stream's queries and frames. The
            # encoder's embeddings for the rules and the trained head; the frames themselves for the
            # model policy, which also publishes its own responses (configure()).
            consumes={topics.QUERIES: events_pb2.QueryEvent, topics.EMBEDDINGS: events_pb2.EncodedFrameEvent,
                      topics.FRAMES: events_pb2.FrameEvent},
            # stream-state: the stage's durable per-stream state, a compacted changelog it restores
            # from on assignment (keyed and partitioned like queries).
            # decision-log: one record per decided second (silent too), read by the gateways.
            produces=(topics.DECISIONS, topics.RESPONSES, topics.STREAM_STATE, topics.DECISION_LOG),
            tables=(topics.STREAM_STATE,),
            group="decision",
            offset_reset="earliest",
            offset_reset_reason="a session start or a question produced while no decision member ran must "
            "still be seen; 'latest' would lose standing instructions",
            needs_assignment=True,
        ),
        StageSpec(
            name="responder",
            factory="streamharness.responder.service:ResponderStage",
            settings=("streamharness.responder.service:ResponderSettings", _GENERATION),
            # Decisions always; the frames' JPEGs only when prompts carry frames (configure()). Both keyed
            # tenant/stream with equal partition counts and the range assignor: a stream's frames and
            # decisions reach one member. Not needs_assignment: a response without frames is still an answer.
            consumes={topics.DECISIONS: events_pb2.DecisionEvent, topics.FRAMES: events_pb2.FrameEvent},
            produces=(topics.RESPONSES,),
            group="responder",
            offset_reset="earliest",
            offset_reset_reason="a decision made while no responder ran (first deploy, a crash) is still a "
            "question a user waits for",
            # One generation takes seconds: a member takes one decision per poll and commits it once
            # answered, so it never sits on a queue past max.poll.interval.ms (and gets evicted).
            batching=Batching(max_records=1),
            members=4,
            needs_partitions=True,
        ),
    )
}

#: Settings every stage service reads besides its own (the runner's, telemetry's and Kafka's).
COMMON_SETTINGS = ("streamharness.settings:ServiceSettings", "streamharness.settings:TelemetrySettings", _KAFKA)


def all_topics() -> list[str]:
    """Every logical topic of the pipeline, in a stable order."""
    seen: list[str] = []
    for spec in TOPOLOGY.values():
        for topic in spec.topics:
            if topic not in seen:
                seen.append(topic)
    return seen


def stage_spec(name: str) -> StageSpec:
    try:
        return TOPOLOGY[name]
    except KeyError:
        raise KeyError(f"no stage {name!r} in the topology; stages: {', '.join(TOPOLOGY)}") from None


def consumers_of(topic: str) -> list[str]:
    return [name for name, spec in TOPOLOGY.items() if topic in spec.consumes or topic in spec.tables]
