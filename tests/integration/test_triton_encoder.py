"""The frame encoder served by a real tritonserver, through FrameEncoderClient over gRPC.

Images: scikit-image's chelsea (a tabby cat) and photos from Debian's opencv-doc package
(/usr/share/doc/opencv-doc/examples/data).
"""

from __future__ import annotations

import gzip
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pytest
from skimage import data

from streamharness.devinfra.triton_server import TritonServer, free_port
from streamharness.errors import DependencyUnavailable, InvalidInput
from streamharness.settings import TritonSettings, load_settings

if TYPE_CHECKING:
    from streamharness.triton_client import FrameEncoderClient, FrameEncoding

# streamharness.triton_client (tritonclient.grpc) is imported inside the fixtures, not here: collecting
# this module must not load protos that clash with kserve's when other tests import kserve.
pytestmark = pytest.mark.integration

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
CATS = {"tabby", "tiger cat", "Egyptian cat"}
# opencv-doc photo -> the ImageNet class a working encoder gives it first (each with p > 0.6).
EXPECTED_TOP1 = {"orange.jpg": "orange", "butterfly.jpg": "monarch", "baboon.jpg": "baboon", "apple.jpg": "Granny Smith"}


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


def first_name(label: str) -> str:
    return label.split(",")[0].strip()  # "tabby, tabby cat" -> "tabby"


def top1(encoding: FrameEncoding) -> str:
    return first_name(encoding.labels[0][0])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    tmp = tmp_path_factory.mktemp("opencv-doc")
    found = {name: opencv_doc_image(name, tmp) for name in EXPECTED_TOP1}
    found["chelsea"] = data.chelsea()
    return found


def encoder_client_class() -> type[FrameEncoderClient]:
    from streamharness.triton_client import FrameEncoderClient

    return FrameEncoderClient


@pytest.fixture(scope="module")
def client(triton_settings: TritonSettings) -> Iterator[FrameEncoderClient]:
    with encoder_client_class()(triton_settings) as c:
        yield c


def test_frame_encoder_is_ready(client: FrameEncoderClient) -> None:
    assert client.ready()


def test_chelsea_is_a_cat(client: FrameEncoderClient, images: dict[str, np.ndarray]) -> None:
    [enc] = client.encode([images["chelsea"]])  # 451x300: the client resizes
    names = [first_name(label) for label, _ in enc.labels]
    assert len(names) == 5
    assert names[0] in CATS, enc.labels
    scores = [score for _, score in enc.labels]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001


@pytest.mark.parametrize("name", sorted(EXPECTED_TOP1))
def test_opencv_doc_photo_gets_its_label(client: FrameEncoderClient, images: dict[str, np.ndarray], name: str) -> None:
    [enc] = client.encode([images[name]])
    assert top1(enc) == EXPECTED_TOP1[name], enc.labels


def test_embeddings_are_unit_vectors_that_tell_images_apart(client: FrameEncoderClient, images: dict[str, np.ndarray]) -> None:
    cat, cat_again, orange, butterfly = (
        client.encode([images[name]])[0] for name in ("chelsea", "chelsea", "orange.jpg", "butterfly.jpg")
    )
    [mirrored] = client.encode([np.ascontiguousarray(images["chelsea"][:, ::-1])])
    for enc in (cat, orange, butterfly, mirrored):
        assert enc.embedding.shape == (1280,) and enc.embedding.dtype == np.float32
        assert abs(float(np.linalg.norm(enc.embedding)) - 1.0) < 1e-4
    np.testing.assert_allclose(cat_again.embedding, cat.embedding, atol=1e-6)
    # The same cat mirrored stays close; different subjects are far apart (measured: 0.98 vs <= 0.25).
    assert float(cat.embedding @ mirrored.embedding) > 0.9
    for other in (orange, butterfly):
        assert float(cat.embedding @ other.embedding) < 0.5
    assert float(orange.embedding @ butterfly.embedding) < 0.5


