"""Benchmark: what open, idle sessions cost the gateway and ingest (issue 13, "sessions are not threads").

Starts a Kafka broker and the real gateway and ingest services (separate processes, defaults:
SH_GRPC_WORKERS=16), then opens idle sessions in steps (SessionStart, then nothing) and at each
step measures, side by side in one run:

- the RSS and thread count of the gateway and ingest processes (per idle session: the slope);
- the latency of the gateway's and ingest's health checks (p50/p99 of 40 calls);
- the time another tenant needs to open a session and get its first frame acknowledged (p50 of 10).

Ratios to the 0-session step are what to read (this machine is noisy). Loopback only, bounded:

    .venv/bin/python bench/idle_sessions.py --steps 0,250,1000,2000 --out docs/bench/idle-sessions.json
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
import time
from pathlib import Path

import cv2
import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from streamharness.client import Session
from streamharness.devinfra.common import free_port
from streamharness.devinfra.kafka_broker import KafkaBroker

ROOT = Path(__file__).resolve().parents[1]
JPEG = cv2.imencode(".jpg", np.full((240, 320, 3), 100, np.uint8))[1].tobytes()


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":")[1].strip() for line in status}
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"])}


def pct(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50_ms": 1e3 * float(p50), "p99_ms": 1e3 * float(p99), "max_ms": 1e3 * float(max(values))}


async def health_latency(address: str, n: int = 40) -> list[float]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            out.append(time.perf_counter() - t0)
        return out


async def fresh_session(address: str, i: int) -> float:
    """Seconds from opening a session of another tenant to its first frame's ack."""
    t0 = time.perf_counter()
    async with Session(address, stream_id=f"probe-{i}", tenant="other") as s:
        await s.send_frame(0, JPEG)
        async for msg in s:
            if msg.WhichOneof("message") == "ack":
                break
    return time.perf_counter() - t0


def spawn(name: str, port: int, env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    out = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(ROOT / f"services/{name}/main.py")], cwd=ROOT,
                            env={**os.environ, **env, "SH_SERVICE_NAME": name, "SH_GRPC_PORT": str(port)},
                            stdout=out, stderr=subprocess.STDOUT)


async def wait_serving(address: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode}")
            try:
                if (await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.3)
    raise TimeoutError(f"{address} not SERVING")


