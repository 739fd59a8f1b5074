"""`streamharness eval run/compare` with the built-in baselines (no pipeline)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


def test_an_empty_episode_folder_is_an_error_not_an_empty_result(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = invoke("run", "--episodes", str(tmp_path / "empty"), "--baseline", "silent", "--out", str(tmp_path / "r.json"))
    assert bad.exit_code == 2 and "no episodes in" in bad.output and not (tmp_path / "r.json").exists()


def _table_rows(output: str, title: str) -> dict[str, list[str]]:
    """The rows of the rich table printed under ``title``: scope -> the other cells."""
    rows, inside = {}, False
    for line in output.splitlines():
        inside = inside or title in line
        if inside and line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def test_compare_with_episodes_sets_both_beside_the_chance_baselines(tmp_path):
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(EPISODE))
    for name, extra in (("silent", ()), ("every-k", ("--k", "5"))):
        done = invoke("run", "--episodes", str(episodes), "--baseline", name, *extra, "--out", str(tmp_path / f"{name}.json"))
        assert done.exit_code == 0, done.output

    shown = invoke("compare", str(tmp_path / "silent.json"), str(tmp_path / "every-k.json"), "--episodes", str(episodes))
    assert shown.exit_code == 0, shown.output  # still the regression check: every-k does not regress on silent
    assert "chance baselines (1 episode, random-choice seed 0)" in shown.output
    rows = _table_rows(shown.output, "chance baselines")
    # scope: baseline (silent), candidate (every-k), first-choice, random-choice, mark; only cells with events
    assert set(rows) == {"overall", "proactive/forward", "punctual/present"}
    assert rows["overall"] == ["0.000", "0.870", "0.500", rows["overall"][3], ""]
    # first-choice says "A. five" at the ask: right and in time, which every-k's repeat (an FP) does not beat
    assert rows["punctual/present"][:3] == ["0.000", "0.909", "1.000"] and rows["punctual/present"][4] == "≤ chance"
    assert rows["proactive/forward"] == ["0.000", "0.833", "0.000", "0.000", ""]  # the chance baselines never alert

    regressed = invoke("compare", str(tmp_path / "every-k.json"), str(tmp_path / "silent.json"), "--episodes", str(episodes))
    assert regressed.exit_code == 1 and "chance baselines" in regressed.output
    assert "chance baselines" not in invoke("compare", str(tmp_path / "silent.json"), str(tmp_path / "every-k.json")).output


def test_run_random_choice_baseline_with_a_seed(tmp_path):
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps({**EPISODE, "events": [
        {"type": "question", "event_id": f"q{i}", "ask_at_s": i / 2, "text": "Which?", "window": [i / 2, i / 2 + 1],
         "choices": ["red", "blue", "white"], "answer_index": i % 3, "mode": "punctual", "position": "present"}
        for i in range(20)]}))

    def answers(seed: str, name: str) -> list[str]:
        args = ["--seed", seed] if seed else []
        done = invoke("run", "--episodes", str(episodes), "--baseline", "random-choice", *args,
                      "--out", str(tmp_path / f"{name}.json"), "--runs-out", str(tmp_path / f"{name}.jsonl"))
        assert done.exit_code == 0, done.output
        result = json.loads((tmp_path / f"{name}.json").read_text())
        total = result["total"]
        assert total["tp"] + total["fn"] == 20 and total["fp"] == total["fn"]  # one guess each, in time: a wrong one is FP + FN
        return [r["text"] for r in json.loads((tmp_path / f"{name}.jsonl").read_text())["responses"]]

    one = answers("1", "one")
    assert len(one) == 20 and set(one) <= {"A. red", "B. blue", "C. white"}
    assert answers("1", "again") == one and answers("2", "two") != one and answers("", "default") == answers("0", "zero")
    assert json.loads((tmp_path / "one.json").read_text())["system"] == "baseline:random-choice-seed1"
    first = invoke("run", "--episodes", str(episodes), "--baseline", "first-choice", "--out", str(tmp_path / "first.json"))
    assert first.exit_code == 0 and "baseline:first-choice: SW-F1" in first.output
    assert json.loads((tmp_path / "first.json").read_text())["total"]["tp"] == 7  # answer A: questions 0, 3, ..., 18


# -- `eval score` (saved runs, no replay) and the LLM judge options -------------------------------------
FREE_TEXT = {
    "episode_id": "free", "video": "opencv-doc:vtest.avi", "duration_s": 30, "source": "opencv-doc",
    "events": [
        {"type": "question", "event_id": "q", "ask_at_s": 10, "text": "How many people are in the street?",
         "window": [10, 15], "reference": "About five people are walking in the street.",
         "mode": "punctual", "position": "present"},
        {"type": "question", "event_id": "c", "ask_at_s": 20, "text": "Which colour is the car?", "window": [20, 25],
         "choices": ["red", "white"], "answer_index": 1, "mode": "contextual", "position": "backward"},
    ],
}
NO_JUDGE_ENV = {"SH_EVAL_JUDGE_URL": None, "SH_EVAL_JUDGE_MODEL": None, "SH_EVAL_JUDGE_API_KEY": None}


def invoke(*args: str, env: dict | None = None):
    from typer.testing import CliRunner

    from streamharness.eval.cli import app

    return CliRunner().invoke(app, list(args), env={**NO_JUDGE_ENV, **(env or {})})


def test_score_rescores_saved_runs_with_minilm(tmp_path):
    from streamharness.eval.episode import EpisodeRun, ResponseRecord, save_runs
    from streamharness.text_encoder import default_model_dir, is_exported

    if not is_exported(default_model_dir()):
        pytest.skip("text encoder not exported: run `streamharness dev text-encoder export`")
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(FREE_TEXT))
    runs = save_runs([EpisodeRun(episode_id="free", system="saved-sys", responses=[
        ResponseRecord(event_id="q", media_ts_s=12.0, text="There are 5 people in the street.", ttft_ms=40.0, e2e_ms=90.0),
        ResponseRecord(event_id="c", media_ts_s=21.0, text="B"),
        ResponseRecord(event_id="c", media_ts_s=28.0, text="white"),  # late: FP
    ])], tmp_path / "runs.jsonl")

    done = invoke("score", "--episodes", str(episodes), "--runs", str(runs), "--out", str(tmp_path / "r.json"),
                  "--report", str(tmp_path / "r.html"))
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["system"] == "saved-sys" and result["matcher"] == "choice=exact; free_text=minilm>=0.5"
    assert (result["total"]["tp"], result["total"]["fp"], result["total"]["fn"]) == (2, 1, 0)
    assert result["ttft_ms"]["count"] == 1
    assert "saved-sys: SW-F1" in done.output and (tmp_path / "r.html").read_text().startswith("<!")

    # the same saved runs, a stricter threshold: the paraphrase no longer matches (FP + FN), no replay
    strict = invoke("score", "--episodes", str(episodes), "--runs", str(runs), "--threshold", "0.95",
                    "--system", "strict", "--out", str(tmp_path / "strict.json"))
    assert strict.exit_code == 0, strict.output
    result = json.loads((tmp_path / "strict.json").read_text())
    assert result["system"] == "strict" and result["matcher"].endswith("minilm>=0.95")
    assert (result["total"]["tp"], result["total"]["fp"], result["total"]["fn"]) == (1, 2, 1)


def test_score_gives_the_same_result_as_run_on_its_saved_runs(tmp_path):
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(EPISODE))
    ran = invoke("run", "--episodes", str(episodes), "--baseline", "every-k", "--k", "5", "--out", str(tmp_path / "run.json"),
                 "--runs-out", str(tmp_path / "runs.jsonl"))
    assert ran.exit_code == 0, ran.output
    scored = invoke("score", "--episodes", str(episodes), "--runs", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "score.json"))
    assert scored.exit_code == 0, scored.output
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("run.json", "score.json"))
    assert a["total"] == b["total"] and a["cells"] == b["cells"] and a["system"] == b["system"] == "baseline:every-k-5"


def test_score_rejects_runs_that_fit_no_episode(tmp_path):
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(EPISODE))
    (tmp_path / "runs.jsonl").write_text(json.dumps({"episode_id": "elsewhere", "system": "s", "responses": []}) + "\n")
    other = invoke("score", "--episodes", str(episodes), "--runs", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "r.json"))
    assert other.exit_code == 1 and "runs of episodes not in the set: ['elsewhere']" in other.output
    (tmp_path / "runs.jsonl").write_text('{"episode_id": "cli", "system": "s", "responses": [{"media_ts_s": -1}]}\n')
    broken = invoke("score", "--episodes", str(episodes), "--runs", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "r.json"))
    assert broken.exit_code == 2 and "runs.jsonl:1" in broken.output and "media_ts_s" in broken.output
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("command", ["run", "score"])
def test_judge_options_are_validated_before_any_work(tmp_path, command):
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(EPISODE))
    (tmp_path / "runs.jsonl").write_text("")
    args = ["--episodes", str(episodes), "--out", str(tmp_path / "r.json")]
    args += ["--baseline", "silent"] if command == "run" else ["--runs", str(tmp_path / "runs.jsonl")]

    no_model = invoke(command, *args, "--judge-url", "http://127.0.0.1:9/v1")
    assert no_model.exit_code == 2 and "--judge-url needs the model to ask" in no_model.output
    from_env = invoke(command, *args, env={"SH_EVAL_JUDGE_URL": "http://127.0.0.1:9/v1"})
    assert from_env.exit_code == 2 and "--judge-model" in from_env.output
    no_url = invoke(command, *args, "--judge-model", "smollm2")
    assert no_url.exit_code == 2 and "--judge-model needs the judge's endpoint" in no_url.output
    not_http = invoke(command, *args, "--judge-url", "127.0.0.1:8080", "--judge-model", "smollm2")
    assert not_http.exit_code == 2 and "not an http(s) URL" in not_http.output
    assert not (tmp_path / "r.json").exists()


def test_an_unreachable_judge_is_one_clear_error_line(tmp_path):
    episodes = tmp_path / "episodes.json"
    episodes.write_text(json.dumps(FREE_TEXT))
    (tmp_path / "runs.jsonl").write_text(json.dumps({"episode_id": "free", "system": "s", "responses": [
        {"event_id": "q", "media_ts_s": 12.0, "text": "five people"}]}) + "\n")
    port = _closed_port()
    failed = invoke("score", "--episodes", str(episodes), "--runs", str(tmp_path / "runs.jsonl"), "--out", str(tmp_path / "r.json"),
                    env={"SH_EVAL_JUDGE_URL": f"http://127.0.0.1:{port}/v1", "SH_EVAL_JUDGE_MODEL": "judge-m"})
    assert failed.exit_code == 1, failed.output
    assert f"error: cannot reach the LLM judge at http://127.0.0.1:{port}/v1/chat/completions (model 'judge-m')" in failed.output
    assert "gave up after 3 attempts" in failed.output and "Traceback" not in failed.output
    assert not (tmp_path / "r.json").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends: nothing listens there
