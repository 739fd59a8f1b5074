"""Response generation: the :class:`ResponseGenerator` interface and its backends.

- :class:`OpenAICompatibleGenerator`: any OpenAI-compatible server (our KServe generator server,
  vLLM, SGLang, hosted APIs), streamed over HTTP server-sent events;
- :class:`LocalSmolLM2Generator`: SmolLM2-135M-Instruct in-process (what the KServe server runs).

``kserve_server`` is not imported here: it imports ``kserve``, which cannot share a process with
``tritonclient.grpc``.
"""

from streamharness.generation.base import FrameImage, GenerationError, GenerationRejected, Prompt, ResponseGenerator
from streamharness.generation.local_smollm2 import LocalSmolLM2Generator
from streamharness.generation.openai_client import OpenAICompatibleGenerator
from streamharness.generation.settings import GenerationSettings


def make_generator(settings: GenerationSettings) -> ResponseGenerator:
    """The backend ``settings.backend`` names (not loaded yet: call ``load()`` on a local one)."""
    if settings.backend == "local":
        return LocalSmolLM2Generator(settings)
    if settings.backend == "engine":
        from streamharness.generation.engine_backend import EngineGenerator

        return EngineGenerator(settings)
    return OpenAICompatibleGenerator(settings)


__all__ = [
    "FrameImage",
    "GenerationError",
    "GenerationRejected",
    "GenerationSettings",
    "LocalSmolLM2Generator",
    "OpenAICompatibleGenerator",
    "Prompt",
    "ResponseGenerator",
    "make_generator",
]