async def run(steps: list[int], console: Console) -> dict:
    work = Path(tempfile.mkdtemp(prefix="sh-idle-bench-"))
    broker = KafkaBroker(work / "kafka", show_progress=False).start()
    common = {"SH_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "SH_AUTH_INTERNAL_SECRET": secrets.token_urlsafe(48),
              "SH_GRPC_HOST": "127.0.0.1", "SH_READINESS_INTERVAL_S": "0.5", "SH_TELEMETRY_LOG_LEVEL": "WARNING"}
    ingest_port, gateway_port = free_port(), free_port()
    ingest = spawn("ingest", ingest_port, common, work)
    gateway = spawn("gateway", gateway_port, {**common, "SH_GATEWAY_INGEST_ADDRESS": f"127.0.0.1:{ingest_port}",
                                              "SH_GATEWAY_ALLOW_ANONYMOUS": "true", "SH_GATEWAY_MAX_SESSIONS_PER_TENANT": "100000",
                                              "SH_GATEWAY_IDLE_TIMEOUT_S": "3600"}, work)
    address, ingest_address = f"127.0.0.1:{gateway_port}", f"127.0.0.1:{ingest_port}"
    idle: list[Session] = []
    rows = []
    try:
        await wait_serving(ingest_address, ingest)
        await wait_serving(address, gateway)
        with Progress(console=console) as progress:
            task = progress.add_task("idle sessions", total=max(steps))
            for step in steps:
                while len(idle) < step:
                    batch = [Session(address, stream_id=f"idle-{len(idle) + i}", tenant="idle")
                             for i in range(min(100, step - len(idle)))]
                    await asyncio.gather(*(s.__aenter__() for s in batch))
                    idle += batch
                    progress.update(task, completed=len(idle))
                await asyncio.sleep(2.0)  # settle
                fresh = [await fresh_session(address, i) for i in range(10)]
                rows.append({"idle_sessions": step, "gateway": proc_stats(gateway.pid), "ingest": proc_stats(ingest.pid),
                             "gateway_health": pct(await health_latency(address)),
                             "ingest_health": pct(await health_latency(ingest_address)),
                             "new_session_first_ack": pct(fresh)})
    finally:
        for s in idle:
            try:
                await s.__aexit__(None, None, None)
            except Exception:  # noqa: BLE001 - best effort at the end of a bench
                pass
        for p in (gateway, ingest):
            p.terminate()
        for p in (gateway, ingest):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()
    base = rows[0]
    for row in rows:
        n = row["idle_sessions"]
        row["gateway_rss_kb_per_session"] = 1024 * (row["gateway"]["rss_mb"] - base["gateway"]["rss_mb"]) / n if n else 0.0
        row["ingest_rss_kb_per_session"] = 1024 * (row["ingest"]["rss_mb"] - base["ingest"]["rss_mb"]) / n if n else 0.0
        row["health_p99_ratio"] = row["gateway_health"]["p99_ms"] / base["gateway_health"]["p99_ms"]
        row["new_session_p50_ratio"] = row["new_session_first_ack"]["p50_ms"] / base["new_session_first_ack"]["p50_ms"]
    return {"rows": rows, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "command": "python bench/idle_sessions.py --steps " + ",".join(map(str, steps))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="0,250,1000,2000", help="idle session counts to measure at, ascending, starting at 0")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a figure (PNG) here")
    opts = parser.parse_args()
    steps = [int(s) for s in opts.steps.split(",")]
    if steps[0] != 0 or steps != sorted(steps):
        parser.error("--steps must be ascending and start at 0 (the baseline of the ratios)")
    console = Console()
    result = asyncio.run(run(steps, console))
    table = Table(title="idle sessions: gateway and ingest on grpc.aio")
    for col in ("idle", "gw RSS MB", "gw threads", "ingest RSS MB", "ingest threads", "KB/session (gw+ingest)",
                "gw health p99 ms", "ingest health p99 ms", "new session→ack p50 ms"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["idle_sessions"]), f"{r['gateway']['rss_mb']:.0f}", str(r["gateway"]["threads"]),
                      f"{r['ingest']['rss_mb']:.0f}", str(r["ingest"]["threads"]),
                      f"{r['gateway_rss_kb_per_session'] + r['ingest_rss_kb_per_session']:.1f}",
                      f"{r['gateway_health']['p99_ms']:.1f}", f"{r['ingest_health']['p99_ms']:.1f}",
                      f"{r['new_session_first_ack']['p50_ms']:.0f}")
    console.print(table)
    if opts.out:
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {opts.out}")
    if opts.plot:
        plot(result, opts.plot)
        console.print(f"wrote {opts.plot}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [r["idle_sessions"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for proc in ("gateway", "ingest"):
        axes[0].plot(n, [r[proc]["rss_mb"] for r in rows], "o-", label=proc)
        axes[1].plot(n, [r[proc]["threads"] for r in rows], "o-", label=proc)
        axes[2].plot(n, [r[f"{proc}_health"]["p99_ms"] for r in rows], "o-", label=f"{proc} health p99")
    axes[2].plot(n, [r["new_session_first_ack"]["p50_ms"] for r in rows], "s--", label="new session → first ack p50")
    for ax, title in zip(axes, ("RSS (MB)", "threads", "latency (ms)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("idle sessions open")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_ylim(bottom=0)
    axes[2].set_ylim(bottom=0)
    fig.suptitle("Idle sessions cost memory, not threads (gateway + ingest on grpc.aio, SH_GRPC_WORKERS=16)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
