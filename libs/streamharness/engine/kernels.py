"""Faster decoder layers for the engine's batched steps, installed on the loaded model without
changing its code (the same module tree, the same forward calls):

* **fused projections**: a layer's ``q_proj``/``k_proj``/``v_proj`` run as one GEMM over their
  concatenated weights (and ``gate_proj``/``up_proj`` of a gated MLP as another): one launch and
  one read of the input instead of three, and a wider GEMM. The attention module still calls
  ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``; the first call computes all three and the others
  return their slice of it (matched by the input tensor itself, so a different input is never
  answered from the group).
* **FP8 weights** (``weights="fp8"``): the decoder's linear layers keep float8 e4m3 weights, one
  scale per output channel, and quantise their input per token at run time for
  ``torch._scaled_mm`` (on an H100/H200 about twice the bf16 GEMM rate, half the weight memory;
  the serving engines' "fp8 dynamic" scheme). The vision tower, the embeddings and the LM head
  stay as loaded; keys and values stay in the KV dtype.
* **compiled element-wise work** (``compile``, default on CUDA): RMSNorm, the gated MLP's
  activation (``silu(gate) * up``, fused with the FP8 quantisation of the down projection's input),
  the input quantisation and the rotary embedding (the decoder's and the vision tower's) are small
  ``torch.compile`` regions with dynamic shapes: one kernel each instead of five to eight eager
  ones. One compiled graph serves every layer (pure functions of tensors, no module state in them).

Model families: decoder layers with Llama/Qwen-style ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` with SiLU, and ``*RMSNorm`` modules with ``weight`` and
``variance_epsilon`` (Llama, Qwen2, Qwen2-VL, Qwen2.5-VL, Qwen3, Qwen3-VL, SmolLM2). Anything else
is left as it is (and counted, so the caller can say what was not changed).
"""

from __future__ import annotations

import logging
import types
import sys
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

WEIGHTS = ("model", "fp8")
FP8_MAX = 448.0  # the largest float8 e4m3fn value

_compiled: dict[str, object] = {}


# -- pure functions (compiled where asked) --------------------------------------------------------
def _quant_rows(x):
    """``x [M, K]`` -> ``(x8 [M, K] float8_e4m3fn, scale [M, 1] float32)`` with ``x ~ x8 * scale``."""
    import torch

    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _rms_norm(x, weight, eps: float):
    """The Llama/Qwen RMSNorm: ``weight * (x / rms(x))`` in float32, cast back before the weight."""
    import torch

    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _silu_mul(gate_up, inter: int):
    import torch

    return torch.nn.functional.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def _silu_mul_quant(gate_up, inter: int):
    return _quant_rows(_silu_mul(gate_up, inter))


def _fn(name: str, compile_: bool):
    """The function ``name`` of this module, compiled once per process (dynamic shapes) when asked."""
    fn = globals()[name]
    if not compile_:
        return fn
    hit = _compiled.get(name)
    if hit is None:
        import torch

        hit = _compiled[name] = torch.compile(fn, dynamic=True)
    return hit


# -- weights -------------------------------------------------------------------------------------
@dataclass
class _Fp8Weight:
    """A ``[N, K]`` weight as float8: ``t`` is its transpose ``[K, N]`` (column-major, as
    ``_scaled_mm`` takes its second operand), ``scale`` ``[1, N]`` float32 per output channel."""

    t: object
    scale: object

    @classmethod
    def of(cls, weight) -> _Fp8Weight:
        import torch

        w = weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FP8_MAX  # [N, 1]
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # [N, K] row-major
        return cls(q.t(), scale.t().contiguous())


class _Matmul:
    """``x [..., K] -> x W^T + b [..., N]`` with W as loaded or as FP8."""

    def __init__(self, weight, bias, fp8: bool, compile_: bool) -> None:
        # _scaled_mm takes dimensions that are multiples of 16; anything else stays as loaded
        self.fp8 = fp8 and weight.shape[0] % 16 == 0 and weight.shape[1] % 16 == 0
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.detach()
        if self.fp8:
            self.w8 = _Fp8Weight.of(weight)
            self.weight = None
        else:
            self.weight = weight.detach()
        self._quant = _fn("_quant_rows", compile_)

    def __call__(self, x):
        import torch

        if not self.fp8:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x8, xs = self._quant(x.reshape(-1, x.shape[-1]))
        return self.scaled(x8, xs, x.dtype).view(*lead, self.out_features)

    def scaled(self, x8, xs, dtype):
        """``[M, N]`` from an input already quantised per row."""
        import torch

        y = torch._scaled_mm(x8, self.w8.t, scale_a=xs, scale_b=self.w8.scale, out_dtype=dtype)
        return y if self.bias is None else y + self.bias


