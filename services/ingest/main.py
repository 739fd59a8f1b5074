"""Ingest service entry point. Settings: SH_*, SH_KAFKA_*, SH_INGEST_*."""

import sys


def main() -> int:
    from streamharness.errors import SettingsError
    from streamharness.ingest.service import IngestService

    try:
        service = IngestService()
    except SettingsError as err:
        print(f"error: {err}", flush=True)
        return 2
    from streamharness.runner import run_service

    return run_service(service)


if __name__ == "__main__":
    sys.exit(main())
