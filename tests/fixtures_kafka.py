"""Pytest plugin: one real Kafka broker per test session, started only when a test asks for it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from streamharness.devinfra.kafka_broker import KafkaBroker
from streamharness.settings import KafkaSettings, load_settings


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"), show_progress=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_settings(kafka_broker: KafkaBroker) -> KafkaSettings:
    """Settings for the session broker with a topic prefix of this test's own, so tests never see
    each other's topics, records or consumer groups (group ids get the same prefix)."""
    return load_settings(
        KafkaSettings,
        bootstrap_servers=kafka_broker.bootstrap_servers,
        security_protocol="PLAINTEXT",  # whatever SH_KAFKA_* a developer has exported
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        partitions=3,
        consumer_poll_timeout_ms=100,
    )
