"""The streaming engine: per-stream KV caches on one model, batched per-second steps, background
rebuilds at memory-chunk boundaries, and a bounded memory budget.

A stream's cache holds its **prefix** (the system text and memory's stable context, whose bytes
change only at chunk boundaries) and the **turns** appended since (each second's user turn and the
previous reply). Nothing is ever re-prefilled on a step:

* :meth:`StreamingEngine.append` runs one forward for many streams at once (each its own KV slot,
  its own length, a lower-right causal mask) and returns each stream's next-token logits;
* :meth:`StreamingEngine.decide` is a step: append each stream's turn, then choose among a few
  token sequences (the protocol's ``</silence>`` / ``</response>``) by constrained greedy decoding
  over their token trie — one forward when each option is one token (a model trained by
  Streaming-Train), one more when they share a first token (a prompted model that never saw them);
* :meth:`StreamingEngine.generate` continues a stream greedily on its cache (the response text);
* :meth:`StreamingEngine.rebuild` builds a new prefix (plus the turns to carry) in a spare slot on a
  background thread, catches up on what the live cache got meanwhile and swaps it in between two
  steps: a boundary never stalls a step, it only waits for the model between two of the rebuild's
  prefill pieces (``prefill_piece`` tokens each).

Memory is fixed at start: ``slots`` KV slots of ``capacity`` tokens (from a byte budget), int8 KV
optional. A stream that is idle for ``idle_evict_s`` (or the least recently used one, when a new
stream needs a slot and none is free) is evicted; ``evictions`` counts them and ``on_evict`` is
called, and its owner rebuilds it on its next step. A stream whose cache would overflow gets
:class:`CacheFull` (its owner rebuilds with a shorter carry).

No pydantic, no OpenTelemetry here (the GPU benchmark imports this on a bare image); the settings
are :class:`EngineConfig`, filled from ``SH_ENGINE_*`` by :mod:`streamharness.engine.settings`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from streamharness.engine.kv import KVPool
from streamharness.engine.model import EngineModel, TokenChunk

log = logging.getLogger(__name__)


class CacheFull(RuntimeError):
    """The stream's KV slot has no room for this append."""


@dataclass(frozen=True)
class EngineConfig:
    capacity: int = 4096  # tokens a stream's cache holds (prefix + turns)
    margin: int = 1024  # the longest single append (a turn, a prefill piece, a generation step)
    slots: int = 0  # KV slots; 0 = as many as budget_bytes holds
    budget_bytes: int = 256 << 20  # the KV pool's size when slots = 0
    int8_kv: bool = False
    idle_evict_s: float = 600.0
    max_batch: int = 64  # streams in one forward
    prefill_piece: int = 512  # a rebuild's prefill is cut into pieces of this many tokens
    spare_slots: int = 1  # slots kept for background rebuilds
    rebuild_yield_s: float = 1.0  # a rebuild piece waits this long at most for steps to finish


@dataclass
class _Stream:
    name: str
    slot: int
    length: int = 0
    next_pos: int = 0
    ids: list[int] = field(default_factory=list)
    pos_after: list[int] = field(default_factory=list)  # next RoPE position after each token
    last_used: float = field(default_factory=time.monotonic)
    prefix_key: str = ""
    rebuild: _Rebuild | None = None
    generation: int = field(default_factory=itertools.count().__next__)  # a new one for every cache built


@dataclass
class _Rebuild:
    shadow: _Stream
    chunks: list[TokenChunk]
    key: str
    log: list[TokenChunk] = field(default_factory=list)  # appended to the live cache since it began
    done: threading.Event = field(default_factory=threading.Event)
    failed: BaseException | None = None


