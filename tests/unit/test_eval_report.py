"""The Streaming-Eval HTML report: one self-contained file with its plots, rendered by headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamharness.eval.episode import EpisodeRun, ResponseRecord, parse_episode
from streamharness.eval.report import main, render_report, write_report
from streamharness.eval.scoring import AnswerMatcher, save_result, score_run


class ExactMatcher:
    name = "exact"

    def matches(self, question: str, reference: str, response: str) -> bool:
        return response.strip().lower() == reference.strip().lower()


def _score(system: str, late: bool):
    ep = parse_episode({
        "episode_id": "street", "video": "vtest.avi", "duration_s": 80.0, "source": "opencv-doc",
        "events": [
            {"type": "question", "event_id": "q1", "ask_at_s": 20.0, "text": "How many people?", "window": [20.0, 25.0],
             "reference": "five", "mode": "punctual", "position": "present"},
            {"type": "question", "event_id": "q2", "ask_at_s": 30.0, "text": "Colour of the car?", "window": [30.0, 35.0],
             "choices": ["red", "blue", "white"], "answer_index": 2, "mode": "contextual", "position": "backward"},
            {"type": "instruction", "event_id": "i1", "given_at_s": 0.0, "text": "tell me when someone walks in",
             "windows": [[3.0, 8.0], [41.0, 46.0]], "mode": "proactive", "position": "forward"},
        ]})
    responses = [("q1", 21.0, "five", 180.0, 650.0), ("q1", 23.0, "five", 170.0, 600.0),
                 ("q2", 40.0 if late else 31.0, "C", 210.0, 700.0), ("i1", 5.0, "someone walked in", 150.0, 500.0),
                 (None, 60.0, "nice weather", 160.0, 520.0)]
    run = EpisodeRun(episode_id="street", system=system, responses=[
        ResponseRecord(event_id=e, media_ts_s=t, text=x, ttft_ms=a, e2e_ms=b) for e, t, x, a, b in responses])
    return score_run([ep], [run], AnswerMatcher(ExactMatcher()))


def test_report_is_self_contained_with_plots_and_cell_values(tmp_path: Path) -> None:
    base, cand = _score("baseline", late=False), _score("candidate", late=True)
    page = render_report(cand, baseline=base)
    assert page.count("<svg") == 4  # heatmap, latency, comparison, one timeline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from outside
    # punctual/present: TP + duplicate FP -> 2/(2+0.2) = 0.909; contextual/backward late: FP+FN -> 0.000
    assert re.search(r'data-cell="punctual/present">.*?<td>1</td><td>1</td><td>0</td><td>0.909</td>', page)
    assert re.search(r'data-cell="contextual/backward">.*?<td>0</td><td>1</td><td>1</td><td>0.000</td>', page)
    assert re.search(r"<tr class='regression'><td class='l'>contextual/backward</td>", page)
    assert "REGRESSION" in page and "Comparison: baseline → candidate" in page
    assert "REGRESSION" not in render_report(base)


@pytest.mark.integration  # starts a browser (a few seconds)
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    base, cand = _score("baseline", late=False), _score("candidate", late=True)
    assert main([str(save_result(cand, tmp_path / "cand.json")), "--baseline", str(save_result(base, tmp_path / "base.json")),
                 "-o", str(tmp_path / "report.html"), "--fail-on-regression"]) == 1
    report = tmp_path / "report.html"
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
                    report.as_uri()], check=True, timeout=120, capture_output=True)
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 20  # not a blank page
    # the heatmap drew: its green (SW-F1 1.0 cell) and red (0.0 cell) are on screen
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((g > 120) & (g - r > 60) & (g - b > 60)).sum() > 500
    assert ((r > 150) & (r - g > 80) & (r - b > 80)).sum() > 500


def test_write_report_without_baseline_has_no_comparison(tmp_path: Path) -> None:
    path = write_report(tmp_path / "r.html", _score("s", late=False), progress=True)
    page = path.read_text()
    assert "id='comparison'" not in page and page.count("<svg") == 3
    # TP 3 (q1, q2, first window of i1), FP 2 (q1 repeat, unsolicited), FN 1 (second window): 6 / 8.4
    assert "id='overall-sw-f1'>0.714<" in page


def test_a_long_episode_gets_one_timeline_row_per_cell() -> None:
    from streamharness.eval.episodes_builtin import plan_synthetic
    from streamharness.eval.report import MAX_EVENT_ROWS, timeline_svg
    from streamharness.eval.runner import run_baseline
    from streamharness.eval.scoring import score_run

    _, ep = plan_synthetic(3600, seed=1)
    assert len(ep.events) > MAX_EVENT_ROWS
    score = score_run([ep], [run_baseline(ep, "every-k", k=30)])
    svg = timeline_svg(score.episodes[0])
    assert svg.count("× ") >= 9 and "punctual × backward" in svg and "contextual × forward" in svg
    assert "b0-shape-now" not in svg  # event ids are not rows any more
    short = score_run([ep.model_copy(update={"events": ep.events[:5]})], [run_baseline(ep, "silent")])
    assert ep.events[0].event_id in timeline_svg(short.episodes[0])
