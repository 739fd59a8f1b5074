"""The generator server (SmolLM2 with real weights behind KServe's model server, a real subprocess
on 127.0.0.1) called through OpenAICompatibleGenerator, the client the responder uses.

Needs the ``generator_server`` fixture from ``tests/fixtures_generation.py``."""

from __future__ import annotations

import socket

import httpx
import pytest

from streamharness.generation import GenerationSettings, OpenAICompatibleGenerator, Prompt
from streamharness.generation.base import GenerationError, GenerationRejected
from streamharness.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def test_streams_a_real_answer_in_several_chunks(generation_settings: GenerationSettings) -> None:
    generator = OpenAICompatibleGenerator(generation_settings)
    try:
        assert generator.ready()
        chunks = list(generator.stream(Prompt(system=SYSTEM, question="What is the capital of France?")))
    finally:
        generator.close()
    text = "".join(chunks)
    assert len(chunks) >= 3, chunks  # streamed, not one blob
    assert all(chunks), chunks
    letters = [c for c in text if c.isalpha()]
    assert len(letters) >= 10 and sum(c.isascii() for c in letters) / len(letters) > 0.95, text
    # A real model, greedy: SmolLM2-135M-Instruct knows this one.
    assert "paris" in text.lower(), text


def test_server_speaks_the_openai_and_v2_protocols(generator_server, generation_settings) -> None:
    root = generator_server.root
    assert httpx.get(f"{root}/v2/health/ready", timeout=5).status_code == 200
    assert httpx.get(f"{root}/v2/models/smollm2/ready", timeout=5).status_code == 200
    models = httpx.get(f"{generation_settings.base_url}/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["smollm2"]

    reply = httpx.post(
        f"{generation_settings.base_url}/chat/completions",
        json={"model": "smollm2", "max_tokens": 8, "temperature": 0,
              "messages": [{"role": "user", "content": "Say hello."}]},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].strip()
    assert 0 < body["usage"]["completion_tokens"] <= 8


def test_bad_requests_get_a_clear_4xx(generation_settings: GenerationSettings) -> None:
    generator = OpenAICompatibleGenerator(generation_settings)
    try:
        with pytest.raises(GenerationRejected, match=r"HTTP 400.*messages"):
            list(generator.stream_request({"model": "smollm2", "messages": []}))
        with pytest.raises(GenerationRejected, match=r"HTTP 400.*role"):
            list(generator.stream_request({"model": "smollm2", "messages": [{"role": "robot", "content": "hi"}]}))
        with pytest.raises(GenerationRejected, match=r"HTTP 404.*'gpt-9' does not exist"):
            list(generator.stream_request({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}))
    finally:
        generator.close()
    # A generator configured for a model the server does not serve is not ready.
    other = OpenAICompatibleGenerator(generation_settings.model_copy(update={"model": "gpt-9"}))
    try:
        assert not other.ready()
    finally:
        other.close()


def test_an_unreachable_backend_is_not_ready_and_fails_retryably() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens there
    settings = load_settings(GenerationSettings, base_url=f"http://127.0.0.1:{port}/openai/v1", api_key=None)
    generator = OpenAICompatibleGenerator(settings)
    try:
        assert not generator.ready()
        with pytest.raises(GenerationError, match="cannot reach the generation backend") as info:
            list(generator.stream(Prompt(system=SYSTEM, question="Anyone there?")))
        assert not isinstance(info.value, GenerationRejected)
    finally:
        generator.close()
