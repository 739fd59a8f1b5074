"""Benchmark: CPU cost per frame of the encoder's work, and what cheaper people-detector settings miss.

Runs the real models in this process, on real frames as the encoder receives them: vtest.avi
(opencv-doc; pedestrians) sampled at 1 FPS, bounded to ingest's ``SH_INGEST_MAX_PIXELS`` default
(640x480) and JPEG round-tripped at ingest's quality. Measured per frame:

* JPEG decode (``encoder.service.decode_jpeg``);
* the frame encoder (``model-repository/frame_encoder/1/model.onnx`` with onnxruntime, after the
  client's resize to 224x224), alone and in batches;
* the people detector: the real ``model-repository/people_detector/1/model.py`` (its
  ``TritonPythonModel.detect``, loaded outside Triton) at the current config.pbtxt parameters and at
  cheaper ones; for each, people per frame and agreement with the reference setting (the one before
  issue 14: upscale 2, stride 8, pyramid 1.05): the count equal / within 1 per frame, and the share
  of the reference's boxes that the setting finds too (box recall, IoU >= 0.3); plus boxes on
  opencv-doc photos without people (false positives).

CPU cost is process CPU time (``time.process_time``) with one thread for OpenCV and onnxruntime: the
core-seconds a frame takes, which is what bounds throughput on a small box (2 cores: capacity ~
2000 / cpu_ms frames/s). Wall time on a shared machine is noisier; it is reported too.

With ``--load``, the encoder stage itself under live load instead: a real tritonserver serving the
repository's models (the people detector with ``--setting``'s parameters, default config.pbtxt's),
``--streams`` streams sending one vtest.avi frame per second each, in real time, all in the same
instant of every second (streams started together: the worst case); the stage is fed as the Kafka
host feeds it (one partition per stream; a batch = what waited, partition after partition as
kafka-python drains them, up to SH_ENCODER_MAX_BATCH, after at most SH_ENCODER_MAX_WAIT_MS). It
reports each frame's wall time from its ingest stamp to its encoder stamp (what the encoder adds to
frame-to-decision), detector calls, shed work and the CPU the encoder and Triton used. The rest of
the pipeline (broker, decision, memory, responder) is not running: on a shared box it needs the
headroom that the detector leaves.

    .venv/bin/python bench/people_detector_cost.py                  # all of vtest.avi at 1 FPS
    .venv/bin/python bench/people_detector_cost.py --seconds 20 --json out.json
    .venv/bin/python bench/people_detector_cost.py --setting upscale=1.5,win_stride=8,pyramid_scale=1.1
    .venv/bin/python bench/people_detector_cost.py --load --streams 10 --seconds 60 --every-s 3
    .venv/bin/python bench/people_detector_cost.py --load --streams 10 --seconds 30 --every-s 0 --lag-shed-ms 0 \
        --setting upscale=2.0,win_stride=8,pyramid_scale=1.05,max_pixels=0   # the encoder before issue 14
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from streamharness.encoder.service import decode_jpeg
from streamharness.ingest.frames import bound_pixels, encode_jpeg
from streamharness.ingest.service import IngestSettings
from streamharness.media import read_video, sample_path

REPO = Path(__file__).resolve().parents[1]
PEOPLE_MODEL = REPO / "model-repository" / "people_detector"
FRAME_ENCODER_ONNX = REPO / "model-repository" / "frame_encoder" / "1" / "model.onnx"
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
NO_PEOPLE = ("orange.jpg", "fruits.jpg", "butterfly.jpg", "baboon.jpg", "apple.jpg")
# The setting before issue 14; the candidates vary it (uncapped: the cap only matters above 640x480).
REFERENCE = {"upscale": "2.0", "max_pixels": "0", "win_stride": "8", "pyramid_scale": "1.05"}
CANDIDATES = [REFERENCE] + [
    {"upscale": up, "max_pixels": "0", "win_stride": stride, "pyramid_scale": pyramid}
    for up, stride, pyramid in [("2.0", "8", "1.1"), ("2.0", "8", "1.15"), ("2.0", "8", "1.2"), ("2.0", "16", "1.05"),
                                ("2.0", "16", "1.1"), ("2.0", "16", "1.2"), ("1.75", "8", "1.1"), ("1.5", "8", "1.1"),
                                ("1.5", "8", "1.2"), ("1.5", "16", "1.1"), ("1.0", "8", "1.05"), ("1.0", "8", "1.1"),
                                ("1.0", "16", "1.2")]
]


def load_people_model(parameters: dict[str, str], threads: int):
    """The repository's people detector (``TritonPythonModel``), initialised outside Triton: its
    module imports ``triton_python_backend_utils``, which only the backend stub has, so a stand-in
    with the few names ``initialize`` and ``detect`` use is put in its place."""
    if "triton_python_backend_utils" not in sys.modules:
        stand_in = types.ModuleType("triton_python_backend_utils")
        stand_in.TritonModelException = type("TritonModelException", (Exception,), {})
        stand_in.Logger = None
        sys.modules["triton_python_backend_utils"] = stand_in
    spec = importlib.util.spec_from_file_location("people_detector_model", PEOPLE_MODEL / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = {"parameters": {k: {"string_value": v} for k, v in {**parameters, "threads": str(threads)}.items()}}
    model.initialize({"model_config": json.dumps(config)})
    return model


def repository_parameters() -> dict[str, str]:
    """``key: "x" value: { string_value: "y" }`` pairs of people_detector/config.pbtxt."""
    import re

    text = (PEOPLE_MODEL / "config.pbtxt").read_text()
    return dict(re.findall(r'key:\s*"([^"]+)"\s*value:\s*{\s*string_value:\s*"([^"]*)"', text))


def frames_as_the_encoder_sees_them(seconds: float | None, max_pixels: int) -> list[tuple[int, bytes]]:
    quality = IngestSettings.model_fields["jpeg_quality"].default
    out = []
    for frame in read_video(sample_path("vtest.avi"), fps=1):
        if seconds is not None and frame.media_ts_ms >= seconds * 1000:
            break
        out.append((frame.media_ts_ms, encode_jpeg(bound_pixels(frame.rgb, max_pixels), quality)))
    return out


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(result, cpu seconds, wall seconds)."""
    c0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    return result, time.process_time() - c0, time.perf_counter() - w0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = w * h
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def matched(reference: np.ndarray, found: np.ndarray, threshold: float = 0.3) -> int:
    """Reference boxes with a found box overlapping IoU >= threshold (greedy, one to one)."""
    used: set[int] = set()
    hits = 0
    for box in reference:
        best, best_j = threshold, -1
        for j, other in enumerate(found):
            if j not in used and (v := iou(box, other)) >= best:
                best, best_j = v, j
        if best_j >= 0:
            used.add(best_j)
            hits += 1
    return hits


