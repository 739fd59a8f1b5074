"""Long-term memory of streams: the store (Qdrant, in-process or server) and the memory stage.

``streamharness.memory.store`` has no heavy imports at module level; the service module imports the
text encoder (onnxruntime) and Kafka. Import what you need from the submodules::

    from streamharness.memory.store import FrameRecord, MemoryStore, QdrantEdgeMemoryStore
    from streamharness.memory.service import MemoryStage, MemorySettings
"""

from streamharness.memory.store import FrameRecord, MemoryStore, QdrantEdgeMemoryStore, QdrantServerMemoryStore, RecallHit, point_id

__all__ = ["FrameRecord", "MemoryStore", "QdrantEdgeMemoryStore", "QdrantServerMemoryStore", "RecallHit", "point_id"]
