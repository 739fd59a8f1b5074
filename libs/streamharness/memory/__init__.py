"""Long-term memory of streams: the tiers (``tiers``), the store (Qdrant, in-process or server), the
time-phrase reader (``timephrases``) and the memory stage (``service``).

``streamharness.memory.store`` has no heavy imports at module level; the service module imports the
text encoder (onnxruntime). Import what you need from the submodules::

    from streamharness.memory.store import Entry, MemoryStore, QdrantEdgeMemoryStore
    from streamharness.memory.service import MemoryStage, MemorySettings
"""

from streamharness.memory.store import Entry, MemoryStore, QdrantEdgeMemoryStore, QdrantServerMemoryStore, Scope, entry_id
from streamharness.memory.tiers import TierSettings, estimate_tokens

__all__ = ["Entry", "MemoryStore", "QdrantEdgeMemoryStore", "QdrantServerMemoryStore", "Scope", "TierSettings", "entry_id", "estimate_tokens"]
