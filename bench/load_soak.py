"""Benchmark: load and soak of the whole local pipeline (issue 14, item 6).

Starts one local stack (Kafka, tritonserver, the KServe generator with SmolLM2-135M, gateway,
ingest, encoder, decision, memory, summariser, responder — each its own process; answers capped at
16 tokens), then for each N of ``--streams`` runs N concurrent sessions for ``--seconds`` of wall
time. Each session sends real frames of ``vtest.avi`` (JPEGs encoded once, 1 frame per media
second, paced by the wall clock, streams staggered over the first second), has one standing
instruction ("tell me when someone walks in") and asks a question every ``--every`` seconds. After
a step the sessions end (the gateway waits up to SH_GATEWAY_END_GRACE_S for open answers) and the
pipeline is left to drain (encoder, decision and responder consumer lag 0) before the next step.

Measured per step, on the client unless said otherwise:

- frame-ack latency: ``send_frame`` → its ``Ack`` KIND_FRAME (ingest decoded and published it);
- question latency: ``ask`` → first chunk, and → final chunk; answered / asked (refusals and the
  gateway's "not_answered" count as not answered);
- frames shed: acks with ``shed`` (ingest over the tenant's frame quota) or not ``sampled``, session
  errors, the decision stage's lag shedding (its log: "N older frames shed"), records on the
  dead-letter topic, and the share of frames the encoder ran the people detector on (frames with
  boxes: at most one per SH_ENCODER_PEOPLE_EVERY_S of media time, fewer when it sheds for lag);
- frame → decision: the ``decisions`` topic read with kafka-python; for each decision made on a
  frame (its hops went through the encoder) the decision hop's wall time minus the gateway hop's;
  frame → encoder the same way for every frame from ``embeddings``;
- the RSS of every process of the stack (with its children, e.g. tritonserver's Python-backend
  stubs), sampled every second over the whole run; flat = first vs last 20 % of the samples, and
  the RSS when idle after each step (load vs leak).

The knee is the first N where frame → decision p99 exceeds ``--knee-f2d-ms`` (2 s), or a question
goes unanswered, or question first-chunk p99 exceeds ``--knee-ttft-factor`` × the first step's.
Loopback only, bounded: about 15 minutes with the defaults (a saturated step adds up to --drain
75 s for its sessions to close and --settle 60 s for the pipeline to catch up; a step that does not
catch up in time leaves its backlog to the next, reported as consumer_lag_after_drain):

    .venv/bin/python bench/load_soak.py --streams 1,2,4,8,10,12 --seconds 60 \\
        --out docs/bench/load-soak.json --plot docs/bench/load-soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streamharness.client import Session
from streamharness.devinfra.stack import LocalStack
from streamharness.media import sample_path
from streamharness.replay import encoded_frames
from streamharness.v1 import events_pb2, session_pb2

INSTRUCTION = "tell me when someone walks in"
QUESTION = "What is happening in the street right now?"
TENANT = "load-soak"
DRAINED_GROUPS = ("encoder", "decision", "responder")  # the step is over once these have caught up
LAG_GROUPS = ("encoder", "decision", "responder", "memory", "summariser")
SHED_LINE = re.compile(r"(\d+) older frames shed")


def pct(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p99 = np.percentile(values, [50, 99])
    return {"n": len(values), "p50": float(p50), "p99": float(p99), "max": float(max(values))}


# -- per-stream client ------------------------------------------------------------------------------
@dataclass
class StreamResult:
    stream_id: str
    frames_sent: int = 0
    ack_ms: list[float] = field(default_factory=list)
    send_late_ms: list[float] = field(default_factory=list)  # how late the client sent a frame vs its due time
    acks_shed: int = 0
    acks_not_sampled: int = 0
    errors: list[str] = field(default_factory=list)
    asked: int = 0
    answered: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    first_chunk_ms: list[float] = field(default_factory=list)
    final_ms: list[float] = field(default_factory=list)
    proactive: int = 0
    closed: bool = False  # the gateway ended the call (KIND_END ack, then EOF) within the drain time


async def run_stream(address: str, stream_id: str, jpegs: list[bytes], seconds: int, every: int, stagger_s: float,
                     drain_s: float, on_second) -> StreamResult:
    res = StreamResult(stream_id)
    sent_at: dict[int, float] = {}
    async with Session(address, stream_id=stream_id, tenant=TENANT, instructions={"walk-in": INSTRUCTION}) as s:

        def seen(msg: session_pb2.ServerMessage) -> None:
            kind = msg.WhichOneof("message")
            if kind == "ack" and msg.ack.kind == session_pb2.Ack.KIND_FRAME:
                t0 = sent_at.pop(msg.ack.seq, None)
                if t0 is not None:
                    res.ack_ms.append(1e3 * (time.monotonic() - t0))
                res.acks_shed += msg.ack.shed
                res.acks_not_sampled += not msg.ack.sampled and not msg.ack.shed
            elif kind == "error":
                res.errors.append(f"{msg.error.code}: {msg.error.message[:120]}")

        async def receive() -> None:
            async for r in s.responses(on_message=seen):
                if r.proactive:
                    res.proactive += 1
                    continue
                asked = s.asked_wall.get(r.question_id)
                if asked is None:
                    continue
                if r.refusal:
                    res.refused[r.refusal] = res.refused.get(r.refusal, 0) + 1
                    continue
                res.answered += 1
                res.first_chunk_ms.append(1e3 * (r.first_chunk_wall - asked))
                res.final_ms.append(1e3 * (r.final_wall - asked))
            res.closed = True

        receiver = asyncio.create_task(receive())
        await asyncio.sleep(stagger_s)
        start = time.monotonic()
        for i in range(seconds):
            due = start + i
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            res.send_late_ms.append(1e3 * (now - due))
            seq = await s.send_frame(i * 1000, jpegs[i % len(jpegs)])
            sent_at[seq] = now
            res.frames_sent += 1
            if i and i % every == 0:
                await s.ask(QUESTION, at_ms=i * 1000)
                res.asked += 1
            on_second()
        await s.end()
        try:
            await asyncio.wait_for(receiver, drain_s)
        except TimeoutError:
            pass
    return res


# -- background observers ----------------------------------------------------------------------------
class RssSampler(threading.Thread):
    """RSS (MB) of each named process and its descendants, every ``interval_s``."""

    def __init__(self, pids: dict[str, int], interval_s: float = 1.0):
        super().__init__(daemon=True, name="rss-sampler")
        self.pids, self.interval_s = pids, interval_s
        self.t0 = time.monotonic()
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self.load: list[tuple[float, float]] = []  # the machine's 1-minute load average (shared machine)
        self.stop_event = threading.Event()

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the stack's processes and their children."""
        total = 0.0
        for pid in self.pids.values():
            try:
                p = psutil.Process(pid)
                procs = [p, *p.children(recursive=True)]
            except psutil.Error:
                continue
            for q in procs:
                try:
                    t = q.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
        return total

    def sample(self) -> dict[str, float]:
        out = {}
        for name, pid in self.pids.items():
            try:
                p = psutil.Process(pid)
                procs = [p, *p.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for q in procs:
                try:
                    total += q.memory_info().rss
                except psutil.Error:
                    pass
            out[name] = total / 2**20
        return out

    def run(self) -> None:
        while not self.stop_event.is_set():
            t = time.monotonic() - self.t0
            for name, mb in self.sample().items():
                self.samples[name].append((round(t, 1), round(mb, 1)))
            self.load.append((round(t, 1), round(os.getloadavg()[0], 2)))
            self.stop_event.wait(self.interval_s)


class TopicReader(threading.Thread):
    """Reads ``decisions``, ``embeddings`` and the dead-letter topic from the start, for the whole run."""

    def __init__(self, bootstrap: str):
        super().__init__(daemon=True, name="topic-reader")
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                      max_partition_fetch_bytes=8 * 2**20)
        parts = []
        for topic in ("decisions", "embeddings", "dead-letter"):
            for p in sorted(self.consumer.partitions_for_topic(topic) or ()):
                parts.append(TopicPartition(topic, p))
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        self.decisions: list[events_pb2.DecisionEvent] = []
        self.embeddings: list[events_pb2.EncodedFrameEvent] = []
        self.dead_letters: list[tuple[float, bytes | None]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for tp, records in self.consumer.poll(timeout_ms=500).items():
                for r in records:
                    if tp.topic == "decisions":
                        self.decisions.append(events_pb2.DecisionEvent.FromString(r.value))
                    elif tp.topic == "embeddings":
                        self.embeddings.append(events_pb2.EncodedFrameEvent.FromString(r.value))
                    else:
                        self.dead_letters.append((time.time(), r.key))
        self.consumer.close()


def group_lag(admin, consumer) -> dict[str, int]:
    """Records behind per consumer group (end offsets minus committed, over its committed partitions)."""
    out = {}
    for group in LAG_GROUPS:
        try:
            committed = admin.list_group_offsets(group).get(group) or {}
        except Exception:  # noqa: BLE001 - a group that does not exist (yet)
            continue
        committed = {tp: om for tp, om in committed.items() if om.offset >= 0}
        if not committed:
            continue
        ends = consumer.end_offsets(list(committed))
        out[group] = int(sum(max(0, ends[tp] - om.offset) for tp, om in committed.items() if om.offset >= 0))
    return out


def wait_drained(bootstrap: str, timeout_s: float) -> tuple[float, dict[str, int]]:
    """Seconds until the encoder, decision and responder groups have no lag (bounded), and the lags then."""
    from kafka import KafkaAdminClient, KafkaConsumer

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    t0 = time.monotonic()
    try:
        while True:
            lag = group_lag(admin, consumer)
            if all(lag.get(g, 0) == 0 for g in DRAINED_GROUPS) or time.monotonic() - t0 > timeout_s:
                return time.monotonic() - t0, lag
            time.sleep(1.0)
    finally:
        admin.close()
        consumer.close()


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


# -- one step -----------------------------------------------------------------------------------------
async def run_step(stack: LocalStack, n: int, jpegs: list[bytes], opts, progress: Progress) -> tuple[list[StreamResult], float]:
    task = progress.add_task(f"N={n:>2} streams", total=n * opts.seconds)
    tick = lambda: progress.advance(task)  # noqa: E731
    address = stack.gateway_addresses[0]
    t0 = time.monotonic()
    results = await asyncio.gather(*(
        run_stream(address, f"n{n:02d}-s{k:02d}", jpegs, opts.seconds, opts.every, k / n, opts.drain, tick)
        for k in range(n)))
    progress.update(task, completed=n * opts.seconds)
    return list(results), time.monotonic() - t0


def summarise_step(n: int, results: list[StreamResult], reader: TopicReader, shed_logged: int, wall_s: float,
                   drain_s: float, lag_after: dict[str, int], idle_rss: dict[str, float], dead_letters: int) -> dict:
    prefix = f"n{n:02d}-"
    cat = lambda attr: [v for r in results for v in getattr(r, attr)]  # noqa: E731
    f2d, f2e = [], []
    decisions_frame = decisions_total = 0
    for d in reader.decisions:
        if not d.key.stream_id.startswith(prefix):
            continue
        decisions_total += 1
        hops = {h.hop: h.wall_unix_ns for h in d.hops}
        if "encoder" in hops and "decision" in hops and d.hops[0].hop == "gateway":
            decisions_frame += 1
            f2d.append((hops["decision"] - d.hops[0].wall_unix_ns) / 1e6)
    embedded = measured = 0
    for e in reader.embeddings:
        if not e.key.stream_id.startswith(prefix):
            continue
        embedded += 1
        measured += len(e.detections) > 0
        hops = {h.hop: h.wall_unix_ns for h in e.hops}
        if "encoder" in hops and e.hops and e.hops[0].hop == "gateway":
            f2e.append((hops["encoder"] - e.hops[0].wall_unix_ns) / 1e6)
    refused: dict[str, int] = {}
    for r in results:
        for k, v in r.refused.items():
            refused[k] = refused.get(k, 0) + v
    asked, answered = sum(r.asked for r in results), sum(r.answered for r in results)
    sent = sum(r.frames_sent for r in results)
    return {
        "streams": n, "wall_s": round(wall_s, 1), "settle_s": round(drain_s, 1), "consumer_lag_after_drain": lag_after,
        "frames_sent": sent, "frames_acked": len(cat("ack_ms")),
        "frame_ack_ms": pct(cat("ack_ms")), "client_send_late_ms": pct(cat("send_late_ms")),
        "questions_asked": asked, "questions_answered": answered, "questions_refused": refused,
        "question_first_chunk_ms": pct(cat("first_chunk_ms")), "question_final_ms": pct(cat("final_ms")),
        "proactive_responses": sum(r.proactive for r in results),
        "shed": {"acks_shed": sum(r.acks_shed for r in results), "acks_not_sampled": sum(r.acks_not_sampled for r in results),
                 "session_errors": len(cat("errors")), "decision_lag_shed": shed_logged, "dead_letters": dead_letters,
                 "frames_embedded": embedded, "frames_people_measured": measured,
                 "people_measured_share": round(measured / embedded, 3) if embedded else None},
        "errors_sample": cat("errors")[:5],
        "sessions_closed": sum(r.closed for r in results),
        "decisions": decisions_total, "decisions_on_frames": decisions_frame,
        "frame_to_decision_ms": pct(f2d), "frame_to_encoder_ms": pct(f2e),
        "idle_rss_mb_after": idle_rss,
    }


def find_knee(steps: list[dict], f2d_limit_ms: float, ttft_factor: float) -> dict:
    base = (steps[0].get("question_first_chunk_ms") or {}).get("p99")
    for s in steps:
        why = []
        f2d = s.get("frame_to_decision_ms")
        if f2d and f2d["p99"] > f2d_limit_ms:
            why.append(f"frame→decision p99 {f2d['p99']:.0f} ms > {f2d_limit_ms:.0f} ms")
        if s["questions_answered"] < s["questions_asked"]:
            why.append(f"{s['questions_asked'] - s['questions_answered']} of {s['questions_asked']} questions unanswered")
        ttft = s.get("question_first_chunk_ms")
        if base and ttft and ttft["p99"] > ttft_factor * base:
            why.append(f"first-chunk p99 {ttft['p99']:.0f} ms > {ttft_factor:g}× the first step's {base:.0f} ms")
        s["breaks"] = why
    knee = next((s for s in steps if s["breaks"]), None)
    good = [s["streams"] for s in steps if not s["breaks"] and (knee is None or s["streams"] < knee["streams"])]
    return {"knee_streams": knee["streams"] if knee else None, "why": knee["breaks"] if knee else [],
            "last_good_streams": max(good) if good else None,
            "criteria": {"frame_to_decision_p99_ms": f2d_limit_ms, "unanswered_questions": 0,
                         "first_chunk_p99_factor_of_first_step": ttft_factor}}


def rss_summary(samples: dict[str, list[tuple[float, float]]], steps: list[dict]) -> dict:
    out = {}
    for name, series in samples.items():
        if len(series) < 10:
            continue
        mb = np.array([v for _, v in series])
        k = max(1, len(mb) // 5)
        first, last = float(mb[:k].mean()), float(mb[-k:].mean())
        idle = [s["idle_rss_mb_after"].get(name) for s in steps if s["idle_rss_mb_after"].get(name) is not None]
        out[name] = {"first_20pct_mb": round(first, 1), "last_20pct_mb": round(last, 1), "growth_mb": round(last - first, 1),
                     "growth_pct": round(100 * (last - first) / first, 1) if first else None,
                     "max_mb": round(float(mb.max()), 1),
                     "idle_after_steps_mb": [round(v, 1) for v in idle],
                     "flat": abs(last - first) <= max(20.0, 0.05 * first)}
    return out


# -- main ---------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,2,4,8,10,12", help="concurrent streams per step, ascending")
    parser.add_argument("--seconds", type=int, default=60, help="wall seconds (= frames) each stream sends per step")
    parser.add_argument("--every", type=int, default=10, help="each stream asks a question every this many seconds")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="SH_GENERATION_MAX_NEW_TOKENS of the stack")
    parser.add_argument("--drain", type=float, default=75.0, help="after a step, wait at most this long for a session to close")
    parser.add_argument("--settle", type=float, default=60.0, help="then at most this long for the pipeline's consumer lag to reach 0")
    parser.add_argument("--knee-f2d-ms", type=float, default=2000.0, help="knee: frame → decision p99 above this")
    parser.add_argument("--knee-ttft-factor", type=float, default=3.0, help="knee: first-chunk p99 above this × the first step's")
    parser.add_argument("--env", action="append", default=[], metavar="SH_X=VALUE",
                        help="a setting for every process of the stack (repeatable), e.g. SH_GENERATION_TORCH_THREADS=1")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the stack's logs and data here (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write a figure (PNG) here")
    opts = parser.parse_args()
    streams = [int(s) for s in opts.streams.split(",")]
    if streams != sorted(streams) or streams[0] < 1:
        parser.error("--streams must be ascending and ≥ 1")
    console = Console(width=170)
    began = time.monotonic()
    load_at_start = round(os.getloadavg()[0], 2)

    jpegs = [f.image for f in encoded_frames(sample_path("vtest.avi"), fps=1.0)]
    console.print(f"vtest.avi: {len(jpegs)} JPEG frames at 1 frame per media second, {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB each")
    tokens = str(opts.max_new_tokens)
    env = {"SH_GENERATION_MAX_NEW_TOKENS": tokens, "SH_RESPONDER_QUESTION_MAX_NEW_TOKENS": tokens,
           "SH_RESPONDER_ALERT_MAX_NEW_TOKENS": tokens}
    for item in opts.env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("SH_"):
            parser.error(f"--env {item!r}: expected SH_NAME=VALUE")
        env[name] = value
    with console.status("starting the stack (Kafka, tritonserver, generator, services)…"):
        t = time.monotonic()
        stack = LocalStack(opts.work_dir, extra_env=env).start()
        startup_s = time.monotonic() - t
    console.print(f"stack up in {startup_s:.0f} s: {', '.join(p.name for p in stack.procs)} + kafka + tritonserver")
    pids = {p.name: p.popen.pid for p in stack.procs}
    pids["kafka"], pids["tritonserver"] = stack.broker.pid, stack.triton.pid
    sampler = RssSampler(pids)
    sampler.start()
    reader = TopicReader(stack.broker.bootstrap_servers)
    reader.start()
    steps: list[dict] = []
    boundaries: list[tuple[int, float, float]] = []
    decision_log = stack.proc("decision").log_path
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} frames"),
                      TimeElapsedColumn(), console=console) as progress:
            for n in streams:
                log_at = log_size(decision_log)
                dead_at = len(reader.dead_letters)
                t_start, cpu_start = time.monotonic() - sampler.t0, sampler.cpu_s()
                results, wall_s = asyncio.run(run_step(stack, n, jpegs, opts, progress))
                drain_s, lag = wait_drained(stack.broker.bootstrap_servers, opts.settle)
                time.sleep(3.0)  # let the reader catch up with the last decisions
                t_end, cpu_end = time.monotonic() - sampler.t0, sampler.cpu_s()
                boundaries.append((n, t_start, t_end))
                shed = sum(int(m.group(1)) for m in SHED_LINE.finditer(log_since(decision_log, log_at)))
                row = summarise_step(n, results, reader, shed, wall_s, drain_s, lag, sampler.sample(),
                                     len(reader.dead_letters) - dead_at)
                loads = [v for t, v in sampler.load if t_start <= t <= t_end]
                row["machine_load_avg_1m"] = round(float(np.mean(loads)), 2) if loads else None
                row["stack_cpu_cores_used"] = round((cpu_end - cpu_start) / (t_end - t_start), 2)
                steps.append(row)
                q, f2d = row["question_first_chunk_ms"] or {}, row["frame_to_decision_ms"] or {}
                progress.console.print(
                    f"N={n}: ack p99 {(row['frame_ack_ms'] or {}).get('p99', float('nan')):.0f} ms, first chunk p50/p99 "
                    f"{q.get('p50', float('nan')):.0f}/{q.get('p99', float('nan')):.0f} ms, answered {row['questions_answered']}/"
                    f"{row['questions_asked']}, frame→decision p99 {f2d.get('p99', float('nan')):.0f} ms, "
                    f"settled in {drain_s:.0f} s, lag {lag}")
    finally:
        sampler.stop_event.set()
        reader.stop_event.set()
        sampler.join(5)
        reader.join(5)
        codes = stack.stop()
        if stack._tmp is not None:
            stack._tmp.cleanup()

    knee = find_knee(steps, opts.knee_f2d_ms, opts.knee_ttft_factor)
    rss = rss_summary(sampler.samples, steps)
    result = {
        "command": (f"bench/load_soak.py --streams {opts.streams} --seconds {opts.seconds} --every {opts.every} "
                    f"--max-new-tokens {opts.max_new_tokens}"),
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_at_start": load_at_start, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"instruction": INSTRUCTION, "question": QUESTION, "tenant": TENANT, "frames_per_s_per_stream": 1,
                     "video": "vtest.avi", "video_frames": len(jpegs), **env},
        "stack_startup_s": round(startup_s, 1), "run_s": round(time.monotonic() - began, 1), "exit_codes": codes,
        "knee": knee, "steps": steps, "rss": rss,
        "step_times_s": [{"streams": n, "start": round(a, 1), "end": round(b, 1)} for n, a, b in boundaries],
        "rss_samples_mb": sampler.samples,
        "load_avg_1m_samples": sampler.load,
    }
    print_tables(console, result)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(to_json(result))
        console.print(f"wrote {opts.out}")
    if opts.plot:
        plot(result, opts.plot)
        console.print(f"wrote {opts.plot}")


