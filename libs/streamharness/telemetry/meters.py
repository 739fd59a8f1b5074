"""The one place that defines StreamHarness metrics. Instruments are created lazily so that
importing this module has no side effects and picks up the provider set by setup_telemetry.

Exported over OTLP (``OTEL_EXPORTER_OTLP_*``) and/or scraped by Prometheus
(``SH_TELEMETRY_METRICS_PORT``), where names become ``sh_<...>`` with the unit as a suffix
(``sh.pipeline.stage_lag``, ms → ``sh_pipeline_stage_lag_milliseconds_bucket``; ``sh.response.ttft``,
s → ``sh_response_ttft_seconds_bucket``) and counters get ``_total``. The Grafana dashboard of the
chart (``charts/streamharness/dashboards/streamharness.json``) reads those names;
``tests/unit/test_meters.py`` keeps it in step with this module. Histograms name their buckets:
the SDK's default ones (0 … 10000) suit neither seconds nor milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from opentelemetry import metrics

METER_NAME = "streamharness"

# Bucket boundaries. Latencies in seconds: sub-second answers are the point, so finely below 1 s.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0)
# Stage lag in milliseconds: from a few ms (idle) to minutes (a backlog after an outage).
MILLISECONDS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 1500, 2000, 3000, 5000, 10_000, 30_000, 60_000, 300_000, 900_000)
# Gaps of a pulled source, in seconds: a dropped packet burst to a camera away for an hour.
GAP_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@cache
def _meter() -> metrics.Meter:
    return metrics.get_meter(METER_NAME)


@cache
def rpc_duration() -> metrics.Histogram:
    return _meter().create_histogram("sh.rpc.duration", unit="s", description="gRPC call duration by method and status.",
                                      explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)


@cache
def records_processed() -> metrics.Counter:
    return _meter().create_counter(
        "sh.kafka.records_processed", description="Records a stage handled (its handler returned; both hosts), by topic and stage."
    )


@cache
def records_dead_lettered() -> metrics.Counter:
    return _meter().create_counter(
        "sh.kafka.records_dead_lettered", description="Records sent to the dead-letter topic, by topic and reason."
    )


@cache
def hop_latency() -> metrics.Histogram:
    return _meter().create_histogram(
        "sh.pipeline.hop_latency", unit="s", description="Wall time from a frame's arrival at the gateway to each hop.",
        explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
    )


@cache
def frames_ingested() -> metrics.Counter:
    return _meter().create_counter("sh.ingest.frames", description="Frames seen by ingest, by status (published, skipped, rejected).")


@cache
def decisions() -> metrics.Counter:
    return _meter().create_counter(
        "sh.decision.steps",
        description="Decided steps (one per decided frame of a stream), by action (silent, respond), trigger (question, "
        "instruction; none when silent) and policy.",
    )


def trigger_label(trigger: int) -> str:
    """``question``, ``instruction`` or ``none`` for a ``streamharness.v1.Trigger`` value (metric labels)."""
    return {1: "question", 2: "instruction"}.get(int(trigger), "none")


def record_decision_step(triggers: Iterable[int], policy: str) -> None:
    """One decided step: ``triggers`` of the decisions it made (none: silent). A question among
    them names the step (it is what a user waits for)."""
    labels = {trigger_label(t) for t in triggers}
    trigger = "question" if "question" in labels else "instruction" if "instruction" in labels else "none"
    decisions().add(1, {"action": "silent" if trigger == "none" else "respond", "trigger": trigger, "policy": policy})


@cache
def sessions_active() -> metrics.UpDownCounter:
    return _meter().create_up_down_counter("sh.gateway.sessions", description="Open gateway sessions, by tenant.")


@cache
def memory_degraded() -> metrics.Counter:
    return _meter().create_counter("sh.responder.memory_degraded", description="Responses built without (some) memory, by call and reason.")


@cache
def responses_generated() -> metrics.Counter:
    return _meter().create_counter(
        "sh.responder.responses", description="Responses generated whole and published (every chunk acknowledged), by trigger."
    )


@cache
def responses_failed() -> metrics.Counter:
    return _meter().create_counter(
        "sh.responder.responses_failed",
        description="Generation attempts that failed (each is retried, SH_KAFKA_HANDLER_RETRIES in all), by error type and trigger.",
    )


@cache
def responses_given_up() -> metrics.Counter:
    return _meter().create_counter(
        "sh.responder.responses_given_up",
        description="Responses whose last attempt failed: closed with an empty final chunk and dead-lettered, by trigger.",
    )


@cache
def responses_delivered() -> metrics.Counter:
    return _meter().create_counter(
        "sh.gateway.responses",
        description="Responses delivered whole to a session (their final chunk), by trigger and refusal (none, or why the "
        "pipeline refused the question).",
    )


@cache
def ttft() -> metrics.Histogram:
    return _meter().create_histogram(
        "sh.response.ttft", unit="s",
        description="Time to first token at the gateway: wall seconds to a response's first chunk delivered to its session, "
        "from the decision (from=decision) and, for a question asked on this gateway, from the question's arrival "
        "(from=question); by trigger.",
        explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
    )


def record_first_chunk(hops, now_ns: int, trigger: int, asked_unix_ns: int | None = None) -> None:
    """A response's first chunk reached its session at ``now_ns``: time to first token from the
    decision's hop stamp and, when known, from when the question was asked (``asked_unix_ns``)."""
    label = trigger_label(trigger)
    decided = next((h.wall_unix_ns for h in reversed(hops) if h.hop == "decision"), 0)
    if decided:
        ttft().record(max(0, now_ns - decided) / 1e9, {"from": "decision", "trigger": label})
    if asked_unix_ns:
        ttft().record(max(0, now_ns - asked_unix_ns) / 1e9, {"from": "question", "trigger": label})


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
        explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
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
        description="Age of a record when a stage takes it up: wall ms since the hop before it stamped it (its last hop stamp: "
        "ingest for a frame, the encoder for an embedding, the decision for a decision, the responder for a response's "
        "first and final chunks, the gateway for a query), by stage and topic. Recorded by the hosts for every consuming stage.",
        explicit_bucket_boundaries_advisory=MILLISECONDS_BUCKETS,
    )


# -- pulled sources (SessionStart.source: a camera or server URL, a file, an upload; ingest pulls) --
@cache
def source_streams() -> metrics.UpDownCounter:
    return _meter().create_up_down_counter(
        "sh.source.streams", description="Pulled sources being read now (connected or reconnecting), by scheme (rtsp, rtmp, hls, http, upload)."
    )


@cache
def source_reconnects() -> metrics.Counter:
    return _meter().create_counter("sh.source.reconnects", description="Reconnection attempts of pulled sources after a drop, by scheme.")


@cache
def source_gap() -> metrics.Histogram:
    return _meter().create_histogram(
        "sh.source.gap", unit="s",
        description="Media time without frames of a pulled source that came back after a drop (SourceStatus KIND_GAP), by scheme.",
        explicit_bucket_boundaries_advisory=GAP_BUCKETS,
    )


def instruments() -> list[metrics.Instrument]:
    """Every instrument this module defines (the dashboard test records on each)."""
    return [factory() for name, factory in sorted(globals().items())
            if not name.startswith("_") and callable(getattr(factory, "cache_clear", None))]
