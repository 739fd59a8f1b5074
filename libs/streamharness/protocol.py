"""The streaming protocol as a model sees it, shared by Streaming-Train (which trains on it) and
the runtime (the engine and the ``model`` decision policy, which speak it): one user turn per
second, ``[said\n]<T seconds>\n<image>``, and the reply ``</silence>`` or ``</response> text``, in
ChatML with Qwen2-VL-style vision placeholders. No pydantic, no torch at import (the GPU benchmark
and the trainer import it on bare images)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SILENCE = "</silence>"
RESPONSE = "</response>"
IMAGE = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TIME_TAG_RE = re.compile(r"<\d+(?:\.\d+)? seconds>")


def time_tag(t_s: float) -> str:
    """``<4.0 seconds>``: the timestamp token of a step."""
    return f"<{t_s:.1f} seconds>"


def user_turn(t_s: float, said: Sequence[str] = ()) -> str:
    """The user turn of the step at ``t_s``: what was said in it (if anything), the time, the frame."""
    return "\n".join([*said, time_tag(t_s), IMAGE])


def token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def split_user(user: str) -> tuple[str, str, str]:
    """``(before, tag, after)`` of a user turn: what was said (with its trailing newline), the
    time tag, and the rest (``"\\n<image>"``)."""
    matches = list(TIME_TAG_RE.finditer(user))
    if not matches:
        raise ValueError(f"user turn without a time tag: {user!r}")
    m = matches[-1]
    return user[: m.start()], m.group(0), user[m.end():]


def encode_user_turn(tokenizer, user: str, placeholder: str | None, context: Sequence[str] = ()) -> list[int]:
    """The ids of ``<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n`` with the
    ``<image>`` replaced by ``placeholder`` (dropped with its newline when None) and ``context``
    lines first; the time tag is tokenised on its own, so it has the same ids wherever it is."""
    before, tag, after = split_user(user)
    before = "".join(c + "\n" for c in context) + before
    after = after.replace("\n" + IMAGE, "").replace(IMAGE, "") if placeholder is None else after.replace(IMAGE, placeholder)
    return (token_ids(tokenizer, f"{IM_START}user\n{before}") + token_ids(tokenizer, tag)
            + token_ids(tokenizer, f"{after}{IM_END}\n{IM_START}assistant\n"))


@dataclass(frozen=True)
class VisionFormat:
    """How an image stands in the token sequence (Qwen2-VL's layout)."""

    start: str
    pad: str
    end: str
    image_token_id: int
    merge_size: int

    @classmethod
    def from_model(cls, model_config, tokenizer, image_processor) -> VisionFormat:
        ids = [getattr(model_config, name, None) for name in ("vision_start_token_id", "image_token_id", "vision_end_token_id")]
        if None in ids:
            raise NotImplementedError(f"{type(model_config).__name__}: only Qwen2-VL-style vision placeholders "
                                      "(vision_start / image_pad / vision_end token ids) are supported")
        start, pad, end = tokenizer.convert_ids_to_tokens(ids)
        merge = getattr(image_processor, "merge_size", None) or model_config.vision_config.spatial_merge_size
        return cls(start, pad, end, int(ids[1]), int(merge))

    def pads(self, grid_thw) -> int:
        return int(grid_thw.prod().item()) // self.merge_size**2

    def placeholder(self, grid_thw) -> str:
        return self.start + self.pad * self.pads(grid_thw) + self.end


def set_pixel_limits(image_processor, min_pixels: int, max_pixels: int) -> None:
    """Bound the frames' pixels (so the vision tokens per frame) of a loaded image processor."""
    image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(image_processor, name):
            setattr(image_processor, name, value)


def load_pretrained(path: str | Path, *, device=None, dtype=None):
    """``(model, tokenizer, image_processor)`` of a local checkpoint (no download): Qwen2-VL or
    Qwen2.5-VL by their classes, anything else through ``AutoModelForImageTextToText``; bf16 on
    CUDA, float32 on CPU, unless ``dtype`` says otherwise."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a local model folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = AutoModelForImageTextToText
    if config.model_type == "qwen2_vl":
        from transformers import Qwen2VLForConditionalGeneration as cls
    elif config.model_type == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as cls
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True, attn_implementation="sdpa").to(device)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor.tokenizer, processor.image_processor
