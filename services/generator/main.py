"""The generator service: SmolLM2 behind KServe's model server with an OpenAI-compatible API.

    python services/generator/main.py --model_name smollm2 --http_port 8080 [--host 0.0.0.0]

(same as ``python -m streamharness.generation.kserve_server``; all KServe model-server flags work.)
"""

from __future__ import annotations

import sys


def main() -> int:
    from streamharness.generation.kserve_server import main as serve

    return serve()


if __name__ == "__main__":
    sys.exit(main())
