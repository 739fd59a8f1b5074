"""`streamharness dev encode-video`: Kafka and Triton alone, a real video through the frame encoder."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_up_plays_a_real_video_through_kafka_and_triton():
    proc = subprocess.run(
        [sys.executable, "-m", "streamharness.cli", "dev", "encode-video", "--limit-s", "6", "--speed", "0"],
        capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "7/7 frames encoded" in out  # vtest.avi at 1 fps, media time 0..6 s
    # vtest.avi is a street scene: the encoder's top labels are ImageNet classes, one line per second
    assert out.count("t=") >= 7
