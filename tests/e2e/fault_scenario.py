"""The fault-injection scenario of ``tests/e2e/test_faults.py``: a camera stream through the running
stack while a fault is injected mid-stream, and what a user of the stream would notice afterwards.

The stream: ``vtest.avi`` (PETS 2009, people walking) at one frame per media second, through the
gateway with the SDK, at ``speed`` × real time. The street empties for six seconds in every twelve
(the frame is the video's median background, where the people detector finds nobody), so "tell me
when someone walks in" has something to report again and again — after a fault as well as before.
A question every ten media seconds.

The fault runs on the calling (main) thread while the stream runs on a thread of its own: the
stack's servers are tied to the thread that started them (``PR_SET_PDEATHSIG``), so a broker
restarted from a passing thread would die with it.

What is checked afterwards (:meth:`ScenarioResult.failures`):

* the session carried the stream to its end (with ``reconnect=True`` where the fault can drop it);
* every frame the gateway acked as published is in memory's short-term tier exactly once (read back
  with ``MemoryService.Items``) and was encoded (``embeddings`` topic; redeliveries there are
  allowed: memory's ids are deterministic);
* every question has exactly one whole answer (final chunk; the text the responder wrote on its
  final record), or an explicit refusal or error — never none, never two, never a half answer;
* the standing instruction fires after the fault is over (a proactive response at a later media time).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import grpc
import numpy as np
from kafka import KafkaConsumer, TopicPartition
from pydantic import SecretStr

from streamharness.auth import AuthSettings
from streamharness.client import Response, Session
from streamharness.devinfra.common import log_tail
from streamharness.devinfra.stack import LocalStack
from streamharness.ingest.frames import encode_jpeg
from streamharness.media import read_video, sample_path
from streamharness.memory.client import MemoryClient
from streamharness.v1 import common_pb2, events_pb2, memory_pb2, session_pb2

log = logging.getLogger(__name__)

TENANT = "default"  # the stack's gateway is anonymous: no x-tenant metadata → "default"
INSTRUCTION_ID = "walk-in"
INSTRUCTION = "tell me when someone walks in"
QUESTIONS = ("How many people are in the street?", "What is happening right now?",
             "Is anyone walking towards the camera?", "Describe the scene in a few words.")
# The street is empty for the last EMPTY_S seconds of every CYCLE_S: several decision steps, so that a
# lagging decision stage (which sheds older frames, keeping each stream's newest) or an encoder that
# counts people only every few media seconds still sees it empty before people come back.
CYCLE_S, EMPTY_S = 12, 6
QUESTION_EVERY_S, QUESTION_OFFSET_S = 10, 5


# -- the media ----------------------------------------------------------------------------------
@cache
def _media() -> tuple[tuple[bytes, ...], bytes]:
    """vtest.avi at 1 fps as JPEGs, and its median background (the street with nobody in it)."""
    frames = list(read_video(sample_path("vtest.avi"), fps=1.0))
    background = np.median(np.stack([f.rgb for f in frames]), axis=0).astype(np.uint8)
    return tuple(encode_jpeg(f.rgb, 90) for f in frames), encode_jpeg(background, 90)


def frame_at(second: int) -> bytes:
    """The frame of media second ``second`` (the video loops; the street empties every cycle)."""
    frames, empty = _media()
    return empty if second % CYCLE_S >= CYCLE_S - EMPTY_S else frames[second % len(frames)]


def walk_in_seconds(until_s: int) -> list[int]:
    """Media seconds at which people come back into the empty street."""
    return [s for s in range(CYCLE_S, until_s + 1, CYCLE_S)]


# -- faults -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """A fault injected into a running stack. ``inject`` returns what happened, in words;
    ``reconnect``: the fault can drop the client's session (the SDK must reconnect)."""

    name: str
    inject: Callable[[LocalStack], str]
    reconnect: bool = False
    logs: tuple[str, ...] = ()  # the processes whose log tails are evidence
    mid_answer: bool = False  # inject it while a response is being streamed (its first chunks arrived, not its last)


def kill_and_restart(service: str) -> Fault:
    def inject(stack: LocalStack) -> str:
        code = stack.kill(service)
        took = stack.restart(service)
        return f"{service} killed (exit {code}), SERVING again after {took:.1f} s"

    # Losing ingest or a gateway drops the client's call; the other stages are behind Kafka. The
    # responder is killed in the middle of an answer: the one fault that can cut a response in two.
    return Fault(service, inject, reconnect=service == "ingest" or service.startswith("gateway"), logs=(service,),
                 mid_answer=service == "responder")


