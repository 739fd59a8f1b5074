"""`streamharness eval run/compare` with the built-in baselines (no pipeline)."""

from __future__ import annotations

import json
import subprocess
import sys

EPISODE = {
    "episode_id": "cli", "video": "opencv-doc:vtest.avi", "duration_s": 12, "source": "opencv-doc",
    "events": [
        {"type": "question", "event_id": "q", "ask_at_s": 4, "text": "How many people?", "window": [4, 6],
         "choices": ["five", "none"], "answer_index": 0, "mode": "punctual", "position": "present"},
        {"type": "instruction", "event_id": "i", "given_at_s": 0, "text": "tell me when someone walks in",
         "windows": [[0, 2]], "mode": "proactive", "position": "forward"},
    ],
}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamharness.cli", "eval", *args], capture_output=True, text=True, timeout=300)


def test_baselines_score_and_compare(tmp_path):
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(EPISODE))
    every = cli("run", "--episodes", str(episodes), "--baseline", "every-k", "--k", "5", "--out", str(tmp_path / "k.json"),
                "--report", str(tmp_path / "k.html"))
    assert every.returncode == 0, every.stdout + every.stderr
    silent = cli("run", "--episodes", str(episodes), "--baseline", "silent", "--out", str(tmp_path / "s.json"))
    assert silent.returncode == 0, silent.stderr

    k_result = json.loads((tmp_path / "k.json").read_text())
    s_result = json.loads((tmp_path / "s.json").read_text())
    # every 5 s: t=0 fires the instruction inside [0, 2] (TP), t=5 answers "five" inside [4, 6] (TP);
    # t=5 and t=10 alerts and the t=10 answer fall outside their windows (3 FP).
    assert (k_result["total"]["tp"], k_result["total"]["fp"], k_result["total"]["fn"]) == (2, 3, 0)
    assert (s_result["total"]["tp"], s_result["total"]["fn"]) == (0, 2)
    assert (tmp_path / "k.html").read_text().count("<svg") + (tmp_path / "k.html").read_text().count("data:image/png") >= 2

    regressed = cli("compare", str(tmp_path / "k.json"), str(tmp_path / "s.json"))
    assert regressed.returncode == 1 and "regression" in regressed.stdout
    same = cli("compare", str(tmp_path / "k.json"), str(tmp_path / "k.json"))
    assert same.returncode == 0, same.stdout


def test_exactly_one_system(tmp_path):
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(EPISODE))
    bad = cli("run", "--episodes", str(episodes))
    assert bad.returncode == 2 and "exactly one of" in bad.stderr
