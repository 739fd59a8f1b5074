"""The streaming engine on tiny random models built in code (no download): the cached path gives
the logits a full re-prefill gives, batching changes no stream's outputs, memory stays bounded,
and a background rebuild never blocks a step."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from streamharness.engine import CacheFull, EngineConfig, EngineModel, StreamingEngine, TokenChunk  # noqa: E402
from streamharness.train.convert import user_turn  # noqa: E402

VOCAB = ["a person walks in the room memory summary you watch a car a red cup what is on the table ? no one"]


def jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def vlm():
    from streamharness.train.vlm import add_streaming_tokens, build_tiny_qwen2_vl

    model, tok, ip = build_tiny_qwen2_vl(VOCAB, seed=0)
    tokens = add_streaming_tokens(tok, model)
    return EngineModel(model.eval(), tok, ip), tokens


@pytest.fixture(scope="module")
def text_lm():
    """A tiny random Llama (SmolLM2's architecture) with the same word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from streamharness.train.vlm import build_tiny_tokenizer

    tok = build_tiny_tokenizer(VOCAB)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return EngineModel(LlamaForCausalLM(config).eval(), tok)


def full_logits(em: EngineModel, chunks: list[TokenChunk]):
    """Next-token logits of the whole sequence in one plain forward (the model computes its own positions)."""
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    kwargs = {}
    if full.grid is not None:
        kwargs = {"pixel_values": full.pixel_values, "image_grid_thw": full.grid, "mm_token_type_ids": torch.tensor([full.mm])}
    if hasattr(em.base, "rope_deltas"):
        em.base.rope_deltas = None
    with torch.inference_mode():
        return em.model(input_ids=torch.tensor([full.ids]), **kwargs).logits[0, -1].float()


def dialogue(em: EngineModel, silence: list[int], seconds: int, seed: int = 0) -> list[TokenChunk]:
    chunks = [em.system("you watch a room . memory : a person walks in")]
    for t in range(seconds):
        said = ["what is on the table ?"] if t == 2 else []
        chunks.append(em.user_turn(user_turn(float(t), said), jpeg(seed * 100 + t), caption="a red cup"))
        chunks.append(TokenChunk([*silence, em.im_end, *em.ids("\n")]))
    return chunks


def engine(em, **kw) -> StreamingEngine:
    return StreamingEngine(em, EngineConfig(**{"capacity": 2048, "margin": 512, "slots": 6, "spare_slots": 2, **kw}))


@pytest.mark.parametrize("which", ["vlm", "text_lm"])
def test_cached_steps_match_a_full_re_prefill(which, request):
    em = request.getfixturevalue(which)
    em = em[0] if isinstance(em, tuple) else em
    silence = em.ids("</silence>")
    chunks = dialogue(em, silence, 4)
    eng = engine(em)
    eng.prefill("s", chunks[:1])
    for k in range(1, len(chunks)):
        got = eng.append([("s", chunks[k])])[0]
        want = full_logits(em, chunks[:k + 1])
        assert torch.allclose(got, want, atol=1e-4), (k, float((got - want).abs().max()))
    assert eng.tokens("s") == [i for c in chunks for i in c.ids]
    if which == "vlm":
        # The check can fail: positions counted per token (not M-RoPE's per image) give other logits.
        bad = engine(em)
        bad.prefill("s", chunks[:1])
        stream = bad.streams["s"]
        bad.append([("s", chunks[1])])
        stream.next_pos = stream.length  # as if every vision token took a position
        got = bad.append([("s", chunks[2])])[0]
        assert not torch.allclose(got, full_logits(em, chunks[:3]), atol=1e-4)


def test_cached_logits_match_across_a_chunk_boundary_rebuild(vlm):
    em, tokens = vlm
    chunks = dialogue(em, [tokens.silence], 5)
    eng = engine(em)
    eng.prefill("s", chunks[:5])
    # The boundary: a new prefix (the chunk's summary) and the last two turns carried.
    new_prefix = em.system("you watch a room . memory : a person walks in . summary : a red cup on the table")
    carried = chunks[3:5]
    assert eng.rebuild("s", [new_prefix, *carried], key="k1")
    assert eng.wait_rebuild("s", timeout=60)
    got = eng.append([("s", chunks[5])])[0]
    assert torch.allclose(got, full_logits(em, [new_prefix, *carried, chunks[5]]), atol=1e-4)
    assert eng.prefix_key("s") == "k1"


def test_batching_streams_gives_each_the_outputs_it_gets_alone(vlm):
    em, tokens = vlm
    streams = {f"t/{i}": dialogue(em, [tokens.silence], 2 + i, seed=i) for i in range(3)}
    alone = {}
    for name, chunks in streams.items():
        eng = engine(em)
        alone[name] = [eng.append([(name, c)])[0] for c in chunks]
    eng = engine(em)
    batched = {name: [] for name in streams}
    for k in range(max(len(c) for c in streams.values())):
        items = [(name, chunks[k]) for name, chunks in streams.items() if k < len(chunks)]
        for (name, _), logits in zip(items, eng.append(items)):
            batched[name].append(logits)
    for name in streams:
        for a, b in zip(alone[name], batched[name]):
            assert torch.allclose(a, b, atol=1e-4)
    # and through a gathered (non-contiguous) set of slots
    eng2 = engine(em)
    for name in ["x", "t/0", "y", "t/2"]:
        eng2.append([(name, streams["t/0"][0] if name in ("x", "y") else streams[name][0])])
    eng2.close("x")
    eng2.close("y")
    out = eng2.append([("t/0", streams["t/0"][1]), ("t/2", streams["t/2"][1])])
    assert torch.allclose(out[0], alone["t/0"][1], atol=1e-4) and torch.allclose(out[1], alone["t/2"][1], atol=1e-4)


def test_int8_kv_stays_close_and_takes_less_memory(vlm):
    em, tokens = vlm
    chunks = dialogue(em, [tokens.silence], 3)
    full, small = engine(em), engine(em, int8_kv=True)
    for c in chunks:
        a, b = full.append([("s", c)])[0], small.append([("s", c)])[0]
    assert small.pool.bytes < 0.6 * full.pool.bytes
    assert torch.allclose(a, b, atol=0.05 * float(a.abs().max()) + 1e-3)
    assert int(a.argmax()) == int(b.argmax())


def test_memory_stays_bounded_over_a_long_stream_and_idle_streams_are_evicted(text_lm):
    em = text_lm
    eng = engine(em, capacity=256, margin=64, slots=3, spare_slots=1)
    before = eng.pool.bytes
    prefix = em.system("you watch a room")
    turn = em.user_turn(user_turn(1.0), None, caption="a red cup")
    for second in range(400):  # far more than one slot holds: rebuilt from the prefix when full
        if eng.length("s") + len(turn) > eng.config.capacity:
            eng.rebuild("s", [prefix], background=False)
        eng.append([("s", turn)])
        assert eng.length("s") <= eng.config.capacity
    assert eng.pool.bytes == before
    # A new stream takes the least recently used slot when none is free (spare slots kept back).
    eng.append([("b", turn)])
    eng.append([("c", turn)])
    assert eng.evictions == 1 and not eng.has("s")
    assert eng.evict_idle(now=10**9) == 2 and eng.evictions == 3
    # ... and an append sweeps streams idle for idle_evict_s out by itself
    quick = engine(em, capacity=256, margin=64, slots=3, spare_slots=1, idle_evict_s=0.05)
    quick.append([("old", turn)])
    threading.Event().wait(0.1)
    quick.append([("new", turn)])
    assert not quick.has("old") and quick.has("new") and quick.evictions == 1
    with pytest.raises(CacheFull):
        eng.append([("x", turn), ("y", turn), ("z", turn)])


def test_a_background_rebuild_never_blocks_a_step(vlm):
    em, tokens = vlm
    chunks = dialogue(em, [tokens.silence], 6)
    eng = engine(em)
    eng.prefill("s", chunks[:3])
    gate, started, order = threading.Event(), threading.Event(), []

    def hold(name):
        started.set()
        gate.wait(30)  # the rebuild is stuck until the steps below are done
        order.append("rebuild resumed")

    eng.before_rebuild = hold
    new_prefix = em.system("memory : a red cup")
    assert eng.rebuild("s", [new_prefix], key="new")
    assert started.wait(10)
    for c in chunks[3:6]:  # steps go on, on the old cache, while the rebuild waits
        eng.append([("s", c)])
        order.append("step")
    assert eng.prefix_key("s") == "" and eng.rebuilding("s")
    gate.set()
    assert eng.wait_rebuild("s", timeout=60)
    assert order == ["step", "step", "step", "rebuild resumed"]
    # The swapped-in cache holds the new prefix plus every turn appended meanwhile.
    assert eng.prefix_key("s") == "new"
    assert eng.tokens("s") == [*new_prefix.ids, *(i for c in chunks[3:6] for i in c.ids)]
    got = eng.append([("s", chunks[6])])[0]
    assert torch.allclose(got, full_logits(em, [new_prefix, *chunks[3:7]]), atol=1e-4)


def test_decide_chooses_only_among_the_options(text_lm):
    em = text_lm
    eng = engine(em)
    eng.prefill("s", [em.system("you watch")])
    # Options sharing a first token need a second forward; both come back as a valid choice.
    options = [[em.ids("a")[0], em.ids("person")[0]], [em.ids("a")[0], em.ids("car")[0]]]
    ((choice, p, tail),) = eng.decide([("s", em.user_turn(user_turn(0.0), None))], [options])
    assert choice in (0, 1) and 0.0 < p <= 1.0
    assert tail == options[choice][1:]
    assert eng.tokens("s")[-1] == options[choice][0]


def test_a_step_waiting_during_a_rebuild_goes_before_the_rebuilds_next_piece(text_lm):
    em = text_lm
    eng = StreamingEngine(em, EngineConfig(capacity=2048, margin=512, slots=4, spare_slots=1, prefill_piece=16))
    eng.prefill("s", [em.system("you watch a room")])
    order, in_piece, release = [], threading.Event(), threading.Event()
    forward = em.forward

    def recorded(pool, slots, lengths, chunks, positions):
        rebuild = threading.current_thread().name.startswith("engine-rebuild")
        order.append("rebuild" if rebuild else "step")
        if rebuild and not in_piece.is_set():
            in_piece.set()
            release.wait(30)  # the first piece is on the model while a step arrives
        return forward(pool, slots, lengths, chunks, positions)

    em.forward = recorded
    try:
        long_prefix = em.system(" ".join(["a person walks in the room"] * 12))  # several 16-token pieces
        assert eng.rebuild("s", [long_prefix], key="new")
        assert in_piece.wait(10)
        step = threading.Thread(target=lambda: eng.append([("s", em.user_turn(user_turn(5.0), None))]))
        step.start()
        for _ in range(1000):
            if eng._steps == 1:
                break
            threading.Event().wait(0.005)
        release.set()
        step.join(30)
        assert eng.wait_rebuild("s", timeout=60)
    finally:
        em.forward = forward
    assert order[:3] == ["rebuild", "step", "rebuild"], order
    assert order.count("rebuild") > 3 and eng.prefix_key("s") == "new"


def tiny_qwen_vl(family: str):
    """A tiny random Qwen2.5-VL or Qwen3-VL (the other two VLM classes the engine takes), with the
    same word-level tokenizer and the streaming tokens."""
    from streamharness.train.vlm import _mrope_section, add_streaming_tokens, build_tiny_tokenizer, make_image_processor

    tok = build_tiny_tokenizer(VOCAB)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                                        "<|image_pad|>", "<|video_pad|>")}
    text = {"vocab_size": len(tok) + 8, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(16)},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    common = {"image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"], "tie_word_embeddings": False,
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]}
        pixels = 56 * 56
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        text["head_dim"] = 16
        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "out_hidden_size": 64, "patch_size": 16,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": []}
        pixels = 64 * 64
    config = Config(text_config=text, vision_config=vision, **common)
    torch.manual_seed(0)
    model = Model(config).eval()
    tokens = add_streaming_tokens(tok, model)
    return EngineModel(model, tok, make_image_processor(pixels, pixels, config.vision_config.patch_size, 2)), tokens


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_the_other_qwen_vl_classes_give_a_full_re_prefills_logits_too(family):
    em, tokens = tiny_qwen_vl(family)
    chunks = dialogue(em, [tokens.silence], 3)
    assert sum(c.images for c in chunks) == 3
    eng = engine(em)
    eng.prefill("s", chunks[:1])
    for k in range(1, len(chunks)):
        got = eng.append([("s", chunks[k])])[0]
        assert torch.allclose(got, full_logits(em, chunks[:k + 1]), atol=1e-4), (family, k)


