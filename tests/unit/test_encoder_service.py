"""The encoder service's pure parts: captions, frame decoding, settings and its entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamharness.encoder.service import EncoderSettings, build_caption, decode_jpeg
from streamharness.errors import InvalidInput, SettingsError
from streamharness.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
LABELS = [
    ("street sign", 0.31),
    ("trolleybus, trolley coach, trackless trolley", 0.22),
    ("pole", 0.12),
    ("traffic light, traffic signal, stoplight", 0.05),
]


@pytest.mark.parametrize(
    ("count", "caption"),
    [
        (2, "2 people; street sign, trolleybus, pole"),
        (1, "1 person; street sign, trolleybus, pole"),
        (0, "no people; street sign, trolleybus, pole"),
        (None, "street sign, trolleybus, pole"),  # people not counted
    ],
)
def test_caption_names_people_then_the_first_synonym_of_the_top_labels(count: int | None, caption: str) -> None:
    assert build_caption(LABELS, count, 3) == caption


def test_caption_label_count_and_repeats() -> None:
    assert build_caption(LABELS, 5, 1) == "5 people; street sign"
    assert build_caption(LABELS, 5, 0) == "5 people"
    assert build_caption(LABELS, None, 10) == "street sign, trolleybus, pole, traffic light"
    # ImageNet has classes whose first synonyms repeat ("crane" the bird and the machine).
    assert build_caption(["crane", "crane", "pelican"], 3, 2) == "3 people; crane, pelican"
    assert build_caption([], None, 3) == ""


def test_decode_jpeg_gives_rgb() -> None:
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 250  # red
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    decoded = decode_jpeg(data.tobytes())
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    assert decoded[..., 0].mean() > 200 and decoded[..., 2].mean() < 50


@pytest.mark.parametrize("data", [b"", b"not a jpeg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4])
def test_decode_jpeg_rejects_what_is_not_an_image(data: bytes) -> None:
    with pytest.raises(InvalidInput, match="bytes"):
        decode_jpeg(data)


def test_settings_name_the_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SH_ENCODER_MAX_BATCH", "0")
    with pytest.raises(SettingsError, match="SH_ENCODER_MAX_BATCH"):
        load_settings(EncoderSettings)
    monkeypatch.setenv("SH_ENCODER_MAX_BATCH", "8")
    monkeypatch.setenv("SH_ENCODER_DETECT_PEOPLE", "false")
    settings = load_settings(EncoderSettings)
    assert (settings.max_batch, settings.detect_people) == (8, False)
    with pytest.raises(Exception):  # frozen
        settings.max_batch = 4  # type: ignore[misc]
    assert all(f.description for f in EncoderSettings.model_fields.values())


def _python(code_or_args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *code_or_args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_entry_point_exits_2_naming_the_bad_variable() -> None:
    done = _python(["services/encoder/main.py"], {"SH_ENCODER_MAX_WAIT_MS": "-1"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "SH_ENCODER_MAX_WAIT_MS" in done.stdout


def test_importing_the_encoder_does_not_load_tritonclient_grpc() -> None:
    # tritonclient.grpc and kserve cannot share a process: only load() may import it.
    done = _python(["-c", "import sys, streamharness.encoder; print('tritonclient.grpc' in sys.modules)"], {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
