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


@cache
def frames_ingested() -> metrics.Counter:
    return _meter().create_counter("sh.ingest.frames", description="Frames seen by ingest, by status (published, skipped, rejected).")


@cache
def decisions() -> metrics.Counter:
    return _meter().create_counter("sh.decision.steps", description="Decision steps, by action (silent, respond) and trigger.")


@cache
def sessions_active() -> metrics.UpDownCounter:
    return _meter().create_up_down_counter("sh.gateway.sessions", description="Open gateway sessions, by tenant.")


@cache
def memory_degraded() -> metrics.Counter:
    return _meter().create_counter("sh.responder.memory_degraded", description="Responses built without (some) memory, by call and reason.")


@cache
def responses_failed() -> metrics.Counter:
    return _meter().create_counter("sh.responder.responses_failed", description="Responses that could not be generated, by error type.")


def record_hops(hops, final_hop: str, now_ns: int) -> None:
    """Record wall time from the first hop (the gateway's arrival stamp) to each later hop and to now."""
    if not hops:
        return
    start = hops[0].wall_unix_ns
    for stamp in hops[1:]:
        hop_latency().record(max(0, stamp.wall_unix_ns - start) / 1e9, {"hop": stamp.hop})
    hop_latency().record(max(0, now_ns - start) / 1e9, {"hop": final_hop})


@cache
def memory_late_summaries() -> metrics.Counter:
    return _meter().create_counter(
        "sh.memory.late_summaries",
        description="Summaries that reached memory after their chunk boundary had passed (the Context prefix changed mid-chunk), by tier.",
    )


@cache
def summaries_written() -> metrics.Counter:
    return _meter().create_counter("sh.summariser.summaries", description="Summaries and blocks written, by tier, backend and fallback.")


@cache
def summary_lag() -> metrics.Histogram:
    return _meter().create_histogram(
        "sh.summariser.lag", unit="s",
        description="Wall seconds from the frame at a chunk's cut (SH_SUMMARISER_LEAD_FRAMES before the boundary) to the publication of its summary (and block), by tier.",
    )


@cache
def memory_past_horizon() -> metrics.Counter:
    return _meter().create_counter("sh.memory.past_horizon", description="Records not stored because they ended before the stream's horizon, by tier.")


@cache
def engine_evictions() -> metrics.Counter:
    return _meter().create_counter(
        "sh.engine.evictions", description="Streams whose KV cache the engine dropped, by reason (idle, memory: another stream needed the slot)."
    )


@cache
def engine_rebuilds() -> metrics.Counter:
    return _meter().create_counter(
        "sh.engine.rebuilds", description="Per-stream cache rebuilds, by reason (prefix: a new memory prefix or instruction; full: the "
        "cache reached its high-water mark and was rebuilt; drop: its oldest turns were dropped in place instead; missing: evicted or new)."
    )


@cache
def engine_rebuild_failures() -> metrics.Counter:
    return _meter().create_counter(
        "sh.engine.rebuild_failures", description="Background cache rebuilds that failed (the stream kept its old cache), by error type."
    )


@cache
def frames_shed() -> metrics.Counter:
    return _meter().create_counter(
        "sh.pipeline.frames_shed",
        description="Frames a stage published without part of its work to keep up, by stage and reason (encoder: lag = people "
        "detection skipped for a lagging frame that was not its stream's newest of the batch; people-budget = skipped because "
        "SH_ENCODER_PEOPLE_EVERY_S of media time had not passed; decision: lag = a lagging frame not decided because a newer one of "
        "its stream was in the batch). The encoder never drops a frame: memory keeps every one.",
    )


@cache
def stage_lag_ms() -> metrics.Histogram:
    return _meter().create_histogram(
        "sh.pipeline.stage_lag", unit="ms",
        description="Age of a record when a stage takes it up: wall ms since the hop before it stamped it (the encoder: since ingest), by stage.",
    )
