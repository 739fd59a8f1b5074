"""Streaming-Eval scoring: SW-F1 = 2TP / (2TP + 0.2FP + 2FN), only inside ground-truth windows.

Rules (pinned by ``tests/unit/test_eval_scoring.py``)
-----------------------------------------------------
Responses are judged per event, in media-time order (ties keep the run's order). A window
``[t0, t1]`` includes both ends.

* **Question**: the *first* response tied to it (``event_id == question id``) whose media time lies
  inside the window and that matches the reference is the **TP**. Every other response tied to it
  is an **FP**: outside the window (early or late), inside but not matching, or a further answer
  after the TP (a duplicate). A question without a TP is an **FN**. So an early or a late answer
  costs FP + FN; a right answer followed by a repeat is TP + FP.
* **Instruction**: each window expects one proactive response tied to the instruction. The first
  matching response inside a window is that window's TP; a response of the instruction outside
  every window, a non-matching one, or a second one in an already answered window is an FP; a
  window without a TP is an FN.
* A response tied to nothing (``event_id is None``) or to an id the episode does not have is an
  FP that belongs to no cell: it counts in the episode and run totals (``unattributed_fp``).
* **Silence where nothing is expected costs nothing**: no events and no responses give TP = FP =
  FN = 0, and SW-F1 of an all-zero count is **undefined (``None``)**, shown as "n/a": there was
  nothing to score, which is neither perfect nor wrong. An FP alone gives 0.0.
* Cells (mode × position) and totals are **micro** scores: counts are summed over events (and
  episodes), then SW-F1 is computed from the sums. Totals = sum of cells + unattributed FPs.

Matching
--------
* **Multiple choice** (:func:`pick_choice`): a response picks a choice only when it names exactly
  one choice, by its letter (A, B, ...) or by its text, and letter and text agree.

  - *Letters* count in these forms: the whole response is the letter (``"B"``, ``"(B)"``,
    ``"B."``); it starts with ``"B)"``, ``"(B)"``, ``"B."`` or ``"B:"``; it says
    ``"answer/option/choice [is|:] B"`` (keyword in any case); a ``"(B)"`` anywhere; or choice
    letters listed together (``"A or B"``, ``"A, B"``, ``"A and B"``, ``"A/B"``; both must be
    letters of choices). Letters are upper case only, so the article "a" never counts, and a
    letter beyond the choices is ignored.
  - *Texts* count as whole words, case-insensitive; a choice contained in a longer choice that
    also occurs yields to it (``"a red car"`` with choices "red" and "red car" names "red car").
  - The pick: two or more letters pick nothing (``"A or B"``). One letter picks its choice when the
    texts named are none or exactly that choice's (``"B"``, ``"B. blue"`` with B blue); a text of
    another choice picks nothing (``"A. red"`` with A blue and red a choice). Without a letter,
    exactly one text picks its choice (``"blue"``); two or more pick nothing (``"red and blue"``).

  The response matches when the pick is ``answer_index``; picking nothing is a wrong answer.
* **Free text**: a :class:`Matcher` compares response and reference. The default
  :class:`MiniLMMatcher` embeds both with all-MiniLM-L6-v2 (:class:`~streamharness.text_encoder.TextEncoder`)
  and matches when the cosine similarity is ``>= 0.5`` (``DEFAULT_MINILM_THRESHOLD``). It judges
  meaning, not facts: "the car was red" vs "the car was white" scores about 0.6; use choices or an
  LLM judge (:class:`OpenAICompatibleJudge`, any ``/chat/completions`` endpoint) where facts matter.
* **Proactive alerts**: an instruction without a reference matches any non-empty response; with a
  reference it goes through the free-text matcher. An empty response never matches.

Statistics: response delay = media time of a TP − its window start (seconds); latency = client
measured ``ttft_ms`` / ``e2e_ms`` over all responses that carry them; percentiles are numpy's
linear interpolation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streamharness.eval.episode import (
    MODES,
    POSITIONS,
    Episode,
    EpisodeRun,
    InstructionEvent,
    QuestionEvent,
    ResponseRecord,
    Window,
)

FP_WEIGHT = 0.2
DEFAULT_MINILM_THRESHOLD = 0.5
RESULT_FORMAT_VERSION = 1
_EPS = 1e-9  # media times are floats; a response at exactly t1 is inside


def sw_f1(tp: int, fp: int, fn: int) -> float | None:
    """2TP / (2TP + 0.2FP + 2FN); ``None`` when nothing was expected and nothing was said."""
    denom = 2 * tp + FP_WEIGHT * fp + 2 * fn
    return None if denom == 0 else 2 * tp / denom


# -- matching -----------------------------------------------------------------------------------------
@runtime_checkable
class Matcher(Protocol):
    """Decides whether a free-text response says what the reference says."""

    name: str

    def matches(self, question: str, reference: str, response: str) -> bool: ...


class MiniLMMatcher:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings of response and reference ``>= threshold``."""

    def __init__(self, threshold: float = DEFAULT_MINILM_THRESHOLD, encoder: Any = None) -> None:
        self.threshold = threshold
        self._encoder = encoder
        self.name = f"minilm>={threshold:g}"

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from streamharness.text_encoder import TextEncoder

            self._encoder = TextEncoder().load()
        return self._encoder

    def similarity(self, reference: str, response: str) -> float:
        a, b = self.encoder.encode([reference, response])
        return float(np.dot(a, b))

    def matches(self, question: str, reference: str, response: str) -> bool:
        return bool(response.strip()) and self.similarity(reference, response) >= self.threshold


