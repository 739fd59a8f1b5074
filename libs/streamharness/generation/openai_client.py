"""A :class:`ResponseGenerator` that calls any OpenAI-compatible ``/chat/completions`` endpoint with
``stream=true`` and reads the server-sent events: our KServe generator, vLLM, SGLang, TensorRT-LLM,
hosted APIs.

A prompt with frames is sent as OpenAI content parts (:meth:`Prompt.content_parts`: memory, then the
frames in media-time order, then the question, so that prefix caching hits). A prompt that names its
stream carries ``cache_salt`` (``SH_GENERATION_CACHE_SALT``): one value per tenant, so a server with
prefix caching shares cached prefixes between the streams of one tenant and never across tenants.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
from pydantic import SecretStr

from streamharness.generation.base import (
    GenerationError,
    GenerationRejected,
    Prompt,
    ResponseGenerator,
    images_refused_hint,
)
from streamharness.generation.settings import GenerationSettings

log = logging.getLogger(__name__)

# Retrying these later can work; any other 4xx means the request itself is wrong.
_TRANSIENT_STATUS = {408, 409, 425, 429}
# A 400 that says this is about the images (a text-only model behind the server, vision disabled).
_ABOUT_IMAGES = re.compile(r"image|vision|multi-?modal", re.IGNORECASE)
# Hashed with the tenant into cache_salt. Not a secret: the salt keeps tenants' cached prefixes
# apart on a server that only the platform calls (the tenant comes from the authenticated session);
# hashing keeps tenant names out of the server's requests and logs.
CACHE_SALT_NAMESPACE = "streamharness/prefix-cache-salt/v1/"


def cache_salt(stream: str) -> str | None:
    """The ``cache_salt`` of a prompt's ``"tenant/stream"``: the SHA-256 (hex) of the tenant, equal for
    every stream of one tenant; None without a tenant."""
    tenant = stream.partition("/")[0].strip()
    if not tenant:
        return None
    return hashlib.sha256(f"{CACHE_SALT_NAMESPACE}{tenant}".encode()).hexdigest()


def image_parts(payload: dict[str, Any]) -> int:
    """How many ``image_url`` content parts a chat-completions request body carries."""
    count = 0
    for message in payload.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")
    return count


def error_message(response: httpx.Response) -> str:
    """The server's own words for an error: OpenAI's {"error": {"message"}}, KServe's {"error": "..."}."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if error:
        return str(error)
    return json.dumps(body)[:500]


def iter_sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data`` payloads of a server-sent-event stream (multi-line data joined by newlines)."""
    data: list[str] = []
    for line in lines:
        if not line:  # a blank line ends an event
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):  # comment / keep-alive
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def openai_http_client(base_url: str, api_key: SecretStr | None, *, accept: str, timeout: httpx.Timeout,
                       transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """An HTTP client for an OpenAI-compatible API root (``.../v1``), with the bearer token if any."""
    httpx_log = logging.getLogger("httpx")
    if httpx_log.level == logging.NOTSET:
        # httpx logs every request at INFO: the readiness probe alone would flood the logs.
        httpx_log.setLevel(logging.WARNING)
    headers = {"Accept": accept}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
    return httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout, transport=transport)


def served_models(client: httpx.Client, timeout_s: float) -> set[str] | None:
    """The model ids ``GET models`` lists, or None when the server does not answer it properly."""
    try:
        response = client.get("models", timeout=timeout_s)
    except httpx.TransportError as err:
        log.debug("%s not reachable: %r", client.base_url, err)
        return None
    if response.status_code != 200:
        return None
    try:
        return {m.get("id") for m in response.json().get("data") or ()}
    except (ValueError, AttributeError):
        return None


class OpenAICompatibleGenerator(ResponseGenerator):
    def __init__(self, settings: GenerationSettings, *, transport: httpx.BaseTransport | None = None) -> None:
        self._settings = settings
        self._client = openai_http_client(
            settings.base_url, settings.api_key, accept="text/event-stream",
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s), transport=transport,
        )

    def _payload(self, prompt: Prompt) -> dict[str, Any]:
        s = self._settings
        max_tokens = min(prompt.max_new_tokens or s.max_new_tokens, s.max_new_tokens)
        payload: dict[str, Any] = {
            "model": s.model,
            "messages": prompt.messages(),
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        salt = cache_salt(prompt.stream) if s.cache_salt else None
        if salt is not None:
            payload["cache_salt"] = salt  # vLLM's, SGLang's and TensorRT-LLM's field; others ignore it
        return payload

    def stream(self, prompt: Prompt) -> Iterator[str]:
        return self.stream_request(self._payload(prompt))

    def stream_request(self, payload: dict[str, Any]) -> Iterator[str]:
        """Stream a raw chat-completions request body (``stream`` is forced on)."""
        payload = {**payload, "stream": True}
        try:
            with self._client.stream("POST", "chat/completions", json=payload) as response:
                if response.status_code >= 400:
                    response.read()
                    detail = error_message(response)
                    message = f"{self._settings.base_url}/chat/completions -> HTTP {response.status_code}: {detail}"
                    if response.status_code < 500 and response.status_code not in _TRANSIENT_STATUS:
                        images = image_parts(payload)
                        if images or (response.status_code == 400 and _ABOUT_IMAGES.search(detail)):
                            message = f"{message} ({images_refused_hint(images)})"
                        raise GenerationRejected(message)
                    raise GenerationError(message)
                for data in iter_sse_data(response.iter_lines()):
                    if data.strip() == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise GenerationError(f"backend sent an event that is not JSON: {data[:200]!r}") from None
                    if "error" in chunk:
                        raise GenerationError(f"backend failed mid-stream: {chunk['error']}")
                    for choice in chunk.get("choices") or ():
                        text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                        if text:
                            yield text
        except httpx.TransportError as err:
            raise GenerationError(f"cannot reach the generation backend at {self._settings.base_url}: {err!r}") from err

    def ready(self) -> bool:
        ids = served_models(self._client, self._settings.ready_timeout_s)
        return ids is not None and self._settings.model in ids

    def close(self) -> None:
        self._client.close()
