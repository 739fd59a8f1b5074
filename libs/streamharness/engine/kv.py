"""Static per-stream KV buffers: one slot per stream, every layer's keys and values preallocated,
and a transformers ``Cache`` that lets several streams of different lengths go through one forward.

Layout, per layer: keys and values ``[slots, kv_heads, capacity + margin, head_dim]`` in the
model's dtype, or int8 with one scale per (slot, head, position) (``int8=True``: half the bytes of
bf16; the scale is computed per token so a new token never re-quantises older ones). A batch of
streams is a list of slots with their current lengths; the new tokens of row ``b`` are written at
``length_b ..`` (padded rows write past their valid end, into the margin, where nothing reads
them), and attention reads the slots' first ``max_b(length_b + q)`` positions under a lower-right
causal mask (:func:`lower_right_mask`): query ``i`` of row ``b`` sees keys ``j <= length_b + i``.

Why this layout (measured in docs/benchmarks.md, "Streaming engine"): one dense SDPA call per layer
over all streams of a step, no per-step allocation and no copy of a stream's cache when the batch
is a contiguous run of slots (the engine hands out the lowest free slot first), and memory that is
fixed at start, so a long session cannot grow it. A paged layout saves memory on ragged lengths;
here every stream's length is bounded by the same chunk length, so the slack is small.

torch and transformers are imported by the functions that need them (no pydantic, no OpenTelemetry:
the GPU benchmark imports this on a bare image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, text_config) -> KVShape:
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(text_config.num_hidden_layers, getattr(text_config, "num_key_value_heads", None) or heads, head_dim)

    def bytes_per_token(self, element_bytes: int, int8: bool = False) -> int:
        """Keys and values of every layer for one token (int8: one byte a value plus a 2-byte scale per head)."""
        per_head = self.head_dim * (1 if int8 else element_bytes) + (2 if int8 else 0)
        return 2 * self.layers * self.kv_heads * per_head


class KVPool:
    """The preallocated buffers (see the module docstring)."""

    def __init__(self, shape: KVShape, slots: int, capacity: int, margin: int, dtype, device, int8: bool = False) -> None:
        import torch

        if slots < 1 or capacity < 1:
            raise ValueError(f"a KV pool needs at least one slot and one position (slots={slots}, capacity={capacity})")
        self.shape, self.slots, self.capacity, self.margin = shape, slots, capacity, margin
        self.dtype, self.device, self.int8 = dtype, device, int8
        size = (slots, shape.kv_heads, capacity + margin, shape.head_dim)
        store = torch.int8 if int8 else dtype
        # Inference tensors, as what a step gathers from scattered slots is: a view of a whole slot
        # run and a gathered copy are then the same kind of tensor to the compiled attention kernel
        # (a normal tensor's view carries another dispatch key, and each kind was a graph of its own:
        # a recompile of seconds mid-stream). Written only in inference mode (steps, move, copy_slot).
        with torch.inference_mode():
            self.k = [torch.zeros(size, dtype=store, device=device) for _ in range(shape.layers)]
            self.v = [torch.zeros(size, dtype=store, device=device) for _ in range(shape.layers)]
            if int8:
                scale = size[:3] + (1,)
                self.k_scale = [torch.zeros(scale, dtype=torch.float16, device=device) for _ in range(shape.layers)]
                self.v_scale = [torch.zeros(scale, dtype=torch.float16, device=device) for _ in range(shape.layers)]

    @property
    def bytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
        if self.int8:
            total += sum(t.numel() * t.element_size() for t in (*self.k_scale, *self.v_scale))
        return total

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        import torch

        with torch.inference_mode():  # the buffers are inference tensors
            self._copy_slot(src, dst, length)

    def _copy_slot(self, src: int, dst: int, length: int) -> None:
        for layer in range(self.shape.layers):
            self.k[layer][dst, :, :length] = self.k[layer][src, :, :length]
            self.v[layer][dst, :, :length] = self.v[layer][src, :, :length]
            if self.int8:
                self.k_scale[layer][dst, :, :length] = self.k_scale[layer][src, :, :length]
                self.v_scale[layer][dst, :, :length] = self.v_scale[layer][src, :, :length]


    def move(self, slot: int, src: int, end: int, dst: int, rotate_keys) -> None:
        """Move positions ``[src, end)`` of a slot's keys and values down to ``dst`` (every layer),
        the keys through ``rotate_keys`` (float32 ``[kv_heads, n, head_dim]`` -> the same)."""
        import torch

        with torch.inference_mode():
            self._move(slot, src, end, dst, rotate_keys)

    def _move(self, slot: int, src: int, end: int, dst: int, rotate_keys) -> None:
        n = end - src
        for layer in range(self.shape.layers):
            k, v = self.k[layer], self.v[layer]
            if self.int8:
                ks, vs = self.k_scale[layer], self.v_scale[layer]
                keys = rotate_keys(k[slot, :, src:end].float() * ks[slot, :, src:end].float())
                kq, kscale = _quantise(keys)
                k[slot, :, dst:dst + n], ks[slot, :, dst:dst + n] = kq, kscale
                v[slot, :, dst:dst + n] = v[slot, :, src:end].clone()
                vs[slot, :, dst:dst + n] = vs[slot, :, src:end].clone()
            else:
                k[slot, :, dst:dst + n] = rotate_keys(k[slot, :, src:end].float()).to(k.dtype)
                v[slot, :, dst:dst + n] = v[slot, :, src:end].clone()


def _quantise(x):
    import torch

    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127.0
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float16)


def lower_right_mask(lengths, q_len: int, kv_len: int, device):
    """bool ``[B, 1, q_len, kv_len]``: query ``i`` of row ``b`` sees keys ``j <= lengths[b] + i``."""
    import torch

    lengths = torch.as_tensor(lengths, device=device).view(-1, 1, 1, 1)
    i = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    j = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    return j <= lengths + i


FLEX_BLOCK = 128  # FlexAttention's default block size (keys and queries)


def batch_cache(pool: KVPool, slots: list[int], lengths: list[int], q_len: int, *, whole_slots: bool = False) -> Any:
    """A transformers ``Cache`` over ``slots`` for one forward of ``q_len`` new tokens per row.
    Attention reads the rows' first ``kv_len = max(lengths) + q_len`` positions, or (``whole_slots``, for
    FlexAttention, whose block mask skips what no row reaches) the whole slot of a contiguous run of
    bf16 slots, so that the shapes stay the same from step to step. ``cache.kv_len`` says which."""
    import torch
    from transformers.cache_utils import Cache

    device = pool.device
    rows = torch.as_tensor(slots, device=device)
    starts = torch.as_tensor(lengths, device=device)
    if max(lengths) + q_len > pool.capacity + pool.margin:
        raise ValueError(f"a forward of {q_len} tokens does not fit the KV slot (capacity {pool.capacity} + margin {pool.margin})")
    contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
    # A whole slot is a view of a contiguous run; int8 slots are dequantised on read, and scattered
    # slots gathered: for those, only what the rows reach.
    whole = whole_slots and contiguous and not pool.int8
    kv_len = pool.capacity + pool.margin if whole else max(lengths) + q_len
    if whole_slots and not whole:
        # FlexAttention on gathered rows: whole 128-key blocks, at least two, so that a short
        # cache never gives the compiled kernel a one-block shape (a graph of its own, compiled
        # mid-stream); the block mask skips what no row reaches.
        kv_len = min(pool.capacity + pool.margin, max(FLEX_BLOCK * 2, -(-kv_len // FLEX_BLOCK) * FLEX_BLOCK))
    positions = starts.view(-1, 1) + torch.arange(q_len, device=device).view(1, -1)  # [B, q]
    row_index = rows.view(-1, 1).expand_as(positions)

    class _SlotBatchCache(Cache):
        """Writes each layer's new keys/values into the pool and returns the rows' first kv_len positions."""

        is_compileable = False

        def __init__(self) -> None:
            super().__init__(layers=[])
            self.kv_len = kv_len

        def __len__(self) -> int:
            return pool.shape.layers

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return int(max(lengths))

        def get_mask_sizes(self, *args, **kwargs):
            return kv_len, 0

        def _rows(self, buf):
            return buf[slots[0]:slots[0] + len(slots), :, :kv_len] if contiguous else buf[:, :, :kv_len].index_select(0, rows)

        def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
            k_new = key_states.transpose(1, 2)  # [B, q, H, D]
            v_new = value_states.transpose(1, 2)
            if pool.int8:
                kq, ks = _quantise(k_new)
                vq, vs = _quantise(v_new)
                pool.k[layer_idx][row_index, :, positions] = kq
                pool.v[layer_idx][row_index, :, positions] = vq
                pool.k_scale[layer_idx][row_index, :, positions] = ks
                pool.v_scale[layer_idx][row_index, :, positions] = vs
                k = (self._rows(pool.k[layer_idx]).float() * self._rows(pool.k_scale[layer_idx]).float()).to(key_states.dtype)
                v = (self._rows(pool.v[layer_idx]).float() * self._rows(pool.v_scale[layer_idx]).float()).to(value_states.dtype)
                return k, v
            pool.k[layer_idx][row_index, :, positions] = k_new.to(pool.dtype)
            pool.v[layer_idx][row_index, :, positions] = v_new.to(pool.dtype)
            return self._rows(pool.k[layer_idx]), self._rows(pool.v[layer_idx])

    return _SlotBatchCache()
