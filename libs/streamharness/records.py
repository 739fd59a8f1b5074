"""What a consumed record is and what happens to it, written once for both hosts.

A record on a topic (Kafka's, or the local host's in-memory one) is ``key`` = ``tenant/stream``
bytes, ``value`` = one serialised protobuf message, and headers: ``sh-type`` names the message's full
type and the W3C trace context rides along. This module holds the policy every host applies to a
record, so that the Kafka host and the local host cannot drift:

- :func:`decode_record`: the type header is checked before parsing (protobuf parses many foreign
  payloads "successfully" into garbage), the key must be a valid ``tenant/stream``; a record that
  fails is rejected with a one-word reason (``missing-type``, ``wrong-type``, ``undecodable``,
  ``bad-key``);
- :func:`call_with_retries`: a handler failure is retried (``SH_KAFKA_HANDLER_RETRIES`` attempts in
  all, exponential pause), except :class:`~streamharness.errors.InvalidInput`, which does not get
  better by retrying;
- :func:`dead_letter_headers`: a record that is rejected or whose handler gave up goes to the
  dead-letter topic with its original key, value and headers plus the ``sh-dlq-*`` headers below;
- :func:`process_record`: the three above in order, for one record, inside a ``process <topic>``
  CONSUMER span continuing the sender's trace (W3C context in the headers); it records the
  record's age at the stage (``sh.pipeline.stage_lag``) and counts it (``sh.kafka.records_processed``);
- :func:`processing`: a span per record for the work a batched stage does at ``end_batch``, so that
  what a record causes is sent in that record's trace (:mod:`streamharness.telemetry.tracing`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from tenacity import Retrying, retry_if_not_exception_type, stop_after_attempt, wait_exponential

from streamharness.errors import InvalidInput
from streamharness.keys import key_str, parse_key
from streamharness.telemetry import meters, tracing

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("streamharness.records")

Headers = list[tuple[str, bytes]]
M = TypeVar("M", bound=Message)

TYPE_HEADER = "sh-type"
# Dead-letter records keep the original key, value and headers and add these.
DLQ_REASON = "sh-dlq-reason"  # one word: missing-type, wrong-type, undecodable, bad-key, handler-failed
DLQ_ERROR = "sh-dlq-error"  # the exception text, for people
DLQ_SOURCE_TOPIC = "sh-dlq-source-topic"
DLQ_SOURCE_PARTITION = "sh-dlq-source-partition"
DLQ_SOURCE_OFFSET = "sh-dlq-source-offset"
DLQ_GROUP = "sh-dlq-group"


class RawRecord(Protocol):
    """The attributes of a record both hosts hand over (kafka-python's ``ConsumerRecord`` has them)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any
    timestamp: int


@dataclass(frozen=True)
class ConsumedEvent(Generic[M]):
    """One decoded record, as a stage's handler sees it. ``topic`` is the full (prefixed) name."""

    key: str
    message: M
    topic: str
    partition: int
    offset: int
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int
    #: The trace context of the record's consumer span (set by :func:`process_record`; None for an
    #: event made elsewhere: :func:`processing` then reads the sender's context from the headers).
    context: otel_context.Context | None = field(default=None, compare=False, repr=False)

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or None."""
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found


class Rejected(Exception):
    """A record that cannot be handed to a handler; ``reason`` is the dead-letter reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def record_headers(record: RawRecord) -> tuple[tuple[str, bytes], ...]:
    return tuple((k, v if v is not None else b"") for k, v in (record.headers or ()))


def trace_carrier(headers: tuple[tuple[str, bytes], ...] | Headers) -> dict[str, str]:
    """The W3C trace context among a record's headers (every header but the type)."""
    return {k: v.decode("latin-1") for k, v in headers if k != TYPE_HEADER}


@contextmanager
def sending(full_topic: str, key: str | None) -> Iterator[Span]:
    """The PRODUCER span of one send (both hosts), current while the headers are made."""
    attributes: dict[str, Any] = {"messaging.system": "kafka", "messaging.destination.name": full_topic,
                                  "messaging.operation.type": "send", "messaging.operation.name": "send"}
    if key:
        attributes["messaging.kafka.message.key"] = key
    with _tracer.start_as_current_span(f"send {full_topic}", kind=SpanKind.PRODUCER, attributes=attributes) as span:
        yield span


@contextmanager
def processing(event: ConsumedEvent[Any], stage: str, operation: str, *, start_time: int | None = None,
               attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """``<stage> <operation>`` for one record of a batch, the current span inside: a child of the
    record's consumer span, so what is sent inside goes on in the record's trace. For the work
    a batched stage does at ``end_batch`` (after the consumer spans ended), record by record;
    ``start_time`` (ns): when the batch's work on it began (a shared model call before the loop)."""
    parent = event.context if event.context is not None else tracing.extract(trace_carrier(event.headers))
    with tracing.stage_span(stage, operation, message=event.message, key=event.key, parent=parent,
                            start_time=start_time, attributes=attributes) as span:
        yield span


def message_headers(message: Message, extra: Headers | None = None) -> Headers:
    """Headers of a record carrying ``message``: the sender's trace context, the type, ``extra``."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    headers: Headers = [(k, v.encode()) for k, v in carrier.items()]
    headers.append((TYPE_HEADER, message.DESCRIPTOR.full_name.encode()))
    headers.extend(extra or [])
    return headers


def decode_record(record: RawRecord, message_type: type[M]) -> ConsumedEvent[M]:
    """The record as a :class:`ConsumedEvent`, or :class:`Rejected` with the reason."""
    headers = record_headers(record)
    type_name = message_type.DESCRIPTOR.full_name
    type_names = [v for k, v in headers if k == TYPE_HEADER]
    if not type_names:
        raise Rejected("missing-type", f"no {TYPE_HEADER} header (expected {type_name})")
    got = type_names[-1].decode("utf-8", "replace")
    if got != type_name:
        raise Rejected("wrong-type", f"{TYPE_HEADER}={got}, expected {type_name}")
    if record.value is None:
        raise Rejected("undecodable", "record has no value")
    try:
        message = message_type.FromString(record.value)
    except DecodeError as err:
        raise Rejected("undecodable", f"not a valid {type_name}: {err}") from None
    try:
        key = key_str(parse_key(record.key or b""))
    except (InvalidInput, UnicodeDecodeError) as err:
        raise Rejected("bad-key", str(err)) from None
    return ConsumedEvent(key=key, message=message, topic=record.topic, partition=record.partition,
                         offset=record.offset, headers=headers, timestamp_ms=record.timestamp)


def call_with_retries(handler: Callable[[ConsumedEvent[M]], None], event: ConsumedEvent[M], attempts: int) -> None:
    """``handler(event)``, ``attempts`` times at most; ``InvalidInput`` is raised at once."""
    for attempt in Retrying(
        stop=stop_after_attempt(max(1, attempts)),
        wait=wait_exponential(multiplier=0.05, max=2.0),
        # Bad input does not get better by retrying.
        retry=retry_if_not_exception_type(InvalidInput),
        reraise=True,
    ):
        with attempt:
            handler(event)


def dead_letter_headers(headers: tuple[tuple[str, bytes], ...] | Headers, reason: str, detail: str,
                        topic: str, partition: int, offset: int, group: str) -> Headers:
    """The original headers plus the ``sh-dlq-*`` ones."""
    return [
        *headers,
        (DLQ_REASON, reason.encode()),
        (DLQ_ERROR, detail[:2000].encode("utf-8", "replace")),
        (DLQ_SOURCE_TOPIC, topic.encode()),
        (DLQ_SOURCE_PARTITION, str(partition).encode()),
        (DLQ_SOURCE_OFFSET, str(offset).encode()),
        (DLQ_GROUP, group.encode()),
    ]


def dead_letter_record(send_raw: Callable[[str, bytes | None, bytes | None, Headers], Any], dlq_topic: str,
                       record: RawRecord, headers: tuple[tuple[str, bytes], ...], reason: str, detail: str, group: str) -> Any:
    """A record as it came (its key, value and headers byte for byte) to the dead-letter topic
    through ``send_raw``, with the ``sh-dlq-*`` headers. Returns ``send_raw``'s delivery."""
    dlq_headers = dead_letter_headers(headers, reason, detail, record.topic, record.partition, record.offset, group)
    return send_raw(dlq_topic, record.key, record.value, dlq_headers)


def dead_letter_event(send_raw: Callable[[str, bytes | None, bytes | None, Headers], Any], dlq_topic: str,
                      event: ConsumedEvent[Any], reason: str, error: BaseException, group: str) -> Any:
    """A decoded event that failed inside a batch (one frame of a micro-batch), to the dead-letter
    topic through ``send_raw``, with the same headers a rejected record gets. The event keeps the
    decoded message, not the record's bytes: its value is re-serialised (the same fields; unknown
    fields of a newer producer are kept by protobuf). Returns ``send_raw``'s delivery."""
    log.warning("dead-lettering %s[%d]@%d (%s): %r", event.topic, event.partition, event.offset, event.key, error)
    headers = dead_letter_headers(event.headers, reason, repr(error), event.topic, event.partition, event.offset, group)
    return send_raw(dlq_topic, event.key.encode(), event.message.SerializeToString(), headers)


#: ``dead_letter(record, headers, reason, detail)``: send the record to the dead-letter topic, durably.
DeadLetterFn = Callable[[RawRecord, tuple[tuple[str, bytes], ...], str, str], None]


def process_record(
    record: RawRecord,
    types: Mapping[str, type[Message]],
    handler: Callable[[ConsumedEvent[Any]], None],
    *,
    attempts: int,
    group: str,
    dead_letter: DeadLetterFn,
    on_give_up: Callable[[ConsumedEvent[Any], BaseException], None] | None = None,
    stage: str = "",
) -> ConsumedEvent[Any] | None:
    """Decode → handle with retries → dead-letter on rejection or when the handler gives up.

    ``stage``: the stage's name (its topology row), for the span and the meters. Returns the event
    when the handler succeeded, None when the record was dead-lettered. Raises only when the dead
    letter itself cannot be written (then nothing may be committed)."""
    headers = record_headers(record)
    try:
        event = decode_record(record, types[record.topic])
    except Rejected as rej:
        log.warning("dead-lettering %s[%d]@%d: %s: %s", record.topic, record.partition, record.offset, rej.reason, rej)
        dead_letter(record, headers, rej.reason, str(rej))
        return None
    attributes: dict[str, Any] = {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": record.topic,
        "messaging.consumer.group.name": group,
        "messaging.destination.partition.id": str(record.partition),
        "messaging.kafka.offset": record.offset,
        "messaging.kafka.message.key": event.key,
        **tracing.message_attributes(event.message, event.key),
    }
    if stage:
        attributes[tracing.STAGE] = stage
    with _tracer.start_as_current_span(
        f"process {record.topic}",
        context=tracing.extract(trace_carrier(headers)),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        event = replace(event, context=otel_context.get_current())
        if stage:
            _record_lag(event, stage)
        try:
            call_with_retries(handler, event, attempts)
        except Exception as err:  # noqa: BLE001 - any handler failure is dead-lettered
            span.record_exception(err)
            span.set_status(Status(StatusCode.ERROR, str(err)))
            log.warning("dead-lettering %s[%d]@%d after handler failure: %r", record.topic, record.partition, record.offset, err)
            if on_give_up is not None:
                try:
                    on_give_up(event, err)
                except Exception:  # noqa: BLE001 - the dead letter matters more
                    log.exception("give-up hook failed for %s[%d]@%d", record.topic, record.partition, record.offset)
            dead_letter(record, headers, "handler-failed", repr(err))
            return None
    meters.records_processed().add(1, {"topic": record.topic, "stage": stage})
    return event


def _record_lag(event: ConsumedEvent[Any], stage: str) -> None:
    """The record's age as the stage takes it up: wall ms since the last hop stamped it (the hop
    before this stage: ingest for a frame, the encoder for an embedding, the decision for a
    decision...). Records without stamps (a response's middle chunks) say nothing."""
    hops = getattr(event.message, "hops", None)
    if hops:
        lag_ms = max(0, time.time_ns() - hops[-1].wall_unix_ns) / 1e6
        meters.stage_lag_ms().record(lag_ms, {"stage": stage, "topic": event.topic})
