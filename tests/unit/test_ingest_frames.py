"""Frame decoding, pixel bounding and resampling on media time, on real opencv-doc images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from streamharness.errors import InvalidInput, TooLarge
from streamharness.ingest.frames import Resampler, bound_pixels, decode_image, encode_jpeg
from streamharness.media import sample_path
from streamharness.v1 import common_pb2

JPEG, PNG = common_pb2.IMAGE_ENCODING_JPEG, common_pb2.IMAGE_ENCODING_PNG
LIMIT = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def baboon_jpeg() -> bytes:
    return sample_path("baboon.jpg").read_bytes()


def test_real_jpeg_and_png_decode_to_rgb(baboon_jpeg):
    rgb = decode_image(baboon_jpeg, JPEG, LIMIT)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert np.array_equal(decode_image(png.tobytes(), PNG, LIMIT), rgb)


def test_truncated_jpeg_is_rejected_not_padded(baboon_jpeg):
    with pytest.raises(InvalidInput, match="cannot decode JPEG"):
        decode_image(baboon_jpeg[: len(baboon_jpeg) // 2], JPEG, LIMIT)


@pytest.mark.parametrize(
    ("data", "encoding", "message"),
    [
        (b"", JPEG, "no image bytes"),
        (b"\x00" * 100, JPEG, "cannot decode"),
        (b"x" * 100, common_pb2.IMAGE_ENCODING_UNSPECIFIED, "unsupported image encoding"),
    ],
)
def test_bad_frames_say_what_is_wrong(data, encoding, message):
    with pytest.raises(InvalidInput, match=message):
        decode_image(data, encoding, LIMIT)


def test_encoding_must_match_the_bytes(baboon_jpeg):
    with pytest.raises(InvalidInput, match="says PNG but the bytes are JPEG"):
        decode_image(baboon_jpeg, PNG, LIMIT)


def test_size_limit(baboon_jpeg):
    with pytest.raises(TooLarge, match="above the limit"):
        decode_image(baboon_jpeg, JPEG, 1000)


def test_bound_pixels_keeps_aspect_and_limit():
    frame = np.zeros((576, 768, 3), np.uint8)
    out = bound_pixels(frame, 320 * 240)
    assert out.shape[0] * out.shape[1] <= 320 * 240
    assert abs(out.shape[1] / out.shape[0] - 768 / 576) < 0.02
    assert bound_pixels(frame, 10**7) is frame


def test_jpeg_round_trip(baboon_jpeg):
    rgb = decode_image(baboon_jpeg, JPEG, LIMIT)
    again = decode_image(encode_jpeg(rgb, 85), JPEG, LIMIT)
    assert again.shape == rgb.shape and np.abs(again.astype(int) - rgb.astype(int)).mean() < 12


def test_resampler_keeps_one_frame_per_media_second():
    r = Resampler(1.0)
    kept = []
    for ts in range(0, 10_000, 100):  # 10 fps for 10 s
        r.check_order(ts)
        if r.keep(ts):
            kept.append(ts)
    assert kept == list(range(0, 10_000, 1000))


def test_resampler_handles_irregular_timestamps_like_tree_avi():
    r = Resampler(2.0)
    kept = [ts for ts in (0, 70, 480, 530, 990, 1600, 1601, 2400) if (r.check_order(ts) or r.keep(ts))]
    assert kept == [0, 530, 1600, 2400]


def test_resampler_rejects_time_going_back():
    r = Resampler(1.0)
    r.check_order(1000)
    r.keep(1000)
    with pytest.raises(InvalidInput, match="not after the previous"):
        r.check_order(1000)
    with pytest.raises(InvalidInput, match="out of range"):
        Resampler(0)