class LLMJudge(Matcher, Protocol):
    """A :class:`Matcher` that asks a language model (for users with an endpoint)."""


class JudgeError(RuntimeError):
    """The LLM judge gave no verdict: unreachable, rejected the request (unknown model, bad key, wrong
    URL), or answered something that is not a chat completion. The message names URL and model."""


class _TransientJudgeError(JudgeError):
    """A connection error, a timeout, a 5xx, 408 or 429: worth another attempt."""


_RETRY_STATUS = {408, 429}
_VERDICT = re.compile(r"^[\W_]*(yes|no)\b", re.IGNORECASE)


class OpenAICompatibleJudge:
    """Asks any OpenAI-compatible ``POST {base_url}/chat/completions`` whether the response agrees
    with the reference (greedy, ``temperature`` 0, a few tokens); matches when the reply says "yes".

    * Verdict (:meth:`parse_verdict`): the reply's first word, ignoring case, leading spaces and
      punctuation, is "yes" (``"Yes."``, ``" yes"``, ``"YES, it does"``); anything else, an empty
      reply or ``content: null`` included, is "no".
    * Retries: a connection error, a timeout, HTTP 5xx, 408 or 429 is retried, ``attempts`` tries
      in all (exponential wait from ``retry_wait_s``); then, and on any other 4xx (unknown model,
      bad key, wrong URL) at once, :class:`JudgeError` names the URL, the model and the server's words.
    * Cache: one verdict per (question, reference, response) per instance, so re-scoring the same
      runs does not ask again.
    """

    SYSTEM = ("You grade the answers of a video assistant against a reference answer. "
              "Reply with exactly one word: yes or no.")
    PROMPT = (
        "Question: {question}\nReference answer: {reference}\nAssistant's answer: {response}\n"
        "Does the assistant's answer agree with the reference answer? Reply yes or no."
    )

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 60.0,
                 attempts: int = 3, retry_wait_s: float = 0.5, client: Any = None) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.name = f"llm-judge:{model}"
        self.attempts = max(1, attempts)
        self.retry_wait_s = retry_wait_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=timeout_s)
        self._verdicts: dict[tuple[str, str, str], bool] = {}

    @staticmethod
    def parse_verdict(content: str | None) -> bool:
        match = _VERDICT.match(content or "")
        return bool(match) and match.group(1).lower() == "yes"

    def matches(self, question: str, reference: str, response: str) -> bool:
        if not response.strip():
            return False
        key = (question, reference, response)
        if key not in self._verdicts:
            self._verdicts[key] = self.parse_verdict(self.ask(question, reference, response))
        return self._verdicts[key]

    def ask(self, question: str, reference: str, response: str) -> str | None:
        """One verdict request (no cache): the reply's ``content`` as the server sent it."""
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": 3,
            "messages": [
                {"role": "system", "content": self.SYSTEM},
                {"role": "user", "content": self.PROMPT.format(question=question, reference=reference, response=response)},
            ],
        }
        retrying = Retrying(retry=retry_if_exception_type(_TransientJudgeError), stop=stop_after_attempt(self.attempts),
                            wait=wait_exponential(multiplier=self.retry_wait_s, max=10), reraise=True)
        try:
            return retrying(self._post, body)
        except _TransientJudgeError as err:
            raise JudgeError(f"{err} (gave up after {self.attempts} attempts)") from err.__cause__

    def _post(self, body: dict[str, Any]) -> str | None:
        import httpx

        from streamharness.generation.openai_client import error_message

        where = f"LLM judge at {self.url} (model {self.model!r})"
        try:
            reply = self._client.post(self.url, json=body, headers=self._headers)
        except httpx.TransportError as err:
            raise _TransientJudgeError(f"cannot reach the {where}: {err!r}") from err
        if reply.status_code >= 500 or reply.status_code in _RETRY_STATUS:
            raise _TransientJudgeError(f"{where} failed: HTTP {reply.status_code}: {error_message(reply)}")
        if reply.status_code >= 400:
            hint = {401: "; check the API key", 403: "; check the API key",
                    404: "; check the model name, and that the URL is the API base (…/v1, without /chat/completions)"}
            raise JudgeError(f"{where} rejected the request: HTTP {reply.status_code}: {error_message(reply)}"
                             f"{hint.get(reply.status_code, '')}")
        try:
            return reply.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{where} answered HTTP {reply.status_code} without a chat completion: {reply.text[:300]!r}") from None

    def close(self) -> None:
        if self._owns_client:
            self._client.close()


