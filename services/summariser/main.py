"""The summariser service: the ``summariser`` stage of streamharness.topology on the Kafka host.

    python services/summariser/main.py      # settings: SH_*, SH_KAFKA_*, SH_SUMMARISER_*, SH_TIERS_* (docs/operations.md)

A missing or invalid setting exits 2 with a message naming the variable.
"""

import sys

if __name__ == "__main__":
    from streamharness.hosts.kafka import serve

    sys.exit(serve("summariser"))
