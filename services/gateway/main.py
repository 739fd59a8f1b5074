"""Gateway service entry point. Settings: SH_*, SH_KAFKA_*, SH_GATEWAY_* (docs/operations.md)."""

import sys

if __name__ == "__main__":
    from streamharness.gateway.service import GatewayService
    from streamharness.runner import serve_main

    sys.exit(serve_main(GatewayService))
