"""What the development servers share: the cache folder and loopback ports."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def dev_cache_dir() -> Path:
    """Base of the dev cache (jars, exports, dev data): ``$SH_DEV_CACHE_DIR`` or ``~/.cache/streamharness``."""
    env = os.environ.get("SH_DEV_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamharness"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False
