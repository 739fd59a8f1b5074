"""The dev broker's generated configuration, checked without starting java."""

from __future__ import annotations

import re
from pathlib import Path

from streamharness.devinfra import kafka_broker
from streamharness.devinfra.kafka_broker import DEFAULT_POM, KafkaBroker, kafka_libs_dir, kafka_version


def _props(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_server_properties_listen_on_loopback_only(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path, port=19092, controller_port=19093)
    props = _props(broker.write_config())

    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert props["process.roles"] == "broker,controller"
    assert props["controller.listener.names"] == "CONTROLLER"
    # No listener may bind a wildcard or another interface.
    for url in props["listeners"].split(","):
        assert re.fullmatch(r"[A-Z]+://127\.0\.0\.1:\d+", url), url
    assert broker.bootstrap_servers == "127.0.0.1:19092"


def test_server_properties_suit_one_node_and_large_frames(tmp_path: Path) -> None:
    props = _props(KafkaBroker(tmp_path, port=19092, controller_port=19093).write_config())

    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "default.replication.factor",
    ):
        assert props[key] == "1", key
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["auto.create.topics.enable"] == "false"
    # An 8 MiB frame plus headers and batch overhead must fit.
    assert int(props["message.max.bytes"]) >= 8 * 1024 * 1024 + 64 * 1024
    assert Path(props["log.dirs"]) == tmp_path.resolve() / "data"


def test_free_ports_are_picked_when_none_are_given(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path)
    props = _props(broker.write_config())

    assert broker.port > 0 and broker.controller_port > 0
    assert broker.port != broker.controller_port
    assert props["listeners"] == f"PLAINTEXT://127.0.0.1:{broker.port},CONTROLLER://127.0.0.1:{broker.controller_port}"


def test_kafka_version_is_pinned_in_the_pom() -> None:
    version = kafka_version(DEFAULT_POM)
    assert re.fullmatch(r"4\.\d+\.\d+", version), f"pin an exact Kafka 4.x version, not {version!r}"


def test_jar_cache_follows_sh_dev_cache_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SH_DEV_CACHE_DIR", str(tmp_path))
    assert kafka_broker.cache_dir() == tmp_path
    assert kafka_libs_dir("4.3.1") == tmp_path / "kafka-4.3.1" / "libs"
