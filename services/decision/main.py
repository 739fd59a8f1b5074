"""Decision service entry point. Settings: SH_*, SH_KAFKA_*, SH_DECISION_* (docs/operations.md)."""

import sys

if __name__ == "__main__":
    from streamharness.decision.service import DecisionService
    from streamharness.runner import serve_main

    sys.exit(serve_main(DecisionService))
