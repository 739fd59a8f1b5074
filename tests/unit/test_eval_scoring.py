"""Streaming-Eval scoring on hand-computed cases: SW-F1 = 2TP / (2TP + 0.2FP + 2FN), answers count
only inside their windows (rules in ``streamharness.eval.scoring``)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from streamharness.eval.episode import (
    Episode,
    EpisodeFormatError,
    EpisodeRun,
    ResponseRecord,
    load_episode,
    load_episodes,
    parse_episode,
    save_episode,
    save_episodes,
)
from streamharness.eval.scoring import (
    AnswerMatcher,
    JudgeError,
    MiniLMMatcher,
    OpenAICompatibleJudge,
    compare,
    has_regression,
    load_result,
    pick_choice,
    save_result,
    score_episode,
    score_run,
    sw_f1,
)
from streamharness.text_encoder import default_model_dir, is_exported


class ExactMatcher:
    """Free text matches when equal ignoring case: keeps the window rules apart from MiniLM."""

    name = "exact"

    def matches(self, question: str, reference: str, response: str) -> bool:
        return response.strip().lower() == reference.strip().lower()


EXACT = AnswerMatcher(ExactMatcher())


def question(event_id: str = "q1", window=(20.0, 25.0), mode="punctual", position="present", **kw) -> dict:
    base = {"type": "question", "event_id": event_id, "ask_at_s": window[0], "text": "How many people?",
            "window": list(window), "mode": mode, "position": position}
    if "choices" not in kw:
        base["reference"] = "five"
    base.update(kw)
    return base


def episode(*events: dict, duration_s: float = 100.0, episode_id: str = "ep1") -> Episode:
    return parse_episode({"episode_id": episode_id, "video": "vtest.avi", "duration_s": duration_s,
                          "source": "synthetic", "events": list(events)})


def run(*responses: tuple, episode_id: str = "ep1", system: str = "sys") -> EpisodeRun:
    return EpisodeRun(episode_id=episode_id, system=system, responses=[
        ResponseRecord(event_id=r[0], media_ts_s=r[1], text=r[2] if len(r) > 2 else "five",
                       ttft_ms=r[3] if len(r) > 3 else None, e2e_ms=r[4] if len(r) > 4 else None)
        for r in responses])


def counts(score) -> tuple[int, int, int]:
    return score.total.tp, score.total.fp, score.total.fn


# -- the metric ---------------------------------------------------------------------------------------
def test_sw_f1_formula_and_empty_score_is_undefined() -> None:
    assert sw_f1(1, 0, 0) == 1.0
    assert sw_f1(1, 1, 1) == pytest.approx(2 / 4.2)
    assert sw_f1(0, 5, 0) == 0.0
    assert sw_f1(0, 0, 0) is None


def test_answer_inside_window_is_tp() -> None:
    s = score_episode(episode(question()), run(("q1", 22.0)), EXACT)
    assert counts(s) == (1, 0, 0) and s.total.sw_f1 == 1.0
    assert s.delays_s == [2.0]


@pytest.mark.parametrize("t, reason", [(19.0, "before window"), (26.0, "after window")])
def test_early_or_late_answer_is_fp_and_fn(t: float, reason: str) -> None:
    s = score_episode(episode(question()), run(("q1", t)), EXACT)
    assert counts(s) == (0, 1, 1)
    assert s.total.sw_f1 == 0.0
    assert [o.reason for o in s.outcomes if o.kind == "fp"] == [reason]


def test_window_ends_are_inside() -> None:
    s = score_episode(episode(question("a"), question("b")), run(("a", 20.0), ("b", 25.0)), EXACT)
    assert counts(s) == (2, 0, 0)


def test_duplicate_answers_first_matching_is_tp_rest_fp() -> None:
    # wrong answer in window (FP), then the right one (TP), then a repeat (FP)
    s = score_episode(episode(question()), run(("q1", 24.0, "five"), ("q1", 21.0, "three"), ("q1", 23.0, "five")), EXACT)
    assert counts(s) == (1, 2, 0)
    assert s.total.sw_f1 == pytest.approx(2 / 2.4)
    assert s.delays_s == [3.0]  # the TP is the one at 23 s (responses are judged in media-time order)
    assert sorted(o.reason for o in s.outcomes) == ["duplicate in window", "in window, does not match", "in window, matches"]


def test_silence_where_nothing_is_expected_costs_nothing() -> None:
    s = score_episode(episode(), run(), EXACT)
    assert counts(s) == (0, 0, 0) and s.total.sw_f1 is None
    # speaking where nothing is expected is an FP without a cell
    s = score_episode(episode(), run((None, 5.0, "hello")), EXACT)
    assert counts(s) == (0, 1, 0) and s.unattributed_fp == 1 and s.total.sw_f1 == 0.0
    assert all(c.fp == 0 for c in s.cells)


def test_no_run_and_unknown_event_ids() -> None:
    s = score_episode(episode(question()), None, EXACT)
    assert counts(s) == (0, 0, 1) and not s.ran
    s = score_episode(episode(question()), run(("nope", 22.0)), EXACT)
    assert counts(s) == (0, 1, 1) and s.unattributed_fp == 1


def test_proactive_instruction_two_windows_three_responses() -> None:
    instr = {"type": "instruction", "event_id": "i1", "given_at_s": 0.0, "text": "tell me when someone walks in",
             "windows": [[10.0, 15.0], [40.0, 45.0]], "mode": "proactive", "position": "forward"}
    # 12 s: TP (window 1); 13 s: second in window 1 -> FP; 30 s: outside both -> FP; window 2 -> FN
    s = score_episode(episode(instr), run(("i1", 12.0, "someone walked in"), ("i1", 13.0, "again"), ("i1", 30.0, "x")), EXACT)
    assert counts(s) == (1, 2, 1)
    assert s.total.sw_f1 == pytest.approx(2 / (2 + 0.4 + 2))
    assert s.cell("proactive", "forward").tp == 1
    # hit both windows; an empty alert does not count
    s = score_episode(episode(instr), run(("i1", 10.0, "in"), ("i1", 41.0, ""), ("i1", 44.0, "in")), EXACT)
    assert counts(s) == (2, 1, 0)
    assert s.delays_s == [0.0, 4.0]


def test_alert_with_reference_goes_through_the_matcher() -> None:
    instr = {"type": "instruction", "event_id": "i1", "given_at_s": 0.0, "text": "tell me when the bus comes",
             "windows": [[10.0, 15.0]], "reference": "the bus is here", "mode": "proactive", "position": "forward"}
    assert counts(score_episode(episode(instr), run(("i1", 11.0, "a dog")), EXACT)) == (0, 1, 1)
    assert counts(score_episode(episode(instr), run(("i1", 11.0, "The bus is here")), EXACT)) == (1, 0, 0)


# -- multiple choice ---------------------------------------------------------------------------------
CHOICES = ["red", "blue", "white", "red car"]


@pytest.mark.parametrize("response, pick", [
    ("C", 2), ("(C)", 2), ("C.", 2), ("C) white", 2), ("The answer is C.", 2), ("answer: C", 2), ("Option C", 2),
    ("It was white.", 2), ("A red car.", 3), ("red", 0), ("B", 1),
    ("A or C", None), ("I am not sure.", None), ("It was red or blue", None), ("E", None),
    # exactly one choice, and letter and text agree
    ("B. blue", 1), ("blue", 1), ("The answer is B", 1), ("a red car", 3), ("D) red car", 3), ("Answer: B) blue", 1),
    ("The answer is (B)", 1),
    ("A or B", None), ("A, B or C", None), ("B/C", None), ("(B) or (C)", None), ("The answer is B, not (C)", None),
    ("red and blue", None), ("B. blue, not red", None),
    ("A. blue", None), ("C) red", None), ("A) red car", None),  # the letter's choice is not the text's
    ("A, I think blue", 1),  # "I" is no choice here, so no letters are listed: the text decides
])
def test_pick_choice(response: str, pick: int | None) -> None:
    assert pick_choice(response, CHOICES) == pick


def test_a_letter_whose_text_is_another_choice_picks_nothing() -> None:
    blue_first = ["blue", "red", "white"]
    assert pick_choice("A. red", blue_first) is None
    assert pick_choice("A. blue", blue_first) == 0 and pick_choice("B. red", blue_first) == 1
    assert pick_choice("A. green", blue_first) == 0  # a text that is no choice names nothing


def test_multiple_choice_exact_match_vs_wrong_letter() -> None:
    ep = episode(question(choices=CHOICES, answer_index=2, mode="contextual", position="backward"))
    assert counts(score_episode(ep, run(("q1", 21.0, "C) white")), EXACT)) == (1, 0, 0)
    assert counts(score_episode(ep, run(("q1", 21.0, "B")), EXACT)) == (0, 1, 1)
    assert counts(score_episode(ep, run(("q1", 21.0, "white")), EXACT)) == (1, 0, 0)


def test_a_letter_text_disagreement_is_a_wrong_answer() -> None:
    ep = episode(question(choices=CHOICES, answer_index=1))  # B: blue
    assert counts(score_episode(ep, run(("q1", 21.0, "B. blue")), EXACT)) == (1, 0, 0)
    # the right letter with another choice's text, or the right text with another letter: FP + FN
    assert counts(score_episode(ep, run(("q1", 21.0, "B. red")), EXACT)) == (0, 1, 1)
    assert counts(score_episode(ep, run(("q1", 21.0, "A. blue")), EXACT)) == (0, 1, 1)
    # hedging over several choices is wrong too, and a later clean answer is still the TP
    s = score_episode(ep, run(("q1", 21.0, "A or B"), ("q1", 22.0, "blue")), EXACT)
    assert counts(s) == (1, 1, 0) and [o.reason for o in s.outcomes] == ["in window, does not match", "in window, matches"]


# -- free text with the real MiniLM ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm() -> MiniLMMatcher:
    if not is_exported(default_model_dir()):
        pytest.skip("text encoder not exported: run `streamharness dev text-encoder export`")
    return MiniLMMatcher()


def test_free_text_matched_by_minilm_above_threshold(minilm: MiniLMMatcher) -> None:
    ep = episode(question(reference="About five people are walking in the street."))
    matcher = AnswerMatcher(minilm)
    good = score_episode(ep, run(("q1", 21.0, "There are 5 people in the street.")), matcher)
    bad = score_episode(ep, run(("q1", 21.0, "A red cup is on the table.")), matcher)
    assert counts(good) == (1, 0, 0)
    assert counts(bad) == (0, 1, 1)
    assert minilm.similarity("About five people are walking in the street.", "There are 5 people in the street.") > 0.5
    # the threshold decides: a strict matcher rejects the same paraphrase
    assert counts(score_episode(ep, run(("q1", 21.0, "There are 5 people in the street.")), AnswerMatcher(MiniLMMatcher(0.95, minilm.encoder)))) == (0, 1, 1)


def test_llm_judge_posts_chat_completion_and_reads_yes_no() -> None:
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request.url.path, request.headers.get("authorization"), body))
        said = body["messages"][-1]["content"]
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "Yes" if "5 people" in said else "no"}}]})

    judge = OpenAICompatibleJudge("http://judge.local/v1/", "m", api_key="k",
                                  client=httpx.Client(transport=httpx.MockTransport(handler)))
    ep = episode(question())
    assert counts(score_episode(ep, run(("q1", 21.0, "5 people")), AnswerMatcher(judge))) == (1, 0, 0)
    assert counts(score_episode(ep, run(("q1", 21.0, "a cat")), AnswerMatcher(judge))) == (0, 1, 1)
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k"
    assert body["model"] == "m" and body["temperature"] == 0
    assert "How many people?" in body["messages"][-1]["content"] and "five" in body["messages"][-1]["content"]
    assert judge.name == "llm-judge:m"


def _judge(handler, **kw) -> OpenAICompatibleJudge:
    return OpenAICompatibleJudge("http://judge.local/v1", "m", retry_wait_s=0, client=httpx.Client(transport=httpx.MockTransport(handler)), **kw)


def _reply(content) -> httpx.Response:
    return httpx.Response(200, json={"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


@pytest.mark.parametrize(("content", "verdict"), [
    ("Yes.", True), (" yes", True), ("YES, it does", True), ("yes", True), ("\n**Yes**", True), ('"Yes"', True),
    ("No", False), ("no.", False), ("No, yes", False), ("Yesterday", False), ("The answer is yes", False),
    ("", False), ("   ", False), (None, False),
])
def test_llm_judge_verdict_is_the_first_word(content, verdict) -> None:
    assert OpenAICompatibleJudge.parse_verdict(content) is verdict
    assert _judge(lambda request: _reply(content)).matches("q", "r", "an answer") is verdict


def test_llm_judge_caches_verdicts_per_question_reference_response() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content)["messages"][-1]["content"])
        return _reply("yes")

    judge = _judge(handler)
    ep, answered = episode(question()), run(("q1", 21.0, "5 people"))
    for _ in range(3):  # re-scoring the same run asks once
        assert counts(score_episode(ep, answered, AnswerMatcher(judge))) == (1, 0, 0)
    assert len(calls) == 1
    judge.matches("How many people?", "five", "5 people")
    assert len(calls) == 1
    judge.matches("How many people?", "five", "five people")  # another response: asked
    judge.matches("How many cars?", "five", "5 people")  # another question: asked
    assert len(calls) == 3
    assert not judge.matches("q", "r", "  ") and len(calls) == 3  # an empty response is "no" without asking


def test_llm_judge_retries_5xx_and_connection_errors() -> None:
    script = [httpx.Response(503, json={"error": {"message": "warming up"}}), "connect", _reply("Yes.")]
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        step = script[len(calls) - 1]
        if step == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        return step

    assert _judge(handler).matches("q", "r", "a") is True
    assert len(calls) == 3


def test_llm_judge_gives_up_after_three_attempts_with_a_clear_error() -> None:
    calls = []

    def failing(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, json={"error": {"message": "out of memory"}})

    with pytest.raises(JudgeError, match=r"http://judge\.local/v1/chat/completions \(model 'm'\).*HTTP 500: out of memory.*3 attempts"):
        _judge(failing).matches("q", "r", "a")
    assert len(calls) == 3

    def unreachable(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    calls.clear()
    with pytest.raises(JudgeError, match=r"cannot reach the LLM judge at http://judge\.local/v1/chat/completions"):
        _judge(unreachable, attempts=2).matches("q", "r", "a")
    assert len(calls) == 2


def test_llm_judge_does_not_retry_a_rejected_request() -> None:
    calls = []

    def unknown_model(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(404, json={"error": {"message": "model 'm' does not exist", "code": "model_not_found"}})

    with pytest.raises(JudgeError, match=r"\(model 'm'\) rejected the request: HTTP 404: model 'm' does not exist; check the model"):
        _judge(unknown_model).matches("q", "r", "a")
    assert len(calls) == 1
    with pytest.raises(JudgeError, match=r"HTTP 401: bad key; check the API key"):
        _judge(lambda request: httpx.Response(401, json={"error": {"message": "bad key"}})).matches("q", "r", "a")
    with pytest.raises(JudgeError, match=r"without a chat completion"):
        _judge(lambda request: httpx.Response(200, json={"object": "list"})).matches("q", "r", "a")


# -- aggregation, latency, results, comparison ---------------------------------------------------------
def two_episode_score(system: str = "sys", late: bool = False):
    ep1 = episode(question("q1", mode="punctual", position="present"),
                  question("q2", (30.0, 35.0), mode="contextual", position="backward"), episode_id="ep1")
    ep2 = episode(question("q1", (5.0, 8.0), mode="punctual", position="present"), episode_id="ep2")
    runs = [run(("q1", 21.0, "five", 100.0, 400.0), ("q2", 40.0 if late else 31.0, "five", 200.0, 500.0), episode_id="ep1", system=system),
            run(("q1", 9.0, "five", 300.0, 600.0), episode_id="ep2", system=system)]
    return score_run([ep1, ep2], runs, EXACT)


def test_per_cell_aggregation_sums_counts_over_episodes() -> None:
    rs = two_episode_score()
    pp = rs.cell("punctual", "present")
    assert (pp.tp, pp.fp, pp.fn, pp.events) == (1, 1, 1, 2)  # ep1 in window, ep2 late
    assert pp.sw_f1 == pytest.approx(2 / 4.2)
    cb = rs.cell("contextual", "backward")
    assert (cb.tp, cb.fp, cb.fn, cb.sw_f1) == (1, 0, 0, 1.0)
    assert rs.cell("proactive", "forward").sw_f1 is None
    assert (rs.total.tp, rs.total.fp, rs.total.fn) == (2, 1, 1)
    assert rs.total.sw_f1 == pytest.approx(4 / (4 + 0.2 + 2))
    assert rs.response_delay_s.count == 2 and rs.response_delay_s.mean == pytest.approx(1.0)
    assert rs.ttft_ms.p50 == 200.0 and rs.e2e_ms.max == 600.0
    assert rs.ttft_ms.p95 == pytest.approx(290.0)  # linear interpolation over 100, 200, 300


def test_latency_percentiles() -> None:
    ep = episode(question())
    r = EpisodeRun(episode_id="ep1", system="s", responses=[
        ResponseRecord(event_id=None, media_ts_s=float(i), text="x", ttft_ms=float(i), e2e_ms=float(2 * i)) for i in range(1, 101)])
    rs = score_run([ep], [r], EXACT)
    assert (rs.ttft_ms.p50, rs.ttft_ms.p95, rs.ttft_ms.p99) == pytest.approx((50.5, 95.05, 99.01))
    assert rs.e2e_ms.p99 == pytest.approx(198.02)


def test_result_roundtrip_and_compare_flags_a_drop(tmp_path: Path) -> None:
    base = two_episode_score("base")
    path = save_result(base, tmp_path / "base.json")
    assert load_result(path) == base
    worse = two_episode_score("cand", late=True)
    rows = {(r.scope, r.metric): r for r in compare(load_result(path), worse)}
    cb = rows[("contextual/backward", "sw_f1")]
    assert cb.a == 1.0 and cb.b == 0.0 and cb.delta == -1.0 and cb.regression
    assert rows[("overall", "sw_f1")].regression
    assert not rows[("punctual/present", "sw_f1")].regression
    assert rows[("proactive/forward", "sw_f1")].delta is None and not rows[("proactive/forward", "sw_f1")].regression
    assert not has_regression(compare(base, base))


# -- the episode format -------------------------------------------------------------------------------
def test_episode_roundtrip_json_and_jsonl(tmp_path: Path) -> None:
    ep = episode(question(), question("q2", choices=["a", "b"], answer_index=1))
    assert load_episode(save_episode(ep, tmp_path / "e.json")) == ep
    ep2 = ep.model_copy(update={"episode_id": "ep2"})
    assert load_episodes(save_episodes([ep, ep2], tmp_path / "set.jsonl")) == [ep, ep2]
    assert json.loads((tmp_path / "e.json").read_text())["format_version"] == 1


@pytest.mark.parametrize("bad, field", [
    ({"window": [25.0, 20.0]}, "window"),
    ({"choices": ["a", "b"], "answer_index": 5}, "answer_index"),
    ({"windw": [1, 2]}, "windw"),
])
def test_validation_errors_name_episode_and_field(tmp_path: Path, bad: dict, field: str) -> None:
    q = question()
    q.update(bad)
    if "choices" in bad:
        q.pop("reference")
    raw = {"episode_id": "broken-ep", "video": "v.avi", "duration_s": 100, "source": "synthetic", "events": [q]}
    (tmp_path / "set.jsonl").write_text(json.dumps(raw) + "\n")
    with pytest.raises(EpisodeFormatError) as err:
        load_episodes(tmp_path / "set.jsonl")
    assert "broken-ep" in str(err.value) and "events.0" in str(err.value) and field in str(err.value)
    assert "set.jsonl:1" in str(err.value)
