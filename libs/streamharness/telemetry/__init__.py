"""Logging, tracing and metrics bootstrap, configured by the standard ``OTEL_*`` variables.

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
``..._METRICS_ENDPOINT``) set, spans and metrics go to that collector over OTLP/gRPC; without it
they are kept in-process (spans still carry trace context through Kafka headers, so a collector
added later sees whole traces). ``OTEL_SDK_DISABLED=true`` turns the SDK off.

With ``SH_TELEMETRY_METRICS_PORT`` set, the same meters are also served for Prometheus at
``http://SH_TELEMETRY_METRICS_HOST:port/metrics`` (:func:`start_metrics_endpoint`), with the
process's own collectors (CPU, memory, open files, garbage collection). Spans:
:mod:`streamharness.telemetry.tracing`; meters: :mod:`streamharness.telemetry.meters`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

from streamharness.errors import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader

_configured = False
_metrics_server: Any = None  # the Prometheus endpoint's HTTP server, while one runs


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        span = trace.get_current_span().get_span_context()
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if span.is_valid:
            payload["trace_id"] = f"{span.trace_id:032x}"
            payload["span_id"] = f"{span.span_id:016x}"
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    handler: logging.Handler
    if json_lines:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
    else:
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=True, console=None)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("kafka", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _otlp_endpoint(signal: str) -> str | None:
    return os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def start_metrics_endpoint(port: int, host: str = "127.0.0.1", registry: Any = None) -> tuple[MetricReader, Any]:
    """A metric reader for a ``MeterProvider`` and the HTTP server that serves what it reads at
    ``/metrics`` in Prometheus' text format: ``(reader, server)``; ``server.server_port`` is the
    port (``port`` 0 picks a free one); ``server.shutdown()`` stops it. ``registry``: a
    ``prometheus_client.CollectorRegistry`` (default: the process-wide one, which also holds the
    process's CPU, memory and garbage-collection collectors)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, start_http_server

    registry = REGISTRY if registry is None else registry
    # service.name as a label: which service a series comes from, whatever the scrape config adds.
    reader = PrometheusMetricReader(registry=registry, resource_attribute_filter=lambda key: key == "service.name")
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError:
        reader.shutdown()
        raise
    return reader, server


def setup_telemetry(service_name: str, metrics_port: int | None = None, metrics_host: str = "127.0.0.1") -> None:
    """Install tracer and meter providers once per process; ``metrics_port`` (not None): also serve
    the meters for Prometheus there (``SH_TELEMETRY_METRICS_PORT``, ``SH_TELEMETRY_METRICS_HOST``)."""
    global _configured, _metrics_server
    if _configured or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)}).merge(
        OTELResourceDetector().detect()
    )
    tracer_provider = TracerProvider(resource=resource)
    if _otlp_endpoint("TRACES") and os.environ.get("OTEL_TRACES_EXPORTER", "otlp") != "none":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)

    readers = []
    if _otlp_endpoint("METRICS") and os.environ.get("OTEL_METRICS_EXPORTER", "otlp") != "none":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if metrics_port is not None:
        try:
            reader, _metrics_server = start_metrics_endpoint(metrics_port, metrics_host)
        except OSError as err:
            raise SettingsError(f"SH_TELEMETRY_METRICS_PORT: cannot serve metrics on {metrics_host}:{metrics_port} ({err})") from None
        readers.append(reader)
        logging.getLogger(__name__).info("metrics for Prometheus at http://%s:%d/metrics", metrics_host, _metrics_server.server_port)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _configured = True


def metrics_endpoint_port() -> int | None:
    """The port the Prometheus endpoint listens on (the one picked for port 0); None when it is off."""
    return None if _metrics_server is None else _metrics_server.server_port


def shutdown_telemetry() -> None:
    """Flush what is buffered and stop the metrics endpoint (called by the runner on the way out)."""
    global _metrics_server
    provider = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()
    meter_provider = metrics.get_meter_provider()
    if hasattr(meter_provider, "shutdown"):
        meter_provider.shutdown()
    if _metrics_server is not None:
        _metrics_server.shutdown()
        _metrics_server.server_close()
        _metrics_server = None
