"""Pytest plugin: one real tritonserver per test session (the one in the nvidia-pytriton wheel),
serving the project's model-repository/, started only when a test asks for it.

The frame encoder's ONNX file is exported first if it is missing (needs torch: ~15 s once).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from streamharness.devinfra.triton_server import TritonServer
from streamharness.settings import TritonSettings, load_settings

MODEL_REPOSITORY = Path(__file__).resolve().parents[1] / "model-repository"


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = TritonServer(MODEL_REPOSITORY, tmp_path_factory.mktemp("triton"), wait_for_models=("frame_encoder", "people_detector"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton_settings(triton_server: TritonServer) -> TritonSettings:
    """Settings for the session server, whatever SH_TRITON_* a developer has exported."""
    return load_settings(
        TritonSettings,
        url=triton_server.grpc_url,
        frame_encoder_model="frame_encoder",
        frame_encoder_version="",
        top_k=5,
        timeout_s=60.0,  # concurrency tests queue many frames on a 2-core CPU
        model_repository=MODEL_REPOSITORY,
    )