def to_json(result: dict) -> str:
    """Indented JSON, but each process's RSS samples on one line (a sample a second adds up)."""
    compact = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731
    head = json.dumps({k: v for k, v in result.items() if k not in ("rss_samples_mb", "load_avg_1m_samples")}, indent=1)
    samples = ",\n".join(f"  {json.dumps(name)}: {compact(series)}" for name, series in result["rss_samples_mb"].items())
    text = (head[:-2] + f',\n "load_avg_1m_samples": {compact(result["load_avg_1m_samples"])}'
            + ',\n "rss_samples_mb": {\n' + samples + "\n }\n}\n")
    json.loads(text)
    return text


def _p(stats: dict | None) -> str:
    return f"{stats['p50']:.0f} / {stats['p99']:.0f}" if stats else "–"


def print_tables(console: Console, result: dict) -> None:
    table = Table(title="load and soak: latency per step (ms, p50 / p99)")
    for col in ("N", "frame ack", "first chunk", "final", "answered/asked", "shed (ack/decision)", "people measured",
                "frame→decision", "frame→encoder", "settle s", "stack cores", "load avg"):
        table.add_column(col, justify="right")
    for s in result["steps"]:
        shed = s["shed"]
        table.add_row(str(s["streams"]), _p(s["frame_ack_ms"]), _p(s["question_first_chunk_ms"]), _p(s["question_final_ms"]),
                      f"{s['questions_answered']}/{s['questions_asked']}", f"{shed['acks_shed']}/{shed['decision_lag_shed']}",
                      f"{shed['people_measured_share']:.2f}" if shed["people_measured_share"] is not None else "–",
                      _p(s["frame_to_decision_ms"]), _p(s["frame_to_encoder_ms"]), f"{s['settle_s']:.0f}",
                      f"{s['stack_cpu_cores_used']:.2f}", f"{s['machine_load_avg_1m']:.1f}")
    console.print(table)
    rss = Table(title="RSS per process (MB, with children): first vs last 20 % of the run")
    for col in ("process", "first 20 %", "last 20 %", "growth", "max", "idle after each step", "flat"):
        rss.add_column(col, justify="right" if col != "process" else "left")
    for name, r in result["rss"].items():
        rss.add_row(name, f"{r['first_20pct_mb']:.0f}", f"{r['last_20pct_mb']:.0f}", f"{r['growth_mb']:+.0f} ({r['growth_pct']:+.0f} %)",
                    f"{r['max_mb']:.0f}", " ".join(f"{v:.0f}" for v in r["idle_after_steps_mb"]), "yes" if r["flat"] else "NO")
    console.print(rss)
    k = result["knee"]
    console.print(f"knee: N={k['knee_streams']} ({'; '.join(k['why'])}); last good N={k['last_good_streams']}"
                  if k["knee_streams"] else f"no knee up to N={result['steps'][-1]['streams']}")
    console.print(f"run time {result['run_s'] / 60:.1f} min (stack start {result['stack_startup_s']:.0f} s)")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = result["steps"]
    n = [s["streams"] for s in steps]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1.2, 0.8, 1.5]})
    ax = axes[0]
    series = [("question_first_chunk_ms", "ask → first chunk", "C0"), ("question_final_ms", "ask → final", "C1"),
              ("frame_to_decision_ms", "frame → decision", "C2"), ("frame_ack_ms", "frame → ack", "C3")]
    for key, label, color in series:
        xs = [s["streams"] for s in steps if s[key]]
        ax.plot(xs, [s[key]["p50"] for s in steps if s[key]], "o-", color=color, label=f"{label} p50")
        ax.plot(xs, [s[key]["p99"] for s in steps if s[key]], "s--", color=color, alpha=0.7, label=f"{label} p99")
    ax.axhline(result["knee"]["criteria"]["frame_to_decision_p99_ms"], color="C2", lw=0.8, ls=":")
    knee = result["knee"]["knee_streams"]
    if knee is not None:
        ax.axvline(knee, color="red", lw=1.2, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent 1-FPS streams")
    ax.set_ylabel("ms")
    ax.set_title("latency vs load")
    ax.set_xticks(n)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    if knee is not None:
        ax.text(knee, ax.get_ylim()[1], f" knee N={knee}", color="red", va="top", fontsize=9)

    ax = axes[1]
    asked = [s["questions_asked"] for s in steps]
    answered = [s["questions_answered"] for s in steps]
    ax.bar([x - 0.2 for x in range(len(n))], asked, 0.4, label="questions asked", color="C7")
    ax.bar([x + 0.2 for x in range(len(n))], answered, 0.4, label="answered", color="C0")
    ax2 = ax.twinx()
    ax2.plot(range(len(n)), [s["shed"]["people_measured_share"] or 0 for s in steps], "d-", color="C4", label="people-detector share")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("share of frames with people detection")
    ax.set_xticks(range(len(n)), [str(x) for x in n])
    ax.set_xlabel("concurrent streams")
    ax.set_title("questions answered, people detection shed")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    if knee is not None:
        ax.axvline(n.index(knee), color="red", lw=1.2, alpha=0.6)

    ax = axes[2]
    for name, series_ in sorted(result["rss_samples_mb"].items(), key=lambda kv: -max((v for _, v in kv[1]), default=0)):
        if series_:
            ax.plot([t / 60 for t, _ in series_], [v for _, v in series_], lw=1, label=name)
    for i, b in enumerate(result["step_times_s"]):
        ax.axvspan(b["start"] / 60, b["end"] / 60, color="grey", alpha=0.08 if i % 2 else 0.16)
        ax.text(b["start"] / 60, 1.0, f"N={b['streams']}", transform=ax.get_xaxis_transform(), fontsize=7, va="bottom")
    load = result.get("load_avg_1m_samples") or []
    if load:
        ax3 = ax.twinx()
        ax3.plot([t / 60 for t, _ in load], [v for _, v in load], color="black", lw=0.8, ls=":", label="machine load avg (1 min)")
        ax3.set_ylabel("load average (whole machine)")
        ax3.set_ylim(bottom=0)
        ax3.legend(fontsize=7, loc="upper right")
    ax.set_yscale("log")
    ax.set_xlabel("minutes into the run")
    ax.set_ylabel("RSS MB (with children)")
    ax.set_title("RSS per process, sampled every second", pad=14)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(f"Load and soak: N concurrent 1-FPS vtest.avi streams, a question every 10 s ({result['machine']['cpus']} CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
