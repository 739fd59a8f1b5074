"""The streaming engine: per-stream KV caches on one Hugging Face model (see :mod:`.core`)."""

from streamharness.engine.core import CacheFull, EngineConfig, StreamingEngine
from streamharness.engine.model import EngineModel, ImageRejected, TokenChunk, load_engine_model

__all__ = ["CacheFull", "EngineConfig", "EngineModel", "ImageRejected", "StreamingEngine", "TokenChunk", "load_engine_model"]
