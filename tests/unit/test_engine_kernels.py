"""The engine's faster decoder layers (engine/kernels.py): fused projections and compiled
element-wise work give the model's own logits; FP8 weights stay close to them and agree with their
own re-prefill; a fused group never answers one input with another's projections."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from streamharness.engine import EngineModel, TokenChunk, kernels  # noqa: E402

from .test_engine import VOCAB, dialogue, engine, full_logits  # noqa: E402


def fresh(which: str, seed: int = 0):
    """``(model, tokenizer, image_processor)``: a new tiny model (installing changes it in place)."""
    from streamharness.train.vlm import add_streaming_tokens, build_tiny_qwen2_vl, build_tiny_tokenizer

    if which == "vlm":
        model, tok, ip = build_tiny_qwen2_vl(VOCAB, seed=seed)
        add_streaming_tokens(tok, model)
        return model.eval(), tok, ip
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(VOCAB)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval(), tok, None


def stepped_logits(em: EngineModel, chunks):
    eng = engine(em)
    eng.prefill("s", chunks[:1])
    return [eng.append([("s", c)])[0] for c in chunks[1:]]


@pytest.mark.parametrize("which", ["vlm", "text_lm"])
def test_fused_and_compiled_layers_give_the_models_own_logits(which):
    model, tok, ip = fresh(which)
    reference = EngineModel(copy.deepcopy(model), tok, ip, compile_layers="off")
    em = EngineModel(model, tok, ip, compile_layers="on")
    try:
        layers = len(kernels.decoder_layers(model.model))
        assert (em.kernels.attention_groups, em.kernels.mlps, em.kernels.layers_left) == (layers, layers, 0)
        assert em.kernels.norms == 2 * layers + 1 and em.compiles
        rope = {name for _, name, _ in em.kernels.rope}
        assert rope == ({"apply_rotary_pos_emb", "apply_rotary_pos_emb_vision"} if which == "vlm" else {"apply_rotary_pos_emb"})
        assert reference.kernels == kernels.Installed() and not reference.compiles  # off: the model as loaded
        chunks = dialogue(em, em.ids("</silence>"), 3)
        got = stepped_logits(em, chunks)
    finally:
        patched = list(em.kernels.rope)
        kernels.restore_rope(em.kernels)
    assert patched and all(getattr(module, name) is original for module, name, original in patched)
    for k, logits in enumerate(got, start=1):  # against the model as loaded, every function eager
        want = full_logits(reference, chunks[:k + 1])
        assert torch.allclose(logits, want, atol=1e-4), (k, float((logits - want).abs().max()))


@pytest.mark.parametrize("which", ["vlm", "text_lm"])
def test_fp8_weights_stay_close_to_the_model_and_agree_with_their_own_re_prefill(which):
    model, tok, ip = fresh(which, seed=1)
    reference = EngineModel(copy.deepcopy(model), tok, ip, compile_layers="off")
    before = sum(p.numel() * p.element_size() for p in model.model.parameters())
    em = EngineModel(model, tok, ip, weights="fp8", compile_layers="off")
    assert em.kernels.weights == "fp8" and em.kernels.linears == len(kernels.decoder_layers(model.model))
    after = sum(p.numel() * p.element_size() for p in model.model.parameters())
    assert after < before  # the bf16/fp32 copies of the projections are gone
    chunks = dialogue(em, em.ids("</silence>"), 3)
    for k, got in enumerate(stepped_logits(em, chunks), start=1):
        # per-token input scales: a cached step computes what a re-prefill through the same FP8 model does
        own = full_logits(em, chunks[:k + 1])
        assert torch.allclose(got, own, atol=1e-3), (k, float((got - own).abs().max()))
        want = full_logits(reference, chunks[:k + 1])
        cos = torch.nn.functional.cosine_similarity(got, want, dim=0)
        assert cos > 0.995 and not torch.equal(got, want), (k, float(cos))


def test_fp8_matmul_is_the_scaled_product_and_a_wrong_scale_would_show():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48).unsqueeze(1)  # output channels of very different sizes
    x = torch.randn(5, 7, 64) * torch.logspace(-3, 2, 7).view(1, 7, 1)  # tokens too
    mm = kernels._Matmul(w, torch.randn(48), fp8=True, compile_=False)
    assert mm.fp8 and mm.w8.t.dtype == torch.float8_e4m3fn and mm.w8.t.shape == (64, 48)
    want = torch.nn.functional.linear(x, w, mm.bias)
    got = mm(x)
    rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max()
    assert got.shape == want.shape and rel < 0.15, float(rel)  # e4m3 keeps 3 mantissa bits
    back = mm.w8.t.t().float() * mm.w8.scale.t()  # dequantised: each element within e4m3's half step
    assert ((back - w).abs() <= w.abs() / 16 + mm.w8.scale.t() * 2 ** -9).all()
    assert torch.allclose(mm.w8.scale.squeeze(0) * kernels.FP8_MAX, w.abs().amax(dim=1))  # one scale per output channel
    odd = kernels._Matmul(torch.randn(10, 64), None, fp8=True, compile_=False)  # 10 outputs: not a multiple of 16
    assert not odd.fp8 and torch.allclose(odd(x), torch.nn.functional.linear(x, odd.weight))


def test_a_fused_group_never_answers_one_input_with_anothers_projections():
    lins = [torch.nn.Linear(16, n) for n in (16, 8, 8)]
    weights = [(lin.weight.detach().clone(), lin.bias.detach().clone()) for lin in lins]
    group = kernels._Group(lins, fp8=False, compile_=False)
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    q = group.output(x, 0)
    assert torch.allclose(q, torch.nn.functional.linear(x, *weights[0]), atol=1e-6)
    k = group.output(y, 1)  # another input: recomputed, not x's k
    assert torch.allclose(k, torch.nn.functional.linear(y, *weights[1]), atol=1e-6)
    y.mul_(2)  # the same tensor changed in place: recomputed too
    v = group.output(y, 2)
    assert torch.allclose(v, torch.nn.functional.linear(y, *weights[2]), atol=1e-6)
    calls = []
    group.matmul = (lambda f: lambda t: calls.append(1) or f(t))(group.matmul)
    for i in range(3):  # one GEMM serves the three, then nothing of the step is held
        assert torch.allclose(group.output(x, i), torch.nn.functional.linear(x, *weights[i]), atol=1e-6)
    assert len(calls) == 1 and group._out is None and group._x is None


def test_installing_twice_reuses_the_same_kernels_or_refuses_other_settings():
    model, tok, ip = fresh("text_lm")
    first = EngineModel(model, tok, compile_layers="off", weights="fp8")
    again = EngineModel(model, tok, compile_layers="off", weights="fp8", attention_mode="flex")
    assert again.kernels is first.kernels
    with pytest.raises(ValueError, match="already installed"):
        EngineModel(model, tok, compile_layers="on", weights="fp8")
    with pytest.raises(ValueError, match="weights 'int4'"):
        kernels.install(fresh("text_lm")[0], weights="int4")
    with pytest.raises(ValueError, match="compile_layers 'yes'"):
        EngineModel(fresh("text_lm")[0], tok, compile_layers="yes")


@pytest.mark.parametrize(("which", "attention"), [("vlm", "sdpa"), ("text_lm", "sdpa"), ("text_lm", "hybrid")])
def test_after_warm_up_no_turn_length_or_batch_size_compiles_again(which, attention):
    """Dynamic shapes: after the engine's warm-up, steps of other lengths, batch sizes and frames,
    on slots in one run or scattered, build no new graph (a recompile is a stall of seconds
    mid-stream on the GPU; past dynamo's recompile limit a function even falls back to eager)."""
    from torch._dynamo.utils import counters

    model, tok, ip = fresh(which, seed=2)
    em = EngineModel(model, tok, ip, compile_layers="on", attention_mode=attention, flex_min_batch=2)
    try:
        eng = engine(em, slots=10)
        eng.warm_up()
        built = counters["stats"]["unique_graphs"]
        silence = em.ids("</silence>")
        streams = {f"s{i}": dialogue(em, silence, 4, seed=i) for i in range(5)}
        for name, chunks in streams.items():
            eng.prefill(name, chunks[:1])
        order = list(streams)
        for k in range(1, 9):  # 5, 3, 1, 2 ... streams, in one run of slots or not; turns, replies
            names = [order[:5], order[:3], order[:1], [order[0], order[2]], order[1:4], [order[0], order[3], order[4]]][k % 6]
            eng.append([(name, streams[name][k]) for name in names])
        for name in order[:3]:
            list(eng.generate(name, silence, max_new_tokens=3))
        eng.append([(name, TokenChunk([em.im_end])) for name in (order[0], order[2], order[4])])  # a batched 1-token step, scattered
        assert counters["stats"]["unique_graphs"] == built
    finally:
        kernels.restore_rope(em.kernels)
