"""Client of the people detector served by Triton (``model-repository/people_detector``), over gRPC.

    client = PeopleDetectorClient(load_settings(TritonSettings))
    found = client.detect(rgb_frame)         # any size, uint8 RGB (H, W, 3)
    found.count                              # people found
    found.boxes                              # float32 (count, 4): x, y, w, h in pixels of rgb_frame
    found.scores                             # float32 (count,): SVM margins, best first

Like ``streamharness.triton_client``, this module imports ``tritonclient.grpc`` (whose protos clash
with kserve's in one process): import it only where Triton is called, never from the package root.
``detect`` is thread-safe; the model takes one frame per request, so detect frames of a batch from a
thread pool to keep the server busy.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from streamharness.errors import DependencyUnavailable, InvalidInput, StreamHarnessError
from streamharness.settings import TritonSettings
from streamharness.triton_client import check_frame

PEOPLE_DETECTOR = "people_detector"
INPUT_NAME = "IMAGE"
OUTPUT_NAMES = ("BOXES", "SCORES", "COUNT")
# Statuses after which the same call may succeed later: the server or model is not there right now.
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                "StatusCode.NOT_FOUND", "StatusCode.RESOURCE_EXHAUSTED"}


@dataclass(frozen=True)
class PeopleDetection:
    """The people found in one frame."""

    boxes: np.ndarray
    """float32 (count, 4): x, y (top-left), width, height in pixels of the frame sent; best first."""
    scores: np.ndarray
    """float32 (count,): the detector's SVM margin per box (higher = surer; not a probability)."""
    count: int


class PeopleDetectorClient:
    """Finds people in frames with the Triton ``people_detector`` model (one request per frame).

    ``settings`` gives the server (``url``) and the deadline (``timeout_s``); any object with those
    attributes does. ``model`` / ``version`` name the model (``SH_ENCODER_PEOPLE_MODEL`` in the encoder).
    """

    def __init__(self, settings: TritonSettings, model: str = PEOPLE_DETECTOR, version: str = "") -> None:
        self.settings = settings
        self.model = model
        self.version = version
        self._client = grpcclient.InferenceServerClient(url=settings.url)

    def ready(self) -> bool:
        """True when Triton answers and the people detector is ready; never raises."""
        try:
            return bool(self._client.is_model_ready(self.model, self.version, client_timeout=self.settings.timeout_s))
        except InferenceServerException:
            return False

    def detect(self, image_rgb: np.ndarray) -> PeopleDetection:
        """People in one RGB uint8 (H, W, 3) frame of any size.

        Raises ``InvalidInput`` for a malformed frame (before anything is sent) or one the server
        rejects, ``DependencyUnavailable`` when Triton or the model cannot be reached now, and
        ``StreamHarnessError`` for other failures.
        """
        check_frame(image_rgb)
        tensor = grpcclient.InferInput(INPUT_NAME, list(image_rgb.shape), "UINT8")
        tensor.set_data_from_numpy(np.ascontiguousarray(image_rgb))
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUT_NAMES]
        try:
            result = self._client.infer(self.model, [tensor], model_version=self.version, outputs=outputs,
                                        client_timeout=self.settings.timeout_s)
        except InferenceServerException as err:
            raise self._mapped(err, f"detecting people in a {image_rgb.shape[1]}x{image_rgb.shape[0]} frame") from None
        return _parse(result, self._where())

    def _where(self) -> str:
        return f"Triton at {self.settings.url}, model {self.model!r}"

    def _mapped(self, err: InferenceServerException, what: str) -> StreamHarnessError:
        status = str(err.status() or "")
        if status == "StatusCode.INVALID_ARGUMENT":
            return InvalidInput(f"{self._where()} rejected the input: {err.message()}")
        if status in _UNAVAILABLE:
            return DependencyUnavailable(f"{self._where()}: {what} failed ({status.removeprefix('StatusCode.')}): {err.message()}")
        return StreamHarnessError(f"{self._where()}: {what} failed ({status or 'no status'}): {err.message()}")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PeopleDetectorClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _parse(result: grpcclient.InferResult, where: str) -> PeopleDetection:
    boxes = result.as_numpy("BOXES")
    scores = result.as_numpy("SCORES")
    count = result.as_numpy("COUNT")
    if boxes is None or scores is None or count is None:
        raise StreamHarnessError(f"{where} answered without BOXES, SCORES or COUNT")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    n = int(np.asarray(count).reshape(-1)[0]) if np.asarray(count).size else -1
    if n != len(boxes) or n != len(scores):
        raise StreamHarnessError(f"{where} answered COUNT={n} with {len(boxes)} boxes and {len(scores)} scores")
    return PeopleDetection(boxes=boxes, scores=scores, count=n)
