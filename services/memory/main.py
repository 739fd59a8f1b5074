"""The memory service: remembers every encoded frame, answers Recall and Context (gRPC).

    python services/memory/main.py      # settings from SH_*, SH_KAFKA_*, SH_MEMORY_*, SH_TEXT_ENCODER_*
"""

from __future__ import annotations

import sys


def main() -> int:
    from streamharness.memory.service import MemoryService
    from streamharness.runner import run_service

    return run_service(MemoryService())


if __name__ == "__main__":
    sys.exit(main())
