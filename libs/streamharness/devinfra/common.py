"""What the development servers share: the cache folder and loopback ports."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from streamharness.paths import cache_dir

log = logging.getLogger(__name__)


def dev_cache_dir() -> Path:
    """Base of the dev cache (jars, exports, dev data): ``$SH_DEV_CACHE_DIR`` or ``~/.cache/streamharness``
    (:func:`streamharness.paths.cache_dir`, which runtime code uses)."""
    return cache_dir()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_http_ok(url: str, process: subprocess.Popen, timeout_s: float, name: str, tail: Callable[[], str]) -> None:
    """Poll ``url`` until it answers 200 while ``process`` runs; RuntimeError (with ``tail()``, the
    end of its log) if it exits, TimeoutError if ``timeout_s`` passes first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{name} not ready after {timeout_s:.0f}s:\n{tail()}")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = 40, missing: str = "") -> str:
    """The last ``lines`` lines of a log file, or ``missing`` when it cannot be read."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return missing
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen, timeout_s: float, name: str, *, kill_group: bool = False) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code. ``kill_group``: the process
    leads its own session (start_new_session) and the kill reaches its children too."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s pid %s ignored SIGTERM for %.0f s; killing it", name, proc.pid, timeout_s)
            if kill_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()
    return proc.returncode
