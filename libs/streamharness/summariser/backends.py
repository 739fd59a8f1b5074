"""Summariser backends: who writes a chunk's summary (mid-term) and a block's compression (long-term).

All sit behind :class:`SummariserBackend`; ``SH_SUMMARISER_BACKEND`` picks one (:func:`make_backend`):

- :class:`GeneratorSummariser` (``generator``): the response generator of ``SH_GENERATION_*``
  (SmolLM2 here, any OpenAI-compatible server elsewhere) over the chunk's caption lines;
- :class:`OpenAIVisionSummariser` (``openai-vlm``): an OpenAI-compatible VLM shown the chunk's sampled
  frames, each after its ``[H:MM:SS]``, and the caption lines;
- :class:`HFVisionSummariser` (``hf-vlm``): a local Hugging Face image-text-to-text model;
- :class:`DigestSummariser` (``digest``): no model, deterministic; also what the stage writes when a
  model is down, slow or failing (model backends raise :class:`GenerationError` then).

A chunk with nothing to show a model (no captions and no images) gets the digest from every backend:
asking a model about nothing only invites it to make something up.
"""

from __future__ import annotations

import abc
import base64
import inspect
import io
import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from streamharness.errors import InvalidInput
from streamharness.generation import GenerationSettings, make_generator
from streamharness.generation.base import (
    GenerationError,
    Prompt,
    ResponseGenerator,
)
from streamharness.generation.openai_client import error_message, openai_http_client, served_models
from streamharness.summariser import prompts
from streamharness.summariser.prompts import clock, span
from streamharness.summariser.settings import SummariserSettings

log = logging.getLogger(__name__)


# -- inputs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkFrame:
    """One frame of a chunk as the summariser sees it."""

    media_ts_ms: int
    caption: str
    labels: tuple[str, ...] = ()
    person_count: int = 0
    jpeg: bytes | None = None  # only on sampled frames, for backends that see images


@dataclass(frozen=True)
class ChunkInput:
    """One chunk to summarise."""

    key: str  # "<tenant>/<stream_id>"
    index: int  # chunk number
    start_ms: int  # media time covered, inclusive
    end_ms: int
    frames: tuple[ChunkFrame, ...]  # oldest first


@dataclass(frozen=True)
class SummaryPiece:
    """One chunk summary, input of a block compression."""

    index: int
    start_ms: int
    end_ms: int
    text: str
    fallback: bool = False  # written by the digest because the model failed


@dataclass(frozen=True)
class BlockInput:
    """M chunk summaries to compress into one long-term block."""

    key: str
    index: int
    start_ms: int
    end_ms: int
    summaries: tuple[SummaryPiece, ...]  # oldest first


class SummariserBackend(abc.ABC):
    """Writes chunk summaries and block compressions."""

    name: str
    takes_images: bool = False

    def load(self) -> SummariserBackend:
        """Load weights or open clients; called once before the first summary (idempotent)."""
        return self

    @abc.abstractmethod
    def summarise(self, chunk: ChunkInput) -> str:
        """The chunk's summary. Raises :class:`GenerationError` when the model is down, slow or failing."""

    @abc.abstractmethod
    def compress(self, block: BlockInput) -> str:
        """One block's text from its summaries. Raises :class:`GenerationError` like :meth:`summarise`."""

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        """Release clients and models."""


def _has_content(chunk: ChunkInput) -> bool:
    return any(f.caption.strip() or f.jpeg for f in chunk.frames)


def tidy(text: str, max_words: int) -> str:
    """A model's text with repeated sentences dropped (small models loop), a last sentence that the
    token budget cut off dropped, and cut, at a sentence end where one falls in, to ``max_words``;
    line breaks are kept."""
    pieces = re.split(r"((?<=[.!?])[ \t]+|\s*\n\s*)", text.strip())
    kept: list[str] = []
    seen: set[str] = set()
    words = 0
    sentences, seps = pieces[0::2], [*pieces[1::2], ""]
    if len(sentences) > 1 and "\n" not in seps[-2] and not re.search(r"[.!?)\]\"']$", sentences[-1]):
        sentences, seps = sentences[:-1], seps[:-1]  # a sentence cut off by the token budget
    for sentence, sep in zip(sentences, seps, strict=True):
        norm = " ".join(sentence.lower().split())
        if not norm or norm in seen:
            continue
        n = len(sentence.split())
        if words + n > max_words:
            if not kept:
                kept.append(_words(sentence, max_words))
            break
        seen.add(norm)
        kept.append(sentence.strip() + ("\n" if "\n" in sep else " "))
        words += n
    return "".join(kept).strip()


