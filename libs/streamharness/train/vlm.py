"""Streaming-Train's VLM trainer: LoRA fine-tuning of a Qwen2-VL-class model on the per-second
streaming steps (:mod:`streamharness.train.convert`) with the trigger-weighted loss
(:mod:`streamharness.train.objective`).

**Examples.** A training example is a window of ``window_steps`` consecutive steps of one sample
(the dataset's ``steps/shard-*.parquet`` rows, contiguous and ordered by step), as a ChatML
dialogue::

    <|im_start|>user\\n[question\\n]<4.0 seconds>\\n<|vision_start|><|image_pad|>×N<|vision_end|><|im_end|>\\n
    <|im_start|>assistant\\n</response> Five people.<|im_end|>\\n
    ...one user / assistant pair per second...

Each ``<image>`` of a user turn becomes the model's vision placeholder: ``<|vision_start|>``, then
``N = grid_thw.prod() // merge_size**2`` ``<|image_pad|>``, then ``<|vision_end|>``, with the frames
(``frame_jpeg``) through the model's image processor as ``pixel_values`` / ``image_grid_thw``. A
step whose frame is null has no image (its ``<image>`` line is dropped). A window that starts
mid-stream begins with the questions and instructions still open at its start (asked before it,
not withdrawn, and not already answered unless a step of this window or later answers them), one
per line before the first step's own text, so that a response is never trained without what it
answers (``carry_context``; off: the window's own steps only).

**Labels and weights.** ``-100`` everywhere (user turns, image pads, ``<|im_start|>assistant\\n``,
the newline after ``<|im_end|>``) except the assistant turns' tokens:

* the decision token (``</silence>`` / ``</response>``): weight ``TriggerWeights.of(role)`` — 1.0
  for the first silence of a run, 0.8 for a repeated one, 1.5 for a response onset;
* the response text's tokens: ``lm_weight``;
* the ``<|im_end|>`` closing every assistant turn, after a silence as after a response:
  ``lm_weight`` — it is the generator's stop, LM supervision, not a decision (with
  ``lm_weight=0`` only the decisions are trained).

Both are shifted by :func:`~streamharness.train.objective.shift_for_causal_lm`, and the loss is
:func:`~streamharness.train.objective.weighted_token_loss` over the model's logits, computed here
(no labels go to the model; logits are taken only at the supervised positions through
``logits_to_keep``, which changes nothing in the loss: unsupervised positions weigh nothing and
the normaliser counts supervised ones). ``decision_loss`` / ``lm_loss`` in the metrics are the same
loss restricted to the decision positions / to the text and ``<|im_end|>`` positions.

**Tokens.** :func:`add_streaming_tokens` adds ``</silence>`` and ``</response>`` as special tokens
(single ids, never split, never merged with neighbours). Timestamps stay text
(``<4.0 seconds>``, :func:`~streamharness.train.convert.time_tag`): every tag is tokenised on its
own (:func:`encode_user_turn`), so its ids are ``tokenizer(time_tag(t))`` wherever it stands —
byte-level BPE would otherwise merge its ``>`` with a following newline differently when a step
has no frame. Whoever builds prompts for a model trained here (the responder) must use
:func:`encode_user_turn` too.

**Model and LoRA.** :func:`build_tiny_qwen2_vl` builds a tiny random Qwen2-VL and a word-level
tokenizer from the dataset's texts (tests, CPU smoke runs); :func:`load_pretrained` loads a local
checkpoint (Qwen2-VL, Qwen2.5-VL or any ``AutoModelForImageTextToText`` with the same vision
placeholders), bf16 on CUDA. :func:`apply_lora` puts LoRA on the language model's
``q_proj``/``k_proj``/``v_proj``/``o_proj`` and makes only the new tokens' rows of
``embed_tokens`` and ``lm_head`` trainable through peft's ``trainable_token_indices`` (peft 0.21;
``modules_to_save=["embed_tokens", "lm_head"]`` would train and save two full 152k×3584 matrices
of a 7B model for two rows each). New rows start at the mean of the existing rows.

**Training.** :func:`train_vlm`: AdamW, cosine or constant LR after a linear warmup, gradient
accumulation, gradient clipping, bf16 autocast on CUDA, optional gradient checkpointing;
deterministic by seed (the data order of epoch ``e`` is a permutation seeded by ``seed + e``);
checkpoints in ``out_dir/checkpoints`` (trainable weights, optimizer, scheduler, RNG states), from
which a run resumes with the same next step as a run that did not stop; metrics per step in
``out_dir/metrics.jsonl`` (and OpenTelemetry); torchrun-ready (DDP when ``WORLD_SIZE > 1``, each
rank a shard of each epoch's order); the adapter and tokenizer saved with ``save_pretrained`` in
``out_dir/adapter``.

torch, transformers, peft and pyarrow (the ``models`` extra) are imported inside functions.
Where pydantic is missing (the bare GPU image the benchmark runs on) this module still imports:
see :func:`_import_without_pydantic`.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import math
import re
import sys
import time
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from streamharness.protocol import (  # noqa: F401 - the protocol's names, re-exported for the trainer's users
    IM_END,
    IM_START,
    TIME_TAG_RE,
    VisionFormat,
    encode_user_turn,
    load_pretrained,
    set_pixel_limits,
    split_user,
)
from streamharness.train.loop import (
    DistributedContext,
    MetricsWriter,
    latest_checkpoint,
    load_latest_checkpoint,
    lr_factor,
    progress,
    save_checkpoint,
    seed_everything,
)

log = logging.getLogger(__name__)


# -- importing without pydantic ----------------------------------------------------------------------
class _PlainSettings:
    """Stand-in for pydantic's ``BaseModel`` / pydantic-settings' ``BaseSettings`` where pydantic
    is not installed: fields take keyword arguments or their defaults; no validation, no
    environment. Used only by :func:`_import_without_pydantic`."""

    model_config: ClassVar[dict] = {}

    def __init__(self, **values: Any) -> None:
        names = _plain_field_names(type(self))
        unknown = set(values) - set(names)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(unknown)}")
        for name in names:
            if name in values:
                value = values[name]
            else:
                value = getattr(type(self), name, _REQUIRED)
                if isinstance(value, _PlainField):
                    value = value.factory() if value.factory is not None else value.default
                if value is _REQUIRED:
                    raise TypeError(f"{type(self).__name__}: {name} is required")
            object.__setattr__(self, name, value)

    def model_dump(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _plain_field_names(type(self))}

    def model_copy(self, update: dict[str, Any] | None = None):
        return type(self)(**{**self.model_dump(), **(update or {})})

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"{type(self).__name__} is frozen")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.model_dump().items())})"


_REQUIRED = object()


@dataclass(frozen=True)
class _PlainField:
    default: Any = _REQUIRED
    factory: Any = None


def _plain_field(default: Any = _REQUIRED, *, default_factory: Any = None, **_: Any) -> Any:
    return _PlainField(default, default_factory)


def _plain_field_names(cls: type) -> list[str]:
    names: list[str] = []
    for klass in reversed(cls.__mro__):
        for name in vars(klass).get("__annotations__", {}):
            if name != "model_config" and not name.startswith("_") and name not in names:
                names.append(name)
    return names


def _pydantic_stand_ins() -> dict[str, types.ModuleType]:
    pydantic = types.ModuleType("pydantic")
    pydantic.BaseModel = _PlainSettings
    pydantic.ConfigDict = dict
    pydantic.Field = _plain_field
    pydantic.model_validator = lambda *a, **k: (lambda f: f)
    pydantic.field_validator = lambda *a, **k: (lambda f: f)
    settings = types.ModuleType("pydantic_settings")
    settings.BaseSettings = _PlainSettings
    settings.SettingsConfigDict = dict
    return {"pydantic": pydantic, "pydantic_settings": settings}


def _import_without_pydantic(name: str) -> types.ModuleType:
    """``importlib.import_module(name)``; where pydantic is not installed, the module is imported
    with stand-ins for ``pydantic`` / ``pydantic_settings`` in ``sys.modules`` for the time of the
    import (then taken out again): its settings classes become plain classes of their defaults,
    and its functions — the loss, the step format — are the very ones the project tests."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name not in ("pydantic", "pydantic_settings"):
            raise
    stand_ins = _pydantic_stand_ins()
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(name)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


