"""A small real service for runner tests: a MemoryService API whose Recall takes as long as asked
("sleep:<seconds>"); with TEST_CONSUME_TOPIC, a stage on the Kafka host that consumes that topic
slowly and commits what it processed (the host's SIGTERM drain under test).

    python -m tests.services.slow_memory        # reads SH_* settings from the environment
"""

from __future__ import annotations

import os
import sys
import time

import grpc

from streamharness.errors import InvalidInput
from streamharness.runner import Service, run_service
from streamharness.stage import Stage, StageSpec
from streamharness.v1 import memory_pb2, memory_pb2_grpc


class SlowMemory(memory_pb2_grpc.MemoryServiceServicer):
    def Recall(self, request: memory_pb2.RecallRequest, context: grpc.ServicerContext) -> memory_pb2.RecallResponse:
        if not request.query.startswith("sleep:"):
            raise InvalidInput(f"query {request.query!r} must look like sleep:<seconds>")
        seconds = float(request.query.removeprefix("sleep:"))
        time.sleep(seconds)
        return memory_pb2.RecallResponse(items=[memory_pb2.MemoryItem(text=f"slept {seconds}")])

    def Context(self, request, context):  # noqa: N802 - gRPC name
        raise RuntimeError("boom: an unexpected bug")


class SlowMemoryService(Service):
    """The runner-only service (no Kafka): the API above, and readiness from a file's absence."""

    grpc_service_names = (memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name,)

    def register(self, server: grpc.Server) -> None:
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(SlowMemory(), server)

    def ready(self) -> bool:
        return not os.path.exists(os.environ.get("TEST_NOT_READY_FILE", "/nonexistent"))

    def stop(self, deadline: float) -> None:
        print("drained", flush=True)


class SlowStage(Stage):
    """The same API as a stage on the Kafka host, copying ``<topic>`` to ``<topic>-out`` slowly."""

    def __init__(self, topic: str, delay_s: float) -> None:
        self.topic, self.delay_s = topic, delay_s

    def open(self, ctx) -> None:
        self.out = ctx.outbox

    def handle(self, event) -> None:
        time.sleep(self.delay_s)  # real work takes time: this is what SIGTERM must let finish
        self.out.send(f"{self.topic}-out", event.key, event.message).get(timeout=10)

    def register(self, server: grpc.Server) -> None:
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(SlowMemory(), server)

    def close(self, deadline: float) -> None:
        print("drained", flush=True)


def main() -> int:
    topic = os.environ.get("TEST_CONSUME_TOPIC")
    if not topic:
        return run_service(SlowMemoryService())
    from streamharness.hosts.kafka import KafkaHost
    from streamharness.settings import KafkaSettings, load_settings
    from streamharness.v1 import events_pb2

    spec = StageSpec(name="slow-memory", factory="tests.services.slow_memory:SlowStage",
                     consumes={topic: events_pb2.FrameEvent}, produces=(f"{topic}-out",), group="slow-memory",
                     offset_reset="earliest", offset_reset_reason="the test's records are produced before it starts",
                     grpc_services=SlowMemoryService.grpc_service_names)
    stage = SlowStage(topic, float(os.environ.get("TEST_PER_RECORD_DELAY_S", "0.05")))
    return run_service(KafkaHost(stage, spec, load_settings(KafkaSettings)))


if __name__ == "__main__":
    sys.exit(main())