def _checked(text: str, what: str, max_words: int) -> str:
    text = tidy(text, max_words)
    if not text:
        raise GenerationError(f"the model wrote an empty {what}")
    return text


# -- digest --------------------------------------------------------------------------------------
_WORD_CAP = 12  # words of one caption in a digest
# Words a model's summary or block is cut to: the prompts ask for CHUNK_WORDS / BLOCK_WORDS.
_CHUNK_CAP = prompts.CHUNK_WORDS * 3 // 2
_BLOCK_CAP = prompts.BLOCK_WORDS * 3 // 2
_END_SENTENCE = re.compile(r"^(at|by|in) the end\b|^finally\b|^end state\b", re.IGNORECASE)
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def _words(text: str, limit: int) -> str:
    words = text.split()
    return " ".join(words) if len(words) <= limit else " ".join(words[:limit]) + " …"


def _people(n: int) -> str:
    return "1 person" if n == 1 else f"{n} people"


def _label_changes(frames: Sequence[ChunkFrame], steady: int = 2) -> list[tuple[int, str, bool]]:
    """(media ms, label, appeared) when a label appears or disappears. A label's state flips only
    after ``steady`` frames in a row disagree with it (detector flicker is not a change); the time is
    the first of those frames. Labels of the first frame are the starting state, not changes."""
    if not frames:
        return []
    sets = [{label.strip() for label in f.labels if label.strip()} for f in frames]
    state = set(sets[0])
    streak: dict[str, int] = {}
    changes: list[tuple[int, str, bool]] = []
    for i in range(1, len(frames)):
        for label in sorted(state | sets[i]):
            if (label in sets[i]) == (label in state):
                streak.pop(label, None)
                continue
            streak[label] = streak.get(label, 0) + 1
            if streak[label] >= steady:
                start = i - streak[label] + 1
                appeared = label not in state
                changes.append((frames[start].media_ts_ms, label, appeared))
                (state.add if appeared else state.discard)(label)
                streak.pop(label)
    changes.sort(key=lambda c: (c[0], c[1]))
    return changes


