"""Logical topic names of the pipeline (``KafkaSettings.topic`` adds the install's prefix)."""

FRAMES = "frames"  # FrameEvent: ingest -> encoder
EMBEDDINGS = "embeddings"  # EncodedFrameEvent: encoder -> decision, memory
QUERIES = "queries"  # QueryEvent: gateway -> decision
DECISIONS = "decisions"  # DecisionEvent: decision -> responder
RESPONSES = "responses"  # ResponseEvent: responder -> gateway, memory (Q&A history)
SUMMARIES = "summaries"  # SummaryEvent: summariser -> memory

PIPELINE = (FRAMES, EMBEDDINGS, QUERIES, DECISIONS, RESPONSES, SUMMARIES)
