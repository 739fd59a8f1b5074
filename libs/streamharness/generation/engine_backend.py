"""``SH_GENERATION_BACKEND=engine``: responses generated on the streaming engine's per-stream KV
cache (:mod:`streamharness.engine`), so a prompt whose beginning is the same as the stream's last
one — the system text and memory's stable prefix, byte-identical within a memory chunk — costs
only its new tokens, not a re-prefill of everything.

Per prompt: the ChatML token ids of the whole prompt; the longest common prefix with what the
stream's cache holds is kept, the rest is dropped (``truncate``) and the new tokens appended in
pieces, then the answer is generated greedily on the cache. A prompt with a ``task`` (a summary to
write) or no stream uses a cache of its own that is closed afterwards, so it never evicts a
stream's answer cache. One generation per stream at a time (a lock per stream); the engine's own
lock puts the forwards of several streams one after the other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from streamharness.engine.core import CacheFull
from streamharness.engine.model import IM_END, IM_START, DecodedText, TokenChunk
from streamharness.generation.base import GenerationError, GenerationRejected, Prompt, ResponseGenerator
from streamharness.generation.settings import GenerationSettings

log = logging.getLogger(__name__)


def chat_ids(model, prompt: Prompt) -> list[int]:
    """The ChatML ids of the prompt's messages and the assistant's opening."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in prompt.messages())
    return model.ids(text + f"{IM_START}assistant\n")


class EngineGenerator(ResponseGenerator):
    def __init__(self, settings: GenerationSettings, engine=None, engine_settings=None) -> None:
        """``engine``: a :class:`~streamharness.engine.StreamingEngine` to use (tests); else the
        process's shared engine for ``engine_settings`` (default ``SH_ENGINE_*``)."""
        self._settings = settings
        self._engine = engine
        self._engine_settings = engine_settings
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._scratch = 0
        self.reused_tokens = 0  # prompt tokens found in a stream's cache (for tests and logs)
        self.prefilled_tokens = 0

    def load(self) -> EngineGenerator:
        if self._engine is None:
            from streamharness.engine.settings import EngineSettings, shared_engine
            from streamharness.settings import load_settings

            self._engine = shared_engine(self._engine_settings or load_settings(EngineSettings))
        return self

    def ready(self) -> bool:
        return self._engine is not None

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def stream(self, prompt: Prompt) -> Iterator[str]:
        if self._engine is None:
            raise GenerationError("the engine is not loaded")
        if prompt.images:
            # Frames reach the engine's VLM through the model decision policy; this backend answers from text.
            raise GenerationRejected("SH_GENERATION_BACKEND=engine sends the model no frames; set SH_RESPONDER_FRAMES_PER_REQUEST=0 "
                                     "(or SH_DECISION_POLICY=model, which gives a VLM the frames)")
        ids = chat_ids(self._engine.model, prompt)
        capacity = self._engine.config.capacity
        max_new = min(prompt.max_new_tokens or self._settings.max_new_tokens, self._settings.max_new_tokens)
        if len(ids) + max_new > capacity:
            raise GenerationRejected(f"a prompt of {len(ids)} tokens plus {max_new} new ones exceeds SH_ENGINE_CAPACITY_TOKENS={capacity}")
        if prompt.stream and not prompt.task.strip():
            return self._generate(f"answer:{prompt.stream}", ids, max_new, keep=True)
        with self._locks_guard:
            self._scratch += 1
            name = f"scratch:{self._scratch}"
        return self._generate(name, ids, max_new, keep=False)

    def _generate(self, name: str, ids: list[int], max_new: int, *, keep: bool) -> Iterator[str]:
        engine, model = self._engine, self._engine.model
        with self._lock(name):
            try:
                cached = engine.tokens(name)
                common = 0
                for a, b in zip(cached, ids[:-1]):  # at least the last prompt token is appended (its logits start the answer)
                    if a != b:
                        break
                    common += 1
                if engine.has(name):
                    engine.truncate(name, common)
                self.reused_tokens += common
                self.prefilled_tokens += len(ids) - common
                rest = ids[common:]
                if len(rest) > 1:
                    engine.prefill(name, [TokenChunk(rest[:-1])])
                yield from DecodedText(model, engine.generate(name, rest[-1:], max_new_tokens=max_new, stop=[model.im_end]),
                                       model.im_end)
            except CacheFull as err:
                engine.close(name)
                raise GenerationError(f"the engine has no room for this response ({err})") from err
            finally:
                if not keep:
                    engine.close(name)
