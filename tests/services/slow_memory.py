"""A small real service for runner tests: MemoryService whose Recall takes as long as asked
("sleep:<seconds>"), optionally consuming a Kafka topic and committing what it processed.

    python -m tests.services.slow_memory        # reads SH_* settings from the environment
"""

from __future__ import annotations

import os
import sys
import threading
import time

import grpc

from streamharness.errors import InvalidInput
from streamharness.runner import Service, run_service
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
    grpc_service_names = (memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name,)

    def __init__(self) -> None:
        self._loaded = False
        self._consumer = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def load(self) -> None:
        topic = os.environ.get("TEST_CONSUME_TOPIC")
        if topic:
            from streamharness.kafka import EventConsumer, EventProducer, ensure_topics
            from streamharness.settings import KafkaSettings, load_settings
            from streamharness.v1 import events_pb2

            settings = load_settings(KafkaSettings)
            ensure_topics(settings, [topic, f"{topic}-out"], partitions=1)
            producer = EventProducer(settings, client_id="slow-memory")
            delay = float(os.environ.get("TEST_PER_RECORD_DELAY_S", "0.05"))

            def handle(event) -> None:
                time.sleep(delay)  # real work takes time: this is what SIGTERM must let finish
                producer.send(f"{topic}-out", event.key, event.message).get(timeout=10)

            self._producer = producer
            self._consumer = EventConsumer(
                settings, group_id="slow-memory", topics=[topic], message_type=events_pb2.FrameEvent, handler=handle
            )
        self._loaded = True

    def register(self, server: grpc.Server) -> None:
        memory_pb2_grpc.add_MemoryServiceServicer_to_server(SlowMemory(), server)

    def start(self) -> None:
        if self._consumer is not None:
            self._thread = threading.Thread(target=self._consumer.run, args=(self._stop,), daemon=True)
            self._thread.start()

    def ready(self) -> bool:
        return self._loaded and not os.path.exists(os.environ.get("TEST_NOT_READY_FILE", "/nonexistent"))

    def stop(self, deadline: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._consumer.close()
            self._producer.close()
        print("drained", flush=True)


if __name__ == "__main__":
    sys.exit(run_service(SlowMemoryService()))