@pytest.mark.parametrize("mode", ["flex", "sdpa"])
@pytest.mark.parametrize("which", ["vlm", "text_lm"])
def test_each_attention_mode_gives_a_full_re_prefills_logits_for_a_batch_of_unequal_streams(which, mode, request):
    """FlexAttention's block mask and SDPA with folded query groups (the text model has 4 query
    heads on 2 KV heads) both give, for each stream of a batch, the logits of its own re-prefill."""
    em = request.getfixturevalue(which)
    em = em[0] if isinstance(em, tuple) else em
    m = EngineModel(em.model, em.tokenizer, em.image_processor, attention_mode=mode)
    assert m.attention == mode
    silence = m.ids("</silence>")
    streams = {"a": dialogue(m, silence, 3, seed=1), "b": dialogue(m, silence, 1, seed=2)}
    eng = engine(m)
    eng.prefill("a", streams["a"][:3])  # a is longer than b from the start
    eng.prefill("b", streams["b"][:1])
    got = eng.append([("b", streams["b"][1]), ("a", streams["a"][3])])
    assert torch.allclose(got[0], full_logits(m, streams["b"][:2]), atol=1e-4)
    assert torch.allclose(got[1], full_logits(m, streams["a"][:4]), atol=1e-4)


def test_grouped_vision_attention_equals_attention_image_by_image(vlm):
    """Equal consecutive segments go through one call; unequal and empty ones (Qwen2.5-VL's edge
    windows) too; and the tiny VLM's whole vision tower gives what transformers' per-image loop gives."""
    from streamharness.engine.attention import VISION, vision_attention

    torch.manual_seed(0)
    lengths = [7, 7, 7, 3, 0, 5, 5, 9]
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()])
    q, k, v = (torch.randn(1, 4, int(cu[-1]), 8) for _ in range(3))
    got, _ = vision_attention(None, q, k, v, cu_seq_lens_q=cu)
    bounds = [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]).transpose(1, 2)
                      for s, e in bounds], dim=1)
    assert torch.allclose(got, want, atol=1e-6)
    # not one attention over everything: a segment that saw its neighbours would differ
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert not torch.allclose(got, whole, atol=1e-3)

    em, _ = vlm
    visual = em.base.visual
    pv, grid = em.images([jpeg(1), jpeg(2), jpeg(3, size=(48, 64))])
    with torch.inference_mode():
        assert visual.config._attn_implementation == VISION
        grouped = visual(pv, grid_thw=grid.to(em.device))
        visual.config._attn_implementation = "sdpa"
        try:
            loop = visual(pv, grid_thw=grid.to(em.device))
        finally:
            visual.config._attn_implementation = VISION
    grouped = getattr(grouped, "pooler_output", grouped)
    loop = getattr(loop, "pooler_output", loop)
    assert torch.allclose(grouped, loop, atol=1e-5)