class DigestSummariser(SummariserBackend):
    """No model: the chunk's caption runs, changes, counts and end state, in at most ~120 words.
    The same input always gives byte-identical text."""

    name = "digest"

    #: (scenes, changes, labels) tried from the most to the least until the text fits the words.
    _LADDER = ((4, 6, 5), (4, 4, 4), (3, 4, 3), (3, 2, 3), (2, 2, 2), (2, 1, 0), (1, 0, 0))

    def summarise(self, chunk: ChunkInput) -> str:
        frames = chunk.frames
        when = span(chunk.start_ms, chunk.end_ms)
        if not frames:
            return f"{when}: no frames were received."
        text = ""
        for scenes, changes, labels in self._LADDER:
            text = self._render(chunk, scenes, changes, labels)
            if len(text.split()) <= prompts.CHUNK_WORDS:
                return text
        return _words(text, prompts.CHUNK_WORDS)

    def _render(self, chunk: ChunkInput, max_scenes: int, max_changes: int, max_labels: int) -> str:
        frames = chunk.frames
        parts = [f"{span(chunk.start_ms, chunk.end_ms)}, {len(frames)} {'frame' if len(frames) == 1 else 'frames'}."]
        runs = prompts.caption_runs(frames, max_scenes)
        if runs:
            scenes = []
            for run in runs:
                caption = _words(run.captions[0][0], _WORD_CAP)
                text = f"{span(run.start_ms, run.end_ms)} {'mostly ' if run.merged else ''}{caption}"
                scenes.append(text + (f", {_people(run.people)}" if run.people else ""))
            parts.append("Scenes: " + "; ".join(scenes) + ".")
        changes = _label_changes(frames)
        if changes and max_changes:
            shown = [f"{clock(ms)} {label} {'appears' if appeared else 'gone'}" for ms, label, appeared in changes[:max_changes]]
            more = len(changes) - max_changes
            parts.append("Changes: " + "; ".join(shown) + (f"; {more} more" if more > 0 else "") + ".")
        most = max(f.person_count for f in frames)
        if most > 0:
            first = next(f.media_ts_ms for f in frames if f.person_count == most)
            parts.append(f"Most people: {most} at {clock(first)}.")
        counted = prompts.label_frames(frames)
        if counted and max_labels:
            parts.append("Seen most (frames): " + ", ".join(f"{label} {n}" for label, n in counted[:max_labels]) + ".")
        parts.append(self._end_state(frames))
        return " ".join(parts)

    @staticmethod
    def _end_state(frames: Sequence[ChunkFrame]) -> str:
        last = frames[-1]
        captioned = next((f for f in reversed(frames) if f.caption.strip()), None)
        bits = [_words(captioned.caption, _WORD_CAP) if captioned else "no caption"]
        labels = sorted({label.strip() for label in last.labels if label.strip()})
        if labels:
            bits.append("labels: " + ", ".join(labels))
        bits.append(_people(last.person_count) if last.person_count else "no people")
        return f"At the end ({clock(last.media_ts_ms)}): " + "; ".join(bits) + "."

    def compress(self, block: BlockInput) -> str:
        if not block.summaries:
            return f"{span(block.start_ms, block.end_ms)}: no summaries."
        budget = max(12, prompts.BLOCK_WORDS // len(block.summaries) - 2)
        lines = []
        for piece in block.summaries:
            lines.append(f"[{span(piece.start_ms, piece.end_ms)}] {self._gist(piece.text, budget)}")
        text = "\n".join(lines)
        if len(text.split()) > prompts.BLOCK_WORDS + 2 * len(lines):
            text = _words(text, prompts.BLOCK_WORDS)
        return text

    @staticmethod
    def _gist(text: str, budget: int) -> str:
        """What a summary says happened (its first sentence that is not the digest's bare header:
        the scenes, with their times) and its end state (the digest's 'At the end ...'), in about
        ``budget`` words: two thirds for what happened, the rest for the end state."""
        sentences = [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]
        if not sentences:
            return "(empty)"
        end = next((s for s in sentences if _END_SENTENCE.match(s)), None)
        told = [s for s in sentences if not _END_SENTENCE.match(s) and not re.fullmatch(r"[\d:–-]+, \d+ frames?\.", s)]
        first = told[0] if told else sentences[0]
        if end is None or end == first:
            return _words(first, budget)
        happened = max(6, budget * 2 // 3)
        return f"{_words(first, happened)} {_words(end, max(4, budget - happened))}"


# -- a text generator over the captions ----------------------------------------------------------
class GeneratorSummariser(SummariserBackend):
    """The chunk's caption lines through a :class:`ResponseGenerator` (text only)."""

    name = "generator"

    def __init__(self, generator: ResponseGenerator, settings: SummariserSettings, *, owns_generator: bool = False) -> None:
        self._generator = generator
        self._settings = settings
        self._owns = owns_generator
        self._digest = DigestSummariser()

    def load(self) -> GeneratorSummariser:
        self._generator.load()
        return self

    def chunk_prompt(self, chunk: ChunkInput) -> Prompt:
        return Prompt(
            system=prompts.CHUNK_SYSTEM,
            context=prompts.render_chunk_input(chunk, self._settings.max_caption_lines),
            task=prompts.chunk_task(chunk),
            max_new_tokens=self._settings.max_new_tokens,
        )

    def block_prompt(self, block: BlockInput) -> Prompt:
        return Prompt(
            system=prompts.BLOCK_SYSTEM,
            context=prompts.render_block_input(block),
            task=prompts.block_task(block),
            max_new_tokens=self._settings.block_max_new_tokens,
        )

    def summarise(self, chunk: ChunkInput) -> str:
        if not any(f.caption.strip() for f in chunk.frames):
            return self._digest.summarise(chunk)
        return _checked(self._run(self.chunk_prompt(chunk)), "summary", _CHUNK_CAP)

    def compress(self, block: BlockInput) -> str:
        if not block.summaries:
            return self._digest.compress(block)
        return _checked(self._run(self.block_prompt(block)), "block", _BLOCK_CAP)

    def _run(self, prompt: Prompt) -> str:
        deadline = time.monotonic() + self._settings.timeout_s
        pieces: list[str] = []
        stream: Any = None
        try:
            stream = self._generator.stream(prompt)
            for piece in stream:
                pieces.append(piece)
                if time.monotonic() > deadline:
                    raise GenerationError(f"the generator took longer than {self._settings.timeout_s:g} s")
        except InvalidInput as err:  # GenerationRejected among them: the stage falls back on GenerationError
            raise GenerationError(f"the generator refused the prompt: {err}") from err
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return "".join(pieces)

    def ready(self) -> bool:
        return self._generator.ready()

    def close(self) -> None:
        if self._owns:
            self._generator.close()


# -- images --------------------------------------------------------------------------------------
def sample_frames(frames: Sequence[ChunkFrame], limit: int) -> list[ChunkFrame]:
    """At most ``limit`` of the frames that carry a JPEG, evenly spread, the first and last included."""
    with_images = [f for f in frames if f.jpeg]
    n = len(with_images)
    if n <= limit:
        return with_images
    if limit == 1:
        return [with_images[-1]]  # the end state matters most
    picks = sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})
    return [with_images[i] for i in picks]


