"""The gateway's two public ports share TLS: with SH_GRPC_TLS_CERT_FILE / _KEY_FILE set, the HTTP
API (and the live view) is served over HTTPS with the same certificate, and plain HTTP is refused."""

from __future__ import annotations

import time

import httpx
import pytest

from streamharness import topics
from streamharness.devinfra.media import self_signed_certificate
from streamharness.gateway.service import GatewaySettings, GatewayStage
from streamharness.hosts.kafka import KafkaHost
from streamharness.kafka import ensure_topics
from streamharness.runner import ServiceRunner
from streamharness.settings import ServiceSettings
from streamharness.topology import TOPOLOGY

pytestmark = pytest.mark.integration


def test_the_http_port_serves_tls_with_the_grpc_certificate(kafka_settings, tmp_path, monkeypatch):
    cert, key = self_signed_certificate(tmp_path)
    monkeypatch.setenv("SH_GRPC_TLS_CERT_FILE", str(cert))
    monkeypatch.setenv("SH_GRPC_TLS_KEY_FILE", str(key))
    ensure_topics(kafka_settings, topics.PIPELINE)
    stage = GatewayStage(GatewaySettings(replica_id="gw-tls", ingest_address="127.0.0.1:9", allow_anonymous=True, http_port=0))
    host = KafkaHost(stage, TOPOLOGY["gateway"], kafka_settings)
    runner = ServiceRunner(host, ServiceSettings(service_name="gateway", grpc_port=0, shutdown_grace_s=3,
                                                 grpc_tls_cert_file=cert, grpc_tls_key_file=key))
    runner.serve()
    try:
        deadline = time.monotonic() + 20
        while stage.http_port is None and time.monotonic() < deadline:
            time.sleep(0.1)
        url = f"127.0.0.1:{stage.http_port}/v1/models"
        models = httpx.get(f"https://{url}", verify=str(cert), timeout=5)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "streamharness"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{url}", timeout=5)  # no plaintext beside it
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://{url}", timeout=5)  # a client that does not trust the certificate
    finally:
        runner.request_stop()
        runner.shutdown()