def test_warm_up_runs_its_shapes_and_leaves_no_stream_behind(text_lm):
    eng = engine(text_lm, slots=4, spare_slots=1)
    eng.append([("live", text_lm.text("a person walks in"))])
    seconds = eng.warm_up(((1, 1), (5, 7), (2, 600)))  # more streams than free slots, tokens past the margin
    assert seconds >= 0
    assert list(eng.streams) == ["live"] and len(eng._free) == 3
    assert eng.length("live") == len(text_lm.ids("a person walks in"))


def one_layer(which: str) -> EngineModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    from streamharness.train.vlm import add_streaming_tokens, build_tiny_qwen2_vl, build_tiny_tokenizer

    if which == "vlm":
        model, tok, ip = build_tiny_qwen2_vl(VOCAB, seed=3, layers=1)
        add_streaming_tokens(tok, model)
        return EngineModel(model.eval(), tok, ip)
    tok = build_tiny_tokenizer(VOCAB)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return EngineModel(LlamaForCausalLM(config).eval(), tok)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("which", ["vlm", "text_lm"])
def test_dropping_the_oldest_turns_leaves_the_cache_a_re_prefill_of_the_rest_gives(which, int8):
    """At one layer a cache's keys and values depend only on each token and its position, so after
    a drop (the kept turns moved down, their keys rotated back) the next step's logits are those of
    a re-prefill of the prefix and the kept turns (images and M-RoPE positions included). Without
    the rotation they are not."""
    em = one_layer(which)
    silence = em.ids("</silence>")
    chunks = dialogue(em, silence, 5)  # system, then (turn, reply) x 5
    eng = engine(em, int8_kv=int8)
    for c in chunks[:-1]:
        eng.append([("s", c)])
    start = len(chunks[0])
    end = start + len(chunks[1]) + len(chunks[2])  # the first second: its turn and its reply
    before = eng.length("s")
    gen = eng.generation("s")
    eng.drop("s", start, end)
    assert eng.length("s") == before - (end - start) and eng.generation("s") == gen
    kept = [chunks[0], *chunks[3:]]
    assert eng.tokens("s") == [i for c in kept[:-1] for i in c.ids]
    got = eng.append([("s", chunks[-1])])[0]
    want = full_logits(em, kept)
    atol = 0.05 * float(want.abs().max()) + 1e-3 if int8 else 1e-4
    error = float((got - want).abs().max())
    assert torch.allclose(got, want, atol=atol), error

    if not int8:  # moved but not rotated: the positions are wrong and so are the logits
        bad = engine(em)
        for c in chunks[:-1]:
            bad.append([("s", c)])
        em.shift_keys, real = (lambda delta: (lambda keys: keys)), em.shift_keys
        try:
            bad.drop("s", start, end)
        finally:
            em.shift_keys = real
        wrong = float((bad.append([("s", chunks[-1])])[0] - want).abs().max())
        assert wrong > 20 * max(error, 1e-6), (wrong, error)


