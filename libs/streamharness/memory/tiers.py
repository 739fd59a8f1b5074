"""The three memory tiers' shape, shared by the memory and summariser stages (``SH_TIERS_*``).

- **short-term**: the current chunk's frames (captions, labels, people counts, embeddings);
- **mid-term**: one written summary per chunk of ``chunk_s`` media seconds;
- **long-term**: blocks, each compressed from ``summaries_per_block`` (M) chunk summaries; the newest
  ``blocks_kept`` (L) are kept, and fewer when their text passes ``long_tokens``.

What one stream remembers spans ``chunk_s * (1 + M + M * L)`` media seconds (the current chunk, the
mid-term summaries not folded into a block yet, and the blocks): the paper's 200 s / 5 / 42 give
43,200 s = 12 h, the default. ``horizon_s`` (0 = that span) is when everything of a stream is deleted:
frames, summaries, blocks and the Q&A history older than ``newest media time - horizon``.

The 24-hour profile (docs/memory.md): ``SH_TIERS_SUMMARIES_PER_BLOCK=6``,
``SH_TIERS_BLOCKS_KEPT=71``, ``SH_TIERS_LONG_TOKENS=22000`` → 200 * (1 + 6 + 426) = 86,600 s.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Characters per token assumed when a text's tokens are counted without its model's tokenizer
#: (English text under the BPE tokenizers of the supported LLMs averages about 4).
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """Tokens ``text`` takes in a prompt, estimated from its length (no tokenizer needed)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


class TierSettings(BaseSettings):
    """The tiers' sizes and budgets: read by memory and the summariser alike, so their chunks agree."""

    model_config = SettingsConfigDict(env_prefix="SH_TIERS_", frozen=True, extra="forbid", case_sensitive=False)

    chunk_s: float = Field(200.0, ge=10, le=86_400, description="Chunk length (media seconds): one mid-term summary per chunk; the short-term tier is the current chunk.")
    summaries_per_block: int = Field(5, ge=1, le=1000, description="M: chunk summaries compressed into one long-term block.")
    blocks_kept: int = Field(42, ge=1, le=100_000, description="L: long-term blocks kept per stream (the oldest is evicted).")
    horizon_s: float = Field(0.0, ge=0, le=30 * 86_400, description="Media seconds a stream remembers; older frames, summaries, blocks and Q&A are deleted. 0 = chunk_s * (1 + M + M*L) (12 h by default).")
    mid_tokens: int = Field(2000, ge=0, le=1_000_000, description="Token budget of the mid-term summaries in a Context prefix (the newest fit).")
    long_tokens: int = Field(
        13000, ge=0, le=1_000_000,
        description="Token budget of the long-term blocks: blocks past it are evicted, newest kept. Keep it >= L x a block's "
        "tokens (the digest's run ~275-305, SH_SUMMARISER_BLOCK_MAX_NEW_TOKENS for a model), or fewer than L blocks stay.",
    )
    qa_history: int = Field(40, ge=0, le=10_000, description="Questions and answers a Context returns (the newest).")
    qa_tokens: int = Field(1500, ge=0, le=1_000_000, description="Token budget of the Q&A history in a Context (the newest fit).")

    @model_validator(mode="after")
    def _horizon_holds_the_tiers(self) -> TierSettings:
        if self.horizon_s and self.horizon_s < self.chunk_s * 2:
            raise ValueError(f"SH_TIERS_HORIZON_S={self.horizon_s} is shorter than two chunks ({2 * self.chunk_s} s)")
        return self

    @property
    def chunk_ms(self) -> int:
        return int(round(self.chunk_s * 1000))

    @property
    def block_ms(self) -> int:
        return self.chunk_ms * self.summaries_per_block

    @property
    def span_s(self) -> float:
        """What the tiers hold when full: the current chunk, M mid-term summaries, L blocks."""
        m, blocks = self.summaries_per_block, self.blocks_kept
        return self.chunk_s * (1 + m + m * blocks)

    @property
    def horizon_ms(self) -> int:
        return int(round((self.horizon_s or self.span_s) * 1000))

    def chunk_index(self, media_ts_ms: int) -> int:
        return max(0, int(media_ts_ms)) // self.chunk_ms

    def boundary_ms(self, chunk_index: int) -> int:
        """The media time chunk ``chunk_index`` ends at (exclusive) = where the next one starts."""
        return (chunk_index + 1) * self.chunk_ms

    def block_of(self, chunk_index: int) -> int:
        return chunk_index // self.summaries_per_block

    def block_chunks(self, block_index: int) -> range:
        m = self.summaries_per_block
        return range(block_index * m, (block_index + 1) * m)


def summary_id(key: str, tier: str, index: int) -> str:
    """Deterministic id of a stream's chunk summary (``tier="mid"``) or block (``"long"``)."""
    return f"{key}/{tier}/{int(index)}"


__all__ = ["CHARS_PER_TOKEN", "TierSettings", "estimate_tokens", "summary_id"]