def no_people_images() -> list[tuple[str, np.ndarray]]:
    import gzip

    out = []
    for name in NO_PEOPLE:
        path = OPENCV_DATA / name
        data = path.read_bytes() if path.is_file() else gzip.open(path.with_name(name + ".gz")).read() \
            if path.with_name(name + ".gz").is_file() else None
        if data is None:
            continue
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        out.append((name, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    return out


def bench_frame_encoder(images: list[np.ndarray], batch: int) -> dict[str, float]:
    import onnxruntime as ort

    from streamharness.triton_client import to_model_input

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(FRAME_ENCODER_ONNX), sess_options=options, providers=["CPUExecutionProvider"])
    inputs = [to_model_input(image, (224, 224)) for image in images]
    session.run(["embedding", "logits"], {"image": np.stack(inputs[:1])})  # warm up
    cpu = wall = 0.0
    n = 0
    for start in range(0, len(inputs), batch):
        chunk = np.stack(inputs[start:start + batch])
        _, c, w = timed(lambda: session.run(["embedding", "logits"], {"image": chunk}))
        cpu, wall, n = cpu + c, wall + w, n + len(chunk)
    return {"cpu_ms": 1000 * cpu / n, "wall_ms": 1000 * wall / n, "frames": n}


def label(parameters: dict[str, str]) -> str:
    cap = parameters.get("max_pixels", "0")
    return (f"upscale {parameters['upscale']}, stride {parameters['win_stride']}, pyramid {parameters['pyramid_scale']}"
            + (f", max_pixels {cap}" if cap not in ("", "0") else ""))


# -- the encoder under live load ----------------------------------------------------------------
def model_repository_with(parameters: dict[str, str], where: Path) -> Path:
    """A copy of the model repository whose people detector has ``parameters`` (the frame encoder linked)."""
    import re
    import shutil

    repo = where / "models"
    (repo / "people_detector" / "1").mkdir(parents=True)
    (repo / "frame_encoder").symlink_to(REPO / "model-repository" / "frame_encoder", target_is_directory=True)
    shutil.copy(PEOPLE_MODEL / "1" / "model.py", repo / "people_detector" / "1" / "model.py")
    text = (PEOPLE_MODEL / "config.pbtxt").read_text()
    for key, value in parameters.items():
        pattern = r'(key:\s*"' + re.escape(key) + r'"\s*value:\s*{\s*string_value:\s*")[^"]*(")'
        text, n = re.subn(pattern, lambda m: m.group(1) + value + m.group(2), text)
        if n == 0:  # a parameter config.pbtxt does not list
            text = text.replace("parameters [", f'parameters [\n  {{ key: "{key}" value: {{ string_value: "{value}" }} }},', 1)
    (repo / "people_detector" / "config.pbtxt").write_text(text)
    return repo


def process_tree_cpu_s(pid: int) -> float:
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            t = proc.cpu_times()
            total += t.user + t.system
    except psutil.NoSuchProcess:
        pass
    return total


def run_load(opts: argparse.Namespace, parameters: dict[str, str]) -> dict[str, object]:
    import collections
    import os
    import tempfile
    import threading

    from streamharness.devinfra.triton_server import TritonServer
    from streamharness.encoder.service import EncoderSettings, EncoderStage
    from streamharness.keys import key_str, make_key
    from streamharness.records import ConsumedEvent
    from streamharness.settings import TritonSettings
    from streamharness.stage import StageContext
    from streamharness.v1 import common_pb2, events_pb2

    frames = frames_as_the_encoder_sees_them(None, opts.max_pixels)
    keys = [make_key("bench", f"cam-{i}") for i in range(opts.streams)]
    published: list[events_pb2.EncodedFrameEvent] = []

    class Outbox:
        class _Sent:
            def get(self, timeout=None):
                return None

        def send(self, topic, key, message, headers=None):
            published.append(message)
            return self._Sent()

        def dead_letter(self, event, reason, error):
            raise RuntimeError(f"dead letter {reason}: {error}")

    settings = EncoderSettings(people_every_s=opts.every_s, lag_shed_ms=opts.lag_shed_ms)
    with tempfile.TemporaryDirectory(prefix="people-bench-") as tmp:
        repo = model_repository_with(parameters, Path(tmp))
        with TritonServer(repo, Path(tmp) / "triton", wait_for_models=("frame_encoder", "people_detector")) as server:
            triton = TritonSettings(url=server.grpc_url, timeout_s=120.0, frame_encoder_model="frame_encoder",
                                    frame_encoder_version="", top_k=5, model_repository=repo)
            stage = EncoderStage(settings, triton)
            stopping = threading.Event()
            stage.open(StageContext(outbox=Outbox(), attempts=3, stopping=stopping))
            # One partition per stream, drained as kafka-python's poll drains them: what one
            # partition holds (up to max_batch), then the next, so a backlog comes a stream at a time.
            partitions = [collections.deque() for _ in keys]
            arrived = threading.Condition()
            sending = [True]

            def send_live() -> None:
                start = time.monotonic()
                for second in range(int(opts.load_seconds)):
                    time.sleep(max(0.0, start + second - time.monotonic()))
                    ts, data = frames[second % len(frames)]
                    now = time.time_ns()
                    with arrived:
                        for i, key in enumerate(keys):
                            message = events_pb2.FrameEvent(
                                key=key, session_id=f"bench-{i}", media_ts_ms=second * 1000, seq=second, jpeg=data,
                                hops=[common_pb2.HopStamp(hop="gateway", wall_unix_ns=now), common_pb2.HopStamp(hop="ingest", wall_unix_ns=now)])
                            partitions[i].append(ConsumedEvent(key=key_str(key), message=message, topic="frames", partition=i,
                                                               offset=second, headers=(), timestamp_ms=0))
                        arrived.notify()
                with arrived:
                    sending[0] = False
                    arrived.notify()

            def poll(next_partition: int) -> list[ConsumedEvent]:
                with arrived:
                    while sending[0] and not any(partitions):
                        arrived.wait()
                    if any(partitions) and sum(map(len, partitions)) < settings.max_batch:
                        arrived.wait(settings.max_wait_ms / 1000)  # the broker holds the fetch a little
                    batch: list[ConsumedEvent] = []
                    for j in range(len(partitions)):
                        part = partitions[(next_partition + j) % len(partitions)]
                        while part and len(batch) < settings.max_batch:
                            batch.append(part.popleft())
                    return batch

            warm = decode_jpeg(frames[0][1])  # first calls load onnxruntime's and OpenCV's kernels
            stage.encoder.encode([warm])
            stage.people.detect(warm)
            sender = threading.Thread(target=send_live, daemon=True)
            cpu0, triton0, wall0 = time.process_time(), process_tree_cpu_s(server.pid), time.perf_counter()
            sender.start()
            turn = 0
            while batch := poll(turn):
                turn += 1
                for event in batch:
                    stage.handle(event)
                stage.end_batch()
            wall = time.perf_counter() - wall0
            cpu, triton_cpu = time.process_time() - cpu0, process_tree_cpu_s(server.pid) - triton0
            stage.close(time.monotonic() + 10)
    latency = np.array([(m.hops[-1].wall_unix_ns - m.hops[1].wall_unix_ns) / 1e6 for m in published])
    p50, p95, p99 = np.percentile(latency, [50, 95, 99])
    stats = stage.stats
    return {
        "streams": opts.streams, "seconds": opts.load_seconds, "frames": len(published), "people": parameters,
        "every_s": opts.every_s, "lag_shed_ms": opts.lag_shed_ms,
        "encoder_ms": {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(latency.max())},
        "detector_calls": stats.people_detected, "shed_lag": stats.people_shed_lag, "shed_budget": stats.people_shed_budget,
        "cpu_cores": {"encoder": cpu / wall, "triton": triton_cpu / wall}, "wall_s": wall, "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        # Per media second: the slowest frame (ms), to tell a start-up burst from a steady lag.
        "slowest_ms_by_second": [float(max(lat for m, lat in zip(published, latency) if m.media_ts_ms == t * 1000))
                                 for t in range(int(opts.load_seconds))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None, help="media seconds of vtest.avi (default: all, ~80); --load: seconds to send (default 60)")
    parser.add_argument("--setting", action="append", default=[],
                        help="a people-detector setting to measure, e.g. upscale=1.5,win_stride=8,pyramid_scale=1.1 "
                             "(repeatable; default: a built-in list plus config.pbtxt's)")
    parser.add_argument("--threads", type=int, default=1, help="OpenCV threads per detection (1: CPU per frame = core-seconds)")
    parser.add_argument("--max-pixels", type=int, default=IngestSettings.model_fields["max_pixels"].default,
                        help="bound frames to this many pixels, as ingest does (default: SH_INGEST_MAX_PIXELS' default; "
                             "768*576 keeps vtest.avi's own size)")
    parser.add_argument("--load", action="store_true", help="run the encoder stage under live load instead (see above)")
    parser.add_argument("--streams", type=int, default=10, help="--load: concurrent 1-FPS streams")
    parser.add_argument("--every-s", type=float, default=None, help="--load: SH_ENCODER_PEOPLE_EVERY_S (default: the setting's default)")
    parser.add_argument("--lag-shed-ms", type=int, default=None, help="--load: SH_ENCODER_LAG_SHED_MS (default: the setting's default)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    opts = parser.parse_args()
    if opts.load:
        from streamharness.encoder.service import EncoderSettings

        fields = EncoderSettings.model_fields
        opts.every_s = fields["people_every_s"].default if opts.every_s is None else opts.every_s
        opts.lag_shed_ms = fields["lag_shed_ms"].default if opts.lag_shed_ms is None else opts.lag_shed_ms
        opts.load_seconds = opts.seconds or 60.0
        configured = repository_parameters()
        parameters = {k: configured[k] for k in ("upscale", "max_pixels", "win_stride", "pyramid_scale") if k in configured}
        for setting in opts.setting:
            parameters.update(dict(kv.split("=", 1) for kv in setting.split(",")))
        result = run_load(opts, parameters)
        lat = result["encoder_ms"]
        print("| people detector | every_s | lag_shed_ms | streams | frames | ingest→encoder ms p50 / p95 / p99 / max | "
              "detector calls | shed: lag | shed: budget | CPU cores: Triton + encoder |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(f"| {label(parameters)} | {opts.every_s:g} | {opts.lag_shed_ms} | {opts.streams} | {result['frames']} | "
              f"{lat['p50']:.0f} / {lat['p95']:.0f} / {lat['p99']:.0f} / {lat['max']:.0f} | {result['detector_calls']} | "
              f"{result['shed_lag']} | {result['shed_budget']} | {result['cpu_cores']['triton']:.2f} + {result['cpu_cores']['encoder']:.2f} |")
        if opts.json:
            opts.json.write_text(json.dumps(result, indent=2))
        return
    cv2.setNumThreads(opts.threads)

    frames = frames_as_the_encoder_sees_them(opts.seconds, opts.max_pixels)
    decoded = []
    decode_cpu = 0.0
    for _, data in frames:
        rgb, c, _ = timed(lambda: decode_jpeg(data))
        decoded.append(rgb)
        decode_cpu += c
    h, w = decoded[0].shape[:2]
    print(f"{len(frames)} frames of vtest.avi at 1 FPS, {w}x{h} after ingest's bound; {platform.processor() or platform.machine()}, "
          f"{opts.threads} OpenCV thread(s)")
    results: dict[str, object] = {"frames": len(frames), "size": [w, h], "threads": opts.threads,
                                  "jpeg_decode_cpu_ms": 1000 * decode_cpu / len(frames)}
    encoder = {b: bench_frame_encoder(decoded, b) for b in (1, 16)}
    results["frame_encoder"] = encoder
    print(f"jpeg decode {results['jpeg_decode_cpu_ms']:.1f} ms CPU/frame; frame encoder (onnxruntime, 1 thread) "
          f"{encoder[1]['cpu_ms']:.1f} ms CPU/frame alone, {encoder[16]['cpu_ms']:.1f} ms in batches of 16")

    configured = repository_parameters()
    settings = [dict(kv.split("=", 1) for kv in s.split(",")) for s in opts.setting] or list(CANDIDATES)
    current = {k: configured[k] for k in ("upscale", "win_stride", "pyramid_scale", "max_pixels") if k in configured}
    if not opts.setting and current not in settings:
        settings.append(current)
    photos = no_people_images()
    rows = []
    reference_found = None
    for parameters in [REFERENCE, *[s for s in settings if s != REFERENCE]]:
        model = load_people_model(parameters, opts.threads)
        model.detect(decoded[0])  # warm up
        found, cpu, wall = [], 0.0, 0.0
        for rgb in decoded:
            (boxes, _), c, wt = timed(lambda: model.detect(rgb))
            found.append(boxes)
            cpu, wall = cpu + c, wall + wt
        counts = np.array([len(b) for b in found])
        if reference_found is None:
            reference_found = found
        ref_counts = np.array([len(b) for b in reference_found])
        ref_total = int(ref_counts.sum())
        hits = sum(matched(r, f) for r, f in zip(reference_found, found))
        false_pos = {name: len(model.detect(img)[0]) for name, img in photos}
        row = {
            "setting": label(parameters), "parameters": parameters,
            "cpu_ms": 1000 * cpu / len(decoded), "wall_ms": 1000 * wall / len(decoded),
            "mean_people": float(counts.mean()), "median_people": float(np.median(counts)),
            "count_equal": float(np.mean(counts == ref_counts)), "count_within_1": float(np.mean(np.abs(counts - ref_counts) <= 1)),
            "frames_with_people": float(np.mean(counts > 0)),
            "box_recall": hits / ref_total if ref_total else 1.0,
            "no_people_photo_boxes": sum(false_pos.values()),
            "current": parameters == current,
        }
        rows.append(row)
        print(f"  {row['setting']:<48} {row['cpu_ms']:7.0f} ms CPU", flush=True)
    results["people_detector"] = rows

    print()
    print("| people detector setting | CPU ms/frame | wall ms/frame | people/frame (mean, median) | count = ref | count ±1 | box recall vs ref | boxes on 5 no-people photos |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mark = " (reference: before)" if r["parameters"] == REFERENCE else ""
        mark += " **(config.pbtxt)**" if r["current"] else ""
        print(f"| {r['setting']}{mark} | {r['cpu_ms']:.0f} | {r['wall_ms']:.0f} | {r['mean_people']:.1f}, {r['median_people']:.0f} | "
              f"{100 * r['count_equal']:.0f}% | {100 * r['count_within_1']:.0f}% | {100 * r['box_recall']:.0f}% | {r['no_people_photo_boxes']} |")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