def broker_restart() -> Fault:
    def inject(stack: LocalStack) -> str:
        return f"broker stopped and started again on {stack.broker.bootstrap_servers} in {stack.restart_broker():.1f} s"

    return Fault("broker", inject, reconnect=True, logs=("broker", "ingest", "decision", "responder"))


def triton_pause(seconds: float = 10.0) -> Fault:
    def inject(stack: LocalStack) -> str:
        stack.pause_triton()
        try:
            time.sleep(seconds)
        finally:
            stack.resume_triton()
        return f"tritonserver SIGSTOPped for {seconds:g} s, then SIGCONTinued"

    return Fault("triton", inject, logs=("triton", "encoder", "decision"))


# -- what the client saw ------------------------------------------------------------------------
@dataclass
class ChunkLog:
    """Every response chunk as it arrived, by response id; an index-0 chunk (a ``restart``, or a
    response delivered again after a resume) starts a new attempt. Once a response is whole (its
    final chunk came) its later chunks are only counted: the SDK drops them too."""

    attempts: dict[str, list[list[session_pb2.ResponseChunk]]] = field(default_factory=lambda: defaultdict(list))
    restarts: Counter = field(default_factory=Counter)
    after_final: Counter = field(default_factory=Counter)

    def add(self, chunk: session_pb2.ResponseChunk) -> None:
        tries = self.attempts[chunk.response_id]
        if tries and tries[-1] and tries[-1][-1].final:
            self.after_final[chunk.response_id] += 1
            return
        if chunk.restart:
            self.restarts[chunk.response_id] += 1
        if not tries or chunk.index == 0 or chunk.restart:
            tries.append([])
        tries[-1].append(chunk)

    def problems(self) -> list[str]:
        """Responses whose last attempt is not whole: no final chunk, or indices with gaps or repeats."""
        out = []
        for rid, tries in self.attempts.items():
            last = tries[-1]
            indices = [c.index for c in last]
            if not last[-1].final:
                out.append(f"half answer: response {rid} ended after chunks {indices} with no final chunk")
            elif indices != list(range(len(last))):
                out.append(f"response {rid}: chunk indices {indices} (gaps or repeats)")
        return out


