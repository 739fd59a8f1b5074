"""The meters operators read (streamharness.telemetry.meters): per-hop latency, time to first token,
decided steps, the hosts' per-stage lag; the Prometheus endpoint serving them under their translated
names; and the chart's Grafana dashboard reading only metrics that a meter makes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry

from streamharness import topics
from streamharness.hosts.local import LocalHost
from streamharness.keys import make_key
from streamharness.settings import KafkaSettings
from streamharness.stage import Stage, StageSpec
from streamharness.telemetry import meters, start_metrics_endpoint
from streamharness.v1 import common_pb2, events_pb2

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "streamharness" / "dashboards" / "streamharness.json"


def test_record_hops_records_each_hop_from_the_gateway_stamp(monkeypatch):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(meters, "_meter", lambda: provider.get_meter("test"))
    meters.hop_latency.cache_clear()
    try:
        t0 = 1_000_000_000_000
        hops = [common_pb2.HopStamp(hop="gateway", wall_unix_ns=t0),
                common_pb2.HopStamp(hop="encoder", wall_unix_ns=t0 + 40_000_000),
                common_pb2.HopStamp(hop="decision", wall_unix_ns=t0 + 60_000_000)]
        meters.record_hops(hops, "gateway_first_token", t0 + 450_000_000)
        data = reader.get_metrics_data()
        points = {
            p.attributes["hop"]: p.sum
            for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == "sh.pipeline.hop_latency" for p in m.data.data_points
        }
        assert points == {"encoder": 0.04, "decision": 0.06, "gateway_first_token": 0.45}
    finally:
        meters.hop_latency.cache_clear()


@pytest.fixture
def metrics_reader(monkeypatch):
    """The meters on a provider of their own, read as OpenTelemetry data."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    _use(monkeypatch, provider)
    yield reader
    _forget()


def _use(monkeypatch, provider: MeterProvider) -> None:
    monkeypatch.setattr(meters, "_meter", lambda: provider.get_meter("test"))
    _forget()


def _forget() -> None:
    for factory in vars(meters).values():
        if callable(getattr(factory, "cache_clear", None)) and factory is not meters._meter:
            factory.cache_clear()


def _points(reader: InMemoryMetricReader, name: str) -> list:
    return [p for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == name for p in m.data.data_points]


def _record_every_instrument() -> None:
    for instrument in meters.instruments():
        if hasattr(instrument, "record"):
            instrument.record(1.0, {"stage": "encoder"})
        else:
            instrument.add(1, {"stage": "encoder"})


def test_time_to_first_token_from_the_decision_and_from_the_question(metrics_reader):
    t0 = 1_000_000_000_000
    hops = [common_pb2.HopStamp(hop="gateway", wall_unix_ns=t0), common_pb2.HopStamp(hop="decision", wall_unix_ns=t0 + 100_000_000),
            common_pb2.HopStamp(hop="responder_first_token", wall_unix_ns=t0 + 300_000_000)]
    meters.record_first_chunk(hops, t0 + 400_000_000, common_pb2.TRIGGER_QUESTION, asked_unix_ns=t0 - 600_000_000)
    meters.record_first_chunk(hops, t0 + 400_000_000, common_pb2.TRIGGER_INSTRUCTION)
    meters.record_first_chunk([], t0, common_pb2.TRIGGER_QUESTION)  # a refusal: no stamps, nothing to say
    got = {(p.attributes["from"], p.attributes["trigger"]): round(p.sum, 3) for p in _points(metrics_reader, "sh.response.ttft")}
    assert got == {("decision", "question"): 0.3, ("question", "question"): 1.0, ("decision", "instruction"): 0.3}


def test_a_decided_step_counts_once_named_by_its_question(metrics_reader):
    meters.record_decision_step([], "rules")
    meters.record_decision_step([common_pb2.TRIGGER_INSTRUCTION, common_pb2.TRIGGER_QUESTION], "rules")
    meters.record_decision_step([common_pb2.TRIGGER_INSTRUCTION], "trained")
    got = {tuple(sorted(p.attributes.items())): p.value for p in _points(metrics_reader, "sh.decision.steps")}
    assert got == {
        (("action", "silent"), ("policy", "rules"), ("trigger", "none")): 1,
        (("action", "respond"), ("policy", "rules"), ("trigger", "question")): 1,
        (("action", "respond"), ("policy", "trained"), ("trigger", "instruction")): 1,
    }