def test_a_batch_returns_one_result_per_image_in_order(client: FrameEncoderClient, images: dict[str, np.ndarray]) -> None:
    order = ["orange.jpg", "chelsea", "baboon.jpg", "butterfly.jpg", "apple.jpg", "chelsea"]
    singles = {name: client.encode([images[name]])[0] for name in set(order)}
    batch = client.encode([images[name] for name in order])
    assert len(batch) == len(order)
    for name, enc in zip(order, batch):
        assert top1(enc) == top1(singles[name]), name
        np.testing.assert_allclose(enc.embedding, singles[name].embedding, atol=1e-4, err_msg=name)


def test_more_frames_than_max_batch_size(client: FrameEncoderClient, images: dict[str, np.ndarray]) -> None:
    order = [("chelsea", "orange.jpg", "baboon.jpg")[i % 3] for i in range(40)]  # max_batch_size is 32
    results = client.encode([images[name] for name in order])
    assert [top1(enc) for enc in results] == [
        "Egyptian cat" if name == "chelsea" else EXPECTED_TOP1[name] for name in order
    ]


def settled_statistics(server: TritonServer, timeout_s: float = 5.0) -> dict:
    """The model's statistics once two reads 50 ms apart agree: Triton counts an inference after its
    response has gone out, so a read right after a request can miss it (and the next test's
    difference then counts it: 49 of 48, seen in CI)."""
    deadline = time.monotonic() + timeout_s
    last = server.model_statistics()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = server.model_statistics()
        if now["inference_count"] == last["inference_count"] and now["execution_count"] == last["execution_count"]:
            return now
        last = now
    return last


def test_concurrent_requests_all_succeed_and_are_batched(
    client: FrameEncoderClient, images: dict[str, np.ndarray], triton_server: TritonServer
) -> None:
    names = ["chelsea", "orange.jpg", "butterfly.jpg", "baboon.jpg"]
    expected = {name: top1(client.encode([images[name]])[0]) for name in names}
    before = settled_statistics(triton_server)
    start = threading.Barrier(8)

    def worker(i: int) -> list[tuple[str, str]]:
        start.wait()  # all threads send at once: the dynamic batcher gets something to merge
        got = []
        for j in range(6):
            name = names[(i + j) % len(names)]
            got.append((name, top1(client.encode([images[name]])[0])))
        return got

    with ThreadPoolExecutor(8) as pool:
        results = [pair for chunk in pool.map(worker, range(8)) for pair in chunk]
    assert len(results) == 48
    assert all(label == expected[name] for name, label in results), results

    after = settled_statistics(triton_server)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 48
    assert executions < inferences, "the dynamic batcher never merged two concurrent requests"


def test_top_k_follows_the_settings(triton_settings: TritonSettings, images: dict[str, np.ndarray]) -> None:
    settings = load_settings(TritonSettings, **{**triton_settings.model_dump(), "top_k": 2})
    with encoder_client_class()(settings) as c:
        [enc] = c.encode([images["chelsea"]])
    assert len(enc.labels) == 2 and first_name(enc.labels[0][0]) in CATS


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((120, 160), np.uint8),  # grayscale
        np.zeros((120, 160, 4), np.uint8),  # RGBA
        np.zeros((120, 160, 3), np.float32),  # not uint8
        np.zeros((0, 160, 3), np.uint8),  # empty
    ],
    ids=["grayscale", "rgba", "float32", "empty"],
)
def test_a_malformed_frame_is_invalid_input(client: FrameEncoderClient, images: dict[str, np.ndarray], frame: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match="frame 1"):
        client.encode([images["chelsea"], frame])


def test_the_server_rejects_a_wrong_sized_batch_as_invalid_input(client: FrameEncoderClient) -> None:
    with pytest.raises(InvalidInput, match="unexpected shape"):
        client.encode_batch(np.zeros((1, 100, 100, 3), np.uint8))  # not resized to 224x224


def test_an_unreachable_server_is_dependency_unavailable(images: dict[str, np.ndarray]) -> None:
    settings = load_settings(TritonSettings, url=f"127.0.0.1:{free_port()}", timeout_s=5.0)
    with encoder_client_class()(settings) as c:
        assert not c.ready()
        with pytest.raises(DependencyUnavailable, match="127.0.0.1"):
            c.encode([images["chelsea"]])
