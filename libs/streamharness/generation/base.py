"""The response-generation interface: a prompt in, a stream of text chunks out.

Backends implement :class:`ResponseGenerator`; the responder only sees this interface, so a real
VLM behind any OpenAI-compatible server (vLLM, SGLang, a hosted API, our KServe server) drops in
by configuration.
"""

from __future__ import annotations

import abc
import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamharness.errors import DependencyUnavailable, InvalidInput
from streamharness.memory.timephrases import clock

#: The responder setting that decides whether a prompt carries frames; named when a backend refuses them.
FRAMES_SETTING = "SH_RESPONDER_FRAMES_PER_REQUEST"


def images_refused_hint(count: int) -> str:
    """What to do when a backend refused a request that carried ``count`` frame images (0: its answer
    spoke of images)."""
    what = f"the request carried {count} frame image(s)" if count else "the backend's answer is about images"
    return (f"{what}: point SH_GENERATION_BASE_URL at a vision-language model, send fewer or smaller frames "
            f"(SH_RESPONDER_FRAME_MAX_PIXELS), or set {FRAMES_SETTING}=0 to send text only")


class GenerationError(DependencyUnavailable):
    """The backend failed or could not be reached; retrying later may work."""


class GenerationRejected(InvalidInput):
    """The backend refused the request itself (HTTP 4xx): retrying the same request will not help."""


@dataclass(frozen=True)
class FrameImage:
    """One frame a prompt shows the model: its media time and its JPEG bytes."""

    media_ts_ms: int
    jpeg: bytes

    def label(self) -> str:
        """The text part put before the frame: its media time ("Frame at 0:01:05:")."""
        return f"Frame at {clock(self.media_ts_ms)}:"

    def data_url(self) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode("ascii")


@dataclass(frozen=True)
class Prompt:
    """What one response is built from. The order of the rendered parts is fixed on purpose: the
    system text and the memory context come first and change only at memory-chunk boundaries, so a
    server with prefix caching (vLLM, SGLang) reuses their KV cache; the recent frames (``images``,
    only for a backend that sees them: :meth:`content_parts`) follow in media-time order, and recent
    captions and the question, which change every call, come last.

    A prompt asks a ``question``, fires a standing ``instruction``, or sets a ``task`` (a summary to
    write, say): with a task the user text is the context as given (no heading: the caller titles
    it), the recent captions, then the task."""

    system: str
    context: str = ""
    recent_captions: Sequence[str] = field(default_factory=tuple)
    question: str = ""
    instruction: str = ""
    max_new_tokens: int | None = None
    task: str = ""
    stream: str = ""  # "tenant/stream": per-stream caches (the engine) and per-tenant cache isolation (cache_salt)
    images: Sequence[FrameImage] = field(default_factory=tuple)  # recent frames, oldest first

    def __post_init__(self) -> None:
        if self.task.strip():
            if self.question.strip() or self.instruction.strip():
                raise InvalidInput("a prompt with a task takes no question or instruction")
        elif not (self.question.strip() or self.instruction.strip()):
            raise InvalidInput("a prompt needs a question, an instruction or a task")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def memory_text(self) -> str:
        """The memory block: "Memory of the stream so far:" and the context ('' without context; the
        context as given, with no heading, for a task)."""
        if not self.context.strip():
            return ""
        context = self.context.strip()
        return context if self.task.strip() else f"Memory of the stream so far:\n{context}"

    def tail_text(self) -> str:
        """What changes every call: the recent captions, then the question, instruction or task."""
        parts: list[str] = []
        captions = [c.strip() for c in self.recent_captions if c.strip()]
        if captions:
            parts.append("What the camera shows now (oldest first):\n" + "\n".join(f"- {c}" for c in captions))
        if self.task.strip():
            parts.append(self.task.strip())
        elif self.question.strip():
            parts.append(f"Question: {self.question.strip()}")
        else:
            parts.append(
                f"Standing instruction: {self.instruction.strip()}\n"
                "It has just been triggered. Write one short sentence alerting the user."
            )
        return "\n\n".join(parts)

    def user_text(self) -> str:
        """The user message as one text (what a text-only prompt sends): memory block, then the tail."""
        memory = self.memory_text()
        return f"{memory}\n\n{self.tail_text()}" if memory else self.tail_text()

    def content_parts(self) -> list[dict[str, Any]]:
        """The user message as OpenAI content parts, for a prompt with images, laid out for prefix caching.

        A server with automatic prefix caching (vLLM's APC, SGLang's radix cache, TensorRT-LLM's KV
        reuse) reuses the KV cache of the longest prefix of tokens it has already seen — images
        included, by a hash of their bytes — and nothing after the first part that differs. So the
        parts go from the most stable to the least:

        1. the memory block, byte for byte the text a text-only prompt starts with: it changes only
           at memory-chunk boundaries, so every request of a stream within a chunk shares it (after
           the system message, which never changes);
        2. the frames in media-time order, oldest first, each a text part with its time ("Frame at
           0:01:05:") then its ``image_url`` part (a JPEG data URL): the next request of the stream
           has the same earlier frames in the same places, one more at the end (until its ring is
           full and the oldest goes, after which the shared prefix ends at the memory block);
        3. the recent captions and the question, instruction or task, which change every call.

        Putting the frames or the question before the memory block would make the whole memory
        block miss the cache on every request.
        """
        parts: list[dict[str, Any]] = []
        memory = self.memory_text()
        if memory:
            parts.append({"type": "text", "text": memory})
        for image in sorted(self.images, key=lambda i: i.media_ts_ms):
            parts.append({"type": "text", "text": image.label()})
            parts.append({"type": "image_url", "image_url": {"url": image.data_url()}})
        parts.append({"type": "text", "text": self.tail_text()})
        return parts

    def messages(self) -> list[dict[str, Any]]:
        """OpenAI-style chat messages: the system message, then the user message — one text without
        images (:meth:`user_text`), content parts with them (:meth:`content_parts`)."""
        user: str | list[dict[str, Any]] = self.content_parts() if self.images else self.user_text()
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


class ResponseGenerator(abc.ABC):
    """Streams a response to a :class:`Prompt` as text chunks (tokens or words)."""

    def load(self) -> ResponseGenerator:
        """Load weights or open clients; called once before the first ``stream`` (idempotent)."""
        return self

    @abc.abstractmethod
    def stream(self, prompt: Prompt) -> Iterator[str]:
        """Yield the response's text in order. Closing the iterator early cancels the generation.

        Raises :class:`GenerationError` when the backend fails or cannot be reached, and
        :class:`GenerationRejected` when it refuses the request.
        """

    @abc.abstractmethod
    def ready(self) -> bool:
        """True when the backend can generate right now."""

    def close(self) -> None:
        """Release clients and models."""
