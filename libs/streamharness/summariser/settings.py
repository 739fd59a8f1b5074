"""Settings of the summariser stage (``SH_SUMMARISER_*``); the chunk and block sizes are ``SH_TIERS_*``
(:class:`streamharness.memory.tiers.TierSettings`), shared with memory."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SummariserSettings(BaseSettings):
    """Who writes the mid-term summaries and long-term blocks, and when."""

    model_config = SettingsConfigDict(env_prefix="SH_SUMMARISER_", frozen=True, extra="forbid", case_sensitive=False)

    backend: Literal["generator", "openai-vlm", "hf-vlm", "digest"] = Field(
        "generator",
        description="generator = the text generator of SH_GENERATION_* (SmolLM2 here) over the chunk's captions; "
        "openai-vlm = an OpenAI-compatible VLM given the chunk's sampled frames (SH_SUMMARISER_VLM_*); "
        "hf-vlm = a local Hugging Face VLM (SH_SUMMARISER_HF_MODEL_PATH); digest = the deterministic digest only.",
    )
    lead_frames: int = Field(
        15, ge=0, le=10_000,
        description="Frames before a chunk boundary at which its summary starts; those last frames carry into the next chunk.",
    )
    images_per_chunk: int = Field(8, ge=1, le=256, description="Frames (evenly sampled, timestamped) a VLM backend sees per chunk.")
    image_max_side: int = Field(448, ge=64, le=4096, description="Longest side of the frames sent to a VLM backend (pixels).")
    max_new_tokens: int = Field(160, ge=16, le=4096, description="Token budget of one chunk summary.")
    block_max_new_tokens: int = Field(200, ge=16, le=4096, description="Token budget of one long-term block.")
    max_caption_lines: int = Field(80, ge=4, le=10_000, description="Caption lines (runs of equal captions) a text prompt holds; runs are merged to fit.")
    timeout_s: float = Field(
        60.0, gt=0, le=3600,
        description="Longest one summary or block may take, tries included, before the fallback digest is written instead "
        "(keep 2x this under the consumer's max.poll.interval.ms, 300 s).",
    )
    catch_up_chunks: int = Field(
        2, ge=0, le=1000,
        description="After a restart, chunks before the current one that memory has no summary of are summarised from memory's frames (at most this many).",
    )
    attempts: int = Field(2, ge=1, le=10, description="Tries of the model per summary before the fallback digest is written.")
    retry_wait_s: float = Field(1.0, ge=0, le=60, description="Wait between two tries.")
    vlm_base_url: str = Field("", description="openai-vlm: the API root up to and including /v1 (vLLM, SGLang, a hosted API).")
    vlm_model: str = Field("", description="openai-vlm: the model name sent in requests.")
    vlm_api_key: SecretStr | None = Field(None, description="openai-vlm: bearer token (a secret: mount it from a Kubernetes Secret).")
    hf_model_path: Path | None = Field(None, description="hf-vlm: a local folder with a Hugging Face image-text-to-text model (e.g. Qwen2-VL).")
    hf_device: str = Field("cpu", description="hf-vlm: torch device (cpu, cuda, cuda:1).")
    memory_address: str = Field(
        "127.0.0.1:50052",
        description="Memory gRPC host:port: after a restart the summariser reads the chunk's frames and the block's summaries back from it.",
    )
    memory_timeout_s: float = Field(5.0, gt=0, le=120, description="Deadline of one memory call.")
    memory_wait_s: float = Field(
        60.0, ge=0, le=600,
        description="After a restart, how long a summary waits for memory to catch up before reading the chunk's earlier frames back from it.",
    )
    consumer_group: str = Field("summariser", min_length=1, description="Kafka consumer group (gets SH_KAFKA_TOPIC_PREFIX).")
    publish_timeout_s: float = Field(10.0, gt=0, le=300, description="How long to wait for the broker to acknowledge a summary.")

    @model_validator(mode="after")
    def _backend_needs(self) -> SummariserSettings:
        if self.backend == "openai-vlm" and not (self.vlm_base_url and self.vlm_model):
            raise ValueError("SH_SUMMARISER_BACKEND=openai-vlm needs SH_SUMMARISER_VLM_BASE_URL and SH_SUMMARISER_VLM_MODEL")
        if self.backend == "hf-vlm" and self.hf_model_path is None:
            raise ValueError("SH_SUMMARISER_BACKEND=hf-vlm needs SH_SUMMARISER_HF_MODEL_PATH")
        return self

    @property
    def takes_images(self) -> bool:
        return self.backend in ("openai-vlm", "hf-vlm")
