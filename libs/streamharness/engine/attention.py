"""Attention for the engine's batched steps, registered with transformers' attention interface so
that the model's own forward runs unchanged.

Decoder (``streamharness_engine``), given the mask the engine builds for a step of many streams:

* ``flex``: FlexAttention with a block mask of each row's lower-right causal window (query ``i``
  of row ``b`` sees keys ``j <= length_b + i``). Blocks past a row's length are skipped, the query
  groups are folded onto their KV head as below (fewer, fuller query blocks per KV read than one
  block per query head: a step's ~90 queries fill 128-row blocks badly), and the keys are the
  whole static slot, so the compiled kernel sees the same shapes step after step.
* ``sdpa``: fused SDPA with the grouped query heads folded into the query axis (``[B, kv_heads,
  groups * q, D]`` against ``[B, kv_heads, kv, D]``), so the keys and values are read once per KV
  head instead of being copied ``groups`` times (transformers' SDPA path copies them whenever there
  is a mask), and an additive mask built once per step rather than once per layer. The default on CPU.

* ``hybrid`` (the CUDA default): ``flex`` for a step of at least ``flex_min_batch`` streams, ``sdpa``
  below. On the H200 Flex's dynamic-shape kernel is the fastest for batches (2.4× transformers'
  path per stream at 64 streams) but slower than fused SDPA for one stream's step (~100 against
  ~70 ms at t = 1 min), which is what a question's answer waits for.

Any other call (the plain model outside the engine, a mask transformers built itself) goes to
transformers' own SDPA function, so the model behaves as before everywhere else. ``transformers``
leaves the model on transformers' SDPA and per-image vision loop (the reference the benchmark
compares against).

Vision (``streamharness_flash_grouped``; the name says "flash" so that the Qwen2-VL-class vision
towers hand over the whole batch with its ``cu_seqlens`` instead of looping image by image):
consecutive segments of the same length (the frames of one camera, the equal windows of
Qwen2.5-VL) go through one batched SDPA call. Exact: every segment still attends only to itself.
"""

from __future__ import annotations

import logging
import threading
import weakref

log = logging.getLogger(__name__)

DECODER = "streamharness_engine"
VISION = "streamharness_flash_grouped"
MODES = ("auto", "hybrid", "flex", "sdpa", "transformers")

FOLD_FLEX = True  # fold the query groups onto their KV head in FlexAttention too (the benchmark compares)
_registered = False
_register_lock = threading.Lock()
_compiled_flex = None
_segments: dict[int, tuple[weakref.ref, list[tuple[int, int, int]]]] = {}


def register() -> None:
    """Add both functions (and, for the decoder, transformers' SDPA mask builder) to transformers'
    registries once per process."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(DECODER, decoder_attention)
        AttentionInterface.register(VISION, vision_attention)
        AttentionMaskInterface.register(DECODER, sdpa_mask)
        _registered = True


def resolve(mode: str, device) -> str:
    if mode not in MODES:
        raise ValueError(f"attention mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "auto":
        return "hybrid" if device.type == "cuda" else "sdpa"
    return mode


def install(model, mode: str, device) -> str:
    """Point the model's decoder (and vision tower, if any) at these functions; returns the mode
    used (``auto`` resolved)."""
    register()
    mode = resolve(mode, device)
    decoder, vision_name = ("sdpa", "sdpa") if mode == "transformers" else (DECODER, VISION)
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    text._attn_implementation = decoder
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        vision._attn_implementation = vision_name
    visual = getattr(getattr(model, "model", model), "visual", None)
    if visual is not None and getattr(visual, "config", None) is not None:
        visual.config._attn_implementation = vision_name
    return mode


# -- masks ---------------------------------------------------------------------------------------
def folded_mask(allowed, groups: int, dtype):
    """The additive ``[B, 1, groups * q, kv]`` mask of a bool ``[B, 1, q, kv]`` one (row ``g * q +
    i`` of the folded queries is query ``i`` of group ``g``)."""
    import torch

    if groups > 1:
        allowed = allowed.repeat(1, 1, groups, 1)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def lower_right_block_mask(lengths, q_len: int, kv_len: int, device, groups: int = 1):
    """FlexAttention's block mask: query ``i`` of row ``b`` sees keys ``j <= lengths[b] + i``. With
    ``groups > 1`` the queries are folded (row ``g * q_len + i`` is query ``i`` of group ``g``)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    starts = torch.as_tensor(lengths, device=device, dtype=torch.int32)
    # The query length as a tensor, not a Python int: the compiled kernel takes the mask's captured
    # tensors as inputs but specialises on captured numbers, so every new turn length (a question, a
    # longer time tag) recompiled it: a stall of seconds mid-stream (measured on the H200).
    rows = torch.full((1,), q_len, device=device, dtype=torch.int32)

    def lower_right(b, h, q_idx, kv_idx):
        return kv_idx <= starts[b] + q_idx % rows[0]

    return create_block_mask(lower_right, B=len(lengths), H=None, Q_LEN=groups * q_len, KV_LEN=kv_len, device=device)


def _flex():
    """flex_attention, compiled on CUDA (its fused kernel); eager elsewhere (exact, slow: tests)."""
    global _compiled_flex
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    if not torch.cuda.is_available():
        return flex_attention
    if _compiled_flex is None:
        # Dynamic from the start: one kernel for every batch size, query length and slot size (with
        # static shapes each new one recompiled, and past dynamo's recompile limit flex fell back to
        # its unfused eager form: a 2-hour step went from ~110 ms to ~570 ms on the H200).
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    return _compiled_flex


# -- the functions ---------------------------------------------------------------------------------
def decoder_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0, **kwargs):
    """``query [B, H, q, D]``, ``key/value [B, kv_heads, kv, D]`` -> ``([B, q, H, D], None)``."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    folded = groups > 1 and attention_mask is not None and attention_mask.shape[-2] == groups * q
    if folded:
        query = query.reshape(b, kv_heads, groups * q, d)
    if isinstance(attention_mask, BlockMask):
        out = _flex()(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=groups > 1 and not folded)
        return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None
    if folded:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _runs(cu_seqlens) -> list[tuple[int, int, int]]:
    """``(start, count, length)`` of each run of consecutive equal-length segments (memoised per
    tensor: every layer of one forward passes the same one, and reading it syncs the device)."""
    key = id(cu_seqlens)
    hit = _segments.get(key)
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1]
    bounds = [int(x) for x in cu_seqlens.tolist()]
    runs: list[tuple[int, int, int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length <= 0:
            continue
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, length)
        else:
            runs.append((start, 1, length))
    if len(_segments) > 16:
        _segments.clear()
    _segments[key] = (weakref.ref(cu_seqlens), runs)
    return runs


def vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout: float = 0.0,
                     cu_seq_lens_q=None, **kwargs):
    """``query/key/value [1, H, N, D]`` of all images, ``cu_seq_lens_q`` their segment bounds ->
    ``([1, N, H, D], None)``; each segment attends to itself only."""
    import torch

    _, heads, n, d = query.shape
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.tensor([0, n])
    out = torch.empty_like(query)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for start, count, length in _runs(cu_seq_lens_q):
        end = start + count * length

        def batch(x):
            return x[0, :, start:end].reshape(heads, count, length, d).transpose(0, 1)

        o = sdpa(batch(query), batch(key), batch(value), scale=scaling)  # [count, H, length, D]
        out[0, :, start:end] = o.transpose(0, 1).reshape(heads, count * length, d)
    return out.transpose(1, 2).contiguous(), None
