"""The decision service: the ``decision`` stage of streamharness.topology on the Kafka host.

    python services/decision/main.py      # settings: SH_*, SH_KAFKA_* and the stage's own (docs/operations.md)

A missing or invalid setting exits 2 with a message naming the variable.
"""

import sys

if __name__ == "__main__":
    from streamharness.hosts.kafka import serve

    sys.exit(serve("decision"))