try:
    from pydantic import Field
    from pydantic_settings import BaseSettings, SettingsConfigDict
except ModuleNotFoundError:  # the bare GPU image: see _import_without_pydantic
    BaseSettings, Field, SettingsConfigDict = _PlainSettings, _plain_field, dict  # type: ignore[assignment,misc]

_objective = _import_without_pydantic("streamharness.train.objective")
_convert = _import_without_pydantic("streamharness.train.convert")
IGNORE_INDEX: int = _objective.IGNORE_INDEX
TriggerWeights = _objective.TriggerWeights
shift_for_causal_lm = _objective.shift_for_causal_lm
weighted_token_loss = _objective.weighted_token_loss
SILENCE: str = _convert.SILENCE
RESPONSE: str = _convert.RESPONSE
IMAGE: str = _convert.IMAGE
time_tag = _convert.time_tag

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
PAD, UNK = "<|endoftext|>", "[UNK]"
STREAMING_TOKENS = (SILENCE, RESPONSE)
STOP_PREFIX = "Stop: "

# token kinds of an example, per position
PROMPT, DECISION, TEXT = 0, 1, 2


# -- the data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRow:
    """One stream-second as the trainer reads it. ``frame``: JPEG bytes, a PIL image, an RGB
    ``uint8`` array, or None (no frame that second)."""

    step: int
    t_s: float
    user: str
    target: str
    role: str
    frame: Any = None
    said: tuple[str, ...] = ()
    responding: tuple[str, ...] = ()


@dataclass(frozen=True)
class Window:
    """Consecutive steps of one sample; ``context``: the open questions / instructions carried
    in from before the window (see the module docstring)."""

    sample_id: str
    steps: tuple[StepRow, ...]
    context: tuple[str, ...] = ()


