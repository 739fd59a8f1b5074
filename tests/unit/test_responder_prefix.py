"""The responder keeps memory's prefix byte-identical across the responses of one chunk, even when
the prompt must be trimmed, so a prefix cache (the engine's, vLLM's) keeps hitting."""

from __future__ import annotations

from streamharness.keys import make_key
from streamharness.responder.service import ResponderSettings, ResponseBuilder
from streamharness.v1 import common_pb2, events_pb2, memory_pb2

KEY = make_key("t", "cam")
PREFIX = "Earlier in the stream:\n" + "\n".join(f"[0:{m:02d}:00] a person walks past the cup number {m}" for m in range(60))


class _Memory:
    def __init__(self, recalled: int) -> None:
        self.recalled = recalled

    def Context(self, request, timeout=None):
        return memory_pb2.ContextResponse(prefix_text=PREFIX, recent=[
            memory_pb2.MemoryItem(start_ms=request.now_ms - 1000, text="a red cup on a table")])

    def Recall(self, request, timeout=None):
        items = [memory_pb2.MemoryItem(start_ms=k * 1000, end_ms=k * 1000 + 500, text=f"moment {k} " + "words " * 40)
                 for k in range(self.recalled)]
        return memory_pb2.RecallResponse(items=items)


def question(text: str, ts: int) -> events_pb2.DecisionEvent:
    return events_pb2.DecisionEvent(key=KEY, media_ts_ms=ts, action=events_pb2.DecisionEvent.ACTION_RESPOND,
                                    trigger=common_pb2.TRIGGER_QUESTION, question_id="q", prompt_text=text, decision_id="d")


def test_the_memory_prefix_is_the_same_bytes_in_two_trimmed_prompts_of_a_chunk():
    settings = ResponderSettings(max_prompt_chars=2500)
    a = ResponseBuilder(settings, _Memory(recalled=1)).prompt(question("where is the cup?", 61_000), KEY, True)
    b = ResponseBuilder(settings, _Memory(recalled=4)).prompt(question("who walked past the cup just now?", 75_000), KEY, True)
    assert len(a.user_text()) + len(a.system) <= 2500 and len(b.user_text()) + len(b.system) <= 2500
    end = a.context.index("cup number 59") + len("cup number 59")
    stable_a = a.context[:end]
    assert stable_a.startswith("…") and b.context[:end] == stable_a  # trimmed, and the same bytes
    assert "Moments" in a.context and a.context[end:] != b.context[end:]
    assert b.messages()[1]["content"].startswith(a.messages()[1]["content"][:len("Memory of the stream so far:\n") + len(stable_a)])
