"""Per-hop latency reaches the metrics pipeline (OpenTelemetry SDK, in-memory reader)."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from streamharness.telemetry import meters
from streamharness.v1 import common_pb2


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
