"""Typed, frozen settings. One environment variable per knob; the Helm chart sets the same names.

Every group has its own prefix (``SH_KAFKA_``, ``SH_TRITON_``, ...). ``load_settings`` turns a
pydantic validation error into a ``SettingsError`` whose message names the variable, so a service
fails at start, not at the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness.errors import SettingsError


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, frozen=True, extra="forbid", case_sensitive=False)


class KafkaSettings(BaseSettings):
    """How to reach Kafka and which topics carry the pipeline."""

    model_config = _config("SH_KAFKA_")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list of brokers.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field("PLAINTEXT", description="How clients talk to the brokers.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(None, description="SASL mechanism with SASL_* protocols.")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (a secret: mount it from a Kubernetes Secret).")
    topic_prefix: str = Field("", description="Prepended to every topic name, e.g. 'prod.'.")
    partitions: int = Field(6, ge=1, le=1024, description="Partitions of each topic the platform creates.")
    replication_factor: int = Field(1, ge=1, le=7, description="Replication factor of topics the platform creates (3 in production).")
    create_topics: bool = Field(True, description="Create missing topics at service start.")
    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest record the producer sends (frames are large).")
    consumer_poll_timeout_ms: int = Field(200, ge=1, le=60_000, description="How long one consumer poll waits for records.")
    consumer_max_records: int = Field(64, ge=1, le=10_000, description="Records per poll; offsets are committed after each polled batch is processed.")
    handler_retries: int = Field(3, ge=0, le=20, description="Attempts to process one record before it goes to the dead-letter topic.")
    dead_letter_topic: str = Field("dead-letter", description="Records that cannot be decoded or processed go here (after the prefix).")
    session_timeout_ms: int = Field(10_000, ge=1000, le=300_000, description="A consumer-group member that stops heartbeating (a killed process) loses its partitions after this long; Kafka's own default, 45 s, is what a crashed stage cost before its streams moved on.")
    heartbeat_interval_ms: int = Field(2_000, ge=100, le=60_000, description="How often a member heartbeats to its group coordinator (below a third of SH_KAFKA_SESSION_TIMEOUT_MS).")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def bootstrap_list(self) -> list[str]:
        return [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()]

    @model_validator(mode="after")
    def _heartbeat(self) -> KafkaSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(f"SH_KAFKA_HEARTBEAT_INTERVAL_MS ({self.heartbeat_interval_ms}) must be at most a third of "
                             f"SH_KAFKA_SESSION_TIMEOUT_MS ({self.session_timeout_ms})")
        return self

    @field_validator("bootstrap_servers")
    @classmethod
    def _hosts(cls, value: str) -> str:
        for part in value.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{part.strip()!r} is not host:port")
        return value


class TritonSettings(BaseSettings):
    """The Triton Inference Server that serves the frame encoder and detectors."""

    model_config = _config("SH_TRITON_")

    url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint host:port.")
    frame_encoder_model: str = Field("frame_encoder", description="Triton model name of the frame encoder.")
    frame_encoder_version: str = Field("", description="Empty = the server's latest version.")
    timeout_s: float = Field(10.0, gt=0, le=600, description="Deadline of one Triton request.")
    top_k: int = Field(5, ge=1, le=50, description="Labels kept per frame (the model returns its configured K; the client keeps the first top_k).")
    model_repository: Path = Field(Path("model-repository"), description="Local model repository (dev server and export).")


class TelemetrySettings(BaseSettings):
    """OpenTelemetry is configured by the standard OTEL_* variables; these only add switches of ours."""

    model_config = _config("SH_TELEMETRY_")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Root log level.")
    log_json: bool = Field(False, description="One JSON object per log line (for log collectors).")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Serve the service's metrics for Prometheus at http://<host>:<port>/metrics (the chart sets 9464 and the container port `metrics`). 0 picks a free port (tests). Unset: no endpoint (OTLP export is OTEL_EXPORTER_OTLP_*'s business, either or both).")
    metrics_host: str = Field("127.0.0.1", description="Bind address of the metrics endpoint; the chart sets 0.0.0.0 inside pods.")


class ServiceSettings(BaseSettings):
    """What every service has: where it listens and how it shuts down."""

    model_config = _config("SH_")

    service_name: str = Field("streamharness", min_length=1, description="Name in logs and telemetry (OTEL_SERVICE_NAME wins for telemetry).")
    grpc_host: str = Field("127.0.0.1", description="Bind address; the chart sets 0.0.0.0 inside pods.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="0 picks a free port (tests).")
    grpc_max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Frames are large: explicit gRPC message limit.")
    grpc_workers: int = Field(16, ge=1, le=1024, description="Threads serving the plain (non-async) gRPC calls, e.g. memory's queries. Sessions of the gateway and ingest are coroutines and hold none; health and reflection never wait for one.")
    grpc_tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS on SH_GRPC_PORT (the chart sets it on the gateway from gateway.tls). Unset: plaintext.")
    grpc_tls_key_file: Path | None = Field(None, description="PEM private key of SH_GRPC_TLS_CERT_FILE.")
    grpc_health_port: int | None = Field(None, ge=0, le=65535, description="Also serve the health service (only it) in plaintext on this port, e.g. for the kubelet's gRPC probe when SH_GRPC_PORT speaks TLS. Unset: health only on SH_GRPC_PORT.")
    grpc_tls_client_ca_file: Path | None = Field(None, description="PEM CA bundle: also require client certificates signed by it (mutual TLS). Unset: no client certificate asked.")
    shutdown_grace_s: float = Field(20.0, ge=0, le=600, description="Drain time on SIGTERM; keep below the pod's terminationGracePeriodSeconds.")
    readiness_interval_s: float = Field(2.0, gt=0, le=60, description="How often ready() is probed to update the gRPC health status.")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceSettings:
        if (self.grpc_tls_cert_file is None) != (self.grpc_tls_key_file is None):
            raise ValueError("SH_GRPC_TLS_CERT_FILE and SH_GRPC_TLS_KEY_FILE go together")
        if self.grpc_tls_client_ca_file is not None and self.grpc_tls_cert_file is None:
            raise ValueError("SH_GRPC_TLS_CLIENT_CA_FILE needs SH_GRPC_TLS_CERT_FILE and SH_GRPC_TLS_KEY_FILE")
        for path in (self.grpc_tls_cert_file, self.grpc_tls_key_file, self.grpc_tls_client_ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self


S = TypeVar("S", bound=BaseSettings)


def describe_error(cls: type[BaseSettings], err: ValidationError) -> str:
    prefix = (cls.model_config.get("env_prefix") or "").upper()
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "?"
        var = f"{prefix}{field.upper()}" if field != "?" else prefix
        got = item.get("input")
        shown = "<secret>" if "password" in field or "token" in field else repr(got)
        lines.append(f"{var}={shown}: {item['msg']}")
    return f"invalid settings for {cls.__name__}: " + "; ".join(lines)


def load_settings(cls: type[S], **overrides: object) -> S:
    """Read ``cls`` from the environment (overrides win); raise SettingsError naming the variable."""
    try:
        return cls(**overrides)
    except ValidationError as err:
        raise SettingsError(describe_error(cls, err)) from None