_WHOLE_LETTER = re.compile(r"^\s*\(?([A-Z])\)?[.:]?\s*$")
_LEADING_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[).:])")
_KEYWORD_LETTER = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*|:\s*)?\(?([A-Z])\b")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
# "A or B", "A, B", "(A) and (B)", "A/B": the lookahead lets "A, B or C" yield (A, B) and (B, C)
_LISTED_LETTERS = re.compile(r"\b([A-Z])\)?\.?\s*(?:,|/|&|\b(?:or|and)\b)\s*(?=\(?([A-Z])\b)")


def _norm(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def _letters_named(response: str, letters: set[str]) -> set[str]:
    """The choice letters a response names (the forms of the module docs)."""
    found: set[str] = set()
    whole = _WHOLE_LETTER.match(response)
    if whole:
        found.add(whole.group(1))
    lead = _LEADING_LETTER.match(response)
    if lead:
        found.add(lead.group(1) or lead.group(2))
    found.update(_KEYWORD_LETTER.findall(response))
    found.update(_PAREN_LETTER.findall(response))
    for a, b in _LISTED_LETTERS.findall(response):
        if a in letters and b in letters:  # both must be choices: "A, I think ..." lists nothing
            found.update((a, b))
    return found & letters


def _texts_named(response: str, choices: Sequence[str]) -> set[int]:
    """The choices whose text occurs in the response as whole words (a choice inside a longer one
    that also occurs yields to it)."""
    said = _norm(response)
    hits = [i for i, c in enumerate(choices) if _norm(c).strip() and _norm(c) in said]
    # "red car" and "red" both occur in "a red car": the longer, more specific choice wins.
    return {i for i in hits if not any(j != i and _norm(choices[i]) in _norm(choices[j]) for j in hits)}


def pick_choice(response: str, choices: Sequence[str]) -> int | None:
    """The index of the one choice a response names, or ``None`` (no pick, several, or a letter and a
    text that disagree). See module docs."""
    letters = _letters_named(response, {chr(ord("A") + i) for i in range(len(choices))})
    if len(letters) > 1:
        return None
    texts = _texts_named(response, choices)
    if letters:
        pick = ord(letters.pop()) - ord("A")
        return pick if texts <= {pick} else None
    return texts.pop() if len(texts) == 1 else None


class AnswerMatcher:
    """Applies the matching rules of the module docstring to one event and one response text."""

    def __init__(self, free_text: Matcher | None = None) -> None:
        self._free_text = free_text

    @property
    def free_text(self) -> Matcher:
        if self._free_text is None:
            self._free_text = MiniLMMatcher()
        return self._free_text

    @property
    def name(self) -> str:
        return f"choice=exact; free_text={self._free_text.name if self._free_text else MiniLMMatcher().name}"

    def matches(self, event: QuestionEvent | InstructionEvent, response: str) -> bool:
        if not response.strip():
            return False
        if isinstance(event, QuestionEvent) and event.choices is not None:
            return pick_choice(response, event.choices) == event.answer_index
        if event.reference is None:  # an alert with nothing it has to say
            return True
        return self.free_text.matches(event.text, event.reference, response)


# -- result types ---------------------------------------------------------------------------------------
class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Counts(_Result):
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def sw_f1(self) -> float | None:
        return sw_f1(self.tp, self.fp, self.fn)

    def add(self, other: Counts) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn


class Stats(_Result):
    """Summary of a sample: count, mean, p50, p95, p99, max (``None`` when empty)."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not len(values):
            return cls()
        v = np.asarray(values, dtype=float)
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return cls(count=len(v), mean=float(v.mean()), p50=float(p50), p95=float(p95), p99=float(p99), max=float(v.max()))


class CellScore(_Result):
    """TP/FP/FN and SW-F1 of one mode × position cell (or of a total)."""

    mode: str
    position: str
    tp: int = 0
    fp: int = 0
    fn: int = 0
    sw_f1: float | None = None
    events: int = 0
    delay_s: Stats = Field(default_factory=Stats)


class Outcome(_Result):
    """One judgement: a response (TP or FP) or a missed expectation (FN, ``media_ts_s`` None)."""

    kind: Literal["tp", "fp", "fn"]
    event_id: str | None
    media_ts_s: float | None = None
    window: Window | None = None
    text: str = ""
    reason: str


class EventSummary(_Result):
    """What the episode expected (kept in the result so a report needs no episode files)."""

    event_id: str
    type: Literal["question", "instruction"]
    at_s: float
    text: str
    windows: list[Window]
    mode: str
    position: str


class EpisodeScore(_Result):
    episode_id: str
    system: str
    duration_s: float
    source: str
    total: CellScore
    cells: list[CellScore]
    unattributed_fp: int = 0
    delays_s: list[float] = Field(default_factory=list)
    events: list[EventSummary] = Field(default_factory=list)
    outcomes: list[Outcome] = Field(default_factory=list)
    ran: bool = True  # False: no run for this episode was given; scored as silence

    def cell(self, mode: str, position: str) -> CellScore:
        return next(c for c in self.cells if c.mode == mode and c.position == position)


class RunScore(_Result):
    format_version: int = RESULT_FORMAT_VERSION
    system: str
    matcher: str
    total: CellScore
    cells: list[CellScore]
    unattributed_fp: int = 0
    response_delay_s: Stats
    ttft_ms: Stats
    e2e_ms: Stats
    ttft_samples_ms: list[float] = Field(default_factory=list)
    e2e_samples_ms: list[float] = Field(default_factory=list)
    episodes: list[EpisodeScore]
    metadata: dict[str, Any] = Field(default_factory=dict)

    def cell(self, mode: str, position: str) -> CellScore:
        return next(c for c in self.cells if c.mode == mode and c.position == position)


def _cell(mode: str, position: str, counts: Counts, events: int, delays: Sequence[float]) -> CellScore:
    return CellScore(mode=mode, position=position, tp=counts.tp, fp=counts.fp, fn=counts.fn, sw_f1=counts.sw_f1,
                     events=events, delay_s=Stats.of(delays))


def _inside(t: float, window: Window) -> bool:
    return window[0] - _EPS <= t <= window[1] + _EPS


# -- scoring --------------------------------------------------------------------------------------------
def score_episode(episode: Episode, run: EpisodeRun | None, matcher: AnswerMatcher | None = None) -> EpisodeScore:
    """Score one run over one episode (``run=None``: the system said nothing)."""
    matcher = matcher or AnswerMatcher()
    if run is not None and run.episode_id != episode.episode_id:
        raise ValueError(f"run of episode {run.episode_id!r} given for episode {episode.episode_id!r}")
    responses = sorted(run.responses if run else [], key=lambda r: r.media_ts_s)  # stable: ties keep order
    by_event: dict[str | None, list[ResponseRecord]] = {}
    for r in responses:
        by_event.setdefault(r.event_id, []).append(r)

    outcomes: list[Outcome] = []
    cell_counts = {(m, p): Counts() for m in MODES for p in POSITIONS}
    cell_events = {(m, p): 0 for m in MODES for p in POSITIONS}
    cell_delays: dict[tuple[str, str], list[float]] = {(m, p): [] for m in MODES for p in POSITIONS}

    for event in episode.events:
        key = (event.mode, event.position)
        counts, delays = cell_counts[key], cell_delays[key]
        cell_events[key] += 1
        windows = event.windows
        answered = [False] * len(windows)
        for r in by_event.pop(event.event_id, []):
            idx = next((i for i, w in enumerate(windows) if _inside(r.media_ts_s, w)), None)
            if idx is None:
                first = windows[0][0] if windows else float("inf")
                reason = "before window" if r.media_ts_s < first else ("after window" if len(windows) == 1 else "outside windows")
                outcomes.append(Outcome(kind="fp", event_id=event.event_id, media_ts_s=r.media_ts_s, text=r.text, reason=reason))
                counts.fp += 1
            elif answered[idx]:
                outcomes.append(Outcome(kind="fp", event_id=event.event_id, media_ts_s=r.media_ts_s, window=windows[idx],
                                        text=r.text, reason="duplicate in window"))
                counts.fp += 1
            elif matcher.matches(event, r.text):
                answered[idx] = True
                counts.tp += 1
                delays.append(r.media_ts_s - windows[idx][0])
                outcomes.append(Outcome(kind="tp", event_id=event.event_id, media_ts_s=r.media_ts_s, window=windows[idx],
                                        text=r.text, reason="in window, matches"))
            else:
                outcomes.append(Outcome(kind="fp", event_id=event.event_id, media_ts_s=r.media_ts_s, window=windows[idx],
                                        text=r.text, reason="in window, does not match"))
                counts.fp += 1
        for w, hit in zip(windows, answered):
            if not hit:
                counts.fn += 1
                outcomes.append(Outcome(kind="fn", event_id=event.event_id, window=w, reason="no matching response in window"))

    unattributed = 0
    for event_id, rest in by_event.items():  # what is left is tied to no event of this episode
        for r in rest:
            unattributed += 1
            outcomes.append(Outcome(kind="fp", event_id=event_id, media_ts_s=r.media_ts_s, text=r.text,
                                    reason="unsolicited" if event_id is None else "unknown event"))

    total = Counts(fp=unattributed)
    for c in cell_counts.values():
        total.add(c)
    all_delays = [d for ds in cell_delays.values() for d in ds]
    cells = [_cell(m, p, cell_counts[(m, p)], cell_events[(m, p)], cell_delays[(m, p)]) for m in MODES for p in POSITIONS]
    return EpisodeScore(
        episode_id=episode.episode_id,
        system=run.system if run else "",
        duration_s=episode.duration_s,
        source=episode.source,
        total=_cell("all", "all", total, len(episode.events), all_delays),
        cells=cells,
        unattributed_fp=unattributed,
        delays_s=all_delays,
        events=[EventSummary(event_id=e.event_id, type=e.type, at_s=e.at_s, text=e.text, windows=list(e.windows),
                             mode=e.mode, position=e.position) for e in episode.events],
        outcomes=sorted(outcomes, key=lambda o: (o.media_ts_s if o.media_ts_s is not None else o.window[0] if o.window else 0.0)),
        ran=run is not None,
    )


def score_run(episodes: Sequence[Episode], runs: Sequence[EpisodeRun], matcher: AnswerMatcher | None = None, *,
              system: str | None = None, metadata: dict[str, Any] | None = None,
              on_episode: Callable[[EpisodeScore], None] | None = None) -> RunScore:
    """Score runs over a set of episodes. An episode without a run is scored as silence
    (``EpisodeScore.ran`` False); a run of an unknown episode is an error."""
    matcher = matcher or AnswerMatcher()
    by_id = {r.episode_id: r for r in runs}
    if len(by_id) != len(runs):
        raise ValueError("two runs for one episode")
    known = {e.episode_id for e in episodes}
    unknown = sorted(set(by_id) - known)
    if unknown:
        raise ValueError(f"runs of episodes not in the set: {unknown}")
    systems = sorted({r.system for r in runs})
    system = system or (systems[0] if len(systems) == 1 else "+".join(systems) or "unknown")

    scores: list[EpisodeScore] = []
    for episode in episodes:
        s = score_episode(episode, by_id.get(episode.episode_id), matcher)
        scores.append(s)
        if on_episode:
            on_episode(s)

    cells = []
    for m in MODES:
        for p in POSITIONS:
            c, events, delays = Counts(), 0, []
            for s in scores:
                ec = s.cell(m, p)
                c.add(Counts(tp=ec.tp, fp=ec.fp, fn=ec.fn))
                events += ec.events
            delays = [o.media_ts_s - o.window[0] for s in scores for o in s.outcomes
                      if o.kind == "tp" and _event_cell(s, o.event_id) == (m, p)]
            cells.append(_cell(m, p, c, events, delays))
    unattributed = sum(s.unattributed_fp for s in scores)
    total = Counts(fp=unattributed)
    for c in cells:
        total.add(Counts(tp=c.tp, fp=c.fp, fn=c.fn))
    delays = [d for s in scores for d in s.delays_s]
    responses = [r for run in runs for r in run.responses]
    ttft = [r.ttft_ms for r in responses if r.ttft_ms is not None]
    e2e = [r.e2e_ms for r in responses if r.e2e_ms is not None]
    return RunScore(
        system=system,
        matcher=matcher.name,
        total=_cell("all", "all", total, sum(s.total.events for s in scores), delays),
        cells=cells,
        unattributed_fp=unattributed,
        response_delay_s=Stats.of(delays),
        ttft_ms=Stats.of(ttft),
        e2e_ms=Stats.of(e2e),
        ttft_samples_ms=ttft,
        e2e_samples_ms=e2e,
        episodes=scores,
        metadata=metadata or {},
    )


def _event_cell(score: EpisodeScore, event_id: str | None) -> tuple[str, str] | None:
    for e in score.events:
        if e.event_id == event_id:
            return (e.mode, e.position)
    return None


# -- JSON result and comparison -------------------------------------------------------------------------
def result_json(score: RunScore, *, indent: int | None = 2) -> str:
    """The JSON result of a run (everything a report or a comparison needs)."""
    return score.model_dump_json(indent=indent)


def save_result(score: RunScore, path: Path | str) -> Path:
    path = Path(path)
    path.write_text(result_json(score) + "\n", encoding="utf-8")
    return path


def load_result(path: Path | str) -> RunScore:
    """Read a JSON result written by :func:`save_result` (or :func:`result_json`)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if raw.get("format_version") != RESULT_FORMAT_VERSION:
        raise ValueError(f"{path}: result format_version {raw.get('format_version')!r}, expected {RESULT_FORMAT_VERSION}")
    return RunScore.model_validate(raw)


class ComparisonRow(_Result):
    """One line of the regression table: ``a`` is the baseline, ``b`` the candidate."""

    scope: str  # "overall", "<mode>/<position>", or "latency"
    metric: str  # "sw_f1", "ttft_ms_p95", "e2e_ms_p95"
    a: float | None
    b: float | None
    delta: float | None
    regression: bool
    higher_is_better: bool


def compare(a: RunScore, b: RunScore, *, tolerance: float = 0.02, latency_tolerance: float = 0.10) -> list[ComparisonRow]:
    """Regression table of candidate ``b`` against baseline ``a``: SW-F1 overall and per cell (a
    regression is ``b < a - tolerance``), then TTFT and e2e p95 (a regression is
    ``b > a * (1 + latency_tolerance)``). Rows where either side is n/a are never regressions."""
    rows: list[ComparisonRow] = []

    def add(scope: str, metric: str, va: float | None, vb: float | None, higher_is_better: bool) -> None:
        delta = None if va is None or vb is None else vb - va
        if delta is None:
            regression = False
        elif higher_is_better:
            regression = delta < -tolerance - 1e-12
        else:
            regression = vb > va * (1 + latency_tolerance) + 1e-12
        rows.append(ComparisonRow(scope=scope, metric=metric, a=va, b=vb, delta=delta, regression=regression,
                                  higher_is_better=higher_is_better))

    add("overall", "sw_f1", a.total.sw_f1, b.total.sw_f1, True)
    for m in MODES:
        for p in POSITIONS:
            add(f"{m}/{p}", "sw_f1", a.cell(m, p).sw_f1, b.cell(m, p).sw_f1, True)
    add("latency", "ttft_ms_p95", a.ttft_ms.p95, b.ttft_ms.p95, False)
    add("latency", "e2e_ms_p95", a.e2e_ms.p95, b.e2e_ms.p95, False)
    return rows


def has_regression(rows: Sequence[ComparisonRow]) -> bool:
    return any(r.regression for r in rows)
