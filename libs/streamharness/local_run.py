"""``streamharness up``: the foundation's main job on local defaults.

Starts a real Kafka broker and a real tritonserver, creates the pipeline's topics, plays a real
video into the ``frames`` topic at the decision rate (keyed ``tenant/stream``, on media time),
consumes it as a consumer group, encodes every frame on Triton's ``frame_encoder`` and publishes
``EncodedFrameEvent`` records to ``embeddings``, printing what the encoder sees each second.
The services of the pipeline replace the two loops here; the wiring is the same.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from streamharness import topics
from streamharness.keys import make_key
from streamharness.media import read_video, sample_path
from streamharness.settings import KafkaSettings, TritonSettings, load_settings
from streamharness.v1 import common_pb2, events_pb2


def _frame_event(key: common_pb2.StreamKey, seq: int, ts_ms: int, rgb: np.ndarray) -> events_pb2.FrameEvent:
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise ValueError(f"cannot JPEG-encode frame at {ts_ms} ms")
    return events_pb2.FrameEvent(
        key=key, session_id="up", media_ts_ms=ts_ms, seq=seq, jpeg=jpeg.tobytes(),
        width=rgb.shape[1], height=rgb.shape[0],
        hops=[common_pb2.HopStamp(hop="ingest", wall_unix_ns=time.time_ns())],
    )


def run_foundation_demo(*, video: str, fps: float, speed: float, tenant: str, stream: str, limit_s: float) -> int:
    from streamharness.devinfra.kafka_broker import KafkaBroker
    from streamharness.devinfra.triton_server import TritonServer
    from streamharness.kafka import EventConsumer, EventProducer, ensure_topics
    from streamharness.triton_client import FrameEncoderClient

    console = Console()
    path = Path(video) if Path(video).exists() else sample_path(video)
    key = make_key(tenant, stream)
    frames = [f for f in read_video(path, fps=fps) if not limit_s or f.media_ts_ms <= limit_s * 1000]
    if not frames:
        console.print(f"[red]no frames decoded from {path}")
        return 1
    console.print(f"[bold]{path.name}[/]: {len(frames)} frames at {fps:g} per media second")

    with console.status("starting Kafka broker…"):
        broker = KafkaBroker(show_progress=False).start()
    console.print(f"Kafka broker on {broker.bootstrap_servers} (started in {broker.startup_s:.1f}s)")
    try:
        with console.status("starting tritonserver…"):
            triton = TritonServer().start()
        try:
            console.print(f"tritonserver gRPC on {triton.grpc_url}")
            kafka = load_settings(KafkaSettings, bootstrap_servers=broker.bootstrap_servers, partitions=3)
            ensure_topics(kafka, topics.PIPELINE)
            encoder = FrameEncoderClient(load_settings(TritonSettings, url=triton.grpc_url))
            return _play(console, kafka, encoder, key, frames, speed, EventProducer, EventConsumer)
        finally:
            triton.stop()
    finally:
        broker.stop()


def _play(console, kafka, encoder, key, frames, speed, producer_cls, consumer_cls) -> int:
    producer = producer_cls(kafka, client_id="up")
    seen: Counter[str] = Counter()
    latencies: list[float] = []
    done = threading.Event()
    received = 0

    def encode(event) -> None:
        nonlocal received
        frame: events_pb2.FrameEvent = event.message
        bgr = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
        result = encoder.encode([cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)])[0]
        out = events_pb2.EncodedFrameEvent(
            key=frame.key, session_id=frame.session_id, media_ts_ms=frame.media_ts_ms, seq=frame.seq,
            embedding=result.embedding.tolist(), embedding_model="frame_encoder",
            labels=[events_pb2.Label(name=n, score=s) for n, s in result.labels],
            caption=", ".join(n.split(",")[0] for n, _ in result.labels[:3]),
            hops=[*frame.hops, common_pb2.HopStamp(hop="encoder", wall_unix_ns=time.time_ns())],
        )
        producer.send(topics.EMBEDDINGS, frame.key, out).get(timeout=30)
        lat = (time.time_ns() - frame.hops[0].wall_unix_ns) / 1e6
        latencies.append(lat)
        top, score = result.labels[0][0].split(",")[0], result.labels[0][1]
        seen[top] += 1
        console.print(f"t={frame.media_ts_ms / 1000:6.1f}s  {top:<22.22} {score:4.2f}  {out.caption:<44.44} {lat:6.0f} ms", soft_wrap=True)
        received += 1
        if received >= len(frames):
            done.set()

    consumer = consumer_cls(kafka, group_id="up-encoder", topics=[topics.FRAMES],
                            message_type=events_pb2.FrameEvent, handler=encode)
    worker = threading.Thread(target=consumer.run, args=(done,), daemon=True)
    worker.start()
    start_wall, first_ts = time.monotonic(), frames[0].media_ts_ms
    for seq, frame in enumerate(frames):
        if speed > 0:  # pace on media time
            due = start_wall + (frame.media_ts_ms - first_ts) / 1000 / speed
            time.sleep(max(0.0, due - time.monotonic()))
        producer.send(topics.FRAMES, key, _frame_event(key, seq, frame.media_ts_ms, frame.rgb))
    producer.flush(30)
    finished = done.wait(timeout=120 + len(frames))
    worker.join(30)
    producer.close()

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