_STEP_COLUMNS = ["sample_id", "split", "step", "t_s", "user", "target", "role", "said", "responding", "frame_jpeg"]


def step_shards(dataset_dir: str | Path) -> list[Path]:
    """The dataset's ``steps/shard-*.parquet``, in order; checks that it is a dataset folder."""
    root = Path(dataset_dir)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root / 'manifest.json'} not found: is {root} a Streaming-Train dataset folder?")
    shards = sorted((root / "steps").glob("shard-*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no steps/shard-*.parquet under {root}")
    return shards


def read_samples(dataset_dir: str | Path, split: str = "train") -> dict[str, list[StepRow]]:
    """The steps of each sample of ``split``, by sample id (frames as JPEG bytes, held in memory)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    samples: dict[str, list[StepRow]] = {}
    for shard in step_shards(dataset_dir):
        table = pq.read_table(shard, columns=_STEP_COLUMNS)
        table = table.filter(pc.equal(table["split"], split))
        cols = {name: table[name].to_pylist() for name in _STEP_COLUMNS if name != "split"}
        for i, sample_id in enumerate(cols["sample_id"]):
            samples.setdefault(sample_id, []).append(StepRow(
                step=int(cols["step"][i]), t_s=float(cols["t_s"][i]), user=cols["user"][i], target=cols["target"][i],
                role=cols["role"][i], frame=cols["frame_jpeg"][i], said=tuple(cols["said"][i] or ()),
                responding=tuple(cols["responding"][i] or ())))
    for sample_id, rows in samples.items():
        steps = [r.step for r in rows]
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise ValueError(f"sample {sample_id}: its steps are out of order or repeated (rows of a sample must be ordered by step)")
    return samples


def _said_texts(row: StepRow) -> list[tuple[str, str]]:
    """(trigger id, text) of what is said in a step, read back from its user turn."""
    before = split_user(row.user)[0]
    lines = before[:-1].split("\n") if before.endswith("\n") else ([before] if before else [])
    if len(lines) == len(row.said):
        return list(zip(row.said, lines, strict=True))
    if len(set(row.said)) == 1 and lines:  # a text with newlines in it
        return [(row.said[0], "\n".join(lines))]
    return []


def open_triggers(rows: Sequence[StepRow], start: int) -> list[str]:
    """The texts of the triggers still open at row ``start``: asked before it, not withdrawn
    before it, and not answered before it unless a later step (from ``start`` on) answers them."""
    asked: dict[str, str] = {}
    withdrawn: set[str] = set()
    answered: set[str] = set()
    for row in rows[:start]:
        for trigger_id, text in _said_texts(row):
            if text.startswith(STOP_PREFIX) and trigger_id in asked:
                withdrawn.add(trigger_id)
            else:
                asked.setdefault(trigger_id, text)
        answered.update(row.responding)
    later = {t for row in rows[start:] for t in row.responding}
    return [text for trigger_id, text in asked.items()
            if trigger_id not in withdrawn and (trigger_id not in answered or trigger_id in later)]


def windows_of(sample_id: str, rows: Sequence[StepRow], window_steps: int = 16, stride: int | None = None,
               carry_context: bool = True) -> list[Window]:
    """The windows of one sample: ``window_steps`` steps every ``stride`` (default: no overlap);
    the last may be shorter."""
    if window_steps < 1:
        raise ValueError("window_steps must be at least 1")
    stride = stride or window_steps
    out = []
    for start in range(0, len(rows), stride):
        chunk = tuple(rows[start:start + window_steps])
        context = tuple(open_triggers(rows, start)) if carry_context and start > 0 else ()
        out.append(Window(sample_id, chunk, context))
        if start + window_steps >= len(rows):
            break
    return out


def read_windows(dataset_dir: str | Path, split: str = "train", window_steps: int = 16, stride: int | None = None,
                 carry_context: bool = True) -> list[Window]:
    """Every window of every sample of ``split`` (samples in dataset order)."""
    return [w for sample_id, rows in read_samples(dataset_dir, split).items()
            for w in windows_of(sample_id, rows, window_steps, stride, carry_context)]


def window_texts(windows: Iterable[Window]) -> list[str]:
    """The texts of some windows (what a tiny tokenizer's vocabulary is trained on)."""
    texts = []
    for w in windows:
        texts.extend(w.context)
        for s in w.steps:
            texts += [s.user, s.target]
    return texts


def decode_frame(frame: Any):
    """A PIL RGB image from JPEG bytes, a PIL image or an RGB array."""
    from PIL import Image

    if isinstance(frame, (bytes, bytearray, memoryview)):
        with Image.open(io.BytesIO(bytes(frame))) as im:
            return im.convert("RGB")
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    return Image.fromarray(frame).convert("RGB")


# -- tokens --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamingTokens:
    """The ids of the decision tokens."""

    silence: int
    response: int

    @property
    def ids(self) -> list[int]:
        return [self.silence, self.response]

    def of(self, decision: str) -> int:
        return self.silence if decision == SILENCE else self.response


def _embedding_rows(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def add_streaming_tokens(tokenizer, model=None) -> StreamingTokens:
    """Add ``</silence>`` and ``</response>`` to ``tokenizer`` as special tokens (single ids) and,
    with ``model``, make its embeddings hold them: resized (to a multiple of 64) when the
    tokenizer outgrew them, and the new tokens' rows of the input and output embeddings set to
    the mean of the existing rows (a pretrained checkpoint's spare padding rows included).
    Timestamps need no tokens: see the module docstring. Adding twice changes nothing."""
    import torch

    before = len(tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": list(STREAMING_TOKENS)}, replace_extra_special_tokens=False)
    tokens = StreamingTokens(*(tokenizer.convert_tokens_to_ids(t) for t in STREAMING_TOKENS))
    for text, tid in zip(STREAMING_TOKENS, tokens.ids, strict=True):
        if tokenizer(text, add_special_tokens=False)["input_ids"] != [tid]:
            raise RuntimeError(f"{text} is not a single token of this tokenizer")
    if model is None:
        return tokens
    new = [tid for tid in tokens.ids if tid >= before]
    rows = _embedding_rows(model)
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    if new:
        with torch.no_grad():
            old = min(before, rows)
            for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
                w = emb.weight
                w[new] = w[:old].float().mean(dim=0).to(w.dtype)
    return tokens


# -- examples ------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One window, tokenised. ``labels`` / ``loss_weights`` / ``kinds`` are aligned with
    ``input_ids`` (the label of position ``i`` is the token at ``i`` where supervised, else -100;
    :func:`window_loss` shifts them)."""

    input_ids: list[int]
    labels: list[int]
    loss_weights: list[float]
    kinds: list[int]
    pixel_values: Any = None  # (patches, C·T·P·P) float tensor, or None without frames
    image_grid_thw: Any = None  # (images, 3) long tensor

    def __len__(self) -> int:
        return len(self.input_ids)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def split_target(target: str) -> tuple[str, str]:
    """``(decision token, response text)`` of an assistant turn."""
    if target.startswith(RESPONSE):
        return RESPONSE, target[len(RESPONSE):]
    if target.strip() == SILENCE:
        return SILENCE, ""
    raise ValueError(f"assistant turn is neither {SILENCE} nor {RESPONSE} ...: {target!r}")


def encode_window(window: Window, tokenizer, image_processor, vision: VisionFormat, tokens: StreamingTokens,
                  weights) -> Example:
    """The example of one window (see the module docstring for the layout and the rules)."""
    frames = [decode_frame(s.frame) for s in window.steps if s.frame is not None]
    pixel_values = grid = None
    if frames:
        processed = image_processor(images=frames, return_tensors="pt")
        pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    newline = _ids(tokenizer, "\n")
    ex = Example([], [], [], [])

    def add(ids: Sequence[int], kind: int = PROMPT, weight: float = 0.0) -> None:
        ex.input_ids.extend(ids)
        ex.labels.extend(ids if kind != PROMPT else [IGNORE_INDEX] * len(ids))
        ex.loss_weights.extend([float(weight)] * len(ids))
        ex.kinds.extend([kind] * len(ids))

    image = 0
    for k, s in enumerate(window.steps):
        placeholder = None
        if s.frame is not None:
            placeholder = vision.placeholder(grid[image])
            image += 1
        add(encode_user_turn(tokenizer, s.user, placeholder, window.context if k == 0 else ()))
        decision, text = split_target(s.target)
        if (decision == RESPONSE) != (s.role == "response"):
            raise ValueError(f"{window.sample_id} step {s.step}: role {s.role!r} does not match target {s.target!r}")
        add([tokens.of(decision)], DECISION, weights.of(s.role))
        add(_ids(tokenizer, text), TEXT, weights.lm_weight)
        add([im_end], TEXT, weights.lm_weight)
        add(newline)
    if grid is not None:
        expected = sum(vision.pads(g) for g in grid)
        found = sum(1 for i in ex.input_ids if i == vision.image_token_id)
        if found != expected:
            raise RuntimeError(f"{window.sample_id}: {found} image pads for {expected} vision tokens")
    ex.pixel_values, ex.image_grid_thw = pixel_values, grid
    return ex


@dataclass
class Batch:
    """Padded examples (right padding) as tensors."""

    input_ids: Any
    attention_mask: Any
    labels: Any
    loss_weights: Any
    kinds: Any
    mm_token_type_ids: Any
    pixel_values: Any = None
    image_grid_thw: Any = None

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum().item())

    def to(self, device, dtype=None) -> Batch:
        def move(t, cast=False):
            if t is None:
                return None
            return t.to(device, dtype=dtype) if cast and dtype is not None else t.to(device)

        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.loss_weights),
                     move(self.kinds), move(self.mm_token_type_ids), move(self.pixel_values, True), move(self.image_grid_thw))


def collate(examples: Sequence[Example], pad_id: int, image_token_id: int) -> Batch:
    import torch

    n = max(len(e) for e in examples)
    shape = (len(examples), n)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(shape, dtype=torch.float32)
    kinds = torch.zeros(shape, dtype=torch.long)
    for i, e in enumerate(examples):
        m = len(e)
        input_ids[i, :m] = torch.tensor(e.input_ids)
        attention[i, :m] = 1
        labels[i, :m] = torch.tensor(e.labels)
        weights[i, :m] = torch.tensor(e.loss_weights)
        kinds[i, :m] = torch.tensor(e.kinds)
    with_images = [e for e in examples if e.pixel_values is not None]
    pixel_values = torch.cat([e.pixel_values for e in with_images]) if with_images else None
    grid = torch.cat([e.image_grid_thw for e in with_images]) if with_images else None
    mm = ((input_ids == image_token_id) & (attention == 1)).int()
    return Batch(input_ids, attention, labels, weights, kinds, mm, pixel_values, grid)


# -- the loss ------------------------------------------------------------------------------------------
def accepts_mm_token_type_ids(model) -> bool:
    """Whether the (unwrapped) model's forward takes ``mm_token_type_ids`` (transformers 5's
    Qwen2-VL needs them for its 3-D RoPE; older versions have no such argument)."""
    import inspect

    return "mm_token_type_ids" in inspect.signature(type(model).forward).parameters


def window_loss(model, batch: Batch, normalise: str = "positions", *, mm_token_type_ids: bool = True):
    """``(loss, decision_loss, lm_loss)`` of a batch: the trigger-weighted loss over the model's
    logits at the supervised positions (the two parts detached, for the metrics)."""
    import torch

    labels, weights = shift_for_causal_lm(batch.labels, batch.loss_weights)
    kinds = torch.cat([batch.kinds[:, 1:], torch.zeros_like(batch.kinds[:, :1])], dim=1)
    keep = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    kwargs = {}
    if mm_token_type_ids:
        kwargs["mm_token_type_ids"] = batch.mm_token_type_ids
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                image_grid_thw=batch.image_grid_thw, use_cache=False, logits_to_keep=keep, **kwargs)
    logits = out.logits
    labels, weights, kinds = labels[:, keep], weights[:, keep], kinds[:, keep]
    loss = weighted_token_loss(logits, labels, weights, normalise)
    with torch.no_grad():
        detached = logits.detach()
        parts = [weighted_token_loss(detached, torch.where(kinds == kind, labels, IGNORE_INDEX), weights, normalise)
                 for kind in (DECISION, TEXT)]
    return loss, parts[0], parts[1]


# -- models --------------------------------------------------------------------------------------------
TINY_SPECIALS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, UNK)


def build_tiny_tokenizer(texts: Iterable[str]):
    """A word-level tokenizer over ``texts`` (words, single digits, punctuation and newlines;
    spaces dropped) with ChatML's and Qwen2-VL's special tokens, as a ``PreTrainedTokenizerFast``.
    Digits and the time tag's pieces are always in the vocabulary, so every timestamp tokenises."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" +"), behavior="removed"),
        pre_tokenizers.Split(Regex(r"\n|\d|\w+|[^\w\s]"), behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##")
    base = ["user\nassistant\n", "0123456789", "< . seconds > : ? ! , ' \" - Stop"]
    tok.train_from_iterator([*base, *texts], trainers.WordLevelTrainer(special_tokens=list(TINY_SPECIALS), min_frequency=1))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD, eos_token=IM_END,
                                   extra_special_tokens=[t for t in TINY_SPECIALS if t not in (UNK, PAD, IM_END)])


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2  # Qwen2-VL-7B: 64 → [16, 24, 24]
    t = half // 4
    h = (half - t) // 2
    return [half - 2 * h, h, h]


def qwen2_vl_config(tokenizer, *, vocab_size: int | None = None, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, vision_depth: int = 2, vision_embed_dim: int = 32,
                    vision_heads: int = 4, patch: int = 14, merge: int = 2, rope_theta: float = 1_000_000.0):
    """A ``Qwen2VLConfig`` of the given sizes (default: tiny) whose special-token ids are
    ``tokenizer``'s. Qwen2-VL-7B: hidden 3584, layers 28, heads 28, kv_heads 4, intermediate
    18944, vision_depth 32, vision_embed_dim 1280, vision_heads 16, vocab 152064."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)}
    text = {"vocab_size": vocab_size or len(tokenizer), "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                                "mrope_section": _mrope_section(hidden // heads)},
            "bos_token_id": ids[PAD], "eos_token_id": ids[IM_END], "pad_token_id": ids[PAD]}
    vision = {"depth": vision_depth, "embed_dim": vision_embed_dim, "hidden_size": hidden, "num_heads": vision_heads,
              "mlp_ratio": 4, "patch_size": patch, "spatial_merge_size": merge, "temporal_patch_size": 2}
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD],
                         video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
                         vision_end_token_id=ids[VISION_END], tie_word_embeddings=False)


def make_image_processor(min_pixels: int, max_pixels: int, patch: int = 14, merge: int = 2):
    """Qwen2-VL's image processor with these pixel bounds (the PIL backend where torchvision is
    missing, without the fallback warning)."""
    import importlib.util

    cls = None
    if importlib.util.find_spec("torchvision") is None:
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
                Qwen2VLImageProcessorPil as cls,
            )
        except ImportError:
            cls = None
    if cls is None:
        from transformers import Qwen2VLImageProcessor as cls
    return cls(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, patch_size=patch, merge_size=merge,
               temporal_patch_size=2)


def build_tiny_qwen2_vl(vocab_texts: Iterable[str], *, seed: int = 0, min_pixels: int = 56 * 56,
                        max_pixels: int = 56 * 56, **sizes: Any):
    """``(model, tokenizer, image_processor)``: a tiny randomly initialised
    ``Qwen2VLForConditionalGeneration`` (hidden 64, 2 layers, 4 heads, vision depth 2, embed_dim
    32, patch 14, merge 2; ``sizes`` as :func:`qwen2_vl_config`), a word-level tokenizer trained on
    ``vocab_texts`` (no download), and Qwen2-VL's image processor (56×56 pixels: 4 vision tokens a
    frame). The streaming tokens are not added yet (:func:`add_streaming_tokens`)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer(vocab_texts)
    config = qwen2_vl_config(tokenizer, **sizes)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    return model, tokenizer, make_image_processor(min_pixels, max_pixels, config.vision_config.patch_size,
                                                  config.vision_config.spatial_merge_size)


def apply_lora(model, tokens: StreamingTokens, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
               targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"), train_token_rows: bool = True,
               gradient_checkpointing: bool = False):
    """The model with LoRA on the language model's ``targets`` and, with ``train_token_rows``,
    the decision tokens' rows of ``embed_tokens`` and ``lm_head`` trainable (peft's
    ``trainable_token_indices``; a model with tied embeddings gets one shared set of rows).
    Everything else is frozen. Gradient checkpointing (non-reentrant) is switched on first when
    asked."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        kwargs = {"use_reentrant": False}
        try:
            enable(activation_checkpointing_kwargs=kwargs)
        except TypeError:
            enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    pattern = rf".*language_model.*\.({'|'.join(map(re.escape, targets))})$"
    token_rows = None
    if train_token_rows:
        token_rows = {"embed_tokens": tokens.ids}
        if model.get_output_embeddings() is not None:
            token_rows["lm_head"] = tokens.ids
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none",
                        trainable_token_indices=token_rows)
    return get_peft_model(model, config)


def trainable_state(model) -> dict[str, Any]:
    """The trainable parameters by name (on CPU): what a checkpoint keeps of the model."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing or set(state) - set(params):
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:3]}, unknown {sorted(set(state) - set(params))[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# -- optimisation ----------------------------------------------------------------------------------------
def make_optimizer(model, *, lr: float, weight_decay: float = 0.0, total_steps: int, warmup_steps: int = 0,
                   schedule: str = "cosine", min_lr_ratio: float = 0.0):
    """AdamW over the trainable parameters and its LR schedule (a ``LambdaLR`` of :func:`lr_factor`)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params) and bool(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total=total_steps, warmup=warmup_steps, schedule=schedule, min_ratio=min_lr_ratio))
    return optimizer, scheduler


@dataclass
class StepResult:
    loss: float
    decision_loss: float
    lm_loss: float
    tokens: int
    grad_norm: float
    lr: float


def train_step(model, optimizer, scheduler, micro_batches: Sequence[Batch], *, normalise: str = "positions",
               max_grad_norm: float = 1.0, autocast_dtype=None, mm_token_type_ids: bool = True,
               ddp: bool = False) -> StepResult:
    """One optimizer step over ``micro_batches`` (gradient accumulation: each micro-batch's loss
    divided by their number; under DDP, gradients are all-reduced on the last one only)."""
    import contextlib

    import torch

    device_type = micro_batches[0].input_ids.device.type
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums = [0.0, 0.0, 0.0]
    tokens = 0
    for i, batch in enumerate(micro_batches):
        sync = contextlib.nullcontext() if (not ddp or i == len(micro_batches) - 1) else model.no_sync()
        cast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
        with sync:
            with cast:
                loss, decision, lm = window_loss(model, batch, normalise, mm_token_type_ids=mm_token_type_ids)
            (loss / len(micro_batches)).backward()
        for j, v in enumerate((loss, decision, lm)):
            sums[j] += float(v.detach().float().item())
        tokens += batch.tokens
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else torch.tensor(0.0)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    n = len(micro_batches)
    return StepResult(sums[0] / n, sums[1] / n, sums[2] / n, tokens, float(grad_norm), float(lr))


# -- the trainer -------------------------------------------------------------------------------------------
class VLMTrainConfig(BaseSettings):
    """Settings of :func:`train_vlm` (environment ``SH_TRAIN_VLM_*``); the trigger weights are
    :class:`~streamharness.train.objective.TriggerWeights` (``SH_TRAIN_*``)."""

    model_config = SettingsConfigDict(env_prefix="SH_TRAIN_VLM_", frozen=True, extra="forbid", case_sensitive=False)

    seed: int = Field(0, description="Seed of everything: the tiny model's weights, LoRA's initialisation, dropout, the data order.")
    split: str = Field("train", description="Which split of the dataset to train on.")
    window_steps: int = Field(16, ge=1, le=4096, description="Steps (stream-seconds) per training example.")
    window_stride: int | None = Field(None, ge=1, description="Steps between the starts of consecutive windows of a sample (default: window_steps, no overlap).")
    carry_context: bool = Field(True, description="Start a mid-stream window with the questions and instructions still open at its start.")
    batch_size: int = Field(1, ge=1, description="Windows per micro-batch (per rank).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    steps: int = Field(0, ge=0, le=10_000_000, description="Optimizer steps to train for; 0: as many as `epochs` make.")
    epochs: float = Field(1.0, gt=0, description="Passes over the windows when steps is 0.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR after the warmup: cosine decay to min_lr_ratio, or constant.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear LR warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Where the cosine ends, as a fraction of lr.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping by global norm (0: off).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (the update is scaled by alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on LoRA's input.")
    lora_targets: tuple[str, ...] = Field(("q_proj", "k_proj", "v_proj", "o_proj"), description="The language model's projections that get LoRA.")
    train_token_rows: bool = Field(True, description="Train the decision tokens' rows of embed_tokens and lm_head (peft trainable_token_indices).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory (20 vs 47 GB for a 7B model at 64-s windows), 2.6x the step time there (docs/benchmarks.md).")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (CPU runs in float32 regardless).")
    min_pixels: int = Field(56 * 56, ge=28 * 28, description="Lower bound of a frame's pixels after the image processor's resize.")
    max_pixels: int = Field(224 * 224, ge=28 * 28, description="Upper bound of a frame's pixels (224×224: 64 vision tokens a frame with patch 14, merge 2).")
    save_every: int = Field(50, ge=1, description="Checkpoint every this many optimizer steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train: CUDA when there (auto), or forced.")
    telemetry: bool = Field(True, description="Install the OpenTelemetry providers (streamharness.telemetry.setup_telemetry) at the start.")


# config fields that fix the trajectory: a resume with other values would not continue the same run
_RESUME_FIELDS = ("seed", "split", "window_steps", "window_stride", "carry_context", "batch_size", "grad_accum",
                  "lora_r", "lora_alpha", "lora_targets", "train_token_rows")


def _config_dict(obj) -> dict[str, Any]:
    data = obj.model_dump()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def max_memory_gb(device) -> float:
    """Peak accelerator memory allocated (CUDA), else this process's peak resident memory."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


@dataclass
class _Plan:
    """Which windows each micro-batch of this rank holds: epoch ``e`` is a permutation seeded by
    ``seed + e``, sharded by rank and cut to the same length on every rank."""

    n: int
    seed: int
    batch_size: int
    ctx: DistributedContext
    per_rank: int = field(init=False)
    micro_per_epoch: int = field(init=False)
    _epoch: int = field(default=-1, init=False)
    _order: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.per_rank = self.n // self.ctx.world_size
        if self.per_rank < 1:
            raise ValueError(f"{self.n} windows for {self.ctx.world_size} ranks: fewer than one each")
        self.micro_per_epoch = math.ceil(self.per_rank / self.batch_size)

    def micro_batch(self, m: int) -> list[int]:
        import torch

        epoch, k = divmod(m, self.micro_per_epoch)
        if epoch != self._epoch:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            self._order, self._epoch = self.ctx.shard(order)[: self.per_rank], epoch
        return self._order[k * self.batch_size:(k + 1) * self.batch_size]


def train_vlm(dataset_dir: str | Path, out_dir: str | Path, config: VLMTrainConfig | None = None,
              weights=None, tiny: bool | str | Path = True, *, resume: bool = True,
              stop_after: int | None = None) -> dict[str, Any]:
    """Train a LoRA adapter on a dataset folder; returns a summary (also ``out_dir/summary.json``).

    ``tiny``: True for :func:`build_tiny_qwen2_vl` (vocabulary from the dataset's texts), or the
    path of a local checkpoint folder (:func:`load_pretrained`). ``weights``: the trigger weights
    (default ``TriggerWeights()``, i.e. ``SH_TRAIN_*``). With ``resume`` a run whose
    ``out_dir/checkpoints`` holds a checkpoint goes on from it; without, such a folder is refused
    (a fresh run there would mix its checkpoints with the old ones). ``stop_after``: end after this
    optimizer step (its checkpoint written), as a preemption would; the next call resumes there.
    """
    import torch

    if tiny is False or tiny is None or str(tiny) == "":
        raise ValueError("tiny: True (the tiny model) or the path of a local checkpoint")
    config = config or VLMTrainConfig()
    weights = weights or TriggerWeights()
    out = Path(out_dir)
    if not resume and latest_checkpoint(out / "checkpoints") is not None:
        raise ValueError(f"{out / 'checkpoints'} holds checkpoints: resume, or train into another out_dir")
    if config.telemetry:
        try:
            from streamharness.telemetry import setup_telemetry
        except ImportError:
            pass
        else:
            setup_telemetry("streamharness-train")
    ctx = DistributedContext.from_env(None if config.device == "auto" else config.device)
    try:
        return _train(ctx, Path(dataset_dir), out, config, weights, "tiny" if tiny is True else tiny, stop_after, torch)
    finally:
        ctx.close()


def _train(ctx, dataset_dir: Path, out: Path, config, weights, model_ref, stop_after, torch) -> dict[str, Any]:
    seed_everything(config.seed)
    windows = read_windows(dataset_dir, config.split, config.window_steps, config.window_stride, config.carry_context)
    if not windows:
        raise ValueError(f"{dataset_dir}: no {config.split!r} steps")
    if str(model_ref) == "tiny":
        model, tokenizer, image_processor = build_tiny_qwen2_vl(window_texts(windows), seed=config.seed,
                                                               min_pixels=config.min_pixels, max_pixels=config.max_pixels)
    else:
        model, tokenizer, image_processor = load_pretrained(model_ref, device=ctx.device)
        set_pixel_limits(image_processor, config.min_pixels, config.max_pixels)
    tokens = add_streaming_tokens(tokenizer, model)
    vision = VisionFormat.from_model(model.config, tokenizer, image_processor)
    use_mm = accepts_mm_token_type_ids(model)
    model = apply_lora(model, tokens, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                       targets=config.lora_targets, train_token_rows=config.train_token_rows,
                       gradient_checkpointing=config.gradient_checkpointing).to(ctx.device)

    plan = _Plan(len(windows), config.seed, config.batch_size, ctx)
    total = config.steps or max(1, math.ceil(config.epochs * plan.micro_per_epoch / config.grad_accum))
    optimizer, scheduler = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay, total_steps=total,
                                          warmup_steps=config.warmup_steps, schedule=config.schedule,
                                          min_lr_ratio=config.min_lr_ratio)
    ckpt_dir = out / "checkpoints"
    start = 0
    loaded = load_latest_checkpoint(ckpt_dir)  # restores the RNG states too
    if loaded is not None:
        start, state = loaded
        saved = state.get("config", {})
        changed = [k for k in _RESUME_FIELDS if k in saved and saved[k] != _config_dict(config)[k]]
        if changed:
            raise ValueError(f"{ckpt_dir}: the checkpoint was trained with other {changed}; use another out_dir")
        load_trainable_state(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from step %d of %d", start, total)

    metrics = MetricsWriter(out / "metrics.jsonl", "vlm", main=ctx.is_main)
    if loaded is not None:
        metrics.rewind(start)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"config": _config_dict(config), "weights": _config_dict(weights),
                                                     "model": str(model_ref), "windows": len(windows)}, indent=2))
    train_model = model
    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    autocast = torch.bfloat16 if (config.bf16 and ctx.device.type == "cuda") else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.convert_tokens_to_ids(PAD)

    def micro_batches(step: int) -> list[Batch]:
        out_batches = []
        for a in range(config.grad_accum):
            idx = plan.micro_batch((step - 1) * config.grad_accum + a)
            examples = [encode_window(windows[i], tokenizer, image_processor, vision, tokens, weights) for i in idx]
            out_batches.append(collate(examples, pad_id, vision.image_token_id).to(ctx.device))
        return out_batches

    end = total if stop_after is None else min(total, stop_after)
    first = last = None
    bar = progress(total, "vlm", initial=start, main=ctx.is_main)
    t_run = time.perf_counter()
    for step in range(start + 1, end + 1):
        t0 = time.perf_counter()
        result = train_step(train_model, optimizer, scheduler, micro_batches(step), normalise=weights.normalise,
                            max_grad_norm=config.max_grad_norm, autocast_dtype=autocast, mm_token_type_ids=use_mm,
                            ddp=ctx.distributed)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        dt = time.perf_counter() - t0
        loss = ctx.mean(result.loss)
        row = {"loss": loss, "decision_loss": ctx.mean(result.decision_loss), "lm_loss": ctx.mean(result.lm_loss),
               "tokens_per_s": result.tokens * ctx.world_size / dt, "step_time_s": dt, "lr": result.lr,
               "grad_norm": result.grad_norm, "max_memory_gb": max_memory_gb(ctx.device)}
        metrics.log(step, **row)
        first = loss if first is None else first
        last = loss
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if ctx.is_main and (step % config.save_every == 0 or step == end):
            save_checkpoint(ckpt_dir, step, {"trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                                             "scheduler": scheduler.state_dict(), "config": _config_dict(config)},
                            keep_last=config.keep_last)
    bar.close()
    metrics.close()
    ctx.barrier()
    done = end >= total
    summary = {"steps": end, "total_steps": total, "resumed_from": start, "finished": done, "windows": len(windows),
               "first_loss": first, "last_loss": last, "wall_s": time.perf_counter() - t_run,
               "metrics": str(out / "metrics.jsonl"), "checkpoints": str(ckpt_dir),
               "tokens": {"silence": tokens.silence, "response": tokens.response}}
    if done and ctx.is_main:
        adapter = out / "adapter"
        model.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        image_processor.save_pretrained(adapter)
        summary["adapter"] = str(adapter)
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
