"""The ``model`` decision policy on a tiny random Qwen2-VL built in code: it emits only protocol
tokens, the decision stage acts on them (a decision and the response itself), questions are
answered in their second, a damaged frame does not stop the stream, and a new memory prefix is
built in the background."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from streamharness import topics  # noqa: E402
from streamharness.decision.model_policy import ModelPolicy, ModelPolicyConfig  # noqa: E402
from streamharness.decision.service import DecisionSettings, DecisionStage  # noqa: E402
from streamharness.engine import EngineConfig, EngineModel, StreamingEngine  # noqa: E402
from streamharness.keys import make_key  # noqa: E402
from streamharness.topology import TOPOLOGY  # noqa: E402
from streamharness.v1 import common_pb2, events_pb2  # noqa: E402

KEY = make_key("t", "cam")
Q = events_pb2.QueryEvent


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def tiny(bias: str | None = None):
    from streamharness.train.vlm import add_streaming_tokens, build_tiny_qwen2_vl

    model, tok, ip = build_tiny_qwen2_vl(["tell me when you see a cup what is on the table ? a red cup"], seed=1)
    tokens = add_streaming_tokens(tok, model)
    if bias is not None:  # make the model say this decision every second: a bias on its output layer
        old = model.lm_head
        head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            head.weight.copy_(old.weight)
            head.bias.zero_()
            head.bias[tokens.silence if bias == "silence" else tokens.response] = 100.0
            head.bias[tok.convert_tokens_to_ids("cup")] = 50.0  # and write about a cup when it responds
        model.lm_head = head
    em = EngineModel(model.eval(), tok, ip)
    return StreamingEngine(em, EngineConfig(capacity=1536, margin=256, slots=4, spare_slots=1)), tokens


class _Captured:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def send(self, topic, key, message):
        self.sent.append((topic, message))

        class _Done:
            def get(self, timeout=None):
                return None

        return _Done()

    def delete(self, topic, key):
        return self.send(topic, key, None)

    def of(self, topic):
        return [m for t, m in self.sent if t == topic]


def cache_text(engine) -> str:
    """The stream's cache as its tokens joined by spaces (the tiny word-level tokenizer's own words)."""
    return " ".join(engine.model.tokenizer.convert_ids_to_tokens(engine.tokens("t/cam")))


def stage(policy) -> DecisionStage:
    svc = DecisionStage(DecisionSettings(policy="model"), policy=policy)
    svc.out = _Captured()
    return svc


def start(instruction: str | None = "tell me when you see a cup") -> events_pb2.QueryEvent:
    instructions = [common_pb2.StandingInstruction(instruction_id="cup", text=instruction)] if instruction else []
    return Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_START, reply_to="gw", instructions=instructions)


def frame(t_s: int, data: bytes | None = None) -> events_pb2.FrameEvent:
    return events_pb2.FrameEvent(key=KEY, session_id="s1", media_ts_ms=t_s * 1000, seq=t_s, jpeg=data if data is not None else jpeg(t_s))


def test_the_stage_reads_frames_and_publishes_responses_with_the_model_policy():
    engine, _ = tiny()
    model_stage = stage(ModelPolicy(engine))
    spec = model_stage.configure(TOPOLOGY["decision"])
    assert topics.FRAMES in spec.consumes and topics.EMBEDDINGS not in spec.consumes
    assert topics.RESPONSES in spec.produces
    rules = DecisionStage(DecisionSettings(policy="rules")).configure(TOPOLOGY["decision"])
    assert topics.EMBEDDINGS in rules.consumes and topics.FRAMES not in rules.consumes
    assert topics.RESPONSES not in rules.produces


def test_an_untrained_model_emits_only_protocol_tokens():
    engine, tokens = tiny()
    svc = stage(ModelPolicy(engine))
    svc._batch = [start(), *(frame(t) for t in range(8))]
    svc.end_batch()
    ids = engine.tokens("t/cam")
    opening = engine.model.ids("<|im_start|>assistant\n")
    replies = [ids[i + len(opening)] for i in range(len(ids) - len(opening)) if ids[i:i + len(opening)] == opening]
    # seven replies in the cache; the eighth is the pending tail, appended with the next turn
    tail = svc.states["t/cam"].policy_state["model"].tail
    assert len(replies) == 7 and tail
    assert set(replies) | {tail[0]} <= {tokens.silence, tokens.response}


def test_the_stage_acts_on_a_response_the_model_chooses():
    engine, _ = tiny(bias="response")
    svc = stage(ModelPolicy(engine, ModelPolicyConfig(min_gap_s=1.5)))
    svc._batch = [start(), *(frame(t) for t in range(4))]
    svc.end_batch()
    decisions = svc.out.of(topics.DECISIONS)
    assert [d.media_ts_ms for d in decisions] == [0, 2000]  # 1 and 3 s: within the gap, not published
    assert all(d.answered and d.policy == "model" and d.instruction_id == "cup" for d in decisions)
    finals = [r for r in svc.out.of(topics.RESPONSES) if r.final]
    assert [r.response_id for r in finals] == [d.decision_id for d in decisions]
    assert all(r.prompt_text == "tell me when you see a cup" for r in finals)
    # streamed: token by token as the model wrote them, in order, and whole in the final record
    for final in finals:
        chunks = [r for r in svc.out.of(topics.RESPONSES) if r.response_id == final.response_id and not r.final]
        assert len(chunks) > 1 and [c.index for c in chunks] == list(range(len(chunks))) and final.index == len(chunks)
        assert "".join(c.text for c in chunks).strip() == final.answer_text and final.answer_text
        first = {h.hop: h.wall_unix_ns for h in chunks[0].hops}
        last = {h.hop: h.wall_unix_ns for h in final.hops}
        assert first["responder_first_token"] <= last["responder_final"]


def test_a_silent_model_stays_silent_and_a_question_is_answered_in_its_second():
    engine, _ = tiny(bias="silence")
    svc = stage(ModelPolicy(engine))
    question = Q(key=KEY, session_id="s1", kind=Q.KIND_QUESTION, question_id="q1", text="what is on the table ?", media_ts_ms=3000)
    svc._batch = [start(), *(frame(t) for t in range(6)), question]
    svc.end_batch()
    decisions = svc.out.of(topics.DECISIONS)
    assert [(d.media_ts_ms, d.question_id, d.trigger) for d in decisions] == [(3000, "q1", common_pb2.TRIGGER_QUESTION)]
    # the question was part of the user turn of second 3, before its time tag
    assert "user \n what is on the table ? \n < 3 . 0 seconds >" in cache_text(engine)


def test_a_damaged_frame_does_not_stop_the_stream():
    engine, _ = tiny(bias="response")
    svc = stage(ModelPolicy(engine, ModelPolicyConfig(min_gap_s=0)))
    svc._batch = [start(), frame(0), frame(1, b"\xff\xd8 not a jpeg"), frame(2)]
    svc.end_batch()
    assert [d.media_ts_ms for d in svc.out.of(topics.DECISIONS)] == [0, 1000, 2000]


def test_the_next_chunks_prefix_is_built_in_the_background_before_its_boundary():
    engine, _ = tiny()
    calls = []

    def context(key, now_ms):
        calls.append(now_ms)
        return "" if now_ms < 10_000 else "a red cup on the table"  # chunk 0's summary, from the boundary on

    policy = ModelPolicy(engine, ModelPolicyConfig(chunk_s=10, lead_s=3, carry_turns=3), context=context)
    svc = stage(policy)
    svc._batch = [start(), *(frame(t) for t in range(8))]
    svc.end_batch()  # second 7 is inside the lead: the boundary's prefix was read and is being built
    assert 10_000 in calls
    assert policy.rebuilds.get("prefix") == 1
    assert engine.wait_rebuild("t/cam", timeout=60)
    svc._batch = [frame(t) for t in range(8, 14)]
    svc.end_batch()
    assert policy.rebuilds.get("prefix") == 1  # the boundary itself needed no rebuild
    assert "a red cup on the table" in cache_text(engine)
    # the cache holds the new prefix, the three turns carried at second 7 (4-6) and every later one
    text = cache_text(engine)
    assert "< 3 . 0 seconds >" not in text
    assert all(f"< {' '.join(str(t))} . 0 seconds >" in text for t in range(4, 14))


def test_a_text_model_reads_the_encoders_captions_instead_of_frames():
    from transformers import LlamaConfig, LlamaForCausalLM

    from streamharness.train.vlm import build_tiny_tokenizer

    tok = build_tiny_tokenizer(["tell me when you see a cup a red cup on the table silence response [ frame ] :"])  # no protocol tokens: scored as words
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    engine = StreamingEngine(EngineModel(model, tok), EngineConfig(capacity=1024, margin=256, slots=3))
    svc = stage(ModelPolicy(engine))
    spec = svc.configure(TOPOLOGY["decision"])
    assert topics.EMBEDDINGS in spec.consumes and topics.FRAMES not in spec.consumes and topics.RESPONSES in spec.produces
    emb = np.zeros(1280, np.float32)
    emb[0] = 1
    svc._batch = [start(), events_pb2.EncodedFrameEvent(key=KEY, session_id="s1", media_ts_ms=0, embedding=emb.tolist(),
                                                        caption="a red cup on the table")]
    svc.end_batch()
    assert "[ frame : a red cup on the table ]" in cache_text(engine)


def test_with_several_instructions_the_response_is_written_first_then_attributed():
    engine, _ = tiny(bias="response")
    svc = stage(ModelPolicy(engine, ModelPolicyConfig(min_gap_s=0)))
    two = Q(key=KEY, session_id="s1", kind=Q.KIND_SESSION_START, reply_to="gw", instructions=[
        common_pb2.StandingInstruction(instruction_id="cup", text="tell me when you see a cup"),
        common_pb2.StandingInstruction(instruction_id="table", text="what is on the table ?")])
    svc._batch = [two, frame(0), frame(1)]
    svc.end_batch()
    decisions = svc.out.of(topics.DECISIONS)
    assert [d.media_ts_ms for d in decisions] == [0, 1000] and all(d.answered for d in decisions)
    assert {d.instruction_id for d in decisions} <= {"cup", "table"}
    finals = [r for r in svc.out.of(topics.RESPONSES) if r.final]
    pieces = [r for r in svc.out.of(topics.RESPONSES) if not r.final]
    assert len(finals) == len(pieces) == 2 and [p.text for p in pieces] == [f.answer_text for f in finals]


def test_a_stream_with_a_question_jumps_the_queue():
    engine, _ = tiny(bias="response")
    policy = ModelPolicy(engine, ModelPolicyConfig(min_gap_s=0))
    batches = []
    step_many = policy.step_many

    def recorded(items):
        batches.append([state.key.stream_id for state, _ in items])
        return step_many(items)

    policy.step_many = recorded
    svc = stage(policy)
    keys = [make_key("t", name) for name in ("a", "b", "c")]

    def start_of(key):
        return Q(key=key, session_id="s", kind=Q.KIND_SESSION_START, reply_to="gw",
                 instructions=[common_pb2.StandingInstruction(instruction_id="cup", text="tell me when you see a cup")])

    question = Q(key=keys[2], session_id="s", kind=Q.KIND_QUESTION, question_id="q", text="what is on the table ?", media_ts_ms=0)
    frames = [events_pb2.FrameEvent(key=k, session_id="s", media_ts_ms=0, seq=1, jpeg=jpeg(i)) for i, k in enumerate(keys)]
    svc._batch = [*(start_of(k) for k in keys), question, *frames]
    svc.end_batch()
    assert batches == [["c"], ["a", "b"]]  # the question's stream alone, first
    first = svc.out.of(topics.RESPONSES)[0]
    assert first.question_id == "q" and first.key.stream_id == "c"


@pytest.mark.parametrize("overflow", ["drop", "rebuild"])
def test_a_long_stream_stays_within_its_cache_and_a_long_memory_within_its_share(overflow):
    """Two minutes on a 1,536-token cache with a memory prefix of ~2,400 tokens: the prefix is
    trimmed to its share (its newest end kept), and the cache never passes its high-water mark by
    more than a turn: its oldest turns are dropped in place (``drop``: no rebuild), or it is rebuilt
    from the prefix and the carried turns (``rebuild``)."""
    engine, _ = tiny("silence")
    memory = " ".join(f"summary {i} : a red cup on the table ." for i in range(300))
    policy = ModelPolicy(engine, ModelPolicyConfig(carry_turns=3, overflow=overflow), context=lambda key, now_ms: memory)
    svc = stage(policy)
    capacity = engine.config.capacity
    svc._batch = [start()]
    longest = 0
    for t0 in range(0, 120, 10):
        svc._batch += [frame(t) for t in range(t0, t0 + 10)]
        svc.end_batch()
        engine.wait_rebuild("t/cam", timeout=60)
        longest = max(longest, engine.length("t/cam"))
    memo = policy._memo(next(iter(svc.states.values())))
    assert len(engine.model.ids(memo.prefix)) <= 0.5 * capacity < len(engine.model.ids(memory))
    assert memo.prefix.startswith("…") and "2 9 9 :" in memo.prefix and "1 0 0 :" not in memo.prefix  # the newest end
    text = cache_text(engine)
    assert "2 9 9 :" in text and "1 0 0 :" not in text
    assert longest <= 0.8 * capacity + 80
    assert "< 1 1 9 . 0 seconds >" in text and "< 1 . 0 seconds >" not in text
    if overflow == "drop":
        assert policy.rebuilds.get("drop", 0) >= 1 and "full" not in policy.rebuilds
    else:
        assert policy.rebuilds.get("full", 0) >= 1 and "drop" not in policy.rebuilds


def test_a_cache_never_overflows_while_its_background_rebuild_is_held_back():
    """The 2-hour eval found it: a chunk boundary's background rebuild falls behind (here it is
    held back), the live cache goes on growing by a turn and a 40-token response every second, and
    it reached the capacity mid-response (CacheFull out of generate). Now the step makes room
    first: a cache that cannot take the turn and its reply is rebuilt there and then."""
    engine, _ = tiny("response")  # responds every second, writing up to alert_max_new_tokens
    release = threading.Event()
    engine.before_rebuild = lambda name: release.wait(120)
    policy = ModelPolicy(engine, ModelPolicyConfig(chunk_s=10, lead_s=3, carry_turns=3, min_gap_s=0,
                                                         alert_max_new_tokens=100),
                         context=lambda key, now_ms: "" if now_ms < 10_000 else "a red cup on the table")
    svc = stage(policy)
    capacity = engine.config.capacity
    svc._batch = [start()]
    longest = 0
    try:
        for t0 in range(0, 24, 4):
            svc._batch += [frame(t) for t in range(t0, t0 + 4)]
            svc.end_batch()  # raised CacheFull before the fix
            longest = max(longest, engine.length("t/cam"))
    finally:
        release.set()
    assert longest <= capacity
    # the boundary's rebuild started (and was held); the step made room by a rebuild of its own
    assert policy.rebuilds.get("prefix", 0) >= 1 and policy.rebuilds.get("full", 0) >= 1
    seconds = {d.media_ts_ms // 1000 for d in svc.out.of(topics.DECISIONS)}
    assert seconds == set(range(24))  # a response every second, none lost to a full cache
    text = cache_text(engine)
    assert "a red cup on the table" in text and "< 2 3 . 0 seconds >" in text


def test_a_response_neither_starts_a_new_turn_nor_stops_before_it_says_something():
    """SmolLM2 prompted with the protocol answered every question with "\\n" and closed the turn
    (the 2-hour eval got no response at all), and, kept going, wrote the next user turn itself.
    A response now goes on past whitespace, and <|im_start|> is never chosen inside it."""
    engine, _ = tiny("response")
    em = engine.model
    tok = em.tokenizer
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():  # the model prefers to open a new turn over writing "cup"
        em.model.lm_head.bias[im_start] = 75.0
    svc = stage(ModelPolicy(engine, ModelPolicyConfig(min_gap_s=0, alert_max_new_tokens=4)))
    svc._batch = [start(), frame(0)]
    svc.end_batch()
    finals = [r for r in svc.out.of(topics.RESPONSES) if r.final]
    assert len(finals) == 1 and "cup" in finals[0].answer_text and "im_start" not in finals[0].answer_text
    blanks = svc.policy._blanks
    assert blanks and all(not tok.decode([i]).strip() for i in blanks) and im_start not in blanks
