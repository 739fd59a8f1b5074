"""The service runner: health follows readiness, errors map to statuses, SIGTERM drains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamharness.v1 import memory_pb2, memory_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(tmp_path: Path, **env: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    full_env = {
        **os.environ,
        "SH_GRPC_PORT": str(port),
        "SH_SERVICE_NAME": "slow-memory",
        "SH_READINESS_INTERVAL_S": "0.1",
        "SH_SHUTDOWN_GRACE_S": "10",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.services.slow_memory"],
        cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    return proc, port


def wait_serving(port: int, timeout: float = 30.0) -> grpc.Channel:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                return channel
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("service never became SERVING")


@pytest.fixture
def service(tmp_path):
    proc, port = start_service(tmp_path, TEST_NOT_READY_FILE=str(tmp_path / "not-ready"))
    try:
        yield proc, port, tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_lets_in_flight_call_finish_and_exits_zero(service):
    proc, port, _ = service
    channel = wait_serving(port)
    stub = memory_pb2_grpc.MemoryServiceStub(channel)
    result: dict[str, object] = {}

    def slow_call() -> None:
        try:
            result["reply"] = stub.Recall(memory_pb2.RecallRequest(query="sleep:2"), timeout=20)
        except grpc.RpcError as err:  # pragma: no cover - reported by the assert below
            result["error"] = err

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.5)  # the call is in flight
    proc.send_signal(signal.SIGTERM)
    caller.join(20)
    out, _ = proc.communicate(timeout=30)
    assert "error" not in result, result.get("error")
    assert result["reply"].items[0].text == "slept 2.0"
    assert proc.returncode == 0, out
    assert "drained" in out


def test_new_calls_are_refused_after_sigterm(service):
    proc, port, _ = service
    channel = wait_serving(port)
    stub = memory_pb2_grpc.MemoryServiceStub(channel)
    blocker = threading.Thread(target=lambda: stub.Recall(memory_pb2.RecallRequest(query="sleep:2"), timeout=20))
    blocker.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    fresh = memory_pb2_grpc.MemoryServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    with pytest.raises(grpc.RpcError) as err:
        fresh.Recall(memory_pb2.RecallRequest(query="sleep:0"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    blocker.join(20)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_health_follows_readiness(service):
    proc, port, tmp_path = service
    channel = wait_serving(port)
    stub = health_pb2_grpc.HealthStub(channel)
    (tmp_path / "not-ready").touch()
    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        status = stub.Check(health_pb2.HealthCheckRequest(service="streamharness.v1.MemoryService")).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.1)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    (tmp_path / "not-ready").unlink()
    wait_serving(port)


def test_errors_map_to_status_codes_with_messages(service):
    _, port, _ = service
    stub = memory_pb2_grpc.MemoryServiceStub(wait_serving(port))
    with pytest.raises(grpc.RpcError) as bad:
        stub.Recall(memory_pb2.RecallRequest(query="what happened?"), timeout=5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sleep:<seconds>" in bad.value.details()
    with pytest.raises(grpc.RpcError) as bug:
        stub.Context(memory_pb2.ContextRequest(), timeout=5)
    assert bug.value.code() == grpc.StatusCode.INTERNAL
    assert "RuntimeError" in bug.value.details() and "boom" not in bug.value.details()


def test_reflection_lists_the_service(service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, port, _ = service
    stub = reflection_pb2_grpc.ServerReflectionStub(wait_serving(port))
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"streamharness.v1.MemoryService", "grpc.health.v1.Health"} <= names


def test_bad_setting_fails_fast_naming_the_variable(tmp_path):
    proc, _ = start_service(tmp_path, SH_SHUTDOWN_GRACE_S="soon")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "SH_SHUTDOWN_GRACE_S" in out and "'soon'" in out


def test_metrics_are_served_for_prometheus_while_the_service_runs(tmp_path):
    """SH_TELEMETRY_METRICS_PORT: the runner serves the meters at /metrics, named by the service."""
    import httpx

    metrics_port = free_port()
    proc, port = start_service(tmp_path, SH_TELEMETRY_METRICS_PORT=str(metrics_port))
    try:
        channel = wait_serving(port)
        memory_pb2_grpc.MemoryServiceStub(channel).Recall(memory_pb2.RecallRequest(query="sleep:0"), timeout=10)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        recall = [line for line in text.splitlines()
                  if line.startswith("sh_rpc_duration_seconds_count{") and "/streamharness.v1.MemoryService/Recall" in line]
        assert len(recall) == 1 and 'service_name="slow-memory"' in recall[0] and recall[0].endswith(" 1.0"), text[-2000:]
        assert "process_resident_memory_bytes" in text  # the process's own collectors come along
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_metrics_port_in_use_fails_the_start_naming_the_variable(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc, _ = start_service(tmp_path, SH_TELEMETRY_METRICS_PORT=str(taken.getsockname()[1]))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "SH_TELEMETRY_METRICS_PORT" in out
