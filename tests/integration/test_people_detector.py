"""The people detector (OpenCV HOG in Triton's python backend) served by a real tritonserver,
through PeopleDetectorClient over gRPC, on real video (opencv-doc's vtest.avi: PETS 2009 S2.L1,
pedestrians 60-100 px tall) and on opencv-doc photos without people.

Measured with the repository's config (upscale 2 capped at 1280x960 pixels, stride 8, pyramid 1.1,
score >= 1.0, NMS 0.3) on vtest.avi's own 768x576 frames: 2-9 people in every second (median 5), 7
at 24 s; none in the photos below. (Before issue 14, pyramid 1.05 and no cap: 3-9, 9 at 24 s, at
about twice the cost; bench/people_detector_cost.py compares the settings.)
"""

from __future__ import annotations

import gzip
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest

from streamharness.devinfra.triton_server import TritonServer
from streamharness.errors import DependencyUnavailable, InvalidInput
from streamharness.media import read_video, sample_path
from streamharness.settings import TritonSettings

if TYPE_CHECKING:
    from streamharness.people_client import PeopleDetectorClient

# streamharness.people_client (tritonclient.grpc) is imported inside fixtures: collecting this module
# must not load protos that clash with kserve's.
pytestmark = pytest.mark.integration

PEOPLE_DETECTOR = "people_detector"
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
NO_PEOPLE = ("orange.jpg", "fruits.jpg", "butterfly.jpg", "baboon.jpg", "apple.jpg")
CROWDED_S = 24  # a crowded vtest.avi second (7 people found); people walk in every second
SCORE_THRESHOLD = 1.0  # model-repository/people_detector/config.pbtxt


def wait_for_model(server: TritonServer, name: str, timeout_s: float = 120.0) -> None:
    """The session server loads every model of the repository but awaits only the frame encoder."""
    deadline = time.monotonic() + timeout_s
    while not server.is_model_ready(name):
        states = {entry["name"]: entry for entry in server.repository_index()}
        entry = states.get(name, {})
        if entry.get("state") == "UNAVAILABLE" and entry.get("reason", "unloaded") != "unloaded":
            pytest.fail(f"model {name} failed to load: {entry['reason']}\n{server.log_tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"model {name} not ready after {timeout_s:.0f} s ({entry}):\n{server.log_tail()}")
        time.sleep(0.2)


def opencv_doc_image(name: str, tmp_dir: Path) -> np.ndarray:
    """An RGB image from opencv-doc's examples/data; Debian may ship it gzip-compressed."""
    path = OPENCV_DATA / name
    if not path.is_file():
        packed = OPENCV_DATA / f"{name}.gz"
        if not packed.is_file():
            pytest.fail(f"{path} is missing: these tests need Debian's opencv-doc (apt-get install opencv-doc)")
        path = tmp_dir / name
        with gzip.open(packed) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, f"OpenCV cannot read {path}"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def detector(triton_server: TritonServer, triton_settings: TritonSettings) -> Iterator[PeopleDetectorClient]:
    from streamharness.people_client import PeopleDetectorClient

    wait_for_model(triton_server, PEOPLE_DETECTOR)
    with PeopleDetectorClient(triton_settings, PEOPLE_DETECTOR) as client:
        yield client


@pytest.fixture(scope="module")
def crowded_frame() -> np.ndarray:
    for frame in read_video(sample_path("vtest.avi"), fps=1):
        if frame.media_ts_ms >= CROWDED_S * 1000:
            return frame.rgb
    pytest.fail(f"vtest.avi is shorter than {CROWDED_S} s")


def test_counts_the_pedestrians_of_a_crowded_street_frame(detector: PeopleDetectorClient, crowded_frame: np.ndarray) -> None:
    assert detector.ready()
    found = detector.detect(crowded_frame)
    height, width = crowded_frame.shape[:2]

    assert 5 <= found.count <= 12, f"{found.count} people in vtest.avi at {CROWDED_S} s"
    assert found.boxes.shape == (found.count, 4) and found.scores.shape == (found.count,)
    assert found.boxes.dtype == np.float32 and found.scores.dtype == np.float32
    assert np.all(found.scores >= SCORE_THRESHOLD), found.scores
    assert np.all(np.diff(found.scores) <= 0), "scores must come best first"
    x, y, w, h = found.boxes.T
    # Boxes are in pixels of the frame sent (not of the 2x upscaled image the model searched).
    assert np.all(w > 0) and np.all(h > 0)
    assert np.all(x + w / 2 >= 0) and np.all(x + w / 2 <= width) and np.all(y + h / 2 >= 0) and np.all(y + h / 2 <= height)
    assert 60 <= float(np.median(h)) <= 200, f"box heights {h}: people here are 60-100 px tall"
    assert np.allclose(w / h, 0.5, atol=0.05), "HOG's window is 64x128"


@pytest.mark.parametrize("name", NO_PEOPLE)
def test_finds_nobody_in_photos_without_people(detector: PeopleDetectorClient, name: str, tmp_path: Path) -> None:
    found = detector.detect(opencv_doc_image(name, tmp_path))
    assert found.count == 0, f"{found.count} people in {name}: scores {found.scores}"
    assert found.boxes.shape == (0, 4) and found.scores.shape == (0,)


def test_a_frame_smaller_than_the_window_has_nobody(detector: PeopleDetectorClient) -> None:
    found = detector.detect(np.full((20, 30, 3), 127, np.uint8))
    assert found.count == 0 and found.boxes.shape == (0, 4)


def test_errors_are_mapped(detector: PeopleDetectorClient, triton_settings: TritonSettings) -> None:
    from streamharness.people_client import PeopleDetectorClient

    with pytest.raises(InvalidInput, match="shape"):
        detector.detect(np.zeros((64, 64), np.uint8))  # grey, not RGB: refused before sending
    with PeopleDetectorClient(triton_settings, "no_such_model") as missing:
        assert not missing.ready()
        with pytest.raises(DependencyUnavailable, match="no_such_model"):
            missing.detect(np.zeros((64, 64, 3), np.uint8))
