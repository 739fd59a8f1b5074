"""Settings fail fast, name the variable, and are frozen."""

from __future__ import annotations

import pydantic
import pytest

from streamharness.errors import SettingsError
from streamharness.settings import KafkaSettings, ServiceSettings, TritonSettings, load_settings


def test_defaults_load(monkeypatch):
    for var in ("SH_GRPC_PORT", "SH_KAFKA_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(var, raising=False)
    assert load_settings(ServiceSettings).grpc_port == 50051
    assert load_settings(KafkaSettings).bootstrap_list == ["127.0.0.1:9092"]


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("SH_KAFKA_BOOTSTRAP_SERVERS", "k1:9092, k2:9093")
    monkeypatch.setenv("SH_KAFKA_TOPIC_PREFIX", "prod.")
    settings = load_settings(KafkaSettings)
    assert settings.bootstrap_list == ["k1:9092", "k2:9093"]
    assert settings.topic("frames") == "prod.frames"


@pytest.mark.parametrize(
    ("cls", "var", "value", "expect"),
    [
        (ServiceSettings, "SH_GRPC_PORT", "70000", "less than or equal to 65535"),
        (ServiceSettings, "SH_SHUTDOWN_GRACE_S", "soon", "valid number"),
        (KafkaSettings, "SH_KAFKA_BOOTSTRAP_SERVERS", "localhost", "is not host:port"),
        (KafkaSettings, "SH_KAFKA_SECURITY_PROTOCOL", "TLS", "PLAINTEXT"),
        (TritonSettings, "SH_TRITON_TIMEOUT_S", "-1", "greater than 0"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch, cls, var, value, expect):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings(cls)
    message = str(err.value)
    assert var in message and repr(value) in message and expect in message


def test_secrets_are_not_echoed(monkeypatch):
    monkeypatch.setenv("SH_KAFKA_SASL_PASSWORD", "hunter2")
    settings = load_settings(KafkaSettings)
    assert "hunter2" not in repr(settings)
    assert settings.sasl_password.get_secret_value() == "hunter2"


def test_settings_are_frozen():
    settings = load_settings(ServiceSettings)
    with pytest.raises(pydantic.ValidationError):
        settings.grpc_port = 1


def test_unknown_override_is_rejected():
    with pytest.raises(SettingsError) as err:
        load_settings(ServiceSettings, grpc_prot=1)
    assert "SH_GRPC_PROT" in str(err.value)