def test_drop_refuses_what_it_cannot_do(text_lm):
    eng = engine(text_lm)
    eng.append([("s", text_lm.text("a person walks in the room"))])
    with pytest.raises(ValueError, match="cannot drop"):
        eng.drop("s", 0, 2)  # the first token stays
    with pytest.raises(ValueError, match="cannot drop"):
        eng.drop("s", 2, 99)


def test_a_stream_closed_during_its_rebuild_can_be_rebuilt_at_once(text_lm):
    """The policy's answer to a full cache while a background rebuild still runs: close the stream
    and rebuild it now. The slot the old rebuild holds must not block that (nor leak once it ends)."""
    eng = engine(text_lm, slots=3, spare_slots=1)
    eng.prefill("s", [text_lm.text("a person walks in the room")])
    started, release = threading.Event(), threading.Event()

    def hold(name):
        started.set()
        release.wait(30)

    eng.before_rebuild = hold
    assert eng.rebuild("s", [text_lm.text("a red cup")], background=True)
    assert started.wait(30)
    eng.close("s")
    eng.before_rebuild = None
    eng.rebuild("s", [text_lm.text("a red cup on the table")], background=False)
    assert eng.length("s") == len(text_lm.ids("a red cup on the table"))
    release.set()
    deadline = time.monotonic() + 30
    while len(eng._free) != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(eng._free + [eng.streams["s"].slot]) == [0, 1, 2] and eng._shadows == 0


