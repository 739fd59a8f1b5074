"""The response-generation interface: a prompt in, a stream of text chunks out.

Backends implement :class:`ResponseGenerator`; the responder only sees this interface, so a real
VLM behind any OpenAI-compatible server (vLLM, SGLang, a hosted API, our KServe server) drops in
by configuration.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from streamharness.errors import DependencyUnavailable, InvalidInput


class GenerationError(DependencyUnavailable):
    """The backend failed or could not be reached; retrying later may work."""


class GenerationRejected(InvalidInput):
    """The backend refused the request itself (HTTP 4xx): retrying the same request will not help."""


@dataclass(frozen=True)
class FrameImage:
    """One frame a prompt shows the model: its media time and its JPEG bytes."""

    media_ts_ms: int
    jpeg: bytes


@dataclass(frozen=True)
class Prompt:
    """What one response is built from. The order of the rendered parts is fixed on purpose: the
    system text and the memory context come first and change only at memory-chunk boundaries, so a
    server with prefix caching (vLLM, SGLang) reuses their KV cache; recent captions and the
    question, which change every call, come last.

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

    def user_text(self) -> str:
        parts: list[str] = []
        if self.context.strip():
            context = self.context.strip()
            parts.append(context if self.task.strip() else f"Memory of the stream so far:\n{context}")
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

    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style chat messages."""
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user_text()}]


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
