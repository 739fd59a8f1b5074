"""The streaming engine's benchmark results as one figure (docs/bench/engine.png), read from the
JSON that ``bench/engine_latency.py`` wrote (nothing is measured here):

1. H200: step and TTFT at each point of a stream, full re-prefill vs 120-s window vs the cached
   engine (``engine-h200-points.json``);
2. H200: the cost per stream of one batched step, by attention mode (``engine-h200-modes.json``,
   ``engine-h200-flex.json``);
3. H200: N streams arriving at 1 FPS, p95 step and frame-to-decision latency against the 200 ms
   goal: eager layers (the same two files), compiled bf16 and FP8 (``engine-h200-kernels-*.json``);
4. 2 CPU cores: TTFT at 1 min and 2 h with the production bounds, drop vs rebuild
   (``engine-cpu-smollm2-steady.json``).

    python bench/plot_engine.py --bench docs/bench --out docs/bench/engine.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(bench: Path, name: str) -> dict:
    return json.loads((bench / name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=Path("docs/bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/bench/engine.png"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    ax = axes[0][0]
    for run, marker in zip(_load(args.bench, "engine-h200-points.json")["runs"], "os"):
        tpf = run["tokens_per_frame"]
        t = [p["t_s"] / 60 for p in run["points"]]
        for key, label, style in (("full", "full re-prefill", "-"), ("window", "120-s window", "--"),
                                  ("cached_ttft", "engine TTFT", ":")):
            ax.plot(t, [p[key]["p50_ms"] / 1000 for p in run["points"]], style, marker=marker, label=f"{label}, {tpf} tok/frame")
    ax.set(xscale="log", yscale="log", xlabel="stream time (min)", ylabel="p50 (s)",
           title="H200, one stream (transformers' attention run)")
    ax.axhline(0.25, color="grey", lw=0.8, label="TTFT goal 250 ms")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    series: dict[str, list[tuple[int, float]]] = {}
    for name in ("engine-h200-modes.json", "engine-h200-flex.json"):
        for run in _load(args.bench, name)["runs"]:
            for key, rows in run["concurrency"].items():
                for row in rows:
                    if "per_stream_ms" in row:
                        series.setdefault(key, []).append((row["streams"], row["per_stream_ms"]))
    for key, points in sorted(series.items()):
        points = sorted(set(points))
        ax.plot([n for n, _ in points], [ms for _, ms in points], marker="o", label=key)
    ax.set(xlabel="streams in one batched step", ylabel="ms per stream (p50 step / N)",
           title="H200: one batched step, 8,192 cached tokens a stream")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    groups = (("eager, 8,192 tok", ("engine-h200-modes.json", "engine-h200-flex.json"), "o", "grey"),
              ("compiled bf16, 3,277 tok", ("engine-h200-kernels-bf16.json",), "o", "tab:blue"),
              ("compiled fp8, 3,277 tok", ("engine-h200-kernels-fp8.json",), "s", "tab:green"),
              ("compiled bf16, 8,192 tok", ("engine-h200-kernels-bf16-8k.json",), "^", "tab:purple"),
              ("compiled fp8, 8,192 tok", ("engine-h200-kernels-fp8-8k.json",), "v", "tab:olive"))
    for name, files, marker, color in groups:
        rows = sorted({(row["streams"], row["p95_ms"], row.get("step_ms", {}).get("p95_ms")) for f in files
                       for run in _load(args.bench, f)["runs"] for row in run.get("arrivals", [])})
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker=marker, color=color, ls="--", label=f"{name}: frame p95")
        steps = [(r[0], r[2]) for r in rows if r[2] is not None]
        if steps:
            ax.plot([n for n, _ in steps], [ms for _, ms in steps], marker=marker, color=color, label=f"{name}: step p95")
    ax.axhline(200, color="red", lw=0.8, label="goal: p95 step 200 ms at 200 streams")
    ax.set(yscale="log", xlabel="streams arriving at 1 FPS", ylabel="ms",
           title="H200: streams at 1 FPS in real time (hybrid attention)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)

    ax = axes[1][1]
    steady = _load(args.bench, "engine-cpu-smollm2-steady.json")["runs"][0]["steady"]
    labels = [f"{p['overflow']}\n{'1 min' if p['t_s'] < 3600 else '2 h'}" for p in steady]
    x = range(len(steady))
    ax.bar([i - 0.2 for i in x], [p["cached_ttft"]["p50_ms"] for p in steady], 0.4, label="TTFT p50")
    ax.bar([i + 0.2 for i in x], [p["cached_ttft"]["p95_ms"] for p in steady], 0.4, label="TTFT p95")
    ax.set_xticks(list(x), labels)
    ax.set(ylabel="ms", title="2 CPU cores, SmolLM2, production bounds: minute 1 vs hour 2")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
