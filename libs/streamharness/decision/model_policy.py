"""The ``model`` decision policy: the model decides by itself, in the streaming protocol.

Each second of a stream is one user turn on the stream's cache in the streaming engine
(:mod:`streamharness.engine`): what was said in that second first (a question, a new standing
instruction, ``Stop: <instruction>``), then ``<T seconds>`` and the frame (a VLM gets the frame's
vision tokens; a text model its caption) — the layout Streaming-Train trains on
(:mod:`streamharness.protocol`). The model's reply is chosen between ``</silence>`` and
``</response>`` by constrained decoding (it can emit nothing else); after ``</response>`` it writes
the response on the same cache. A model trained by Streaming-Train has both as single tokens; any
other chat model is prompted with the protocol in the system text (event-driven triggering without
training) and the two are scored as the token sequences its tokenizer makes of them.

**Cache layout.** ``[system: protocol + standing instructions + memory's stable prefix]`` then the
turns since the prefix was built. Memory's prefix changes only at chunk boundaries; once a step is
``lead_s`` before the boundary, the next chunk's prefix is fetched (``Context`` at the boundary's
media time: its summary is written before the boundary) and rebuilt in the background with the last
``carry_turns`` turns (the seconds the new summary does not cover yet), then swapped in between two
steps. A new instruction changes the prefix too (rebuilt in the background the same way). A stream
the engine evicted is rebuilt from its prefix and carried turns. A cache past ``high_water`` of the
engine's capacity drops its oldest turns in place (``overflow="drop"``: no re-prefill, the kept
turns' keys rotated back, :meth:`StreamingEngine.drop`) down to ``low_water``, so a step costs about
the same hour after hour; ``overflow="rebuild"`` rebuilds it from the prefix and the carried turns
instead (exact, at the cost of a prefill). Memory's prefix is trimmed to ``prefix_share`` of the
capacity (its newest end), so a 12-hour memory never outgrows the cache.

**Batches.** The decision stage steps a polled batch's streams together (:meth:`step_many`), one
frame per stream per round; streams with a question due go first, in a batch of their own.

**Which trigger a response answers.** A question asked in that second (with ``answer_questions``,
the default, a turn holding a question must respond: an untrained model may not; a trained one
may be trusted to wait for a forward question with ``answer_questions=False``, and its next response
answers the oldest open question); otherwise the standing instruction the response is most similar
to (MiniLM), or the only one. A response with nothing to answer is dropped (logged), and so is one to
an instruction that responded less than ``min_gap_s`` ago (``SH_DECISION_REFRACTORY_S``).
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from streamharness.decision.policy import Decision, DecisionPolicy, Evidence, InstructionState, PendingQuestion, StreamState
from streamharness.engine.core import CacheFull, StreamingEngine
from streamharness.engine.model import DecodedText, ImageRejected, TokenChunk
from streamharness.protocol import IM_START, RESPONSE, SILENCE, user_turn
from streamharness.v1 import common_pb2

log = logging.getLogger(__name__)

PROTOCOL_PROMPT = (
    "You are a live video assistant watching a camera stream one frame per second; you never see the future. "
    "Each user turn is the time in seconds and the frame; a question or a standing instruction may come first. "
    f"Reply {SILENCE} when nothing needs saying now. Reply {RESPONSE} followed by one short sentence when a standing "
    "instruction is met in this frame or a question can be answered."
)


@dataclass(frozen=True)
class ModelPolicyConfig:
    carry_turns: int = 15  # turns kept when the cache is rebuilt (a new prefix, or a full cache)
    lead_s: float = 15.0  # fetch and build the next chunk's prefix this long before its boundary
    chunk_s: float = 200.0  # memory's chunk length (SH_TIERS_CHUNK_S)
    answer_questions: bool = True
    min_gap_s: float = 10.0  # an instruction's responses closer than this are not published (a prompted model repeats itself)
    alert_max_new_tokens: int = 40
    question_max_new_tokens: int = 128
    context_every_s: float = 5.0  # memory's prefix is read again after this much media time (a late summary)
    system_prompt: str = PROTOCOL_PROMPT
    overflow: str = "drop"  # a cache past high_water: "drop" its oldest turns in place, or "rebuild" it (prefix + carried turns)
    high_water: float = 0.8  # of the engine's capacity: past it the cache is shortened ...
    low_water: float = 0.6  # ... to this (drop), so that drops are rare and every step costs about the same
    prefix_share: float = 0.5  # memory's prefix takes at most this share of the capacity (its newest end is kept)


@dataclass
class _Turn:
    chunk: TokenChunk  # what was appended to the cache for this step, in order
    tail_len: int  # its first tokens are the previous reply's tail


@dataclass
class _Memo:
    """What the policy keeps of one stream (``StreamState.policy_state['model']``)."""

    turns: deque  # the last carry_turns _Turns, oldest first
    tail: list[int] = field(default_factory=list)  # the last reply's tokens not in the cache yet
    prefix: str = ""  # memory's prefix text the cache is (being) built on
    fetched_ms: int | None = None  # media time memory's context was last read at
    announced: dict = field(default_factory=dict)  # instruction id -> text the model was told
    raw_prefix: str | None = None  # memory's prefix as read (memo.prefix is it trimmed to its budget)
    marks: list[int] = field(default_factory=list)  # cache lengths where this cache's turns began (droppable)
    generation: int = -1  # the engine cache the marks are positions in


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ModelPolicy(DecisionPolicy):
    """See the module docstring. ``context(key, now_ms) -> prefix_text | None`` reads memory's
    stable prefix at a media time (None: no memory or not reachable; the prefix is then kept)."""

    name = "model"
    batched = True

    def __init__(self, engine: StreamingEngine, config: ModelPolicyConfig = ModelPolicyConfig(), *,
                 context: Callable[[common_pb2.StreamKey, int], str | None] | None = None,
                 embed: Callable[[Sequence[str]], np.ndarray] | None = None) -> None:
        self.engine = engine
        self.config = config
        self.context = context
        self._embed = embed
        em = engine.model
        self._silence = em.ids(SILENCE)
        self._response = em.ids(RESPONSE)
        if not self._silence or not self._response or self._silence == self._response:
            raise ValueError("the model's tokenizer cannot tell </silence> from </response>")
        self._close_turn = [em.im_end, *em.ids("\n")]
        self._blanks = _blank_ids(em.tokenizer)
        self._im_start = em.tokenizer.convert_tokens_to_ids(IM_START)
        self.rebuilds: dict[str, int] = {}

    @property
    def takes_frames(self) -> bool:
        """A VLM reads the frames (the stage consumes ``frames``); a text model reads the encoder's
        captions (the stage consumes ``embeddings``)."""
        return self.engine.model.takes_images

    # -- state -------------------------------------------------------------------------------------
    def _memo(self, state: StreamState) -> _Memo:
        memo = state.policy_state.get("model")
        if memo is None:
            memo = state.policy_state["model"] = _Memo(deque(maxlen=max(1, self.config.carry_turns)))
        return memo

    def add_instruction(self, state: StreamState, instruction_id: str, text: str) -> InstructionState:
        vec = self._embed([text])[0] if self._embed is not None else np.zeros(0, np.float32)
        inst = InstructionState(instruction_id, text, "model", vec)
        state.instructions[instruction_id] = inst
        return inst

    def system_text(self, state: StreamState, memory_prefix: str) -> str:
        """The cache's stable prefix: the protocol, the standing instructions, memory's prefix."""
        parts = [self.config.system_prompt]
        if state.instructions:
            parts.append("Standing instructions:\n" + "\n".join(f"- {i.text}" for i in state.instructions.values()))
        if memory_prefix.strip():
            parts.append(memory_prefix.strip())
        return "\n\n".join(parts)

    def _carried(self, turns: list[_Turn]) -> list[TokenChunk]:
        """The turns as they are appended again (the first without the tail of the turn before it)."""
        if not turns:
            return []
        first = turns[0]
        c = first.chunk
        head = TokenChunk(c.ids[first.tail_len:], c.mm[first.tail_len:], c.pixel_values, c.grid)
        return [head, *(t.chunk for t in turns[1:])]

    def _rebuild(self, state: StreamState, memo: _Memo, *, background: bool, reason: str, room: int = 0) -> None:
        """Rebuild the cache on the prefix and the carried turns; with ``room``, the oldest carried
        turns are left out until that many tokens stay free."""
        from streamharness.telemetry import meters

        system = self.system_text(state, memo.prefix)
        head = self.engine.model.system(system)
        turns = list(memo.turns)
        carried = self._carried(turns)
        while room and turns and len(head) + sum(len(c) for c in carried) + room > self.engine.config.capacity:
            turns.pop(0)
            carried = self._carried(turns)
        chunks = [head, *carried]
        if self.engine.rebuild(_name(state), chunks, key=_key(system), background=background):
            meters.engine_rebuilds().add(1, {"reason": reason})
            self.rebuilds[reason] = self.rebuilds.get(reason, 0) + 1

    def _prepare(self, state: StreamState, memo: _Memo, now_ms: int) -> None:
        """Read memory's prefix when due and make sure the cache exists on it (module docstring)."""
        name = _name(state)
        chunk_ms = int(self.config.chunk_s * 1000)
        boundary = (now_ms // chunk_ms + 1) * chunk_ms
        at = boundary if now_ms >= boundary - self.config.lead_s * 1000 else now_ms
        if self.context is not None and (memo.fetched_ms is None or now_ms - memo.fetched_ms >= self.config.context_every_s * 1000
                                         or at // chunk_ms != memo.fetched_ms // chunk_ms):
            prefix = self.context(state.key, at)
            memo.fetched_ms = at if at == boundary else now_ms
            if prefix is not None and prefix != memo.raw_prefix:
                memo.raw_prefix, memo.prefix = prefix, self._fit_prefix(prefix)
        want = _key(self.system_text(state, memo.prefix))
        if not self.engine.has(name):
            self._rebuild(state, memo, background=False, reason="missing")
        elif self.engine.rebuilding(name):
            return
        elif self.engine.prefix_key(name) != want:
            self._rebuild(state, memo, background=True, reason="prefix")
        elif self.engine.length(name) > self.config.high_water * self.engine.config.capacity:
            if not (self.config.overflow == "drop" and self._drop(state, memo)):
                self._rebuild(state, memo, background=True, reason="full")

    def _budget(self, question: bool) -> int:
        """The most tokens a response is given: an answer's or an alert's."""
        return self.config.question_max_new_tokens if question else self.config.alert_max_new_tokens

    def _reply_room(self, question: bool) -> int:
        """The most tokens a step appends after its turn: the longer option, the response's budget
        and the turn's close."""
        return max(len(self._silence), len(self._response)) + self._budget(question) + len(self._close_turn) + 1

    def _ensure_room(self, state: StreamState, memo: _Memo, need: int) -> None:
        """Make sure this step (``need`` tokens) fits the live cache. The high-water mark keeps it so
        as a rule; it can fail while a background rebuild is behind (the live cache goes on growing
        until the new one catches up) or when the prefix and the carried turns alone are long. Then
        the oldest turns are dropped in place, or, failing that (or during a rebuild, whose live
        cache cannot be cut), the cache is rebuilt now from the prefix and as many carried turns as
        leave room: a one-off stall rather than a step that cannot be taken."""
        name = _name(state)
        capacity = self.engine.config.capacity
        if not self.engine.has(name) or self.engine.length(name) + need <= capacity:
            return
        if not self.engine.rebuilding(name) and self.config.overflow == "drop" and self._drop(state, memo) \
                and self.engine.length(name) + need <= capacity:
            return
        self.engine.close(name)  # a background rebuild still running stops (its slot comes back)
        self._rebuild(state, memo, background=False, reason="full", room=need)

    def _fit_prefix(self, prefix: str) -> str:
        """Memory's prefix within ``prefix_share`` of the capacity, in tokens: its newest end is kept
        (summaries and blocks are oldest first), by a rule that depends on the text alone, so it
        stays byte-identical within a chunk. Without it a long stream's memory outgrows the cache."""
        em = self.engine.model
        budget = int(self.config.prefix_share * self.engine.config.capacity)
        ids = em.ids(prefix)
        if len(ids) <= budget:
            return prefix
        return "…" + em.decode(ids[len(ids) - budget + 1:]).lstrip()

    def _drop(self, state: StreamState, memo: _Memo) -> bool:
        """Drop the cache's oldest turns in place (:meth:`StreamingEngine.drop`) down to
        ``low_water`` of the capacity, keeping the last ``carry_turns``; False when this cache's
        turns are not known well enough to (then it is rebuilt)."""
        from streamharness.telemetry import meters

        name = _name(state)
        if memo.generation != self.engine.generation(name):
            return False
        marks = self.engine.drop_oldest_turns(name, memo.marks, self.config.low_water * self.engine.config.capacity,
                                              self.config.carry_turns)
        if marks is None:
            return False
        memo.marks = marks
        meters.engine_rebuilds().add(1, {"reason": "drop"})
        self.rebuilds["drop"] = self.rebuilds.get("drop", 0) + 1
        return True

    def _mark(self, state: StreamState, memo: _Memo) -> None:
        """Note where this step's turn begins in the cache (what :meth:`_drop` may cut at)."""
        name = _name(state)
        generation = self.engine.generation(name)
        if memo.generation != generation:
            memo.generation, memo.marks = generation, []
        memo.marks.append(self.engine.length(name))

    # -- steps -------------------------------------------------------------------------------------
    def step(self, state: StreamState, evidence: Evidence) -> list[Decision]:
        return self.step_many([(state, evidence)])[0]

    def _said(self, state: StreamState, memo: _Memo, due: list[PendingQuestion]) -> list[str]:
        said = [q.text for q in due]
        current = {i.instruction_id: i.text for i in state.instructions.values()}
        said += [text for iid, text in current.items() if iid not in memo.announced]
        said += [f"Stop: {text}" for iid, text in memo.announced.items() if iid not in current]
        memo.announced = current
        return said

    def _turn(self, state: StreamState, memo: _Memo, ev: Evidence, said: list[str]) -> TokenChunk:
        em = self.engine.model
        text = user_turn(ev.media_ts_ms / 1000, said)
        try:
            turn = em.user_turn(text, ev.jpeg or None, caption=ev.caption)
        except ImageRejected as err:
            log.warning("%s t=%.1fs: %s; the step goes on without the frame", _name(state), ev.media_ts_ms / 1000, err)
            turn = em.user_turn(text, None, caption=ev.caption)
        return TokenChunk(list(memo.tail)) + turn if memo.tail else turn

    def step_many(self, items: Sequence[tuple[StreamState, Evidence]]) -> list[list[Decision]]:
        """One protocol step for each stream (each at most once), in one batched forward."""
        rows = []
        for state, ev in items:
            memo = self._memo(state)
            due = [q for q in state.questions if q.media_ts_ms <= ev.media_ts_ms]
            said = self._said(state, memo, due)
            chunk = self._turn(state, memo, ev, said)
            self._prepare(state, memo, ev.media_ts_ms)
            self._ensure_room(state, memo, len(chunk) + self._reply_room(bool(due)))
            if not self.engine.rebuilding(_name(state)):
                self._mark(state, memo)
            rows.append((state, ev, memo, due, chunk))
        options = [[self._response] if due and self.config.answer_questions else [self._silence, self._response]
                   for _, _, _, due, _ in rows]
        batch = [(_name(state), chunk) for state, _, _, _, chunk in rows]
        try:
            chosen = self.engine.decide(batch, options)
        except CacheFull:
            # No room left in some cache (a rebuild could not keep up): rebuild those now from the
            # prefix and the carried turns (the pending tail stays pending), then step again.
            for state, _, memo, _, chunk in rows:
                if self.engine.length(_name(state)) + len(chunk) + 64 > self.engine.config.capacity:
                    self.engine.close(_name(state))
                    self._rebuild(state, memo, background=False, reason="full")
            chosen = self.engine.decide(batch, options)
        results: list[list[Decision]] = [[] for _ in items]
        for k, ((state, ev, memo, due, chunk), (choice, p, tail)) in enumerate(zip(rows, chosen)):
            option = options[k][choice]
            appended = [*chunk.ids, *option[:len(option) - len(tail)]]
            state.last = ev

            def remember(generated: list[int], new_tail: list[int], memo=memo, chunk=chunk, appended=appended,
                         tail_len=len(memo.tail)) -> None:
                """The turn as the cache holds it (carried into a rebuild), and the reply's tail."""
                memo.tail = new_tail
                ids = [*appended, *generated]
                memo.turns.append(_Turn(TokenChunk(ids, [*chunk.mm, *[0] * (len(ids) - len(chunk))], chunk.pixel_values,
                                                   chunk.grid), tail_len))

            if option == self._silence:
                remember([], [*tail, *self._close_turn])
                continue
            decision = self._attribute(state, ev, due, "", p, upfront=True)
            if decision is not None:
                # Who the response answers is known before it is written: it streams as it is generated.
                results[k].append(replace(decision, pieces=self._pieces(state, tail, bool(due), remember)))
                continue
            text = "".join(self._pieces(state, tail, bool(due), remember))
            if not text:
                log.info("%s t=%.1fs: the model chose to respond but wrote nothing", _name(state), ev.media_ts_ms / 1000)
                continue
            decision = self._attribute(state, ev, due, text, p)
            if decision is not None:
                results[k].append(decision)
        return results

    def _pieces(self, state: StreamState, tail: list[int], question: bool, remember: Callable[[list[int], list[int]], None]):
        """The response after ``</response>``, generated on the cache as text pieces; ``remember``
        gets the tokens appended and the new tail once it ends (also when the reader stops early)."""
        em = self.engine.model
        budget = self._budget(question)
        # never past the cache (the step made room for the budget; this holds whatever happened since)
        room = self.engine.config.capacity - self.engine.length(_name(state)) - len(tail) - len(self._close_turn) - 1
        budget = max(1, min(budget, room))
        # Inside a response: no decision token, and no new turn (a prompted model that does not
        # close its turn with <|im_end|> goes on to write the next user turn itself).
        banned = [ids[0] for ids in (self._silence, self._response) if len(ids) == 1] + [self._im_start]
        # A response the model chose says something: no stop before its first token (a prompted
        # model that never saw </response> tends to close the turn right after it).
        decoded = DecodedText(em, self.engine.generate(_name(state), tail, max_new_tokens=budget, stop=[em.im_end],
                                                       banned=banned, min_new_tokens=1, blank=self._blanks),
                              em.im_end, lstrip=True)
        try:
            yield from decoded
        finally:
            # generate() appends every token it yields but the last one: that one starts the new tail.
            out = decoded.tokens
            if decoded.stopped or not out:
                remember([*tail, *out], list(self._close_turn))
            else:
                remember([*tail, *out[:-1]], [out[-1], *self._close_turn])

    def _attribute(self, state: StreamState, ev: Evidence, due: list[PendingQuestion], text: str, p: float, *,
                   upfront: bool = False) -> Decision | None:
        """The trigger a response answers (module docstring). ``upfront``: before the text exists —
        None when it cannot be told without it (several instructions) or the response is not to
        be published (a repeat within the gap); the response is then generated first."""
        now = ev.media_ts_ms
        open_questions = due or ([] if self.config.answer_questions else state.questions[:1])
        if open_questions:
            q = open_questions[0]
            state.questions = [x for x in state.questions if x.question_id != q.question_id]
            return Decision(now, common_pb2.TRIGGER_QUESTION, q.question_id, q.text, f"the model answered (p={p:.2f})", p, text=text)
        instructions = list(state.instructions.values())
        if upfront and (len(instructions) != 1 or self._repeat(instructions[0], now)):
            return None
        if not instructions:
            log.info("%s t=%.1fs: the model responded with nothing to answer; dropped: %r", _name(state), now / 1000, text[:80])
            return None
        inst = instructions[0]
        if len(instructions) > 1 and self._embed is not None and text:
            vec = self._embed([text])[0]
            inst = max(instructions, key=lambda i: float(np.dot(i.target_vec, vec)) if i.target_vec.size else 0.0)
        if self._repeat(inst, now):
            log.debug("%s t=%.1fs: %s responded again within %.0fs; not published", _name(state), now / 1000,
                      inst.instruction_id, self.config.min_gap_s)
            return None
        inst.last_fired_ms = now
        return Decision(now, common_pb2.TRIGGER_INSTRUCTION, inst.instruction_id, inst.text, f"the model responded (p={p:.2f})", p, text=text)

    def _repeat(self, inst: InstructionState, now: int) -> bool:
        return inst.last_fired_ms is not None and now - inst.last_fired_ms < self.config.min_gap_s * 1000

    def answer_pending(self, state: StreamState, now_ms: int) -> list[Decision]:
        """Questions asked after the stream's last frame: answered on the cache, in a turn with no
        frame, so none is lost (a stream the engine holds no cache of gets the base behaviour)."""
        due = [q for q in state.questions if q.media_ts_ms <= now_ms]
        name = _name(state)
        if not due or not self.engine.has(name):
            return super().answer_pending(state, now_ms)
        memo = self._memo(state)
        out = []
        for q in due:
            turn = self.engine.model.user_turn(user_turn(now_ms / 1000, [q.text]), None)
            turn = TokenChunk(list(memo.tail)) + turn if memo.tail else turn
            ((_, p, tail),) = self.engine.decide([(name, turn)], [[self._response]])

            def remember(generated, new_tail, memo=memo):
                memo.tail = new_tail

            text = "".join(self._pieces(state, tail, True, remember))
            state.questions = [x for x in state.questions if x.question_id != q.question_id]
            out.append(Decision(max(now_ms, q.media_ts_ms), common_pb2.TRIGGER_QUESTION, q.question_id, q.text,
                                "the model answered at the end of the stream", p, text=text))
        return out

    def forget(self, state: StreamState) -> None:
        """The stream ended: its KV slot goes back."""
        self.engine.close(_name(state))


def _blank_ids(tokenizer) -> frozenset[int]:
    """The tokens that decode to whitespace only (a response of them says nothing: SmolLM2 prompted
    with the protocol wrote "\n" and closed the turn, every time, on the 2-hour eval). Read once, when
    the policy is built, rather than on the first response."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, text in enumerate(texts) if text and not text.strip())


def _name(state: StreamState) -> str:
    return f"{state.key.tenant}/{state.key.stream_id}"
