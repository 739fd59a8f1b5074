"""Ingest service entry point. Settings: SH_*, SH_KAFKA_*, SH_INGEST_* (docs/operations.md)."""

import sys

if __name__ == "__main__":
    from streamharness.ingest.service import IngestService
    from streamharness.runner import serve_main

    sys.exit(serve_main(IngestService))