def test_a_failed_background_rebuild_is_reported_and_the_stream_keeps_its_cache(text_lm):
    failures = []
    eng = StreamingEngine(text_lm, EngineConfig(capacity=256, margin=64, slots=3, spare_slots=1),
                          on_rebuild_failed=lambda name, err: failures.append((name, type(err).__name__)))
    eng.append([("s", text_lm.text("a person walks in"))])
    before = eng.tokens("s")
    too_long = text_lm.text(" ".join(["a red cup on the table"] * 60))  # past the capacity
    assert eng.rebuild("s", [too_long], background=True)
    assert eng.wait_rebuild("s", timeout=60)
    assert failures == [("s", "CacheFull")] and eng.rebuild_failures == 1
    assert eng.tokens("s") == before and not eng.rebuilding("s")


def test_hybrid_attention_runs_flex_for_big_steps_and_sdpa_for_small_ones(text_lm, monkeypatch):
    from streamharness.engine import attention

    built = []
    real = attention.lower_right_block_mask
    monkeypatch.setattr(attention, "lower_right_block_mask", lambda *a, **k: built.append(len(a[0])) or real(*a, **k))
    m = EngineModel(text_lm.model, text_lm.tokenizer, attention_mode="hybrid", flex_min_batch=2)
    assert m.attention == "hybrid" and m.compiles
    silence = m.ids("</silence>")
    streams = {"a": dialogue(m, silence, 2, seed=1), "b": dialogue(m, silence, 2, seed=2)}
    eng = engine(m)
    eng.prefill("a", streams["a"][:2])  # one stream a step: SDPA
    assert built == []
    got = eng.append([("a", streams["a"][2]), ("b", streams["b"][0])])  # two: Flex
    assert built == [2]
    assert torch.allclose(got[0], full_logits(m, streams["a"][:3]), atol=1e-4)
    assert torch.allclose(got[1], full_logits(m, streams["b"][:1]), atol=1e-4)


