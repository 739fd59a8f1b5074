"""StreamHarness shared package: settings, service runner, Kafka and gRPC bootstrap, clients.

Nothing here imports heavy or conflicting modules at import time (``kserve`` and
``tritonclient.grpc`` cannot share a process), so submodules are imported explicitly.
"""

__version__ = "0.1.0"
