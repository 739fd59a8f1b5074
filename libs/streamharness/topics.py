"""Logical topic names of the pipeline (``KafkaSettings.topic`` adds the install's prefix)."""

FRAMES = "frames"  # FrameEvent: ingest -> encoder
EMBEDDINGS = "embeddings"  # EncodedFrameEvent: encoder -> decision, memory
QUERIES = "queries"  # QueryEvent: gateway -> decision
DECISIONS = "decisions"  # DecisionEvent: decision -> responder
RESPONSES = "responses"  # ResponseEvent: responder -> gateway, memory (Q&A history)
SUMMARIES = "summaries"  # SummaryEvent: summariser -> memory
STREAM_STATE = "stream-state"  # StreamStateRecord: decision's durable per-stream state (compacted changelog)
DECISION_LOG = "decision-log"  # DecisionEvent: every decided second, silent ones too (decision -> gateway: live view, want_decisions)

PIPELINE = (FRAMES, EMBEDDINGS, QUERIES, DECISIONS, RESPONSES, SUMMARIES, STREAM_STATE, DECISION_LOG)

#: Topic configs set when the platform creates a topic: changelogs are compacted (the latest
#: record per stream is kept for ever; a tombstone removes it), so a restore reads one record per
#: live stream rather than the whole history.
CONFIGS: dict[str, dict[str, str]] = {
    STREAM_STATE: {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "600000",
                   "delete.retention.ms": "3600000"},
    # A view of the last hours, not a record: read live by the gateways (kept 6 h).
    DECISION_LOG: {"retention.ms": str(6 * 3600 * 1000)},
}
