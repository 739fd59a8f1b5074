"""SIGTERM on a running service that consumes Kafka: in-flight records finish, exactly what was
processed is committed, the process exits 0, and a restarted service continues without loss or
duplicates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from streamharness.kafka import EventProducer, ensure_topics
from streamharness.keys import make_key
from streamharness.v1 import events_pb2

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOTAL = 60


def start(kafka_settings, tmp_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SH_GRPC_PORT": "0",
        "SH_SERVICE_NAME": "slow-memory",
        "SH_SHUTDOWN_GRACE_S": "15",
        "SH_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "SH_KAFKA_TOPIC_PREFIX": kafka_settings.topic_prefix,
        "SH_KAFKA_CONSUMER_MAX_RECORDS": "8",
        "TEST_CONSUME_TOPIC": "in",
        "TEST_PER_RECORD_DELAY_S": "0.25",
    }
    return subprocess.Popen([sys.executable, "-m", "tests.services.slow_memory"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class Outputs:
    """Reads the service's output topic from the start, keeping what it has seen."""

    def __init__(self, kafka_settings) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=kafka_settings.bootstrap_list, enable_auto_commit=False)
        self.consumer.assign([TopicPartition(kafka_settings.topic("in-out"), 0)])
        self.consumer.seek_to_beginning()
        self.seqs: list[int] = []

    def read(self, wait_s: float = 0.5) -> list[int]:
        for records in self.consumer.poll(timeout_ms=int(wait_s * 1000)).values():
            self.seqs += [events_pb2.FrameEvent.FromString(r.value).seq for r in records]
        return self.seqs

    def settle(self) -> list[int]:
        """Everything on the topic now (reads until a poll brings nothing)."""
        before = -1
        while before != len(self.seqs):
            before = len(self.seqs)
            self.read(1.0)
        return self.seqs


def committed(kafka_settings) -> int:
    admin = KafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_list)
    try:
        group = kafka_settings.topic("slow-memory")
        offsets = admin.list_group_offsets({group: None})[group]
        return sum(meta.offset for tp, meta in offsets.items() if tp.topic == kafka_settings.topic("in"))
    finally:
        admin.close()


def test_sigterm_drains_commits_and_exits_zero(kafka_settings, tmp_path):
    ensure_topics(kafka_settings, ["in", "in-out"], partitions=1)
    key = make_key("acme", "cam-1")
    with EventProducer(kafka_settings, client_id="test") as producer:
        for seq in range(TOTAL):
            producer.send("in", key, events_pb2.FrameEvent(key=key, seq=seq, media_ts_ms=seq * 1000))
        producer.flush(30)

    seen = Outputs(kafka_settings)
    proc = start(kafka_settings, tmp_path)
    deadline = time.monotonic() + 90
    while len(seen.read()) < 5:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "service never processed records"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "drained" in out

    first = list(seen.settle())
    assert 5 <= len(first) < TOTAL, "the test needs SIGTERM to land mid-stream"
    assert first == list(range(len(first))), "in order, no duplicates"
    assert committed(kafka_settings) == len(first), "committed exactly what was processed"

    proc = start(kafka_settings, tmp_path)
    deadline = time.monotonic() + 90
    while len(seen.read()) < TOTAL and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert seen.settle() == list(range(TOTAL)), "no loss and no duplicates across the restart"
    assert committed(kafka_settings) == TOTAL
