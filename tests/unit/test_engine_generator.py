"""``SH_GENERATION_BACKEND=engine``: an answer generated on the stream's cache is the answer a fresh
cache gives, and the second prompt of a chunk prefills only what follows its memory prefix."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from streamharness.engine import EngineConfig, EngineModel, StreamingEngine  # noqa: E402
from streamharness.generation import GenerationRejected, GenerationSettings, Prompt  # noqa: E402
from streamharness.generation.engine_backend import EngineGenerator, chat_ids  # noqa: E402

WORDS = "you are a live video assistant memory of the stream so far a person walks in what is on the table ? who came in"


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from streamharness.train.vlm import build_tiny_tokenizer

    tok = build_tiny_tokenizer([WORDS])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return EngineModel(LlamaForCausalLM(config).eval(), tok)


def generator(model, **kw) -> EngineGenerator:
    engine = StreamingEngine(model, EngineConfig(capacity=1024, margin=256, slots=4, **kw))
    return EngineGenerator(GenerationSettings(backend="engine", max_new_tokens=12), engine=engine).load()


def prompt(question: str, context: str = "a person walks in", **kw) -> Prompt:
    return Prompt(system="you are a live video assistant", context=context, question=question, stream="t/cam", **kw)


def test_a_cached_answer_is_the_answer_a_fresh_cache_gives(model):
    gen = generator(model)
    first = "".join(gen.stream(prompt("what is on the table ?")))
    before = gen.prefilled_tokens
    second = "".join(gen.stream(prompt("who came in ?")))
    ids = chat_ids(model, prompt("who came in ?"))
    common = len(chat_ids(model, prompt("what is on the table ?", context="a person walks in")))
    assert gen.reused_tokens >= common - 12  # the system text and the memory block were not prefilled again
    assert gen.prefilled_tokens - before < len(ids) / 2
    fresh = "".join(generator(model).stream(prompt("who came in ?")))
    assert second == fresh and first


def test_a_summary_prompt_uses_a_cache_of_its_own_and_gives_it_back(model):
    gen = generator(model)
    "".join(gen.stream(prompt("what is on the table ?")))
    task = Prompt(system="you are a live video assistant", context="a person walks in", task="who came in ?", stream="t/cam")
    "".join(gen.stream(task))
    assert sorted(gen._engine.streams) == ["answer:t/cam"]


def test_a_prompt_longer_than_a_cache_is_refused_naming_the_setting(model):
    gen = generator(model)
    with pytest.raises(GenerationRejected, match="SH_ENGINE_CAPACITY_TOKENS"):
        gen.stream(prompt("what is on the table ?", context=" ".join(["a person walks in"] * 400)))


def test_a_prompt_with_frames_is_refused_naming_the_setting(model):
    from streamharness.generation import FrameImage

    with pytest.raises(GenerationRejected, match="SH_RESPONDER_FRAMES_PER_REQUEST=0"):
        generator(model).stream(prompt("what is on the table ?", images=(FrameImage(0, b"jpeg"),)))