def test_drop_oldest_turns_stops_at_the_target_or_the_turns_it_must_keep(text_lm):
    eng2 = engine(text_lm)
    eng2.append([("s", text_lm.text("you watch a room"))])
    marks = []
    for word in ["a", "person", "walks", "in", "the", "room"]:
        marks.append(eng2.length("s"))
        eng2.append([("s", text_lm.text(f"{word} a red cup"))])  # 4 tokens a turn
    assert marks == [4, 8, 12, 16, 20, 24] and eng2.length("s") == 28
    # down to 16 tokens: the three oldest turns go (28 - 12), the marks follow them down
    after = eng2.drop_oldest_turns("s", marks, 16, keep=2)
    assert eng2.length("s") == 16 and after == [4, 8, 12]
    # keeping the last 2 of 3 turns: one more can go, not two
    assert eng2.drop_oldest_turns("s", after, 0, keep=2) == [4, 8] and eng2.length("s") == 12
    assert eng2.drop_oldest_turns("s", [4, 8], 0, keep=2) is None


def test_generate_does_not_stop_before_something_that_is_not_blank(text_lm, monkeypatch):
    """min_new_tokens counts tokens that say something: a model that writes a newline and closes the
    turn (SmolLM2 prompted with the protocol did, every second) is kept going past the newline."""
    eng = engine(text_lm)
    eng.prefill("s", [text_lm.system("you watch a room")])
    vocab = len(text_lm.tokenizer)
    newline, stop, word = 5, 6, 7
    script = iter([newline, stop, stop, stop, stop, stop])  # what the "model" prefers at each step

    def logits_of(token):
        row = torch.zeros(vocab)
        row[token] = 10.0
        row[word] = 5.0  # the runner-up when the preferred token is banned
        return row

    monkeypatch.setattr(eng, "append", lambda items: [logits_of(next(script))])
    assert list(eng.generate("s", [1], max_new_tokens=6, stop=[stop], min_new_tokens=1)) == [newline, stop]
    script = iter([newline, stop, stop, stop, stop, stop])
    assert list(eng.generate("s", [1], max_new_tokens=6, stop=[stop], min_new_tokens=1, blank=[newline])) == [newline, word, stop]