class _Group:
    """Several projections of the same input as one GEMM; each member returns its slice. The input
    and the outputs are held until every member has taken its slice (then let go, so no layer keeps
    a step's activations), matched by identity and version: a new or modified tensor is always
    recomputed (an inference tensor, which cannot change in place, by identity)."""

    def __init__(self, linears, fp8: bool, compile_: bool) -> None:
        import torch

        weights = [lin.weight for lin in linears]
        biases = [lin.bias for lin in linears]
        if any(b is not None for b in biases):
            biases = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) for w, b in zip(weights, biases)]
            bias = torch.cat(biases)
        else:
            bias = None
        self.matmul = _Matmul(torch.cat(weights), bias, fp8, compile_)
        self.sizes = [w.shape[0] for w in weights]
        self._key = None
        self._out = None
        self._x = None
        self._taken: set[int] = set()

    def output(self, x, index: int):
        try:
            version = x._version
        except RuntimeError:  # an inference tensor has no version counter (and cannot be changed in place)
            version = None
        key = (id(x), version, x.data_ptr(), tuple(x.shape))
        if self._key != key or self._out is None or self._x is not x or index in self._taken:
            self._out = self.matmul(x).split(self.sizes, dim=-1)
            self._key = key
            self._x = x  # keeps the id from being reused while the outputs are held
            self._taken = set()
        out = self._out[index]
        self._taken.add(index)
        if len(self._taken) == len(self.sizes):
            self._key = self._out = self._x = None
        return out


def _member_forward(group: _Group, index: int):
    def forward(self, x):
        return group.output(x, index)

    return forward


def _linear_forward(matmul: _Matmul):
    def forward(self, x):
        return matmul(x)

    return forward


def _gated_mlp_forward(gate_up: _Matmul, down: _Matmul, inter: int, compile_: bool):
    act = _fn("_silu_mul", compile_)
    act_quant = _fn("_silu_mul_quant", compile_)

    def forward(self, x):
        h = gate_up(x)
        if down.fp8:
            x8, xs = act_quant(h.reshape(-1, h.shape[-1]), inter)
            return down.scaled(x8, xs, h.dtype).view(*h.shape[:-1], down.out_features)
        return down(act(h, inter))

    return forward


def _norm_forward(compile_: bool):
    norm = _fn("_rms_norm", compile_)

    def forward(self, x):
        return norm(x, self.weight, self.variance_epsilon)

    return forward


# -- install -------------------------------------------------------------------------------------
@dataclass
class Installed:
    """What :func:`install` changed."""

    weights: str = "model"
    compiled: bool = False
    attention_groups: int = 0
    mlps: int = 0
    linears: int = 0
    norms: int = 0
    layers_left: int = 0  # decoder layers whose attention or MLP was not of a known shape
    rope: list = field(default_factory=list)  # (module, name, original) of each rotary function replaced

    @property
    def changed(self) -> bool:
        return bool(self.attention_groups or self.mlps or self.linears or self.norms)


def decoder_layers(base) -> list:
    """The decoder layers of a loaded model's ``.model`` (a causal LM's or a VLM's language model)."""
    for owner in (getattr(base, "language_model", None), base):
        layers = getattr(owner, "layers", None) if owner is not None else None
        if layers is not None:
            return list(layers)
    return []


def _is_silu(act) -> bool:
    import torch

    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")


