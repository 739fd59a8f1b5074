"""The Streaming-Eval LLM judge (``OpenAICompatibleJudge``) against the project's own OpenAI-compatible
server: SmolLM2-135M behind KServe (the ``generator_server`` fixture, a real subprocess on 127.0.0.1).

SmolLM2-135M is a weak judge (greedy, it says "No" to nearly everything, right paraphrases
included), so these tests pin the plumbing (request, reply, verdict parsing, cache, errors, CLI),
never whether a verdict is right. The one verdict asserted is "no" to an answer about something
else entirely, checked stable on the real server first (greedy: "No." every time)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

from streamharness.eval.episode import EpisodeRun, ResponseRecord, parse_episode, save_runs
from streamharness.eval.scoring import AnswerMatcher, JudgeError, OpenAICompatibleJudge, score_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "smollm2"
QUESTION = "How many people are in the street?"
REFERENCE = "About five people are walking in the street."
EPISODE = {
    "episode_id": "judged", "video": "opencv-doc:vtest.avi", "duration_s": 30, "source": "opencv-doc",
    "events": [{"type": "question", "event_id": "q", "ask_at_s": 10, "text": QUESTION, "window": [10, 15],
                "reference": REFERENCE, "mode": "punctual", "position": "present"}],
}
RESPONSES = [
    ResponseRecord(event_id="q", media_ts_s=12.0, text="There are five people walking in the street."),  # in the window
    ResponseRecord(event_id="q", media_ts_s=20.0, text="Five people."),  # late: an FP without asking the judge
]


class CountingJudge(OpenAICompatibleJudge):
    """The real judge on a client that counts the requests that reach the server."""

    def __init__(self, base_url: str, model: str = MODEL, **kw) -> None:
        self.posted: list[str] = []
        client = httpx.Client(timeout=120, event_hooks={"request": [lambda request: self.posted.append(str(request.url))]})
        super().__init__(base_url, model, client=client, **kw)


def test_the_judge_asks_the_real_server_and_returns_a_bool(generator_server) -> None:
    judge = CountingJudge(generator_server.base_url)
    wrong = "A red cup is on the table."
    raw = judge.ask(QUESTION, REFERENCE, wrong)
    assert isinstance(raw, str) and raw.strip(), raw  # the model's own words, a few tokens
    assert judge.posted == [f"{generator_server.base_url}/chat/completions"]
    assert judge.ask(QUESTION, REFERENCE, wrong) == raw  # greedy: the same reply again
    verdict = judge.matches(QUESTION, REFERENCE, wrong)
    assert verdict is OpenAICompatibleJudge.parse_verdict(raw) is False, raw
    assert judge.matches(QUESTION, REFERENCE, wrong) is False and len(judge.posted) == 3  # cached: not asked again


def test_scoring_an_episode_with_the_judge(generator_server) -> None:
    judge = CountingJudge(generator_server.base_url)
    episode = parse_episode(EPISODE)
    run = EpisodeRun(episode_id="judged", system="sys", responses=RESPONSES)

    result = score_run([episode], [run], AnswerMatcher(judge))
    assert result.matcher == f"choice=exact; free_text=llm-judge:{MODEL}"
    assert len(judge.posted) == 1  # only the answer inside the window is judged
    verdict = judge.matches(QUESTION, REFERENCE, RESPONSES[0].text)  # from the cache
    in_window = [o for o in result.episodes[0].outcomes if o.media_ts_s == 12.0]
    assert [(o.kind, o.reason) for o in in_window] == (
        [("tp", "in window, matches")] if verdict else [("fp", "in window, does not match")])
    late = [o for o in result.episodes[0].outcomes if o.media_ts_s == 20.0]
    assert [(o.kind, o.reason) for o in late] == [("fp", "after window")]
    assert (result.total.tp, result.total.fp, result.total.fn) == ((1, 1, 0) if verdict else (0, 2, 1))

    again = score_run([episode], [run], AnswerMatcher(judge))  # re-scoring asks nothing new
    assert len(judge.posted) == 1 and again.total == result.total


def test_an_unknown_model_is_a_clear_error(generator_server) -> None:
    judge = CountingJudge(generator_server.base_url, "gpt-9")
    with pytest.raises(JudgeError) as info:
        judge.matches(QUESTION, REFERENCE, "five")
    message = str(info.value)
    assert f"{generator_server.base_url}/chat/completions (model 'gpt-9')" in message
    assert "HTTP 404: model 'gpt-9' does not exist; this server serves 'smollm2'" in message  # the server's words
    assert len(judge.posted) == 1  # a rejected request is not retried


def test_a_wrong_base_url_is_a_clear_error(generator_server) -> None:
    judge = CountingJudge(generator_server.root)  # without /openai/v1
    with pytest.raises(JudgeError, match=r"rejected the request: HTTP 404.*the URL is the API base") as info:
        judge.matches(QUESTION, REFERENCE, "five")
    assert f"{generator_server.root}/chat/completions" in str(info.value)


def test_an_unreachable_endpoint_is_retried_then_a_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    judge = CountingJudge(f"http://127.0.0.1:{port}/openai/v1", retry_wait_s=0.01)
    with pytest.raises(JudgeError, match=rf"cannot reach the LLM judge at http://127\.0\.0\.1:{port}/openai/v1/chat/completions "
                                         r"\(model 'smollm2'\).*gave up after 3 attempts"):
        judge.matches(QUESTION, REFERENCE, "five")
    assert len(judge.posted) == 3


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SH_EVAL_JUDGE_")}
    return subprocess.run([sys.executable, "-m", "streamharness.cli", "eval", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_scores_saved_runs_with_the_judge(generator_server, tmp_path) -> None:
    (tmp_path / "episodes.json").write_text(json.dumps(EPISODE))
    save_runs([EpisodeRun(episode_id="judged", system="saved", responses=RESPONSES)], tmp_path / "runs.jsonl")
    common = ["score", "--episodes", str(tmp_path / "episodes.json"), "--runs", str(tmp_path / "runs.jsonl"),
              "--judge-url", generator_server.base_url]

    done = cli(*common, "--judge-model", MODEL, "--out", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["matcher"] == f"choice=exact; free_text=llm-judge:{MODEL}"
    judged = [o for o in result["episodes"][0]["outcomes"] if o["media_ts_s"] == 12.0]
    assert [o["reason"] for o in judged] in (["in window, matches"], ["in window, does not match"])
    assert f"llm-judge:{MODEL}" in done.stdout

    unknown = cli(*common, "--judge-model", "gpt-9", "--out", str(tmp_path / "bad.json"))
    assert unknown.returncode == 1, unknown.stdout + unknown.stderr
    assert "error: LLM judge at" in unknown.stderr and "model 'gpt-9' does not exist" in unknown.stderr
    assert "Traceback" not in unknown.stderr and not (tmp_path / "bad.json").exists()
