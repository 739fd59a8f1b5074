"""A self-contained HTML report of a Streaming-Eval result (one file, no external URLs).

Sections: overall SW-F1 and counts; the 3 × 3 mode × position table (heatmap + table with
TP/FP/FN); latency distributions (TTFT and end-to-end histograms, p50/p95/p99) and response delays;
a timeline per episode (ground-truth windows as bars, responses as marks: TP green, FP red; missed
windows outlined red); and, given a baseline, the regression table of :func:`~streamharness.eval.scoring.compare`.
Plots are matplotlib figures (Agg backend) inlined as SVG.

    python -m streamharness.eval.report result.json -o report.html [--baseline base.json]
"""

from __future__ import annotations

import argparse
import html
import io
import sys
from collections.abc import Sequence
from pathlib import Path

from streamharness.eval.episode import MODES, POSITIONS
from streamharness.eval.scoring import ComparisonRow, EpisodeScore, RunScore, compare, load_result

PROGRESS_MIN_EPISODES = 10  # show a rich progress bar from this many episodes on (progress=None)
_TP, _FP, _FN, _WINDOW = "#2e7d32", "#c62828", "#c62828", "#90caf9"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#212121}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f5f5f5} td.l,th.l{text-align:left} .big{font-size:40px;font-weight:600}
.muted{color:#757575} tr.regression td{background:#ffebee;color:#b71c1c;font-weight:600}
.plot svg{max-width:100%;height:auto} .episode{margin:16px 0} .kpi{display:inline-block;margin-right:32px}
"""


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline SVG in HTML5


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable
    import matplotlib.pyplot as plt

    return plt


# -- plots ----------------------------------------------------------------------------------------------
def heatmap_svg(score: RunScore, title: str = "SW-F1 by mode × position") -> str:
    import numpy as np

    plt = _pyplot()
    grid = np.full((len(MODES), len(POSITIONS)), np.nan)
    for i, m in enumerate(MODES):
        for j, p in enumerate(POSITIONS):
            v = score.cell(m, p).sw_f1
            grid[i, j] = np.nan if v is None else v
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#e0e0e0")
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(range(len(POSITIONS)), POSITIONS)
    ax.set_yticks(range(len(MODES)), MODES)
    for i, m in enumerate(MODES):
        for j, p in enumerate(POSITIONS):
            c = score.cell(m, p)
            ax.text(j, i, f"{_fmt(c.sw_f1, 2)}\n{c.tp}/{c.fp}/{c.fn}", ha="center", va="center", fontsize=9)
    ax.set_title(title + "\n(TP/FP/FN)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _svg(fig)


def latency_svg(score: RunScore) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    samples = [("TTFT (ms)", score.ttft_samples_ms, score.ttft_ms), ("end-to-end (ms)", score.e2e_samples_ms, score.e2e_ms),
               ("response delay after window start (s)", [d for e in score.episodes for d in e.delays_s],
                score.response_delay_s)]
    for ax, (label, values, stats) in zip(axes, samples):
        if values:
            ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="#5c6bc0")
            for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
                ax.axvline(getattr(stats, q), color="#212121", linestyle=style, linewidth=1, label=f"{q} {getattr(stats, q):.1f}")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("responses")
    fig.tight_layout()
    return _svg(fig)


MAX_EVENT_ROWS = 40  # more events than this (long episodes): one timeline row per mode × position cell


def timeline_svg(episode: EpisodeScore) -> str:
    plt = _pyplot()
    by_cell = len(episode.events) > MAX_EVENT_ROWS
    row_of = {e.event_id: (f"{e.mode} × {e.position}" if by_cell else e.event_id) for e in episode.events}
    rows = list(dict.fromkeys(row_of[e.event_id] for e in episode.events))
    if by_cell:
        rows.sort(key=lambda r: (MODES.index(r.split(" × ")[0]), POSITIONS.index(r.split(" × ")[1])))
    unsolicited = [o for o in episode.outcomes if o.event_id not in row_of]
    if unsolicited:
        rows.append("(no event)")
    index = {r: i for i, r in enumerate(rows)}
    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.45 * max(1, len(rows))))
    missed = {(o.event_id, tuple(o.window)) for o in episode.outcomes if o.kind == "fn" and o.window}
    for e in episode.events:
        y = index[row_of[e.event_id]]
        for w in e.windows:
            miss = (e.event_id, tuple(w)) in missed
            ax.broken_barh([(w[0], max(w[1] - w[0], episode.duration_s / 500))], (y - 0.3, 0.6), facecolors=_WINDOW,
                           edgecolors=_FN if miss else "#1565c0", linewidth=1.5 if miss else 0.5)
        ax.plot([e.at_s], [y], marker="|", color="#424242", markersize=14)
    for o in episode.outcomes:
        if o.kind == "fn" or o.media_ts_s is None:
            continue
        y = index[row_of.get(o.event_id, "(no event)")]
        ax.plot([o.media_ts_s], [y], marker="o" if o.kind == "tp" else "x", color=_TP if o.kind == "tp" else _FP,
                markersize=7, linestyle="none")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlim(0, episode.duration_s)
    ax.invert_yaxis()
    ax.set_xlabel("media time (s)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _svg(fig)


def comparison_svg(rows: Sequence[ComparisonRow], a_name: str, b_name: str) -> str:
    import numpy as np

    plt = _pyplot()
    f1 = [r for r in rows if r.metric == "sw_f1"]
    x = np.arange(len(f1))
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.bar(x - 0.2, [r.a if r.a is not None else 0 for r in f1], 0.4, label=a_name, color="#90a4ae")
    ax.bar(x + 0.2, [r.b if r.b is not None else 0 for r in f1], 0.4, label=b_name,
           color=[_FP if r.regression else "#5c6bc0" for r in f1])
    ax.set_xticks(x, [r.scope for r in f1], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("SW-F1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _svg(fig)


# -- HTML ----------------------------------------------------------------------------------------------
def _cell_table(score: RunScore) -> str:
    out = ['<table class="cells"><tr><th class="l">mode</th><th class="l">position</th><th>events</th><th>TP</th>'
           '<th>FP</th><th>FN</th><th>SW-F1</th><th>mean delay (s)</th></tr>']
    for c in [*score.cells, score.total]:
        out.append(f'<tr data-cell="{c.mode}/{c.position}"><td class="l">{c.mode}</td><td class="l">{c.position}</td>'
                   f"<td>{c.events}</td><td>{c.tp}</td><td>{c.fp}</td><td>{c.fn}</td><td>{_fmt(c.sw_f1)}</td>"
                   f"<td>{_fmt(c.delay_s.mean, 2)}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _latency_table(score: RunScore) -> str:
    out = ["<table><tr><th class='l'>metric</th><th>n</th><th>mean</th><th>p50</th><th>p95</th><th>p99</th><th>max</th></tr>"]
    for name, s in (("TTFT (ms)", score.ttft_ms), ("end-to-end (ms)", score.e2e_ms), ("response delay (s)", score.response_delay_s)):
        out.append(f"<tr><td class='l'>{name}</td><td>{s.count}</td>" + "".join(
            f"<td>{_fmt(getattr(s, k), 1)}</td>" for k in ("mean", "p50", "p95", "p99", "max")) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _comparison_table(rows: Sequence[ComparisonRow], a_name: str, b_name: str) -> str:
    out = [f"<table class='comparison'><tr><th class='l'>scope</th><th class='l'>metric</th><th>{html.escape(a_name)}</th>"
           f"<th>{html.escape(b_name)}</th><th>delta</th><th class='l'>verdict</th></tr>"]
    for r in rows:
        digits = 3 if r.metric == "sw_f1" else 1
        verdict = "REGRESSION" if r.regression else ("n/a" if r.delta is None else "ok")
        out.append(f"<tr class='{'regression' if r.regression else ''}'><td class='l'>{html.escape(r.scope)}</td>"
                   f"<td class='l'>{r.metric}</td><td>{_fmt(r.a, digits)}</td><td>{_fmt(r.b, digits)}</td>"
                   f"<td>{'n/a' if r.delta is None else f'{r.delta:+.{digits}f}'}</td><td class='l'>{verdict}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _episode_section(e: EpisodeScore, svg: str) -> str:
    outcomes = "".join(
        f"<tr><td>{_fmt(o.media_ts_s, 1) if o.media_ts_s is not None else '—'}</td><td class='l'>{html.escape(o.event_id or '—')}</td>"
        f"<td class='l' style='color:{_TP if o.kind == 'tp' else _FP}'>{o.kind.upper()}</td><td class='l'>{html.escape(o.reason)}</td>"
        f"<td class='l'>{html.escape(o.text[:160])}</td></tr>" for o in e.outcomes)
    return (f"<div class='episode' id='ep-{html.escape(e.episode_id)}'><h3>{html.escape(e.episode_id)} "
            f"<span class='muted'>({html.escape(e.source)}, {e.duration_s:.0f} s{'' if e.ran else ', no run'})</span></h3>"
            f"<p>SW-F1 {_fmt(e.total.sw_f1)} · TP {e.total.tp} · FP {e.total.fp} · FN {e.total.fn}</p>"
            f"<div class='plot'>{svg}</div><details><summary>judgements ({len(e.outcomes)})</summary>"
            f"<table><tr><th>t (s)</th><th class='l'>event</th><th class='l'>verdict</th><th class='l'>why</th>"
            f"<th class='l'>response</th></tr>{outcomes}</table></details></div>")


def render_report(score: RunScore, *, baseline: RunScore | None = None, title: str | None = None,
                  progress: bool | None = None, tolerance: float = 0.02) -> str:
    """The report as one HTML string. ``baseline``: add the regression table of ``score`` against it.
    ``progress``: a rich progress bar over the episode timelines (default: from
    ``PROGRESS_MIN_EPISODES`` episodes on)."""
    title = title or f"Streaming-Eval: {score.system}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='muted'>system {html.escape(score.system)} · matcher {html.escape(score.matcher)} · "
             f"{len(score.episodes)} episodes · SW-F1 = 2TP / (2TP + 0.2FP + 2FN), answers count only inside their windows</p>",
             "<h2>Overall</h2>",
             f"<div class='kpi'><div class='muted'>SW-F1</div><div class='big' id='overall-sw-f1'>{_fmt(score.total.sw_f1)}</div></div>",
             f"<div class='kpi'>TP {score.total.tp} · FP {score.total.fp} (unsolicited {score.unattributed_fp}) · FN {score.total.fn}</div>",
             "<h2>Mode × position</h2>", f"<div class='plot'>{heatmap_svg(score)}</div>", _cell_table(score),
             "<h2>Latency and response time</h2>", f"<div class='plot'>{latency_svg(score)}</div>", _latency_table(score)]
    if baseline is not None:
        rows = compare(baseline, score, tolerance=tolerance)
        n = sum(r.regression for r in rows)
        parts += [f"<h2 id='comparison'>Comparison: {html.escape(baseline.system)} → {html.escape(score.system)}</h2>",
                  f"<p>{n} regression{'s' if n != 1 else ''} (SW-F1 drop &gt; {tolerance:g}, p95 latency up &gt; 10%)</p>",
                  f"<div class='plot'>{comparison_svg(rows, baseline.system, score.system)}</div>",
                  _comparison_table(rows, baseline.system, score.system)]
    parts.append("<h2>Episodes</h2><p class='muted'>bars: ground-truth windows (outlined red: missed); "
                 "| ask time; ● TP; ✕ FP</p>")
    show = len(score.episodes) >= PROGRESS_MIN_EPISODES if progress is None else progress
    if show:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("episode timelines", total=len(score.episodes))
            for e in score.episodes:
                parts.append(_episode_section(e, timeline_svg(e)))
                bar.advance(task)
    else:
        parts.extend(_episode_section(e, timeline_svg(e)) for e in score.episodes)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: Path | str, score: RunScore, *, baseline: RunScore | None = None, title: str | None = None,
                 progress: bool | None = None) -> Path:
    """Write :func:`render_report` to ``path`` and return it."""
    path = Path(path)
    path.write_text(render_report(score, baseline=baseline, title=title, progress=progress), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamharness.eval.report", description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="JSON result (streamharness.eval.scoring.save_result)")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"))
    parser.add_argument("--baseline", type=Path, help="a second result to compare against (the regression table)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when the comparison flags a regression")
    args = parser.parse_args(argv)
    score = load_result(args.result)
    baseline = load_result(args.baseline) if args.baseline else None
    write_report(args.output, score, baseline=baseline)
    print(f"wrote {args.output}")
    if baseline is not None and args.fail_on_regression and any(r.regression for r in compare(baseline, score)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