class StreamingEngine:
    def __init__(self, model: EngineModel, config: EngineConfig = EngineConfig(), *,
                 on_evict: Callable[[str, str], None] | None = None,
                 on_rebuild_failed: Callable[[str, BaseException], None] | None = None) -> None:
        self.model = model
        self.config = config
        element = model._torch.tensor([], dtype=model.dtype).element_size()
        per_token = model.shape.bytes_per_token(element, config.int8_kv)
        per_slot = per_token * (config.capacity + config.margin)
        slots = config.slots or max(1, config.budget_bytes // per_slot)
        self.bytes_per_token = per_token
        self.pool = KVPool(model.shape, slots, config.capacity, config.margin, model.dtype, model.device, config.int8_kv)
        self._piece = min(config.prefill_piece, config.margin)  # one forward never appends more than the margin
        self._free = list(range(slots))
        self.streams: dict[str, _Stream] = {}
        self._lock = threading.RLock()  # one forward at a time; held across a swap
        # Steps first: a rebuild piece starts only when no step (append) is waiting or running, so a
        # step waits at most for the one piece already on the model (Python's lock is not fair).
        self._steps = 0
        self._idle = threading.Condition(threading.Lock())
        self.evictions = 0
        self._shadows = 0  # slots held by background rebuilds
        self._swept = time.monotonic()
        self.rebuild_failures = 0
        self.on_evict = on_evict
        self.on_rebuild_failed = on_rebuild_failed
        self.before_rebuild: Callable[[str], None] | None = None  # tests: runs on the rebuild thread first
        log.info("engine: %d KV slots x %d tokens (%.1f MiB, %s KV)", slots, config.capacity,
                 self.pool.bytes / 2**20, "int8" if config.int8_kv else str(model.dtype).replace("torch.", ""))

    def warm_up(self, shapes: Sequence[tuple[int, int]] | None = None) -> float:
        """Forwards of a few ``(streams, tokens)`` shapes on scratch streams, closed after, so that
        the compiled kernels are built before the first real step rather than stalling it for
        seconds. By default, from the smallest batch that runs FlexAttention (``m``): one token
        (shapes of size one are compiled apart), few queries (Flex's decoding kernel) and a frame's
        worth (its main one), for ``m`` to ``m + 2`` streams; with compiled layers also one and two
        streams (below ``m``: SDPA) and, for a VLM, steps with a frame (the vision tower's compiled
        rotary embedding). ``tokens < 0`` means a turn with a frame. Returns the seconds it took;
        the shared engine runs it at start when the model compiles."""
        m = self.model.flex_min_batch
        if shapes is None:
            shapes = [(m, 1), (m + 1, 3), (m + 2, 17), (m + 1, 90), (m, 5), (m, 90), (m + 2, 1)] if self.model.uses_flex else []
            if self.model.kernels.compiled:
                shapes += [(1, 1), (1, 90), (2, 1), (2, 7), (1, 5)]
                if self.model.takes_images:
                    shapes += [(1, -1), (2, -1), (max(m, 3), -1)]
        start = time.monotonic()
        free = max(1, self.pool.slots - min(self.config.spare_slots, self.pool.slots - 1) - len(self.streams))
        frame = self._warm_frame() if any(tokens < 0 for _, tokens in shapes) else None
        for streams, tokens in shapes:
            names = [f"\x00warm-up/{i}" for i in range(min(streams, free))]
            chunk = frame if tokens < 0 else TokenChunk([self.model.pad_id] * min(tokens, self.config.margin))
            try:
                self.append([(name, chunk) for name in names])
            finally:
                for name in names:
                    self.close(name)
        if self.model.uses_flex and free >= m + 1:
            # Streams whose slots are not one run (the usual case once streams come and go) are
            # gathered rather than viewed, and the gathered keys are another kind of tensor to the
            # compiled kernel: build that graph too (it stalled the first such step by ~3 s).
            names = [f"\x00warm-up/{i}" for i in range(m + 1)]
            try:
                # longer than one 128-key block, as every real stream is (one block is another graph)
                self.append([(name, TokenChunk([self.model.pad_id] * min(300, self.config.margin))) for name in names])
                for tokens in (1, 90):
                    self.append([(name, TokenChunk([self.model.pad_id] * tokens)) for name in names[:1] + names[2:]])
            finally:
                for name in names:
                    self.close(name)
        seconds = time.monotonic() - start
        log.info("engine: warmed up %d shapes in %.1f s (%s attention)", len(shapes), seconds, self.model.attention)
        return seconds

    def _warm_frame(self) -> TokenChunk:
        """A protocol turn with one grey frame (for warming the vision tower's kernels)."""
        import io

        from PIL import Image

        from streamharness.protocol import user_turn

        buf = io.BytesIO()
        Image.new("RGB", (224, 224), (128, 128, 128)).save(buf, format="JPEG")
        return self.model.user_turn(user_turn(0.0), buf.getvalue())

    # -- slots -------------------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        return self.pool.slots

    def has(self, name: str) -> bool:
        return name in self.streams

    def length(self, name: str) -> int:
        return self.streams[name].length if name in self.streams else 0

    def tokens(self, name: str) -> list[int]:
        return list(self.streams[name].ids) if name in self.streams else []

    def prefix_key(self, name: str) -> str:
        return self.streams[name].prefix_key if name in self.streams else ""

    def _take_slot(self, busy: set[str], spare: bool = False) -> int:
        # Slots kept for rebuilds: those not already holding one (a stream closed while its rebuild
        # runs must still be re-openable at once).
        reserve = 0 if spare else max(0, min(self.config.spare_slots, self.pool.slots - 1) - self._shadows)
        while len(self._free) <= reserve:
            victims = [s for s in self.streams.values() if s.name not in busy and s.rebuild is None]
            if not victims:
                if spare:
                    raise CacheFull("no KV slot free for a rebuild")
                raise CacheFull(f"all {self.pool.slots} KV slots are in use by streams of this step")
            self._evict(min(victims, key=lambda s: s.last_used), "memory")
        self._free.sort()
        return self._free.pop(0)

    def _evict(self, stream: _Stream, reason: str) -> None:
        self.streams.pop(stream.name, None)
        self._free.append(stream.slot)
        self.evictions += 1
        log.info("engine: evicted stream %s (%s)", stream.name, reason)
        if self.on_evict is not None:
            self.on_evict(stream.name, reason)

    def evict_idle(self, now: float | None = None, busy: set[str] = frozenset()) -> int:
        """Evict streams unused for ``idle_evict_s`` (not those in ``busy``); the count evicted.
        Every append runs this at most every ``idle_evict_s / 10`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._swept = now
            idle = [s for s in self.streams.values()
                    if s.rebuild is None and s.name not in busy and now - s.last_used >= self.config.idle_evict_s]
            for s in idle:
                self._evict(s, "idle")
            return len(idle)

    def close(self, name: str) -> None:
        with self._lock:
            stream = self.streams.pop(name, None)
            if stream is not None:
                self._free.append(stream.slot)  # a rebuild in flight sees it is gone and frees its own slot

    # -- forwards ----------------------------------------------------------------------------------
    def _forward(self, rows: list[tuple[_Stream, TokenChunk]]):
        for stream, chunk in rows:
            if not len(chunk):
                raise ValueError("an empty chunk")
            if len(chunk) > self.config.margin:
                raise ValueError(f"an append of {len(chunk)} tokens is longer than the engine's margin ({self.config.margin})")
            if stream.length + len(chunk) > self.config.capacity:
                raise CacheFull(f"stream {stream.name}: {stream.length} + {len(chunk)} tokens exceed its capacity {self.config.capacity}")
        positions = [self.model.positions(chunk, stream.next_pos) for stream, chunk in rows]
        logits = self.model.forward(self.pool, [s.slot for s, _ in rows], [s.length for s, _ in rows],
                                    [c for _, c in rows], [p for p, _, _ in positions])
        now = time.monotonic()
        for (stream, chunk), (_, nxt, after) in zip(rows, positions):
            stream.length += len(chunk)
            stream.ids.extend(chunk.ids)
            stream.pos_after.extend(after)
            stream.next_pos = nxt
            stream.last_used = now
        return logits

    def append(self, items: Sequence[tuple[str, TokenChunk]]):
        """Append ``chunk`` to each named stream (opened when new; each name at most once) in
        forwards of at most ``max_batch`` streams; next-token logits ``[len(items), vocab]``."""
        torch = self.model._torch
        names = [n for n, _ in items]
        if len(set(names)) != len(names):
            raise ValueError("a stream appears twice in one append")
        with self._stepping():
            return self._append(items, names, torch)

    @contextlib.contextmanager
    def _stepping(self):
        with self._idle:
            self._steps += 1
        try:
            yield
        finally:
            with self._idle:
                self._steps -= 1
                self._idle.notify_all()

    def _yield_to_steps(self) -> None:
        """Called by a rebuild before each piece: wait while steps are waiting or running (at most
        ``rebuild_yield_s``, so that back-to-back steps cannot starve a rebuild for ever)."""
        with self._idle:
            self._idle.wait_for(lambda: self._steps == 0, timeout=self.config.rebuild_yield_s)

    def _append(self, items, names, torch):
        with self._lock:
            busy = set(names)
            if time.monotonic() - self._swept >= self.config.idle_evict_s / 10:
                self.evict_idle(busy=busy)
            rows = []
            for name, chunk in items:
                stream = self.streams.get(name)
                if stream is None:
                    stream = self.streams[name] = _Stream(name, self._take_slot(busy))
                rows.append((stream, chunk))
            # The batch in slot order, so that a run of neighbouring slots is read without a copy.
            order = sorted(range(len(rows)), key=lambda i: rows[i][0].slot)
            results = []
            for start in range(0, len(order), self.config.max_batch):
                results.append(self._forward([rows[order[i]] for i in range(start, min(start + self.config.max_batch, len(order)))]))
            for stream, chunk in rows:
                if stream.rebuild is not None:
                    stream.rebuild.log.append(chunk)
            logits = results[0] if len(results) == 1 else torch.cat(results)
            if order != sorted(order):  # back to the items' order
                logits = logits[torch.as_tensor(sorted(range(len(order)), key=order.__getitem__), device=logits.device)]
            return logits

    def prefill(self, name: str, chunks: Sequence[TokenChunk]):
        """Append ``chunks`` to one stream in pieces of ``prefill_piece`` tokens; the last logits."""
        logits = None
        for chunk in chunks:
            for piece in chunk.split(self._piece):
                logits = self.append([(name, piece)])[0]
        return logits

    def truncate(self, name: str, length: int) -> None:
        """Forget everything after the first ``length`` tokens (their slots are simply overwritten)."""
        with self._lock:
            s = self.streams[name]
            if s.rebuild is not None:
                raise RuntimeError(f"cannot truncate {name} while its cache is being rebuilt")
            if not 0 <= length <= s.length:
                raise ValueError(f"cannot truncate {name} to {length} of {s.length} tokens")
            s.length = length
            del s.ids[length:], s.pos_after[length:]
            s.next_pos = s.pos_after[-1] if s.pos_after else 0

    def generation(self, name: str) -> int:
        """Which cache the stream has: it changes when the cache is rebuilt, swapped or evicted (so
        positions an owner noted in the old one no longer hold); -1 for no cache."""
        s = self.streams.get(name)
        return -1 if s is None else s.generation

    def drop(self, name: str, start: int, end: int) -> None:
        """Forget tokens ``[start, end)`` of a stream's cache (its oldest turns after the prefix)
        without a re-prefill: the tokens after them move down, and their keys are rotated back so
        that their positions follow on from token ``start - 1`` (contiguous positions, as if the
        dropped tokens had never been there). At the first layer this is exactly the cache a
        re-prefill of what is kept would give; above it, the kept tokens' keys and values were
        computed while the dropped ones were visible (the approximation StreamingLLM and
        StreamingVLM make). ``start`` and ``end`` must be turn boundaries (a turn starts with text)."""
        with self._lock:
            s = self.streams[name]
            if s.rebuild is not None:
                raise RuntimeError(f"cannot drop tokens of {name} while its cache is being rebuilt")
            if not 0 < start < end <= s.length:
                raise ValueError(f"cannot drop tokens [{start}, {end}) of {name} ({s.length} tokens; the first stays)")
            delta = s.pos_after[end - 1] - s.pos_after[start - 1]
            if end < s.length:
                self.pool.move(s.slot, end, s.length, start, self.model.shift_keys(delta))
            s.ids = s.ids[:start] + s.ids[end:]
            s.pos_after = s.pos_after[:start] + [p - delta for p in s.pos_after[end:]]
            s.length -= end - start
            s.next_pos -= delta

    def drop_oldest_turns(self, name: str, marks: Sequence[int], target: float, keep: int) -> list[int] | None:
        """Drop the stream's oldest turns (``marks``: the cache lengths where its turns began, oldest
        first) with :meth:`drop`, until it holds ``target`` tokens or only the last ``keep`` turns
        are left. Returns the marks after the drop, or None when no turn can go."""
        keep_from = len(marks) - keep
        if keep_from < 1:
            return None
        length = self.length(name)
        k = 1
        while k < keep_from and length - (marks[k] - marks[0]) > target:
            k += 1
        if marks[k] <= marks[0]:
            return None
        cut = marks[k] - marks[0]
        self.drop(name, marks[0], marks[k])
        return [marks[0]] + [m - cut for m in marks[k + 1:]]

    # -- rebuilds ----------------------------------------------------------------------------------
    def rebuild(self, name: str, chunks: Sequence[TokenChunk], *, key: str = "", background: bool = True) -> bool:
        """Replace the stream's cache by ``chunks`` (a new prefix and the turns to carry). A new
        stream, or ``background=False``, is built now; otherwise the build runs on a thread and is
        swapped in once it holds ``chunks`` plus everything appended to the live cache meanwhile.
        False when a background rebuild of this stream is already running."""
        chunks = list(chunks)
        with self._lock:
            live = self.streams.get(name)
            if live is not None and live.rebuild is not None:
                return False
            if live is None or not background:
                if live is not None:
                    self.streams.pop(name)
                    self._free.append(live.slot)
                self.streams[name] = _Stream(name, self._take_slot({name}), prefix_key=key)
                build_now = True
            else:
                try:
                    shadow = _Stream(name, self._take_slot({name}, spare=True), prefix_key=key)
                    self._shadows += 1
                except CacheFull:
                    # Every slot is some stream's live cache: keep this one as it is and try again
                    # later rather than evict a stream that is being stepped.
                    log.warning("engine: no spare KV slot to rebuild %s in the background; it keeps its cache for now", name)
                    return False
                live.rebuild = _Rebuild(shadow, chunks, key)
                build_now = False
        if build_now:
            self.prefill(name, chunks)
            return True
        threading.Thread(target=self._run_rebuild, args=(live,), name=f"engine-rebuild-{name}", daemon=True).start()
        return True

    def rebuilding(self, name: str) -> bool:
        s = self.streams.get(name)
        return s is not None and s.rebuild is not None

    def wait_rebuild(self, name: str, timeout: float | None = None) -> bool:
        s = self.streams.get(name)
        if s is None or s.rebuild is None:
            return True
        return s.rebuild.done.wait(timeout)

    def _shadow_append(self, shadow: _Stream, chunk: TokenChunk) -> None:
        for piece in chunk.split(self._piece):
            self._yield_to_steps()
            with self._lock:
                self._forward([(shadow, piece)])

    def _run_rebuild(self, live: _Stream) -> None:
        job = live.rebuild
        assert job is not None
        try:
            if self.before_rebuild is not None:
                self.before_rebuild(live.name)
            for chunk in job.chunks:
                if self.streams.get(live.name) is not live:
                    break  # closed or evicted meanwhile: the loop below gives the slot back
                self._shadow_append(job.shadow, chunk)
            while True:
                self._yield_to_steps()
                with self._lock:
                    if self.streams.get(live.name) is not live:
                        self._free.append(job.shadow.slot)  # the stream was closed or evicted meanwhile
                        return
                    if not job.log:
                        # Caught up: swap between two appends (the lock is held by neither now).
                        job.shadow.last_used = live.last_used
                        self.streams[live.name] = job.shadow
                        self._free.append(live.slot)
                        live.rebuild = None
                        return
                    chunk = job.log.pop(0)
                    small = len(chunk) <= self._piece
                    if small:  # most catch-up chunks are one turn: appended under the same lock
                        self._forward([(job.shadow, chunk)])
                if not small:
                    self._shadow_append(job.shadow, chunk)
        except BaseException as err:  # noqa: BLE001 - the live cache goes on without the new prefix
            job.failed = err
            self.rebuild_failures += 1
            log.warning("engine: rebuild of %s failed (%r); the stream keeps its old cache", live.name, err)
            if self.on_rebuild_failed is not None:
                self.on_rebuild_failed(live.name, err)
            with self._lock:
                live.rebuild = None
                if job.shadow.slot not in self._free:
                    self._free.append(job.shadow.slot)
        finally:
            with self._lock:
                self._shadows -= 1
            job.done.set()

    # -- decoding ----------------------------------------------------------------------------------
    def decide(self, items: Sequence[tuple[str, TokenChunk]], options: Sequence[Sequence[Sequence[int]]]):
        """Append each stream's turn and choose, for item ``i``, one of ``options[i]`` (token-id
        sequences) by constrained greedy decoding over their trie. Returns ``[(option index,
        probability at the branching token, tail)]``; ``tail`` holds the chosen option's tokens not
        yet in the cache (the caller appends them with its next turn)."""
        torch = self.model._torch
        if not items:
            return []
        if len(options) != len(items) or any(not opts or any(not o for o in opts) for opts in options):
            raise ValueError("decide needs non-empty options for each item")
        with self._stepping():  # no rebuild piece between the forwards of one step
            return self._decide(items, options, torch)

    def _decide(self, items, options, torch):
        logits = self.append(items)
        live = {i: list(range(len(options[i]))) for i in range(len(items))}
        depth = dict.fromkeys(range(len(items)), 0)
        prob = dict.fromkeys(range(len(items)), 1.0)
        result: dict[int, tuple[int, float, list[int]]] = {}
        while live:
            step: list[tuple[str, TokenChunk]] = []
            rows = []
            # The logits of every token some option may take next, read back in one copy.
            firsts_of = {i: sorted({options[i][o][depth[i]] for o in opts}) for i, opts in live.items()}
            columns = sorted({t for firsts in firsts_of.values() for t in firsts})
            where = {t: c for c, t in enumerate(columns)}
            scores_all = logits[:, columns].float().cpu()
            for i, opts in list(live.items()):
                d, choices = depth[i], options[i]
                firsts = firsts_of[i]
                scores = scores_all[i, [where[t] for t in firsts]]
                best = int(torch.argmax(scores))
                token = firsts[best]
                if len(firsts) > 1:
                    prob[i] = float(torch.softmax(scores, dim=0)[best])
                opts = [o for o in opts if choices[o][d] == token]
                finished = [o for o in opts if len(choices[o]) == d + 1]
                if len(opts) == 1 or finished:
                    choice = finished[0] if finished else opts[0]
                    result[i] = (choice, prob[i], list(choices[choice][d:]))
                    del live[i]
                    continue
                live[i], depth[i] = opts, d + 1
                step.append((items[i][0], TokenChunk([token])))
                rows.append(i)
            if step:
                with torch.inference_mode():
                    logits[torch.as_tensor(rows, device=logits.device)] = self.append(step)
        return [result[i] for i in range(len(items))]

    def generate(self, name: str, first: Sequence[int], *, max_new_tokens: int, stop: Sequence[int] = (),
                 banned: Sequence[int] = (), min_new_tokens: int = 0, blank: Sequence[int] = ()) -> Iterator[int]:
        """Append ``first`` (may be empty: then the stream's last logits are recomputed from its
        last token) and continue greedily, yielding each new token; a stop token is yielded and not
        appended (it is the caller's tail), nor is the last one. ``banned`` tokens are never chosen
        (the protocol's decision tokens inside a response); the stop tokens are not chosen before
        ``min_new_tokens`` tokens that are not in ``blank`` (whitespace, which says nothing). At most
        ``max_new_tokens`` tokens."""
        stops = set(stop)
        banned = list(banned)
        blanks = set(blank)
        said = 0
        if first:
            logits = self.append([(name, TokenChunk(list(first)))])[0]
        else:
            s = self.streams[name]
            last = s.ids[-1]
            self.truncate(name, s.length - 1)
            logits = self.append([(name, TokenChunk([last]))])[0]
        for n in range(max_new_tokens):
            ban = banned + (list(stops) if said < min_new_tokens else [])
            if ban:
                logits = logits.clone()
                logits[ban] = float("-inf")
            token = int(logits.argmax())
            said += token not in blanks
            yield token
            if token in stops or n == max_new_tokens - 1:
                return
            logits = self.append([(name, TokenChunk([token]))])[0]
