"""Where the platform keeps files on local disk, for runtime code and development tools alike.

Runtime modules take their default paths from here, never from ``streamharness.devinfra`` (the
development servers), so that a service image needs nothing of devinfra's.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Base of the cache (jars, ONNX exports, sample media, dev data): ``$SH_DEV_CACHE_DIR``, else
    ``~/.cache/streamharness``. Not created here: callers make the folders they write."""
    env = os.environ.get("SH_DEV_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamharness"
