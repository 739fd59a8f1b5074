"""The summariser: writes each chunk's summary (mid-term memory) and compresses M summaries into a
long-term block, through one of the backends of :mod:`streamharness.summariser.backends`.

The stage module is not imported here (it pulls in Kafka and gRPC clients)."""

from streamharness.summariser.backends import (
    BlockInput,
    ChunkFrame,
    ChunkInput,
    DigestSummariser,
    GeneratorSummariser,
    HFVisionSummariser,
    OpenAIVisionSummariser,
    SummariserBackend,
    SummaryPiece,
    make_backend,
)
from streamharness.summariser.settings import SummariserSettings

__all__ = [
    "BlockInput",
    "ChunkFrame",
    "ChunkInput",
    "DigestSummariser",
    "GeneratorSummariser",
    "HFVisionSummariser",
    "OpenAIVisionSummariser",
    "SummariserBackend",
    "SummariserSettings",
    "SummaryPiece",
    "make_backend",
]
