"""Benchmark: how many RTSP cameras one ingest replica pulls at 1 FPS (issue 15, item 6).

On this machine (loopback only): a real Kafka broker, the project's RTSP server
(``tools/rtsp-server``, gortsplib), and N FFmpeg "cameras" publishing ``vtest.avi`` (768×576,
10 fps, H.264 with a keyframe every second) to it. The H.264 is encoded **once** before the run and
the cameras publish it with ``-c copy`` in a loop, so that they cost next to nothing and the CPU
measured is ingest's. One ingest replica runs as its own process (``services/ingest/main.py``); the
benchmark calls its ``IngestFrames`` directly with an internal identity token (no gateway: its cost
is not ingest's), one pulled session per camera at a decision rate of 1 frame per media second.

For each N of ``--streams``: the N sessions are opened, ``--warmup`` seconds pass, then for
``--seconds`` the benchmark counts the frames each stream published (``STATUS_PUBLISHED`` results)
and reads the ingest process's CPU time (user + system, from /proc) and RSS. A step **holds** its N
cameras when every stream published ≥ 90 % of one frame per second of the window and no frame is
published more than 3 s later than its stream's own clock says (lateness: the wall time a result
arrived minus the wall time its media time stands for, anchored at the stream's first frame, so
it measures falling behind, not the camera's capture latency). CPU per stream = ingest CPU
seconds / window / N; the cameras' CPU is reported beside it.

Also measured once, in this process: the **decode cost** of one stream — the same clip pulled from
a file by :class:`~streamharness.sources.Puller` at speed 0 (decode every frame, keep 1 per second,
convert those to RGB) — in CPU ms per media second, and what sampling saves (frames decoded vs kept).

    .venv/bin/python bench/rtsp_ingest.py --streams 1,16,32,48,64,80 --seconds 20 \\
        --out docs/bench/rtsp-ingest.json --plot docs/bench/rtsp-ingest.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
from rich.console import Console
from rich.table import Table

from streamharness import topics
from streamharness.auth import AuthSettings, InternalTokens
from streamharness.devinfra.common import free_port
from streamharness.devinfra.kafka_broker import KafkaBroker
from streamharness.devinfra.media import RtspServer
from streamharness.kafka import ensure_topics
from streamharness.media import sample_path
from streamharness.settings import KafkaSettings
from streamharness.sources import Puller, SourceSettings
from streamharness.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
R = ingest_pb2.IngestFrameResult


def encode_clip(video: Path, out: Path) -> Path:
    """H.264 in MP4, a keyframe every second (as cameras are usually set), encoded once."""
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(video), "-an",
                    "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-g", "10", "-keyint_min", "10",
                    str(out)], check=True)
    return out


class Camera:
    """``ffmpeg -re -stream_loop -1 -c copy`` to the RTSP server: a camera that costs almost nothing."""

    def __init__(self, clip: Path, url: str, log: Path) -> None:
        self.url = url
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "warning",
                                          "-re", "-stream_loop", "-1", "-i", str(clip), "-c", "copy", "-f", "rtsp",
                                          "-rtsp_transport", "tcp", url], stdout=fh, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Ingest:
    """One ingest replica as its own process."""

    def __init__(self, kafka: KafkaSettings, secret: str, log: Path, decode_threads: int = 0) -> None:
        self.port = free_port()
        env = {**os.environ, "SH_SERVICE_NAME": "ingest", "SH_GRPC_HOST": "127.0.0.1", "SH_GRPC_PORT": str(self.port),
               "SH_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "SH_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
               "SH_AUTH_INTERNAL_SECRET": secret, "SH_SOURCE_ALLOW_PRIVATE_NETWORKS": "true",
               "SH_SOURCE_MAX_PULLED_STREAMS": "1000", "SH_SOURCE_MAX_PULLED_STREAMS_PER_TENANT": "1000",
               "SH_SOURCE_DECODE_THREADS": str(decode_threads),
               "SH_TELEMETRY_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "services/ingest/main.py")], env=env, cwd=ROOT,
                                         stdout=fh, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 60
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"ingest did not start; see {log}")
            time.sleep(0.3)
        channel.close()

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def threads(self) -> int:
        return self.ps.num_threads()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Pulls:
    """N pulled sessions on one ingest, counting what each publishes (on an asyncio loop of its own)."""

    def __init__(self, address: str, tokens: InternalTokens, urls: list[str]) -> None:
        self.address, self.tokens, self.urls = address, tokens, urls
        self.published = [0] * len(urls)
        self.connected = [False] * len(urls)
        self.failed: list[str] = []
        self.ages_ms: list[float] = []
        self.counting = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.calls = asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(30)

    async def _open(self):
        self.channel = grpc.aio.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 * 2**20)])
        stub = ingest_pb2_grpc.IngestServiceStub(self.channel)
        self.stops = [asyncio.Event() for _ in self.urls]
        tasks = []
        for i, url in enumerate(self.urls):
            key = common_pb2.StreamKey(tenant="bench", stream_id=f"cam-{i}")

            async def requests(i=i, key=key, url=url):
                yield ingest_pb2.IngestFrameRequest(key=key, session_id=f"s{i}", decision_fps=1.0,
                                                    source=common_pb2.Source(url=url, rtsp_transport="tcp"))
                await self.stops[i].wait()

            call = stub.IngestFrames(requests(), metadata=self.tokens.metadata("bench", "ingest"))
            tasks.append(asyncio.create_task(self._read(i, call)))
        return tasks

    async def _read(self, i: int, call) -> None:
        start_wall = None
        try:
            async for r in call:
                if r.HasField("source"):
                    if r.source.kind == common_pb2.SourceStatus.KIND_CONNECTED:
                        self.connected[i] = True
                    elif r.source.kind == common_pb2.SourceStatus.KIND_FAILED:
                        self.failed.append(f"cam-{i}: {r.source.message}")
                    continue
                if r.status == R.STATUS_PUBLISHED:
                    now = time.time()
                    if start_wall is None:
                        start_wall = now - r.media_ts_ms / 1000
                    if self.counting:
                        self.published[i] += 1
                        # How far behind the camera's clock the frame was published (live media time ~ wall).
                        self.ages_ms.append(max(0.0, (now - start_wall) * 1000 - r.media_ts_ms))
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.failed.append(f"cam-{i}: {err.code().name} {err.details()}")

    def close(self) -> None:
        async def stop():
            for e in self.stops:
                e.set()
            await asyncio.gather(*self.calls, return_exceptions=True)
            await self.channel.close()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def decode_cost(clip: Path, media_s: float = 60.0) -> dict:
    """One stream's decode in this process: CPU ms per media second, all frames decoded, 1/s kept."""
    import av

    with av.open(str(clip)) as c:
        stream = c.streams.video[0]
        fps = float(stream.average_rate or 10)
        size = (stream.codec_context.width, stream.codec_context.height)
    kept: list[int] = []
    stop = threading.Event()
    puller = Puller(common_pb2.Source(upload=True, speed=0), 1.0, SourceSettings(), path=clip)
    before = time.process_time()
    wall = time.perf_counter()
    puller.run(lambda ts, rgb: kept.append(ts), lambda status: None, stop)
    cpu = time.process_time() - before
    wall = time.perf_counter() - wall
    media = max(1.0, (kept[-1] / 1000 + 1) if kept else 1.0)
    return {"clip_fps": fps, "size": list(size), "media_s": round(media, 1), "kept": len(kept),
            "decoded_per_media_s": fps, "cpu_ms_per_media_s": round(cpu / media * 1000, 2),
            "wall_ms_per_media_s": round(wall / media * 1000, 2), "realtime_factor_one_core": round(media / cpu, 1) if cpu else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,2,4,8,12,16,24")
    ap.add_argument("--seconds", type=float, default=30.0, help="measurement window per step")
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--decode-threads", type=int, default=0, help="SH_SOURCE_DECODE_THREADS of the ingest replica (0: FFmpeg's choice)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/bench/rtsp-ingest.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/bench/rtsp-ingest.png")
    args = ap.parse_args()
    console = Console()
    counts = [int(n) for n in args.streams.split(",")]
    work = Path(tempfile.mkdtemp(prefix="sh-bench-rtsp-"))
    secret = secrets.token_urlsafe(48)
    clip = encode_clip(sample_path("vtest.avi"), work / "vtest-h264.mp4")
    cost = decode_cost(clip)
    console.print(f"decode cost of one stream (in-process): {cost}")
    results = []
    with KafkaBroker(work / "kafka", show_progress=False) as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="bench-")
        ensure_topics(kafka, topics.PIPELINE)
        with RtspServer() as server:
            ingest = Ingest(kafka, secret, work / "ingest.log", args.decode_threads)
            tokens = InternalTokens(AuthSettings(internal_secret=secret), "gateway")
            cameras: list[Camera] = []
            try:
                for n in counts:
                    while len(cameras) < n:
                        cameras.append(Camera(clip, server.url(f"cam-{len(cameras)}"), work / f"cam-{len(cameras)}.log"))
                    time.sleep(2.0)  # the new cameras are publishing
                    pulls = Pulls(f"127.0.0.1:{ingest.port}", tokens, [c.url for c in cameras[:n]])
                    time.sleep(args.warmup)
                    pulls.counting = True
                    cams = [psutil.Process(c.proc.pid) for c in cameras[:n]]

                    def cams_cpu() -> float:
                        total = 0.0
                        for p in cams:
                            for q in [p, *p.children(recursive=True)]:
                                try:
                                    t = q.cpu_times()
                                    total += t.user + t.system
                                except psutil.Error:
                                    pass
                        return total

                    cpu0, cam0, t0 = ingest.cpu_s(), cams_cpu(), time.monotonic()
                    time.sleep(args.seconds)
                    cpu1, cam1, t1 = ingest.cpu_s(), cams_cpu(), time.monotonic()
                    pulls.counting = False
                    window = t1 - t0
                    published = list(pulls.published)
                    ages = sorted(pulls.ages_ms)
                    step = {
                        "streams": n, "window_s": round(window, 1),
                        "frames_per_stream_per_s": [round(p / window, 2) for p in published],
                        "min_fps": round(min(published) / window, 2), "ingest_cpu_cores": round((cpu1 - cpu0) / window, 3),
                        "cpu_per_stream_pct_of_core": round((cpu1 - cpu0) / window / n * 100, 2),
                        "cameras_cpu_cores": round((cam1 - cam0) / window, 3),
                        "ingest_rss_mb": round(ingest.rss_mb(), 1), "ingest_threads": ingest.threads(),
                        "lateness_p50_ms": round(ages[len(ages) // 2], 0) if ages else None,
                        "lateness_p99_ms": round(ages[int(len(ages) * 0.99)], 0) if ages else None,
                        "failed": pulls.failed[:5],
                        "machine_cpu_pct": psutil.cpu_percent(interval=None),
                    }
                    step["holds"] = bool(step["min_fps"] >= 0.9 and not pulls.failed and (step["lateness_p99_ms"] or 0) < 3000)
                    results.append(step)
                    console.print(f"N={n:3d}: min {step['min_fps']:.2f} fps/stream, ingest {step['ingest_cpu_cores']:.2f} cores "
                                  f"({step['cpu_per_stream_pct_of_core']:.1f} % of a core per stream), RSS {step['ingest_rss_mb']:.0f} MB, "
                                  f"lateness p99 {step['lateness_p99_ms']} ms, {'holds' if step['holds'] else 'does NOT hold'}")
                    pulls.close()
                    time.sleep(2.0)
            finally:
                for c in cameras:
                    c.stop()
                ingest.stop()
    held = [r["streams"] for r in results if r["holds"]]
    report = {"bench": "rtsp_ingest", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "clip": "vtest.avi as H.264 768x576, keyframe every second, published with -c copy",
              "decision_fps": 1.0, "decode_threads": args.decode_threads, "decode_cost_one_stream": cost, "steps": results,
              "max_streams_held": max(held) if held else 0,
              "command": "bench/rtsp_ingest.py --streams " + args.streams + f" --seconds {args.seconds:g} --warmup {args.warmup:g}"
                         + f" --decode-threads {args.decode_threads}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    table = Table("N", "min fps/stream", "ingest cores", "% core/stream", "RSS MB", "lateness p99 ms", "holds")
    for r in results:
        table.add_row(str(r["streams"]), f"{r['min_fps']:.2f}", f"{r['ingest_cpu_cores']:.2f}", f"{r['cpu_per_stream_pct_of_core']:.1f}",
                      f"{r['ingest_rss_mb']:.0f}", str(r["lateness_p99_ms"]), "yes" if r["holds"] else "no")
    console.print(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        ns = [r["streams"] for r in results]
        a.plot(ns, [r["ingest_cpu_cores"] for r in results], "o-", label="ingest CPU (cores)")
        a.axhline(os.cpu_count() or 2, color="grey", ls=":", label="cores on the machine")
        a.set_xlabel("pulled RTSP streams"), a.set_ylabel("cores"), a.legend()
        b.plot(ns, [r["min_fps"] for r in results], "o-", label="slowest stream (frames/s)")
        b.axhline(0.9, color="red", ls=":", label="holds: ≥ 0.9")
        b.set_xlabel("pulled RTSP streams"), b.set_ylabel("published frames/s"), b.set_ylim(0, 1.2), b.legend()
        fig.suptitle("One ingest replica pulling N RTSP cameras at 1 FPS (2 cores, loopback)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
