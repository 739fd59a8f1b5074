"""``streamharness dev encode-video``: an infrastructure check with Kafka and Triton alone.

Starts a real Kafka broker and a real tritonserver, runs the encoder stage on the Kafka host (the
same class, topology row and host as ``services/encoder/main.py``), plays a real video into the
``frames`` topic on media time (the replay loop every client uses), and prints what the encoder
published to ``embeddings`` for each second: its caption, top label and the frame's latency.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from streamharness import topics
from streamharness.keys import make_key
from streamharness.media import sample_path
from streamharness.replay import encoded_frames, replay
from streamharness.settings import KafkaSettings, TritonSettings, load_settings
from streamharness.v1 import common_pb2, events_pb2


def run_foundation_demo(*, video: str, fps: float, speed: float, tenant: str, stream: str, limit_s: float) -> int:
    from streamharness.devinfra.kafka_broker import KafkaBroker
    from streamharness.devinfra.triton_server import TritonServer

    console = Console()
    path = Path(video) if Path(video).exists() else sample_path(video)
    frames = list(encoded_frames(path, fps, limit_s or None))
    if not frames:
        console.print(f"[red]no frames decoded from {path}")
        return 1
    console.print(f"[bold]{path.name}[/]: {len(frames)} frames at {fps:g} per media second")

    with console.status("starting Kafka broker…"):
        broker = KafkaBroker(show_progress=False).start()
    console.print(f"Kafka broker on {broker.bootstrap_servers} (started in {broker.startup_s:.1f}s)")
    try:
        with console.status("starting tritonserver…"):
            triton = TritonServer(wait_for_models=("frame_encoder", "people_detector")).start()
        try:
            console.print(f"tritonserver gRPC on {triton.grpc_url}")
            kafka = load_settings(KafkaSettings, bootstrap_servers=broker.bootstrap_servers, partitions=3)
            return _play(console, kafka, load_settings(TritonSettings, url=triton.grpc_url), make_key(tenant, stream), frames, speed)
        finally:
            triton.stop()
    finally:
        broker.stop()


def _play(console: Console, kafka: KafkaSettings, triton: TritonSettings, key: common_pb2.StreamKey, frames, speed: float) -> int:
    from streamharness.encoder.service import EncoderSettings, EncoderStage
    from streamharness.hosts.kafka import KafkaHost
    from streamharness.kafka import EventConsumer, EventProducer
    from streamharness.topology import TOPOLOGY

    encoder = KafkaHost(EncoderStage(load_settings(EncoderSettings), triton), TOPOLOGY["encoder"], kafka)
    seen: Counter[str] = Counter()
    latencies: list[float] = []
    received = 0
    done = threading.Event()

    def show(event) -> None:
        nonlocal received
        out: events_pb2.EncodedFrameEvent = event.message
        lat = (time.time_ns() - out.hops[0].wall_unix_ns) / 1e6 if out.hops else float("nan")
        latencies.append(lat)
        top, score = (out.labels[0].name.split(",")[0], out.labels[0].score) if out.labels else ("-", 0.0)
        seen[top] += 1
        console.print(f"t={out.media_ts_ms / 1000:6.1f}s  {top:<22.22} {score:4.2f}  {out.caption:<44.44} {lat:6.0f} ms", soft_wrap=True)
        received += 1
        if received >= len(frames):
            done.set()

    encoder.load()
    encoder.start()
    reader = EventConsumer(kafka, group_id="encode-video-reader", topics=[topics.EMBEDDINGS],
                           message_type=events_pb2.EncodedFrameEvent, handler=show)
    worker = threading.Thread(target=reader.run, args=(done,), daemon=True)
    worker.start()
    producer = EventProducer(kafka, client_id="encode-video")
    try:
        for seq, step in enumerate(replay(frames, speed=speed)):
            step.wait()
            frame = step.item
            producer.send(topics.FRAMES, key, events_pb2.FrameEvent(
                key=key, session_id="encode-video", media_ts_ms=frame.media_ts_ms, seq=seq, jpeg=frame.image,
                hops=[common_pb2.HopStamp(hop="ingest", wall_unix_ns=time.time_ns())]))
        producer.flush(30)
        finished = done.wait(timeout=120 + len(frames))
    finally:
        done.set()
        worker.join(30)
        producer.close()
        encoder.stop(time.monotonic() + 30)

    table = Table(title="what the encoder saw (top-1 label, frames)")
    table.add_column("label")
    table.add_column("frames", justify="right")
    for label, count in seen.most_common(8):
        table.add_row(label, str(count))
    console.print(table)
    if latencies:
        p50, p95 = np.percentile(latencies, [50, 95])
        console.print(
            f"{received}/{len(frames)} frames encoded; published→encoded latency p50 {p50:.0f} ms, p95 {p95:.0f} ms "
            "(includes the consumer group's first join)"
        )
    return 0 if finished else 1
