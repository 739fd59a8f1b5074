"""Gateway service entry point: the public SessionService. Settings: SH_*, SH_KAFKA_*, SH_GATEWAY_*."""

import sys


def main() -> int:
    from streamharness.errors import SettingsError
    from streamharness.gateway.service import GatewayService

    try:
        service = GatewayService()
    except SettingsError as err:
        print(f"error: {err}", flush=True)
        return 2
    from streamharness.runner import run_service

    return run_service(service)


if __name__ == "__main__":
    sys.exit(main())
