"""A pipeline step, written once: plain handlers plus a spec. A stage never knows whether Kafka is
underneath — a *host* runs it (:mod:`streamharness.hosts.kafka` in a service, one consumer-group
member per thread; :mod:`streamharness.hosts.local` in one process, for quick runs and tests).

What a stage provides (all optional except :meth:`Stage.healthy`):

- ``configure(spec)``: the parts of its topology row that come from its settings (consumer group,
  batch size and bounded wait, members per process);
- ``open(ctx)``: load models, open stores and clients; ``ctx.outbox`` is where it publishes;
- ``handle(event)``: one consumed record (a :class:`~streamharness.records.ConsumedEvent`); raise
  to have it retried and then dead-lettered (``InvalidInput`` is not retried);
- ``end_batch()``: after each batch was handed to ``handle`` and before its offsets are committed:
  a stage that accumulates (micro-batching) works and publishes here; raising redelivers the batch;
- ``give_up(event, error)``: the record failed for the last time and goes to the dead-letter topic
  next (close what a client is waiting for);
- ``assigned(partitions)`` / ``revoked(partitions)``: ``{logical topic: partition numbers}`` this
  process's member was given or lost in a rebalance (on Kafka inside the poll, on the consuming
  thread, before any record of an assigned partition is handed over; locally once, at start, with
  partition 0): a stage with durable state restores it from its changelog here
  (``ctx.read_table``) and drops what it no longer owns;
- ``register(server)``: add gRPC servicers (stages with an API);
- ``healthy()``: models loaded, dependencies answering right now;
- ``close(deadline)``: after intake stopped and the consumers drained: flush, close stores.

What a host guarantees: records of one stream arrive in order; a stage's effect is published
(``outbox.send(...).get()``) before the record's offset is committed; every record is serialised
and parsed on the way (also locally); delivery is at least once, so handlers are idempotent.
With ``members > 1`` (the responder) the Kafka host calls ``handle`` from that many threads at once,
each for its own partitions: such a stage keeps no per-batch state (micro-batching stages — encoder,
decision — run one member per process and scale by processes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from google.protobuf.message import Message

from streamharness.records import ConsumedEvent, Headers

if TYPE_CHECKING:
    import grpc
    from pydantic_settings import BaseSettings

    from streamharness.v1.common_pb2 import StreamKey


@dataclass(frozen=True)
class Batching:
    """How many records a stage takes at once and how long a record may wait for others."""

    max_records: int = 64
    #: Longest the broker holds a fetch to fill a batch (0: take what is there at once).
    max_wait_ms: int = 0
    #: A fetch returns early once ``max_records`` times this many bytes are there (0: one byte).
    bytes_hint: int = 0


@dataclass(frozen=True)
class StageSpec:
    """One row of the topology (:mod:`streamharness.topology`)."""

    name: str
    #: ``module:Class`` of the :class:`Stage`; its constructor takes the settings objects below, in order.
    factory: str
    #: ``module:Class`` of every settings class the stage reads (each is loaded, and fails, before start).
    settings: tuple[str, ...] = ()
    #: Logical topic → the protobuf type its records carry.
    consumes: Mapping[str, type[Message]] = field(default_factory=dict)
    #: Logical topics the stage publishes to.
    produces: tuple[str, ...] = ()
    #: Compacted logical topics it reads back as tables (``ctx.read_table``, on assignment), not consumed.
    tables: tuple[str, ...] = ()
    #: Consumer group (``SH_KAFKA_TOPIC_PREFIX`` is put in front); empty when nothing is consumed.
    group: str = ""
    offset_reset: Literal["earliest", "latest"] = "earliest"
    #: Why that offset reset: the policy is chosen on purpose, per stage.
    offset_reset_reason: str = ""
    batching: Batching = Batching()
    #: Consumer-group members (threads) per process.
    members: int = 1
    #: Poll timeout of its consumers (None: ``SH_KAFKA_CONSUMER_POLL_TIMEOUT_MS``).
    poll_timeout_ms: int | None = None
    #: Ready only while its members hold partitions of every consumed topic (co-partitioned reads).
    needs_assignment: bool = False
    #: Ready only while some member holds a partition: a replica that owns nothing yet (a restart
    #: waiting for the group's rebalance) would answer health checks while doing no work.
    needs_partitions: bool = False
    #: Full names of the gRPC services it registers (health and reflection list them).
    grpc_services: tuple[str, ...] = ()

    @property
    def topics(self) -> tuple[str, ...]:
        return (*self.consumes, *self.produces)


class Delivery(Protocol):
    def get(self, timeout: float | None = None) -> Any: ...


class Outbox(Protocol):
    """Where a stage publishes. The Kafka host's is an idempotent producer; the local host's a bus."""

    def send(self, topic: str, key: StreamKey | str, message: Message, headers: Headers | None = None) -> Delivery:
        """Publish ``message`` to the logical ``topic``; ``.get(timeout)`` blocks until it is durable."""
        ...

    def dead_letter(self, event: ConsumedEvent[Any], reason: str, error: BaseException) -> None:
        """Send ``event`` to the dead-letter topic now, durably (a record that failed inside a batch)."""
        ...

    def delete(self, topic: str, key: StreamKey | str) -> Delivery:
        """A tombstone for ``key`` on the compacted logical ``topic`` (its latest value is gone)."""
        ...


def _no_table(topic: str, partitions: Any = None) -> dict[int, dict[bytes, bytes]]:
    return {}


@dataclass(frozen=True)
class StageContext:
    """What a host gives a stage at ``open``."""

    outbox: Outbox
    #: Attempts at one record (``SH_KAFKA_HANDLER_RETRIES``); stages that retry a dependency use it too.
    attempts: int
    #: Set when the host stops: long waits inside a stage (an outage pause) end early.
    stopping: threading.Event
    #: ``topic("frames")`` → the full topic name (the install's prefix in front).
    topic_prefix: str = ""
    #: ``read_table(logical topic, partitions or None)`` → ``{partition: {key bytes: latest value}}``
    #: of a compacted changelog, read to its current end (tombstoned keys left out).
    read_table: Callable[[str, Iterable[int] | None], dict[int, dict[bytes, bytes]]] = _no_table
    #: ``read_back(logical topic, key, since_unix_ms, timeout_s)`` → the values of the key's records
    #: written since then, in order (a resumed session's responses).
    read_back: Callable[[str, Any, int, float], list[bytes]] = lambda topic, key, since, timeout: []

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


class Stage:
    """Base class of a pipeline step; see the module docstring."""

    def configure(self, spec: StageSpec) -> StageSpec:
        return spec

    def open(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def handle(self, event: ConsumedEvent[Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} consumes nothing")

    def end_batch(self) -> None:
        pass

    def give_up(self, event: ConsumedEvent[Any], error: BaseException) -> None:
        pass

    def assigned(self, partitions: dict[str, set[int]]) -> None:
        """This member now holds ``partitions`` (``{logical topic: numbers}``) besides what it kept."""

    def revoked(self, partitions: dict[str, set[int]]) -> None:
        """This member is losing ``partitions`` (a rebalance may hand some straight back)."""

    def register(self, server: grpc.Server) -> None:
        pass

    def start(self) -> None:
        """Intake opens (after ``open`` and ``register``, before consumers start)."""

    def healthy(self) -> bool:
        return True

    def close(self, deadline: float) -> None:
        """Intake has stopped and the consumers drained; release what ``open`` took (before ``deadline``)."""


def settings_classes(spec: StageSpec) -> list[type[BaseSettings]]:
    return [import_object(path) for path in spec.settings]


def import_object(path: str) -> Any:
    """``"package.module:Name"`` → the object."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
