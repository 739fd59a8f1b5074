"""Client of the frame encoder served by Triton (``model-repository/frame_encoder``), over gRPC.

    client = FrameEncoderClient(load_settings(TritonSettings))
    [enc] = client.encode([rgb_frame])        # any size, uint8 RGB; resized here to the model's input
    enc.embedding                              # float32 (1280,), unit length
    enc.labels                                 # [("tabby, tabby cat", 0.41), ...], best first

This module imports ``tritonclient.grpc``, whose generated protos clash with kserve's in one process:
import it only where Triton is called (the encoder service), never from the package's ``__init__``.

Concurrency: ``tritonclient.grpc.InferenceServerClient.infer`` is thread-safe, so one
``FrameEncoderClient`` can be shared by a pool of threads; concurrent calls are what lets Triton's
dynamic batcher merge frames of different streams into one forward pass. From asyncio, call
``encode`` through ``asyncio.to_thread`` (or write the same on ``tritonclient.grpc.aio``).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import cv2
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from streamharness.errors import DependencyUnavailable, InvalidInput, StreamHarnessError
from streamharness.settings import TritonSettings

INPUT_NAME = "IMAGE"
OUTPUT_NAMES = ("EMBEDDING", "TOP_SCORES", "TOP_LABELS", "TOP_IDS")
# Statuses after which the same call may succeed later: the server or model is not there right now.
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                "StatusCode.NOT_FOUND", "StatusCode.RESOURCE_EXHAUSTED"}


@dataclass(frozen=True)
class FrameEncoding:
    """What the frame encoder says about one frame."""

    embedding: np.ndarray
    """float32 (1280,), L2-normalised: cosine similarity of two frames is a dot product."""
    labels: list[tuple[str, float]]
    """(ImageNet class name with its synonyms, softmax probability), best first; TritonSettings.top_k long."""


@dataclass(frozen=True)
class _ModelInfo:
    max_batch_size: int
    height: int
    width: int


def check_frame(image: np.ndarray) -> None:
    """Raise ``InvalidInput`` unless ``image`` is a non-empty RGB uint8 frame of shape (H, W, 3)."""
    if not isinstance(image, np.ndarray):
        raise InvalidInput(f"a frame must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise InvalidInput(f"a frame must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInput(f"a frame must have shape (height, width, 3) (RGB), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidInput(f"a frame must not be empty, got shape {image.shape}")


def to_model_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Check one RGB uint8 frame and resize it to ``size`` = (height, width) with INTER_AREA."""
    check_frame(image)
    height, width = size
    if image.shape[:2] == (height, width):
        return np.ascontiguousarray(image)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)


class FrameEncoderClient:
    """Embeds and labels frames with the Triton ``frame_encoder`` model (gRPC, one request per batch)."""

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self._model = settings.frame_encoder_model
        self._version = settings.frame_encoder_version
        self._client = grpcclient.InferenceServerClient(url=settings.url)
        self._info: _ModelInfo | None = None
        self._info_lock = threading.Lock()

    # -- health ------------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when Triton answers and the frame encoder model is ready; never raises."""
        try:
            return bool(self._client.is_model_ready(self._model, self._version, client_timeout=self.settings.timeout_s))
        except InferenceServerException:
            return False

    # -- inference ---------------------------------------------------------------------------
    def encode(self, images: Sequence[np.ndarray]) -> list[FrameEncoding]:
        """One ``FrameEncoding`` per frame, in order. Frames are RGB uint8 (H, W, 3) of any size.

        All frames go in one request (several when there are more than the model's
        ``max_batch_size``). Raises ``InvalidInput`` for a malformed frame (before anything is sent)
        and ``DependencyUnavailable`` when Triton or the model cannot be reached.
        """
        images = list(images)
        if not images:
            return []
        for i, image in enumerate(images):  # fail on a bad frame before any network call
            try:
                check_frame(image)
            except InvalidInput as err:
                raise InvalidInput(f"frame {i}: {err}") from None
        info = self._model_info()
        batch = np.stack([to_model_input(image, (info.height, info.width)) for image in images])
        results: list[FrameEncoding] = []
        for start in range(0, len(batch), info.max_batch_size):
            results += self.encode_batch(batch[start:start + info.max_batch_size])
        return results

    def encode_batch(self, batch: np.ndarray) -> list[FrameEncoding]:
        """Send an already-resized uint8 batch (N, H, W, 3) as one request; the server checks H and W."""
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise InvalidInput(
                f"a batch must be a uint8 array of shape (N, height, width, 3), got "
                f"{getattr(batch, 'dtype', type(batch).__name__)} {getattr(batch, 'shape', '')}"
            )
        if batch.shape[0] == 0:
            return []
        tensor = grpcclient.InferInput(INPUT_NAME, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(batch))
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUT_NAMES]
        try:
            result = self._client.infer(
                self._model,
                [tensor],
                model_version=self._version,
                outputs=outputs,
                parameters={"top_k": self.settings.top_k},
                client_timeout=self.settings.timeout_s,
            )
        except InferenceServerException as err:
            raise self._mapped(err, f"encoding {batch.shape[0]} frame(s)") from None
        return _parse(result, batch.shape[0])

    def _model_info(self) -> _ModelInfo:
        with self._info_lock:
            if self._info is None:
                try:
                    config = self._client.get_model_config(
                        self._model, self._version, as_json=True, client_timeout=self.settings.timeout_s
                    )["config"]
                except InferenceServerException as err:
                    raise self._mapped(err, "reading the model config") from None
                (tensor,) = [t for t in config["input"] if t["name"] == INPUT_NAME]
                height, width, _ = (int(d) for d in tensor["dims"])
                self._info = _ModelInfo(max(1, int(config.get("max_batch_size", 1))), height, width)
            return self._info

    def _mapped(self, err: InferenceServerException, what: str) -> StreamHarnessError:
        status = str(err.status() or "")
        where = f"Triton at {self.settings.url}, model {self._model!r}"
        if status == "StatusCode.INVALID_ARGUMENT":
            return InvalidInput(f"{where} rejected the input: {err.message()}")
        if status in _UNAVAILABLE:
            return DependencyUnavailable(f"{where}: {what} failed ({status.removeprefix('StatusCode.')}): {err.message()}")
        return StreamHarnessError(f"{where}: {what} failed ({status or 'no status'}): {err.message()}")

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FrameEncoderClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _parse(result: grpcclient.InferResult, n: int) -> list[FrameEncoding]:
    embeddings = result.as_numpy("EMBEDDING")
    scores = result.as_numpy("TOP_SCORES")
    labels = result.as_numpy("TOP_LABELS")
    if embeddings is None or scores is None or labels is None or len(embeddings) != n or len(labels) != n:
        raise StreamHarnessError(f"the frame encoder answered {n} frame(s) with malformed outputs")
    return [
        FrameEncoding(
            embedding=np.array(embeddings[i], dtype=np.float32),
            labels=[(_text(label), float(score)) for label, score in zip(labels[i], scores[i])],
        )
        for i in range(n)
    ]


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