class _Consumer(Stage):
    def handle(self, event) -> None:
        pass


def test_the_hosts_record_every_consuming_stages_lag_and_count(metrics_reader):
    """Lag is measured where a record is taken up, for any stage, from the last hop that stamped
    it; records without stamps (a response's middle chunks) say nothing."""
    key = make_key("acme", "cam")
    host = LocalHost(KafkaSettings())
    host.add(_Consumer(), StageSpec(name="reader", factory="tests:none", group="reader",
                                    consumes={topics.DECISIONS: events_pb2.DecisionEvent}))
    now = time.time_ns()
    stamped = events_pb2.DecisionEvent(key=key, hops=[common_pb2.HopStamp(hop="gateway", wall_unix_ns=now - 9_000_000_000),
                                                     common_pb2.HopStamp(hop="decision", wall_unix_ns=now - 2_000_000_000)])
    host.bus.send(topics.DECISIONS, key, stamped)
    host.bus.send(topics.DECISIONS, key, events_pb2.DecisionEvent(key=key))
    host.run_until_idle()
    (lag,) = _points(metrics_reader, "sh.pipeline.stage_lag")
    assert lag.attributes == {"stage": "reader", "topic": "decisions"} and lag.count == 1 and 2000 <= lag.sum < 3000
    (count,) = _points(metrics_reader, "sh.kafka.records_processed")
    assert count.attributes == {"stage": "reader", "topic": "decisions"} and count.value == 2


def test_prometheus_endpoint_serves_the_meters_under_their_translated_names(monkeypatch):
    registry = CollectorRegistry()
    reader, server = start_metrics_endpoint(0, "127.0.0.1", registry=registry)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    try:
        _use(monkeypatch, provider)
        _record_every_instrument()
        reply = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
        names = set(re.findall(r"^([a-z_][a-z0-9_]*)(?:\{| )", reply.text, re.M))
        assert {
            "sh_pipeline_stage_lag_milliseconds_bucket", "sh_response_ttft_seconds_bucket", "sh_response_ttft_seconds_count",
            "sh_decision_steps_total", "sh_gateway_responses_total", "sh_responder_responses_total",
            "sh_responder_responses_failed_total", "sh_pipeline_frames_shed_total", "sh_kafka_records_dead_lettered_total",
            "sh_gateway_sessions", "sh_source_streams", "sh_source_reconnects_total", "sh_source_gap_seconds_bucket",
        } <= names
        assert 'stage="encoder"' in reply.text
        # Seconds are bucketed for sub-second answers, not with the SDK's 0-10000 default.
        assert 'sh_response_ttft_seconds_bucket{le="0.5"' in reply.text
    finally:
        _forget()
        server.shutdown()
        server.server_close()
        provider.shutdown()  # and the reader: its collector leaves the registry


def _prometheus_series_names() -> set[str]:
    """Every series name the meters of meters.py become in Prometheus (recorded once each)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    original = meters._meter
    try:
        meters._meter = lambda: provider.get_meter("test")  # noqa: SLF001 - restored below
        _forget()
        _record_every_instrument()
        return {sample.name for family in registry.collect() for sample in family.samples}
    finally:
        meters._meter = original
        _forget()
        provider.shutdown()


def _dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = []
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
        queries += [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
    return queries


def test_every_metric_the_dashboard_reads_is_a_meter_of_meters_py():
    """The chart's Grafana dashboard cannot drift from the meters: each series name its PromQL
    names is one that a meter of streamharness.telemetry.meters becomes in Prometheus."""
    queries = _dashboard_queries()
    assert len(queries) >= 12
    known = _prometheus_series_names()
    used = {name for q in queries for name in re.findall(r"\b(sh_[a-z0-9_]+)\b", q)}
    assert used, "the dashboard reads no StreamHarness metric"
    assert not used - known, f"the dashboard reads metrics no meter makes: {sorted(used - known)}"
    # And the meters operators were promised are on it.
    for family in ("sh_pipeline_stage_lag_milliseconds", "sh_decision_steps", "sh_response_ttft_seconds", "sh_pipeline_frames_shed",
                   "sh_gateway_sessions", "sh_source_streams", "sh_kafka_records_dead_lettered", "sh_ingest_frames",
                   "sh_gateway_responses", "sh_responder_responses_failed"):
        assert any(name.startswith(family) for name in used), family
