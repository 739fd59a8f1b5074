"""Response delivery under at-least-once (issue 14), a property test: whatever duplicates,
redeliveries and regenerations the pipeline produces — Kafka redelivers a suffix of a partition, a
responder killed mid-answer leaves an incomplete attempt and the next one generates it again whole,
a resume reads everything back — the gateway's per-session delivery (``_Session.offer``) and the
SDK's assembly (``Session.responses``) yield every response exactly once, whole: the text of one
complete attempt, never a splice of two."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamharness.client import Session
from streamharness.gateway.service import _Session
from streamharness.keys import make_key
from streamharness.limits import TokenBucket
from streamharness.session import SessionMapper
from streamharness.v1 import common_pb2, events_pb2

KEY = make_key("t", "cam")


def chunks(response_id: str, attempt: str, pieces: list[str], complete: bool) -> list[events_pb2.ResponseEvent]:
    out = [events_pb2.ResponseEvent(key=KEY, session_id="s", response_id=response_id, index=i, text=t, attempt=attempt,
                                    trigger=common_pb2.TRIGGER_QUESTION, question_id=response_id)
           for i, t in enumerate(pieces)]
    if complete:
        out.append(events_pb2.ResponseEvent(key=KEY, session_id="s", response_id=response_id, index=len(pieces), final=True,
                                            attempt=attempt, trigger=common_pb2.TRIGGER_QUESTION, question_id=response_id))
    return out


@st.composite
def partitions(draw):
    """One partition's records as the gateway may read them: each response a run of attempts
    (every one but the last cut off after a few chunks, a crash), interleaved with the other
    responses, then suffixes of the partition delivered again (a consumer that did not commit)."""
    log, wanted = [], {}
    for n in range(draw(st.integers(1, 4))):
        rid = f"r{n}"
        attempts = draw(st.integers(1, 3))
        for a in range(attempts):
            pieces = draw(st.lists(st.sampled_from(["Two ", "people ", "walk", ".", "A car", " stops"]), min_size=1, max_size=4))
            last = a == attempts - 1
            part = chunks(rid, f"{rid}-a{a}", pieces, complete=last)
            if not last:
                part = part[: draw(st.integers(1, len(part)))]  # killed mid-answer
            else:
                wanted[rid] = "".join(pieces)
            log.extend(part)
    # The responses of one partition interleave (other streams, other questions), each keeping its order.
    order = draw(st.permutations(range(len(log))))
    by_response: dict[str, list] = {}
    for r in log:
        by_response.setdefault(r.response_id, []).append(r)
    merged, cursors = [], {k: 0 for k in by_response}
    for i in order:
        rid = log[i].response_id
        merged.append(by_response[rid][cursors[rid]])
        cursors[rid] += 1
    for _ in range(draw(st.integers(0, 3))):  # redelivered suffixes
        start = draw(st.integers(0, len(merged) - 1))
        merged = merged + merged[start:]
    return merged, wanted


class _Call:
    """What a grpc.aio call hands the SDK: the gateway's outbound messages, then EOF. ``then``:
    what the SDK reads after those (a reconnect: the resumed call's messages, made at that moment
    from what the client holds then)."""

    def __init__(self, messages, then=None) -> None:
        self._messages, self._then = list(messages), then

    async def read(self):
        import grpc

        if not self._messages and self._then is not None:
            self._messages, self._then = list(self._then()), None
        return self._messages.pop(0) if self._messages else grpc.aio.EOF


def delivered(records, *, resume_at: int | None = None) -> tuple[list, list]:
    """(what the gateway sent, the responses the SDK yields) for ``records`` through one gateway
    session or, with ``resume_at``, a session cut after that many records and resumed on a second
    gateway that reads every record back, the client sending the ids it holds whole; the SDK reads
    both calls with one ``responses()``, as it does across a reconnect."""

    async def run():
        loop = asyncio.get_running_loop()

        def session() -> _Session:
            mapper = SessionMapper("t", "s")
            mapper.key = KEY
            return _Session("s", KEY, mapper, loop, TokenBucket(1, 1))

        def sent(gw: _Session) -> list:
            out = []
            while not gw.outbound.empty():
                out.append(gw.outbound.get_nowait())
            return out

        sdk = Session("unused:1", stream_id="cam")
        wire: list = []
        first = session()
        for r in records[: resume_at if resume_at is not None else len(records)]:
            first.offer(r)
        wire += sent(first)

        def resume() -> list:
            second = session()
            second.complete.update(sdk._complete)  # SessionStart.received_response_ids
            second.replaying = True
            for r in records[resume_at:]:
                second.offer(r)  # live records that came during the read-back wait
            second.replayed(records)  # everything read back from the responses topic
            resumed = sent(second)
            wire.extend(resumed)
            return resumed

        sdk._call = _Call(list(wire), then=resume if resume_at is not None else None)
        got = [r async for r in sdk.responses()]
        return wire, got

    return asyncio.run(run())


def finals(wire) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in wire:
        if m.response.final:
            out[m.response.response_id] = out.get(m.response.response_id, 0) + 1
    return out


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(partitions())
def test_every_response_is_yielded_once_and_whole(case):
    records, wanted = case
    wire, got = delivered(records)
    assert finals(wire) == {rid: 1 for rid in wanted}  # the gateway itself sends each response's end once
    assert sorted(r.response_id for r in got) == sorted(wanted)  # each once
    assert {r.response_id: r.text for r in got} == wanted  # whole: the complete attempt's text


@PROPERTY
@given(partitions(), st.data())
def test_a_resume_anywhere_still_yields_every_response_once_and_whole(case, data):
    records, wanted = case
    wire, got = delivered(records, resume_at=data.draw(st.integers(0, len(records))))
    assert finals(wire) == {rid: 1 for rid in wanted}  # never sent again once the client holds it whole
    assert sorted(r.response_id for r in got) == sorted(wanted)
    assert {r.response_id: r.text for r in got} == wanted


def test_a_regenerated_answer_restarts_and_a_late_chunk_of_the_old_attempt_is_dropped():
    old = chunks("r", "a1", ["Six ", "people in "], complete=False)
    new = chunks("r", "a2", ["Three ", "people."], complete=True)
    records = [*old, new[0], old[1], *new[1:]]  # the zombie's late chunk arrives after the new start
    wire, got = delivered(records)
    assert [(r.response_id, r.text) for r in got] == [("r", "Three people.")]
    assert [(m.response.index, m.response.restart) for m in wire] == [(0, False), (1, False), (0, True), (1, False), (2, False)]
