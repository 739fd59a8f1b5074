"""The one place that defines StreamHarness metrics. Instruments are created lazily so that
importing this module has no side effects and picks up the provider set by setup_telemetry."""

from __future__ import annotations

from functools import cache

from opentelemetry import metrics

METER_NAME = "streamharness"


@cache
def _meter() -> metrics.Meter:
    return metrics.get_meter(METER_NAME)


@cache
def rpc_duration() -> metrics.Histogram:
    return _meter().create_histogram("sh.rpc.duration", unit="s", description="gRPC call duration by method and status.")


@cache
def records_processed() -> metrics.Counter:
    return _meter().create_counter("sh.kafka.records_processed", description="Kafka records handled, by topic.")


@cache
def records_dead_lettered() -> metrics.Counter:
    return _meter().create_counter(
        "sh.kafka.records_dead_lettered", description="Records sent to the dead-letter topic, by topic and reason."
    )


@cache
def hop_latency() -> metrics.Histogram:
    return _meter().create_histogram(
        "sh.pipeline.hop_latency", unit="s", description="Wall time from a frame's arrival at the gateway to each hop."
    )
