"""The responder service: consumes ``decisions``, streams generated responses to ``responses``.

    SH_SERVICE_NAME=responder SH_GRPC_PORT=50056 python services/responder/main.py

Settings: ``SH_RESPONDER_*`` (memory address, workers, prompt budget), ``SH_GENERATION_*`` (which
backend writes the text), ``SH_KAFKA_*``, and the common ``SH_*`` service settings.
"""

from __future__ import annotations

import sys


def main() -> int:
    from streamharness.responder import ResponderService
    from streamharness.runner import run_service

    return run_service(ResponderService())


if __name__ == "__main__":
    sys.exit(main())