@dataclass
class ScenarioResult:
    stream_id: str
    fault: Fault
    planned_end_ms: int = 0
    sent_ms: int = -1  # media time of the last frame sent
    fault_at_ms: list[int] = field(default_factory=list)  # media time of the last frame sent when each fault began
    recovered_ms: list[int] = field(default_factory=list)  # ... and when it was over
    fault_notes: list[str] = field(default_factory=list)
    questions: dict[str, int] = field(default_factory=dict)  # question id -> media time asked
    responses: list[Response] = field(default_factory=list)  # what Session.responses() yielded
    chunks: ChunkLog = field(default_factory=ChunkLog)
    streaming: set = field(default_factory=set)  # response ids with chunks received and no final one yet
    acked_ms: Counter = field(default_factory=Counter)  # frames acked as published (sampled), by media time
    sent_seqs: dict[int, int] = field(default_factory=dict)  # frame seq -> media time
    answered_seqs: set = field(default_factory=set)  # frame seqs with an ack (any) or an error
    question_acks: set = field(default_factory=set)  # media times (and ids) of the questions acked
    errors: list[session_pb2.SessionError] = field(default_factory=list)
    end_acked: bool = False
    ended_by: str = ""  # how the session's call ended, when it did not end normally
    stream_error: str = ""  # an exception in the streaming thread
    memory_ms: Counter = field(default_factory=Counter)  # memory's short-term items, by media time
    encoded_ms: Counter = field(default_factory=Counter)  # embeddings records of the stream, by media time
    people: dict[int, str] = field(default_factory=dict)  # media s -> the encoder's person_count ("*": boxes found)
    final_answers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # responses topic
    wall_s: float = 0.0

    @property
    def key(self) -> str:
        return f"{TENANT}/{self.stream_id}"

    def seen(self, msg: session_pb2.ServerMessage) -> None:
        kind = msg.WhichOneof("message")
        if kind == "response":
            self.chunks.add(msg.response)
            (self.streaming.discard if msg.response.final else self.streaming.add)(msg.response.response_id)
        elif kind == "ack":
            ack = msg.ack
            if ack.kind == session_pb2.Ack.KIND_FRAME:
                self.answered_seqs.add(ack.seq)
                if ack.sampled:
                    self.acked_ms[ack.media_ts_ms] += 1
            elif ack.kind == session_pb2.Ack.KIND_QUESTION:
                self.question_acks.add(ack.media_ts_ms)
                if getattr(ack, "id", ""):
                    self.question_acks.add(ack.id)
            elif ack.kind == session_pb2.Ack.KIND_END:
                self.end_acked = True
        elif kind == "error":
            self.errors.append(msg.error)
            if msg.error.seq:
                self.answered_seqs.add(msg.error.seq)

    # -- the checks ---------------------------------------------------------------------------
    def failures(self) -> list[str]:
        out: list[str] = []
        out += self._stream_failures()
        out += self._frame_failures()
        out += self._question_failures()
        out += self._response_failures()
        out += self._instruction_failures()
        return out

    def _stream_failures(self) -> list[str]:
        out = []
        if self.stream_error:
            out.append(f"the streaming client failed: {self.stream_error}")
        if self.sent_ms < self.planned_end_ms:
            why = self.ended_by or "; ".join(f"{e.code}: {e.message}" for e in self.errors if e.fatal) or "?"
            out.append(f"the session ended at media {self.sent_ms / 1000:.0f} s of {self.planned_end_ms / 1000:.0f} s: {why}")
        elif not self.end_acked:
            out.append(f"the session did not end with its end ack ({self.ended_by or 'no KIND_END ack'})")
        return out

    def _frame_failures(self) -> list[str]:
        out = []
        acked = sorted(self.acked_ms)
        if not acked:
            return ["no frame was acked as published"]
        missing = [t for t in acked if self.memory_ms[t] == 0]
        twice = [t for t in acked if self.memory_ms[t] > 1]
        if missing:
            out.append(f"{len(missing)} of {len(acked)} acked frames are not in memory: media s {_secs(missing)}")
        if twice:
            out.append(f"acked frames in memory more than once: media s {_secs(twice)}")
        unencoded = [t for t in acked if self.encoded_ms[t] == 0]
        if unencoded:
            out.append(f"{len(unencoded)} acked frames never reached the embeddings topic: media s {_secs(unencoded)}")
        return out

    def _question_failures(self) -> list[str]:
        out = []
        # A question's non-fatal error carries seq 0 (a frame's carries its seq): each one rejects one question.
        rejections = [e for e in self.errors if not e.fatal and e.seq == 0]
        for qid, at_ms in sorted(self.questions.items(), key=lambda kv: kv[1]):
            answers = [r for r in self.responses if r.question_id == qid]
            where = f"question {qid} (asked at media {at_ms / 1000:.0f} s)"
            if len(answers) > 1:
                out.append(f"{where} answered {len(answers)} times: {[r.text for r in answers]}")
            elif answers:
                (a,) = answers
                if not a.refusal and not a.text.strip():
                    out.append(f"{where}: empty answer (response {a.response_id})")
            elif at_ms in self.question_acks or qid in self.question_acks:
                out.append(f"{where} was accepted (acked) but got no whole answer and no refusal"
                           + _partial(self.chunks, qid))
            elif rejections:
                rejections.pop(0)  # refused with an explicit error: that is an answer too
            else:
                out.append(f"{where}: no ack, no answer, no error" + _partial(self.chunks, qid))
        return out

    def _response_failures(self) -> list[str]:
        out = []
        ids = Counter(r.response_id for r in self.responses)
        out += [f"response {rid} delivered whole {n} times" for rid, n in ids.items() if n > 1]
        for r in self.responses:
            written = self.final_answers.get(r.response_id, set())
            if r.refusal or not written:
                continue
            if r.text.strip() not in written:
                out.append(f"response {r.response_id}: the client assembled {r.text.strip()!r}, the responder wrote "
                           f"{sorted(written)!r} (a half or mixed answer)")
        out += self.chunks.problems()
        return out

    def _instruction_failures(self) -> list[str]:
        alerts = sorted(r.media_ts_ms for r in self.responses if r.proactive and r.instruction_id == INSTRUCTION_ID)
        if not alerts:
            return ["the standing instruction never fired"]
        after = self.recovered_ms[-1] if self.recovered_ms else 0
        if not any(t > after for t in alerts):
            due = [s for s in walk_in_seconds(self.sent_ms // 1000) if s * 1000 > after]
            trail = " ".join(f"{t}:{c}" for t, c in sorted(self.people.items()))
            return [f"the standing instruction did not fire after the fault (over at media {after / 1000:.0f} s; "
                    f"people walked in again at media s {due}); it fired at media s {_secs(alerts)}; "
                    f"the encoder's person_count by media second ('*': with boxes): {trail}"]
        return []

    def summary(self) -> str:
        alerts = [r.media_ts_ms // 1000 for r in self.responses if r.proactive]
        answers = [r for r in self.responses if r.question_id in self.questions]
        answered = sum(1 for r in answers if not r.refusal)
        refused = {r.question_id: r.refusal for r in answers if r.refusal}
        silent = sorted(ts for seq, ts in self.sent_seqs.items() if seq not in self.answered_seqs)
        return (f"[{self.fault.name}] stream {self.stream_id}: media 0..{self.sent_ms / 1000:.0f} s in {self.wall_s:.0f} s wall; "
                f"fault at media s {_secs(self.fault_at_ms)}, over at {_secs(self.recovered_ms)}: {'; '.join(self.fault_notes)}; "
                f"{len(self.sent_seqs)} frames sent, {sum(self.acked_ms.values())} acked as published, "
                f"{len(silent)} neither acked nor refused {_secs(silent)}, {len(self.memory_ms)} in memory, "
                f"{sum(self.encoded_ms.values())} embeddings records ({sum(n - 1 for n in self.encoded_ms.values() if n > 1)} redelivered); "
                f"{answered}/{len(self.questions)} questions answered, refused {refused}, "
                f"{len(self.errors)} errors {[e.message[:80] for e in self.errors][:4]}; alerts at media s {alerts}; "
                f"{sum(self.chunks.restarts.values())} restarted responses, "
                f"{sum(self.chunks.after_final.values())} chunks after a final one")


def _secs(ms: list[int] | Counter) -> str:
    values = sorted(ms)
    if len(values) > 12:
        return f"{[v // 1000 for v in values[:12]]}... ({len(values)})"
    return str([v // 1000 for v in values])


def _partial(chunks: ChunkLog, qid: str) -> str:
    got = [(rid, [c.index for c in tries[-1]]) for rid, tries in chunks.attempts.items()
           if tries[-1] and tries[-1][0].question_id == qid]
    return f"; chunks received: {got}" if got else ""


# -- the driver ---------------------------------------------------------------------------------
@dataclass
class Scenario:
    """Stream for at least ``media_s`` media seconds at ``speed``; inject ``fault`` at media
    ``fault_at_s`` and again ``repeat_every_s`` after each recovery, ``repetitions`` times in all;
    go on for ``after_s`` media seconds after the last one (long enough for people to walk in again)."""

    stack: LocalStack
    stream_id: str
    fault: Fault
    media_s: int = 30
    speed: float = 2.0
    fault_at_s: int = 8  # after a question (5 s) and an alert (0 s)
    repetitions: int = 1
    repeat_every_s: int = 25
    after_s: int = 24  # two walk-ins (every CYCLE_S) after the fault, the first one well before the end
    max_media_s: int = 300
    drain_timeout_s: float = 150.0

    def run(self) -> ScenarioResult:
        _media()  # decoded before the clock starts: a first frame late by the decoding would bunch the rest
        result = ScenarioResult(self.stream_id, self.fault)
        result.planned_end_ms = self.media_s * 1000  # raised once the faults are over
        faults_done = threading.Event()
        started = time.monotonic()
        thread = threading.Thread(target=self._stream_in_thread, args=(result, faults_done), name=f"stream-{self.stream_id}")
        thread.start()
        try:
            next_at = self.fault_at_s * 1000
            for _ in range(self.repetitions):
                deadline = time.monotonic() + 120
                while result.sent_ms < next_at and thread.is_alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self.fault.mid_answer:
                    deadline = time.monotonic() + 60
                    while not result.streaming and thread.is_alive() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    if not result.streaming:
                        result.fault_notes.append("no answer was being streamed when the fault came")
                if not thread.is_alive():
                    break
                result.fault_at_ms.append(result.sent_ms)
                log.info("fault %s at media %.0f s", self.fault.name, result.sent_ms / 1000)
                result.fault_notes.append(self.fault.inject(self.stack))
                result.recovered_ms.append(result.sent_ms)
                log.info("fault %s over at media %.0f s: %s", self.fault.name, result.sent_ms / 1000, result.fault_notes[-1])
                next_at = result.sent_ms + self.repeat_every_s * 1000
            if result.recovered_ms:
                result.planned_end_ms = max(result.planned_end_ms, result.recovered_ms[-1] + self.after_s * 1000)
        finally:
            faults_done.set()
            thread.join(self.max_media_s / max(self.speed, 0.1) + self.drain_timeout_s + 60)
        result.wall_s = time.monotonic() - started
        if thread.is_alive():
            result.stream_error = result.stream_error or "the streaming thread did not finish in time"
        self._read_back(result)
        return result

    # -- the client, on a thread of its own --------------------------------------------------------
    def _stream_in_thread(self, result: ScenarioResult, faults_done: threading.Event) -> None:
        try:
            asyncio.run(self._stream(result, faults_done))
        except BaseException as err:  # noqa: BLE001 - reported as a failure of the scenario
            log.exception("stream %s failed", self.stream_id)
            result.stream_error = f"{type(err).__name__}: {err}"

    async def _stream(self, result: ScenarioResult, faults_done: threading.Event) -> None:
        # reconnect=True only where the fault can drop the call: elsewhere a dropped session is a failure.
        async with Session(self.stack.gateway_addresses[0], stream_id=self.stream_id, decision_fps=1.0,
                           instructions={INSTRUCTION_ID: INSTRUCTION}, reconnect=self.fault.reconnect) as session:
            async def receive() -> None:
                try:
                    async for response in session.responses(on_message=result.seen):
                        result.responses.append(response)
                except grpc.RpcError as err:  # the call ended with a status: what the user sees
                    result.ended_by = f"the call ended with {err.code().name}: {err.details()}"
                except Exception as err:  # noqa: BLE001 - the SDK failed: reported as such
                    log.exception("stream %s: receiving failed", self.stream_id)
                    result.stream_error = f"receiving failed: {type(err).__name__}: {err}"

            receiver = asyncio.create_task(receive())
            start = time.monotonic()
            second = 0
            while True:
                if receiver.done():
                    result.ended_by = result.ended_by or "the server ended the call"
                    break
                if faults_done.is_set() and second * 1000 > result.planned_end_ms:
                    break
                if second > self.max_media_s:
                    break
                if second % QUESTION_EVERY_S == QUESTION_OFFSET_S:
                    text = QUESTIONS[(second // QUESTION_EVERY_S) % len(QUESTIONS)]
                    try:
                        qid = await asyncio.wait_for(session.ask(text, at_ms=second * 1000, question_id=f"q{second}"), 30)
                    except TimeoutError:
                        result.ended_by = result.ended_by or f"asking at media {second} s blocked for 30 s"
                        break
                    result.questions[qid] = second * 1000
                await asyncio.sleep(max(0.0, start + second / self.speed - time.monotonic()))
                try:
                    seq = await asyncio.wait_for(session.send_frame(second * 1000, frame_at(second)), 30)
                    result.sent_seqs[seq] = second * 1000
                except TimeoutError:
                    result.ended_by = result.ended_by or f"sending the frame of media {second} s blocked for 30 s"
                    break
                result.sent_ms = second * 1000
                second += 1
            if not receiver.done():
                await session.end()
                try:
                    await asyncio.wait_for(asyncio.shield(receiver), self.drain_timeout_s)
                except TimeoutError:
                    result.ended_by = f"the session did not end within {self.drain_timeout_s:g} s of SessionEnd"
                    receiver.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await receiver

    # -- afterwards: memory and the topics -------------------------------------------------------
    def _read_back(self, result: ScenarioResult, timeout_s: float = 90.0) -> None:
        """Memory's short-term items of the stream, once it holds every acked frame (or the time is up);
        the stream's embeddings records and the responder's final records."""
        auth = AuthSettings(internal_secret=SecretStr(self.stack.internal_secret))
        memory = MemoryClient(self.stack.proc("memory").address, "fault-test", auth)
        key = common_pb2.StreamKey(tenant=TENANT, stream_id=self.stream_id)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    items = memory.Items(memory_pb2.ItemsRequest(key=key, tier=memory_pb2.MEMORY_TIER_SHORT), timeout=10).items
                    result.memory_ms = Counter(item.start_ms for item in items)
                except Exception as err:  # noqa: BLE001 - memory may be restarting; retried until the deadline
                    log.info("memory Items: %s", err)
                if all(result.memory_ms[t] for t in result.acked_ms) or time.monotonic() > deadline:
                    break
                time.sleep(1)
        finally:
            memory.close()
        for record in topic_records(self.stack, "embeddings", result.key):
            e = events_pb2.EncodedFrameEvent.FromString(record)
            result.encoded_ms[e.media_ts_ms] += 1
            result.people[e.media_ts_ms // 1000] = f"{e.person_count}{'*' if e.detections else ''}"
        for record in topic_records(self.stack, "responses", result.key):
            r = events_pb2.ResponseEvent.FromString(record)
            if r.final and r.answer_text.strip():
                result.final_answers[r.response_id].add(r.answer_text.strip())


def topic_records(stack: LocalStack, topic: str, key: str, timeout_s: float = 60.0) -> list[bytes]:
    """The values of every record of ``topic`` keyed ``key``, up to the end offsets of now."""
    consumer = KafkaConsumer(bootstrap_servers=stack.broker.bootstrap_servers, enable_auto_commit=False,
                             max_partition_fetch_bytes=32 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        out: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in partitions) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                out += [r.value for r in records if r.key is not None and r.key.decode() == key and r.value is not None]
        return out
    finally:
        consumer.close()


def _log_paths(stack: LocalStack, fault: Fault) -> dict[str, Path]:
    paths = {}
    for name in dict.fromkeys((*fault.logs, "gateway-1")):
        if name == "broker":
            paths[name] = stack.broker.log_path
        elif name == "triton":
            paths[name] = stack.triton.log_path
        else:
            paths[name] = stack.proc(name).log_path
    return paths


def log_offsets(stack: LocalStack, fault: Fault) -> dict[str, int]:
    """How long the logs :func:`evidence` reads are now (what a test adds comes after)."""
    return {name: (path.stat().st_size if path.exists() else 0) for name, path in _log_paths(stack, fault).items()}


def evidence(stack: LocalStack, fault: Fault, offsets: dict[str, int], lines: int = 15, problems: int = 12) -> str:
    """What the faulted processes (and the gateway) logged during the test: its warnings and errors
    (repeats folded, newest last), then the log's last lines."""
    parts = []
    for name, path in _log_paths(stack, fault).items():
        try:
            with open(path, "rb") as f:
                f.seek(offsets.get(name, 0))
                text = f.read().decode(errors="replace")
        except OSError as err:
            parts.append(f"--- {name}: {err} ---")
            continue
        found = problem_records(text)[-problems:]
        parts.append(f"--- {name}: warnings and errors during the test ({len(found)} shown) ---")
        parts += [f"  {line}" for line in found] or ["  (none)"]
        parts.append(f"--- {name}: last {lines} lines ---\n{log_tail(path, lines)}")
    return "\n".join(parts)


# A warning or error: a Python/Rich record's level word, a Java (slf4j) level, Triton's glog E/W prefix.
_PROBLEM = re.compile(r"^(?:[EW]\d{4} |.{0,120}?\b(?:WARNING|WARN|ERROR|CRITICAL|FATAL)\b)")


def problem_records(text: str) -> list[str]:
    """The warning and error records of a log, one line each, repeats folded. The services' records
    are Rich-formatted (continuation lines indented); a Python traceback runs to its last line."""
    records: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if not line.strip():
            continue
        continuation = line.startswith(" ") and line[20:29].strip() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if records and (continuation or in_traceback):
            records[-1] += " " + line.strip()
            if in_traceback and not line.startswith(" "):
                in_traceback = False  # "SomeError: message" ends it
            continue
        records.append(line.strip())
        in_traceback = line.startswith("Traceback")
    out: list[tuple[str, str]] = []
    counts: Counter = Counter()
    for record in records:
        if not (record.startswith(("Traceback", "=== restart")) or _PROBLEM.match(record)):
            continue
        body = re.sub(r"^\[[^\]]*\] ", "", " ".join(record.split()))[:400]  # without the Rich time stamp
        same = re.sub(r"\d+", "#", body)  # repeats differ in numbers only (task ids, ports, times)
        counts[same] += 1
        if counts[same] == 1:
            out.append((same, body))
    return [f"{body} (x{counts[same]})" if counts[same] > 1 else body for same, body in out]
