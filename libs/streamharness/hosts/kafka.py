"""The Kafka host: runs one stage as a service (:class:`~streamharness.runner.Service`), written once.

``load``: create the topology's topics (``SH_KAFKA_CREATE_TOPICS``), open one idempotent producer and
wait for its produced topics' metadata, ``stage.open``, build ``spec.members`` consumer-group
members (the spec's group, offset reset, batching; the range assignor is set in
:class:`~streamharness.kafka.EventConsumer`). ``start``: the stage's intake opens, then one thread per
member polls → handles (retries, dead letters: :mod:`streamharness.records`) → ``end_batch`` →
commits. ``ready``: the stage is healthy (a stage restoring its state from a changelog is not), the
producer holds cluster metadata, every member thread is alive, and — for stages that say so — a
member holds partitions (of every consumed topic, for co-partitioned readers): "up" is not "ready"
while a restarted replica waits for its group's rebalance. ``stop``:
members finish the record in hand, flush the batch, commit and leave the group; the stage closes;
the producer flushes and closes. A drain that misses the deadline raises :class:`DrainTimeout`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc

from streamharness import topology
from streamharness.kafka import EventConsumer, EventProducer, ensure_topics, read_key_since, read_table
from streamharness.records import ConsumedEvent, Headers, dead_letter_event
from streamharness.runner import Service
from streamharness.settings import KafkaSettings
from streamharness.stage import Stage, StageContext, StageSpec
from streamharness.telemetry import meters

log = logging.getLogger(__name__)


class DrainTimeout(TimeoutError):
    """Stopping did not finish before the shutdown deadline (records in hand are redelivered)."""


class KafkaOutbox:
    """A stage's outbox on Kafka: the host's producer, and dead letters with the standard headers."""

    def __init__(self, producer: EventProducer, kafka: KafkaSettings, group: str) -> None:
        self._producer = producer
        self._kafka = kafka
        self._dlq_topic = kafka.topic(kafka.dead_letter_topic)
        self._group = group

    def send(self, topic: str, key: Any, message: Any, headers: Headers | None = None) -> Any:
        return self._producer.send(topic, key, message, headers)

    def delete(self, topic: str, key: Any) -> Any:
        from streamharness.kafka import _key_bytes

        return self._producer.send_raw(self._kafka.topic(topic), _key_bytes(key), None, [])

    def dead_letter(self, event: ConsumedEvent[Any], reason: str, error: BaseException) -> None:
        dead_letter_event(self._producer.send_raw, self._dlq_topic, event, reason, error, self._group).get(timeout=30)
        meters.records_dead_lettered().add(1, {"topic": event.topic, "reason": reason})


class KafkaHost(Service):
    """``KafkaHost(stage, topology.TOPOLOGY["encoder"], kafka)``: the stage as a service."""

    def __init__(self, stage: Stage, spec: StageSpec, kafka: KafkaSettings) -> None:
        self.stage = stage
        self.spec = stage.configure(spec)
        self.kafka = kafka
        self.grpc_service_names = self.spec.grpc_services
        self.producer: EventProducer | None = None
        self.consumers: list[EventConsumer[Any]] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._closed = False

    @property
    def group(self) -> str:
        return self.kafka.topic(self.spec.group)

    # -- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        spec = self.spec
        if self.kafka.create_topics:
            ensure_topics(self.kafka, topology.all_topics())
        self.producer = EventProducer(self.kafka, client_id=spec.name)
        for topic in spec.produces:
            self.producer.fetch_metadata(topic)  # fail start, not the first send, when Kafka is away
        self.stage.open(StageContext(
            outbox=KafkaOutbox(self.producer, self.kafka, self.group), attempts=self.kafka.handler_retries,
            stopping=self._stop, topic_prefix=self.kafka.topic_prefix,
            read_table=lambda topic, partitions=None: read_table(self.kafka, topic, partitions),
            read_back=lambda topic, key, since, timeout: read_key_since(self.kafka, topic, key, since, timeout_s=timeout),
        ))
        if not spec.consumes:
            return
        update: dict[str, Any] = {"consumer_max_records": spec.batching.max_records}
        if spec.poll_timeout_ms is not None:
            update["consumer_poll_timeout_ms"] = spec.poll_timeout_ms
        consumer_kafka = self.kafka.model_copy(update=update)
        fetch: dict[str, Any] = {}
        if spec.batching.max_wait_ms > 0:
            # The bounded micro-batch wait is Kafka's own: the broker answers a fetch once
            # fetch_min_bytes are there or after fetch_max_wait_ms, whichever comes first.
            fetch = {"fetch_min_bytes": max(1, spec.batching.max_records * spec.batching.bytes_hint),
                     "fetch_max_wait_ms": spec.batching.max_wait_ms}
        for i in range(spec.members):
            self.consumers.append(EventConsumer(
                consumer_kafka, group_id=spec.group, topics=list(spec.consumes), message_type=dict(spec.consumes),
                handler=self.stage.handle, on_batch_end=self.stage.end_batch, on_give_up=self.stage.give_up,
                on_assigned=self.stage.assigned, on_revoked=self.stage.revoked,
                auto_offset_reset=spec.offset_reset,  # chosen per stage; the reason is in the topology row
                client_id=spec.name if spec.members == 1 else f"{spec.name}-{i}", stage=spec.name, **fetch,
            ))

    def register(self, server: grpc.Server) -> None:
        self.stage.register(server)

    def start(self) -> None:
        self.stage.start()
        for i, consumer in enumerate(self.consumers):
            thread = threading.Thread(target=self._consume, args=(consumer,), name=f"{self.spec.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _consume(self, consumer: EventConsumer[Any]) -> None:
        try:
            consumer.run(self._stop)  # commits and closes the consumer when it returns
        except Exception:  # noqa: BLE001 - reported through ready(): the probe fails, the pod restarts
            log.exception("%s: a consumer stopped on an error; the service is not ready any more", self.spec.name)

    def ready(self) -> bool:
        if self._stop.is_set() or self.producer is None or not self.producer.connected():
            return False
        if not self.stage.healthy():
            return False
        if self.consumers and (len(self._threads) != len(self.consumers) or not all(t.is_alive() for t in self._threads)):
            return False
        if self.spec.needs_partitions and not any(c.assigned() for c in self.consumers):
            return False
        if self.spec.needs_assignment:
            wanted = {self.kafka.topic(t) for t in self.spec.consumes}
            # With only one of two co-partitioned topics assigned, a stream's records drift apart.
            return any(c.assigned_topics() >= wanted for c in self.consumers)
        return True

    def stop(self, deadline: float) -> None:
        """Stop intake, drain the members (commit what was processed), close the stage and producer."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for consumer in self.consumers:
            consumer.stop()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if not self._threads:
            for consumer in self.consumers:
                consumer.close()  # never started: nothing to commit, leave the group
        try:
            if not stuck:
                self.stage.close(deadline)
            # else: a member still holds a record and may be using the stage's stores and clients;
            # they are left to the process's exit rather than closed under it (its offset is not
            # committed, so the record comes back to whoever owns the partition next).
        finally:
            if self.producer is not None:
                self.producer.close(timeout=max(0.1, deadline - time.monotonic()))
        if stuck:
            raise DrainTimeout(f"{self.spec.name}: {', '.join(stuck)} still busy at the shutdown deadline; "
                               "their uncommitted records will be redelivered")

    # -- counts (tests, people) ------------------------------------------------------------------
    @property
    def processed(self) -> int:
        return sum(c.processed for c in self.consumers)

    @property
    def dead_lettered(self) -> int:
        return sum(c.dead_lettered for c in self.consumers)


def serve(name: str) -> int:
    """A stage service's ``main``: every setting the stage reads is loaded first (a bad one exits 2
    naming the variable, the same for every service), then the stage runs on the Kafka host until
    SIGTERM. ``services/<name>/main.py`` is ``sys.exit(serve("<name>"))``."""
    import os

    from streamharness.errors import SettingsError
    from streamharness.runner import ServiceRunner
    from streamharness.settings import ServiceSettings, TelemetrySettings, load_settings
    from streamharness.stage import import_object, settings_classes

    spec = topology.stage_spec(name)
    try:
        # The service's name in logs and telemetry is the stage's, unless SH_SERVICE_NAME says otherwise.
        named = any(k.upper() == "SH_SERVICE_NAME" for k in os.environ)
        service_settings = load_settings(ServiceSettings, **({} if named else {"service_name": name}))
        telemetry = load_settings(TelemetrySettings)
        kafka = load_settings(KafkaSettings)
        own = [load_settings(cls) for cls in settings_classes(spec)]
    except SettingsError as err:
        print(f"error: {err}", flush=True)
        return 2
    stage = import_object(spec.factory)(*own)
    return ServiceRunner(KafkaHost(stage, spec, kafka), service_settings, telemetry).run()
