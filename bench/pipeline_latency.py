"""Benchmark: answer latency of the whole local pipeline on a real video.

Starts the stack (Kafka, Triton, generator, six services), plays vtest.avi through the gateway in
real time (1x media time) with questions at fixed media times, and reports per question the time
from sending it to its first token (TTFT) and to its last token (end-to-end), plus the wall time
from a frame's arrival at the gateway to each hop, read from the hop stamps on the encoder's output.

    .venv/bin/python bench/pipeline_latency.py --seconds 60 --out docs/bench/pipeline_latency.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer
from rich.console import Console
from rich.table import Table

from streamharness.devinfra.stack import LocalStack
from streamharness.media import sample_path
from streamharness.player import TimedQuestion, play
from streamharness.v1 import events_pb2


def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"n": len(values), "p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(max(values))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="media seconds of vtest.avi to play")
    parser.add_argument("--every", type=float, default=10.0, help="ask a question every N media seconds")
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed (1 = real time)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    opts = parser.parse_args()
    console = Console()
    questions = [TimedQuestion(int(t * 1000), "What is happening in the street right now?")
                 for t in np.arange(opts.every, opts.seconds, opts.every)]
    with console.status("starting the stack…"):
        stack = LocalStack(extra_env={"SH_GENERATION_MAX_NEW_TOKENS": str(opts.max_new_tokens),
                                      "SH_RESPONDER_QUESTION_MAX_NEW_TOKENS": str(opts.max_new_tokens)}).start()
    try:
        with console.status(f"playing {opts.seconds:.0f} s of vtest.avi at {opts.speed:g}x…"):
            result = asyncio.run(play(stack.gateway_addresses[0], sample_path("vtest.avi"), stream_id="bench",
                                      questions=questions, speed=opts.speed, send_fps=2.0, limit_s=opts.seconds))
        consumer = KafkaConsumer("embeddings", bootstrap_servers=stack.broker.bootstrap_servers,
                                 auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=5000)
        hops: dict[str, list[float]] = {}
        for record in consumer:
            event = events_pb2.EncodedFrameEvent.FromString(record.value)
            start = event.hops[0].wall_unix_ns
            for stamp in event.hops[1:]:
                hops.setdefault(stamp.hop, []).append((stamp.wall_unix_ns - start) / 1e6)
        consumer.close()
    finally:
        stack.stop()

    ttft, e2e = [], []
    for r in result.responses:
        if r.question_id in result.asked_wall:
            ttft.append((r.first_chunk_wall - result.asked_wall[r.question_id]) * 1000)
            e2e.append((r.final_wall - result.asked_wall[r.question_id]) * 1000)
    report = {
        "command": f"bench/pipeline_latency.py --seconds {opts.seconds:g} --every {opts.every:g} --speed {opts.speed:g} --max-new-tokens {opts.max_new_tokens}",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "questions": len(questions), "answers": len(ttft), "proactive": sum(r.proactive for r in result.responses),
        "ttft_ms": pct(ttft), "end_to_end_ms": pct(e2e),
        "frame_hops_ms": {hop: pct(v) for hop, v in hops.items()},
    }
    table = Table(title="pipeline latency (ms)")
    for col in ("what", "n", "p50", "p95", "p99", "max"):
        table.add_column(col, justify="right" if col != "what" else "left")
    for name, stats in [("TTFT (question → first token)", report["ttft_ms"]), ("end to end (→ last token)", report["end_to_end_ms"]),
                        *[(f"frame: gateway → {h}", s) for h, s in report["frame_hops_ms"].items()]]:
        if stats:
            table.add_row(name, str(stats["n"]), *(f"{stats[k]:.0f}" for k in ("p50", "p95", "p99", "max")))
    console.print(table)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
