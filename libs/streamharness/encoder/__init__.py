"""The encoder stage: micro-batches frames of all streams through Triton's frame encoder and
people detector, and publishes what it saw to ``embeddings``. See ``service.py``."""

from streamharness.encoder.service import EncoderSettings, EncoderStage, EncoderStats, build_caption

__all__ = ["EncoderSettings", "EncoderStage", "EncoderStats", "build_caption"]
