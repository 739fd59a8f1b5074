"""Summarise a Streaming-Eval run for docs/benchmarks.md: overall and per-cell SW-F1 beside the
built-in baselines on the same episodes, latency per stretch of media time (does it stay flat as
memory grows?), and the run's wall time and peak memory (from /usr/bin/time -v).

    python bench/eval_summary.py EPISODES RESULT.json RUNS.jsonl [TIME.txt] [--bucket-s 1800]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from streamharness.eval.episode import load_episodes, load_runs
from streamharness.eval.runner import run_baseline
from streamharness.eval.scoring import MODES, POSITIONS, load_result, score_run


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("episodes", type=Path)
    ap.add_argument("result", type=Path)
    ap.add_argument("runs", type=Path)
    ap.add_argument("time", type=Path, nargs="?")
    ap.add_argument("--bucket-s", type=float, default=1800.0)
    args = ap.parse_args()
    eps = load_episodes(args.episodes)
    result = load_result(args.result)
    runs = load_runs(args.runs)
    media_s = sum(e.duration_s for e in eps)

    scores = {result.system: result}
    for name, k in (("silent", 1), ("always", 1), ("every-k", 5)):
        base = [run_baseline(ep, name, k=k) for ep in eps]
        scores[base[0].system] = score_run(eps, base, system=base[0].system)
    print("| system | SW-F1 | TP | FP | FN |\n|---|---|---|---|---|")
    for name, s in scores.items():
        print(f"| {name} | {_f(s.total.sw_f1)} | {s.total.tp} | {s.total.fp} | {s.total.fn} |")
    print()
    print("| mode \\ position | " + " | ".join(POSITIONS) + " |\n|---|---|---|---|")
    for m in MODES:
        print(f"| {m} | " + " | ".join(f"{_f(result.cell(m, p).sw_f1)} ({result.cell(m, p).events})" for p in POSITIONS) + " |")
    print()
    asked = {q.event_id: q.ask_at_s for ep in eps for q in ep.questions}
    rows = {}
    for run in runs:
        for r in run.responses:
            if r.event_id in asked and r.ttft_ms is not None:
                rows.setdefault(int(asked[r.event_id] // args.bucket_s), []).append((r.ttft_ms, r.e2e_ms))
    print("| media time | answers | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | e2e p95 ms |\n|---|---|---|---|---|---|")
    for b in sorted(rows):
        ttft = np.array([t for t, _ in rows[b]])
        e2e = np.array([e for _, e in rows[b]])
        lo, hi = b * args.bucket_s / 60, (b + 1) * args.bucket_s / 60
        print(f"| {lo:.0f}–{hi:.0f} min | {len(ttft)} | {np.percentile(ttft, 50):.0f} | {np.percentile(ttft, 95):.0f} "
              f"| {np.percentile(e2e, 50):.0f} | {np.percentile(e2e, 95):.0f} |")
    print()
    responses = sum(len(r.responses) for r in runs)
    print(f"responses: {responses}; TTFT p50/p95/p99 {result.ttft_ms.p50:.0f}/{result.ttft_ms.p95:.0f}/{result.ttft_ms.p99:.0f} ms; "
          f"e2e p50/p95/p99 {result.e2e_ms.p50:.0f}/{result.e2e_ms.p95:.0f}/{result.e2e_ms.p99:.0f} ms")
    if args.time and args.time.exists():
        text = args.time.read_text()
        wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", text)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        if wall:
            parts = [float(x) for x in wall.group(1).split(":")]
            seconds = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
            print(f"wall {seconds / 60:.1f} min for {media_s / 3600:.2f} h of media: {media_s / seconds:.1f}x real time")
        if rss:
            print(f"peak RSS of the eval process: {int(rss.group(1)) / 1024 / 1024:.2f} GiB")


if __name__ == "__main__":
    main()