def install(model, *, weights: str = "model", compile_: bool = False) -> Installed:
    """Fuse (and with ``weights="fp8"`` quantise) the decoder layers of ``model`` in place; with
    ``compile_`` the element-wise work is compiled. The original weights of the changed projections
    are released (an FP8 model keeps only its FP8 copy)."""
    import torch

    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}: one of {', '.join(WEIGHTS)}")
    prior = getattr(model, "_streamharness_kernels", None)
    if prior is not None:  # a second EngineModel over the same loaded model
        if (prior.weights, prior.compiled) == (weights, compile_):
            return prior
        raise ValueError(f"this model's layers were already installed with weights={prior.weights!r}, compile={prior.compiled}; "
                         "load it again for other settings")
    fp8 = weights == "fp8"
    param = next(model.parameters())
    if fp8 and param.device.type == "cuda" and torch.cuda.get_device_capability(param.device) < (8, 9):
        name = torch.cuda.get_device_name(param.device)
        raise ValueError(f"FP8 weights need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper); {name} is not")
    done = Installed(weights=weights, compiled=compile_)
    layers = decoder_layers(model.model)
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        known = attn is not None and all(isinstance(getattr(attn, n, None), torch.nn.Linear) for n in names)
        if known:
            group = _Group([getattr(attn, n) for n in names[:3]], fp8, compile_)
            for i, n in enumerate(names[:3]):
                _replace(getattr(attn, n), _member_forward(group, i))
            done.attention_groups += 1
            if fp8:
                o = attn.o_proj
                _replace(o, _linear_forward(_Matmul(o.weight, o.bias, True, compile_)))
                done.linears += 1
        mlp_known = mlp is not None and all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
            and _is_silu(getattr(mlp, "act_fn", None))
        if mlp_known:
            gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            gate_up = _Matmul(torch.cat([gate.weight, up.weight]), None if gate.bias is None else torch.cat([gate.bias, up.bias]), fp8, compile_)
            down_mm = _Matmul(down.weight, down.bias, fp8, compile_)
            mlp.forward = types.MethodType(_gated_mlp_forward(gate_up, down_mm, gate.out_features, compile_), mlp)
            for lin in (gate, up, down):
                _release(lin)
            done.mlps += 1
        if not (known and mlp_known):
            done.layers_left += 1
    if compile_:
        visual = getattr(model.model, "visual", None)
        vision = {id(m) for m in visual.modules()} if visual is not None else set()
        for module in model.model.modules():
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight") \
                    and id(module) not in vision:
                module.forward = types.MethodType(_norm_forward(True), module)
                done.norms += 1
    if compile_:
        done.rope = _compile_rope(model.model, layers)
    model._streamharness_kernels = done
    if done.layers_left:
        log.warning("engine kernels: %d of %d decoder layers not of a known Llama/Qwen shape were left as loaded",
                    done.layers_left, len(layers))
    return done


ROPE_FUNCTIONS = ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision", "apply_multimodal_rotary_pos_emb")


def _compile_rope(base, layers) -> list:
    """Replace the rotary functions of the model's attention modules (module-level functions the
    attention forwards call: five to eight element-wise kernels each) by compiled ones of the same
    code. They are the modeling module's own globals, so every model of that class in this process
    runs the compiled function (the same math); :func:`restore_rope` puts the originals back."""
    import torch

    classes = {type(layer.self_attn) for layer in layers if hasattr(layer, "self_attn")}
    visual = getattr(base, "visual", None)
    if visual is not None:
        classes |= {type(m) for m in visual.modules() if type(m).__name__.endswith("Attention")}
    patched = []
    for module_name in sorted({cls.__module__ for cls in classes}):
        module = sys.modules.get(module_name)
        for name in ROPE_FUNCTIONS:
            fn = getattr(module, name, None)
            if fn is None or not callable(fn) or getattr(fn, "_streamharness_original", None) is not None:
                continue
            compiled = torch.compile(fn, dynamic=True)

            def wrapper(*args, _compiled=compiled, **kwargs):
                return _compiled(*args, **kwargs)

            wrapper._streamharness_original = fn
            setattr(module, name, wrapper)
            patched.append((module, name, fn))
    return patched


def restore_rope(installed: Installed) -> None:
    """Put back the rotary functions :func:`install` replaced (for a process that runs the model
    outside the engine afterwards, and for tests)."""
    for module, name, original in installed.rope:
        setattr(module, name, original)
    installed.rope = []


def _replace(linear, forward) -> None:
    import types as _types

    linear.forward = _types.MethodType(forward, linear)
    _release(linear)


def _release(linear) -> None:
    """Drop a replaced projection's own weight (the fused copy holds the values)."""
    import torch

    linear.weight = torch.nn.Parameter(linear.weight.new_empty(0), requires_grad=False)
    if linear.bias is not None:
        linear.bias = torch.nn.Parameter(linear.bias.new_empty(0), requires_grad=False)