def _image(jpeg: bytes, max_side: int) -> Any:
    """The JPEG decoded to an RGB PIL image whose longest side is at most ``max_side``."""
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg))
    image.load()
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def _images(frames: Sequence[ChunkFrame], settings: SummariserSettings) -> list[tuple[ChunkFrame, Any]]:
    out = []
    for frame in sample_frames(frames, settings.images_per_chunk):
        try:
            out.append((frame, _image(frame.jpeg or b"", settings.image_max_side)))
        except Exception as err:  # noqa: BLE001 - one undecodable frame must not lose the summary
            log.warning("skipping the frame at %s: its JPEG does not decode (%r)", clock(frame.media_ts_ms), err)
    return out


def jpeg_data_url(image: Any, quality: int = 85) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# -- an OpenAI-compatible VLM --------------------------------------------------------------------
class OpenAIVisionSummariser(SummariserBackend):
    """An OpenAI-compatible ``/chat/completions`` VLM (vLLM, SGLang, a hosted API), not streamed."""

    name = "openai-vlm"
    takes_images = True

    def __init__(self, settings: SummariserSettings, *, transport: httpx.BaseTransport | None = None) -> None:
        if not (settings.vlm_base_url and settings.vlm_model):
            raise GenerationError("openai-vlm needs SH_SUMMARISER_VLM_BASE_URL and SH_SUMMARISER_VLM_MODEL")
        self._settings = settings
        self._base = settings.vlm_base_url.rstrip("/")
        self._digest = DigestSummariser()
        self._client = openai_http_client(
            self._base, settings.vlm_api_key, accept="application/json",
            timeout=httpx.Timeout(settings.timeout_s, connect=min(10.0, settings.timeout_s)), transport=transport,
        )

    def chunk_messages(self, chunk: ChunkInput) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        for frame, image in _images(chunk.frames, self._settings):
            content.append({"type": "text", "text": f"[{clock(frame.media_ts_ms)}]"})
            content.append({"type": "image_url", "image_url": {"url": jpeg_data_url(image)}})
        if content:
            content.insert(0, {"type": "text", "text": f"Frames of the video from {span(chunk.start_ms, chunk.end_ms)}, each after its time:"})
        content.append({"type": "text", "text": prompts.render_chunk_input(chunk, self._settings.max_caption_lines)})
        content.append({"type": "text", "text": prompts.chunk_task(chunk)})
        return [{"role": "system", "content": prompts.CHUNK_SYSTEM}, {"role": "user", "content": content}]

    def block_messages(self, block: BlockInput) -> list[dict[str, Any]]:
        user = prompts.render_block_input(block) + "\n\n" + prompts.block_task(block)
        return [{"role": "system", "content": prompts.BLOCK_SYSTEM}, {"role": "user", "content": user}]

    def summarise(self, chunk: ChunkInput) -> str:
        if not _has_content(chunk):
            return self._digest.summarise(chunk)
        return _checked(self._complete(self.chunk_messages(chunk), self._settings.max_new_tokens), "summary", _CHUNK_CAP)

    def compress(self, block: BlockInput) -> str:
        if not block.summaries:
            return self._digest.compress(block)
        return _checked(self._complete(self.block_messages(block), self._settings.block_max_new_tokens), "block", _BLOCK_CAP)

    def _complete(self, messages: list[dict[str, Any]], max_tokens: int) -> str:
        s = self._settings
        payload = {"model": s.vlm_model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": False}
        url = f"{self._base}/chat/completions"
        try:
            response = self._client.post("chat/completions", json=payload)
        except httpx.TimeoutException as err:
            raise GenerationError(f"{url} did not answer within {s.timeout_s:g} s: {err!r}") from err
        except httpx.TransportError as err:
            raise GenerationError(f"cannot reach the VLM at {self._base}: {err!r}") from err
        if response.status_code >= 400:
            # 4xx too: the stage writes the digest instead either way.
            raise GenerationError(f"{url} -> HTTP {response.status_code}: {error_message(response)}")
        try:
            body = response.json()
            content = body["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise GenerationError(f"{url} sent a body that is not a chat completion: {response.text[:300]!r}") from err
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise GenerationError(f"{url} sent message content that is not text: {json.dumps(content)[:300]}")
        return content

    def ready(self) -> bool:
        ids = served_models(self._client, min(5.0, self._settings.timeout_s))
        return ids is not None and (not ids or self._settings.vlm_model in ids)

    def close(self) -> None:
        self._client.close()


# -- a local Hugging Face VLM --------------------------------------------------------------------
def load_vlm_processor(path: Path) -> Any:
    """``AutoProcessor.from_pretrained(path)``; where the processor's video half needs torchvision and
    it is not installed (our images have none), the same processor class without its video processor."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
        cause = err
    import transformers

    name = None
    config = path / "processor_config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("processor_class")
    if not name:
        from transformers import AutoConfig
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        name = PROCESSOR_MAPPING_NAMES.get(AutoConfig.from_pretrained(path).model_type)
    base = getattr(transformers, name, None) if name else None
    if base is None or "video_processor" not in inspect.signature(base.__init__).parameters:
        raise GenerationError(f"cannot load the processor of {path}: {cause}") from cause

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        # ProcessorMixin reads the sub-processors to load from this signature: no video processor.
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any) -> None:
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{name}ImageOnly"
    log.info("torchvision is not installed: loading %s without its video processor", name)
    try:
        return ImageOnlyProcessor.from_pretrained(path)
    except Exception as err:
        raise GenerationError(f"cannot load the processor of {path} without torchvision: {err!r} (first: {cause})") from err


class HFVisionSummariser(SummariserBackend):
    """A Hugging Face image-text-to-text model (Qwen2-VL and kin) in this process, greedy."""

    name = "hf-vlm"
    takes_images = True

    def __init__(self, settings: SummariserSettings) -> None:
        if settings.hf_model_path is None:
            raise GenerationError("hf-vlm needs SH_SUMMARISER_HF_MODEL_PATH")
        self._settings = settings
        self._path = Path(settings.hf_model_path)
        self._model: Any = None
        self._processor: Any = None
        self._lock = threading.Lock()
        self._digest = DigestSummariser()
        self.load_seconds: float | None = None

    def load(self) -> HFVisionSummariser:
        with self._lock:
            if self._model is not None:
                return self
            if not self._path.is_dir():
                raise GenerationError(f"SH_SUMMARISER_HF_MODEL_PATH={self._path}: no such folder")
            import torch
            from transformers import AutoModelForImageTextToText
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            start = time.perf_counter()
            try:
                processor = load_vlm_processor(self._path)
            except (OSError, ValueError, TypeError, ImportError) as err:
                raise GenerationError(f"cannot load the processor in {self._path}: {err!r}") from err
            try:
                model = AutoModelForImageTextToText.from_pretrained(self._path)
                model.to(torch.device(self._settings.hf_device))
            except (OSError, ValueError, RuntimeError) as err:
                raise GenerationError(f"cannot load the VLM in {self._path}: {err!r}") from err
            model.eval()
            if getattr(processor, "chat_template", None) is None:
                raise GenerationError(f"{self._path} carries no chat template")
            self._processor, self._model = processor, model
            self.load_seconds = time.perf_counter() - start
            log.info("loaded the VLM in %s in %.1f s on %s", self._path, self.load_seconds, self._settings.hf_device)
            return self

    def ready(self) -> bool:
        return self._model is not None

    def close(self) -> None:
        with self._lock:
            self._model = self._processor = None

    def chunk_messages(self, chunk: ChunkInput) -> tuple[list[dict[str, Any]], list[Any]]:
        """Chat messages with ``{"type": "image"}`` entries, and the PIL images in their order."""
        content: list[dict[str, Any]] = []
        images = []
        for frame, image in _images(chunk.frames, self._settings):
            content.append({"type": "text", "text": f"[{clock(frame.media_ts_ms)}]"})
            content.append({"type": "image"})
            images.append(image)
        if content:
            content.insert(0, {"type": "text", "text": f"Frames of the video from {span(chunk.start_ms, chunk.end_ms)}, each after its time:\n"})
        content.append({"type": "text", "text": "\n" + prompts.render_chunk_input(chunk, self._settings.max_caption_lines)})
        content.append({"type": "text", "text": "\n\n" + prompts.chunk_task(chunk)})
        system = {"role": "system", "content": [{"type": "text", "text": prompts.CHUNK_SYSTEM}]}
        return [system, {"role": "user", "content": content}], images

    def summarise(self, chunk: ChunkInput) -> str:
        if not _has_content(chunk):
            return self._digest.summarise(chunk)
        messages, images = self.chunk_messages(chunk)
        return _checked(self._generate(messages, images, self._settings.max_new_tokens), "summary", _CHUNK_CAP)

    def compress(self, block: BlockInput) -> str:
        if not block.summaries:
            return self._digest.compress(block)
        text = prompts.render_block_input(block) + "\n\n" + prompts.block_task(block)
        messages = [
            {"role": "system", "content": [{"type": "text", "text": prompts.BLOCK_SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": text}]},
        ]
        return _checked(self._generate(messages, [], self._settings.block_max_new_tokens), "block", _BLOCK_CAP)

    def _generate(self, messages: list[dict[str, Any]], images: list[Any], max_new_tokens: int) -> str:
        import torch

        if self._model is None:
            raise GenerationError("the VLM is not loaded")
        with self._lock:
            processor, model = self._processor, self._model
            if model is None:
                raise GenerationError("the VLM was closed")
            try:
                text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                inputs = processor(text=[text], images=images or None, return_tensors="pt").to(model.device)
                tokenizer = getattr(processor, "tokenizer", processor)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                start = time.monotonic()
                with torch.inference_mode():
                    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                            max_time=self._settings.timeout_s, pad_token_id=pad)
                elapsed = time.monotonic() - start
            except GenerationError:
                raise
            except Exception as err:
                raise GenerationError(f"the VLM failed: {err!r}") from err
            new = output[:, inputs["input_ids"].shape[1]:]
            if elapsed >= self._settings.timeout_s and new.shape[1] < max_new_tokens:
                raise GenerationError(f"the VLM took longer than {self._settings.timeout_s:g} s")
            return str(processor.batch_decode(new, skip_special_tokens=True)[0])


# -- choosing one --------------------------------------------------------------------------------
def make_backend(
    settings: SummariserSettings,
    generation: GenerationSettings | None = None,
    generator: ResponseGenerator | None = None,
) -> SummariserBackend:
    """The backend ``settings.backend`` names, not loaded yet (call ``load()``). ``generator``: the
    generator backend uses this one (its caller closes it); else one from ``generation``
    (``SH_GENERATION_*`` when None), closed with the backend."""
    if settings.backend == "digest":
        return DigestSummariser()
    if settings.backend == "generator":
        if generator is not None:
            return GeneratorSummariser(generator, settings)
        return GeneratorSummariser(make_generator(generation or GenerationSettings()), settings, owns_generator=True)
    if settings.backend == "openai-vlm":
        return OpenAIVisionSummariser(settings)
    if settings.backend == "hf-vlm":
        return HFVisionSummariser(settings)
    raise ValueError(f"unknown summariser backend {settings.backend!r}")
