"""The encoder service: ``frames`` → Triton (frame encoder + people detector) → ``embeddings``.

    python services/encoder/main.py     # settings from SH_*, SH_KAFKA_*, SH_TRITON_*, SH_ENCODER_*

A missing or invalid setting exits 2 with a message naming the variable.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    from streamharness.encoder import EncoderService, EncoderSettings
    from streamharness.errors import SettingsError
    from streamharness.runner import run_service
    from streamharness.settings import KafkaSettings, ServiceSettings, TritonSettings, load_settings

    try:
        # The service's name in logs and telemetry, unless SH_SERVICE_NAME says otherwise.
        named = any(k.upper() == "SH_SERVICE_NAME" for k in os.environ)
        service_settings = load_settings(ServiceSettings, **({} if named else {"service_name": "encoder"}))
        service = EncoderService(load_settings(EncoderSettings), load_settings(KafkaSettings), load_settings(TritonSettings))
    except SettingsError as err:
        print(f"error: {err}", flush=True)
        return 2
    return run_service(service, service_settings)


if __name__ == "__main__":
    sys.exit(main())
