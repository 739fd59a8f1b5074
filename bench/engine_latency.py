"""Streaming-engine latency: full re-prefill vs sliding-window re-prefill vs the cached engine,
at several points of a 1-FPS stream, then how many concurrent streams one device steps in time.

Runs on the GPU machine (Python 3.12, torch, transformers; no pydantic needed) with a real-size
architecture and random bf16 weights (latency does not depend on weight values), and on CPU with
SmolLM2-135M (the flatness goal). The state at t seconds is built directly, not replayed:

* the memory prefix at t: ``min(chunks, M)`` chunk summaries of ~``summary_tokens`` and the long-term
  blocks merged from older ones (~``block_tokens`` each, at most L), as the tiers of
  docs/memory.md keep them;
* the turns since the chunk began: measured at the *end* of a chunk (199 turns), the longest a
  cache gets; each turn = the time tag, the frame's vision tokens (``--tokens-per-frame``) or, for a
  text model, a caption, and the reply.

Strategies, timed side by side in one run:

* ``full``: the whole prompt (prefix + every turn of the chunk, frames through the vision tower)
  prefilled for every step, as a server without a cache does;
* ``window``: the last ``--window-s`` seconds of turns, no memory, prefilled every step;
* ``cached``: the engine; a step appends one turn (its frame through the vision tower) and decides;
  TTFT adds the first response token. A background rebuild of the next chunk's prefix runs during
  part of the cached steps (a boundary), so the numbers include it.

Then the concurrency sweep: N streams with ``--stream-context`` tokens cached each (KV filled with
random values directly), one batched step of all N (each one turn with its frame); the largest N
whose p95 step is within 200 ms and p99 within 1 s; bytes of KV per stream, bf16 and int8.

    python bench/engine_latency.py --model qwen2vl-7b --out docs/bench/engine-h200.json     # GPU
    python bench/engine_latency.py --model smollm2 --out docs/bench/engine-cpu.json         # 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

PROFILE = False
PROFILE_STREAMS = 64
SWEEP_STOP_MS = 400.0
PROFILE_OUT: Path | None = None
CACHED_ONLY = False
SYNC_DEBUG = False
VOCAB = "you watch a live camera stream memory summary what is happening now ? tell me when a person walks in"


def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs):
    return {"n": len(xs), "p50_ms": percentile(xs, 0.5) * 1e3, "p95_ms": percentile(xs, 0.95) * 1e3,
            "p99_ms": percentile(xs, 0.99) * 1e3, "max_ms": max(xs) * 1e3 if xs else float("nan")}


def build_qwen2vl_7b(torch, hidden=3584, layers=28, heads=28, kv_heads=4, inter=18944, vocab=152064, weights="model",
                     compile_layers="auto"):
    from transformers import Qwen2VLForConditionalGeneration

    from streamharness.engine import EngineModel
    from streamharness.train.vlm import build_tiny_tokenizer, make_image_processor, qwen2_vl_config

    tok = build_tiny_tokenizer([VOCAB])
    from streamharness.train.vlm import add_streaming_tokens

    add_streaming_tokens(tok)  # </silence> and </response> as single tokens, as a Streaming-Train model has them
    config = qwen2_vl_config(tok, vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                             intermediate=inter, vision_depth=32, vision_embed_dim=1280, vision_heads=16)
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    ip = make_image_processor(56 * 56, 1024 * 1024)
    return EngineModel(model.eval(), tok, ip, weights=weights, compile_layers=compile_layers), tok


class Workload:
    """Token chunks of the synthetic stream for one model."""

    def __init__(self, em, torch, tokens_per_frame: int, caption_words: int = 12):
        self.em, self.torch, self.tpf = em, torch, tokens_per_frame
        self.words = VOCAB.split()
        self.caption_words = caption_words
        if em.takes_images:
            # grid (t=1, h, w) of patches; merge 2x2 -> h*w/4 tokens
            h = 2 * max(1, round(math.sqrt(tokens_per_frame / 2)))
            w = 2 * max(1, round(tokens_per_frame * 4 / h / 2))
            self.grid = (1, h, w)
            self.vision_tokens = h * w // 4
            self.patch_dim = 3 * 2 * 14 * 14

    def text(self, n: int):
        from streamharness.engine import TokenChunk

        ids = self.em.ids(" ".join(self.words[i % len(self.words)] for i in range(n)))
        return TokenChunk(ids[:n])

    def prefix(self, t_s: float, chunk_s=200, m=5, summary_tokens=250, block_tokens=400, blocks_max=42):
        chunks = int(t_s // chunk_s)
        mids = chunks % m if chunks >= m else chunks
        blocks = min(chunks // m, blocks_max)
        n = 200 + mids * summary_tokens + blocks * block_tokens
        return self.em.system(" ".join(self.words[i % len(self.words)] for i in range(n))), n

    def turn(self, t_s: float, question: str = ""):
        from streamharness.engine import TokenChunk
        from streamharness.train.convert import user_turn

        em, torch = self.em, self.torch
        text = user_turn(t_s, [question] if question else [])
        if not em.takes_images:
            caption = " ".join(self.words[i % len(self.words)] for i in range(self.caption_words))
            return em.user_turn(text, None, caption=caption)
        from streamharness.protocol import encode_user_turn

        placeholder = em.vision.start + em.vision.pad * self.vision_tokens + em.vision.end
        ids = encode_user_turn(em.tokenizer, text, placeholder)
        mm = [1 if i == em.vision.image_token_id else 0 for i in ids]
        n = self.grid[0] * self.grid[1] * self.grid[2]
        pv = torch.randn(n, self.patch_dim, device=em.device, dtype=em.dtype)
        return TokenChunk(ids, mm, pv, torch.tensor([self.grid]))

    def reply(self):
        from streamharness.engine import TokenChunk

        return TokenChunk([self.em.im_end, *self.em.ids("\n")] + self.em.ids("</silence>"))


def label(em) -> str:
    from streamharness.engine import attention

    name = "flex-heads" if em.attention == "flex" and not attention.FOLD_FLEX else em.attention
    k = em.kernels
    return name + ("/fp8" if k.weights == "fp8" else "") + ("/compiled" if k.compiled else "")


def sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_point(em, torch, wl, t_s, reps, window_s, engine_cls, config_cls, capacity):
    """Step latency and TTFT at t_s for the three strategies."""
    global PROFILE
    from streamharness.engine import TokenChunk

    prefix, prefix_tokens = wl.prefix(t_s)
    turns_in_chunk = int(min(t_s, 199 if t_s >= 200 else t_s))
    turns = [wl.turn(float(k)) + wl.reply() for k in range(turns_in_chunk)]
    context = len(prefix) + sum(len(c) for c in turns)
    out = {"t_s": t_s, "attention": label(em), "prefix_tokens": len(prefix), "turns": turns_in_chunk, "context_tokens": context}
    margin = 1024
    room = 3 * reps * (len(turns[-1]) if turns else 256)  # the timed steps, questions and answers appended
    eng = engine_cls(em, config_cls(capacity=max(capacity, context + room + 4 * margin), margin=margin, slots=3, spare_slots=1,
                                    prefill_piece=512))
    if em.compiles:
        out["warm_up_s"] = eng.warm_up()  # as the shared engine does at start

    def one_shot(chunks):
        """Prefill chunks into a fresh stream and return the time to the first token."""
        eng.close("x")
        sync(torch)
        start = time.perf_counter()
        logits = None
        for c in chunks:
            for piece in c.split(margin):
                logits = eng.append([("x", piece)])[0]
        int(logits.argmax())
        sync(torch)
        return time.perf_counter() - start

    # full re-prefill: every step prefills everything (fewer reps: it is the slow one)
    full, window = [], []
    if not CACHED_ONLY:
        full = [one_shot([prefix, *turns, wl.turn(t_s, "what is happening now ?")]) for _ in range(max(2, reps // 5))]
        window_turns = turns[-int(window_s):] if window_s else turns
        window = [one_shot([em.system("you watch a live camera stream"), *window_turns, wl.turn(t_s, "what is happening now ?")])
                  for _ in range(max(2, reps // 5))]
    eng.close("x")
    # cached: built once (not timed), then steps
    eng.prefill("s", [prefix, *turns])
    for k in range(3):  # warm the kernels for these shapes
        eng.decide([("s", wl.turn(t_s + 0.5))], [[em.ids("</silence>"), em.ids("</response>")]])
        eng.truncate("s", len(prefix) + sum(len(c) for c in turns))
    if PROFILE:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for k in range(3):
                eng.decide([("s", wl.turn(t_s + 0.5))], [[em.ids("</silence>"), em.ids("</response>")]])
            sync(torch)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        PROFILE = False  # once is enough
        eng.truncate("s", len(prefix) + sum(len(c) for c in turns))
    steps, ttft = [], []
    boundary_at = reps // 3
    next_prefix, _ = wl.prefix(t_s + 200)
    for k in range(reps):
        if k == boundary_at and t_s >= 200:
            eng.rebuild("s", [next_prefix, *turns[-15:]], key="next", background=True)
        turn = wl.turn(t_s + k + 1)
        sync(torch)
        start = time.perf_counter()
        chosen = eng.decide([("s", turn)], [[em.ids("</silence>"), em.ids("</response>")]])
        sync(torch)
        steps.append(time.perf_counter() - start)
        tail = chosen[0][2]
        if k % 3 == 0:  # a question: the step plus the first token of its answer
            q = wl.turn(t_s + k + 1.5, "what is happening now ?")
            sync(torch)
            start = time.perf_counter()
            (_, _, tail2), = eng.decide([("s", TokenChunk(tail + [em.im_end]) + q)], [[em.ids("</response>")]])
            next(iter(eng.generate("s", tail2, max_new_tokens=1)))
            sync(torch)
            ttft.append(time.perf_counter() - start)
    eng.wait_rebuild("s", 120)
    out.update(full=summary(full), window=summary(window), cached_step=summary(steps), cached_ttft=summary(ttft),
               rebuild_swapped=eng.prefix_key("s") == "next" if t_s >= 200 else None)
    eng.close("s")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def measure_steady(em, torch, wl, t_s, steps, capacity, share, overflow, engine_cls, config_cls, carry=15):
    """A stream at t_s as the ``model`` policy keeps it with the production bounds: memory's prefix
    trimmed to ``share`` of ``capacity`` (its newest end), the turns since; past 80 % of the
    capacity the cache drops its oldest turns in place down to 60 % (``drop``, the default) or is
    rebuilt in the background from the prefix and the last ``carry`` turns (``rebuild``). Then
    ``steps`` timed steps one second apart, as a 1-FPS stream (a background rebuild runs in between),
    a question every third (TTFT = its turn and first token)."""
    from streamharness.engine import CacheFull, TokenChunk

    prefix, _ = wl.prefix(t_s)
    budget = int(share * capacity)
    if len(prefix) > budget:
        prefix = TokenChunk(prefix.ids[len(prefix) - budget:])
    margin = 1024
    eng = engine_cls(em, config_cls(capacity=capacity, margin=margin, slots=4, spare_slots=2, prefill_piece=512))
    if em.compiles:
        eng.warm_up()
    eng.prefill("s", [prefix])
    marks, history = [], []
    second = max(0.0, t_s - 600)
    while second < t_s:  # the turns before t_s that the cache still holds
        turn = wl.turn(second) + wl.reply()
        if eng.length("s") + len(turn) > (0.6 if t_s >= 200 else 0.8) * capacity:
            break
        marks.append(eng.length("s"))
        history.append(turn)
        eng.prefill("s", [turn])
        second += 1
    start_length = eng.length("s")
    options = [em.ids("</silence>"), em.ids("</response>")]
    steps_s, ttft, lengths, shortened, stalls = [], [], [], 0, 0
    generation = eng.generation("s")
    clock = time.perf_counter()
    for k in range(steps):
        clock += 1.0  # one step a second, as a 1-FPS stream: a background rebuild runs in the time between
        time.sleep(max(0.0, clock - 1.0 - time.perf_counter()))
        if eng.length("s") > 0.8 * capacity and not eng.rebuilding("s"):
            kept = eng.drop_oldest_turns("s", marks, 0.6 * capacity, carry) if overflow == "drop" else None
            if kept is not None:
                marks = kept
            else:  # as the policy does when no turn can go
                eng.rebuild("s", [prefix, *history[-carry:]], key=f"r{k}", background=True)
            shortened += 1
        if eng.generation("s") != generation:  # a rebuild swapped in: its turns are unknown
            generation, marks = eng.generation("s"), []
        turn = wl.turn(t_s + k)
        marks.append(eng.length("s"))
        lengths.append(eng.length("s"))
        sync(torch)
        start = time.perf_counter()
        try:
            (_, _, tail), = eng.decide([("s", turn)], [options])
        except CacheFull:  # the background rebuild did not finish in time: rebuilt now, as the policy does
            eng.close("s")
            eng.rebuild("s", [prefix, *history[-carry:]], background=False)
            generation, marks, stalls = eng.generation("s"), [eng.length("s")], stalls + 1
            (_, _, tail), = eng.decide([("s", turn)], [options])
        sync(torch)
        steps_s.append(time.perf_counter() - start)
        reply = TokenChunk(tail + [em.im_end, *em.ids("\n")])
        history.append(turn + reply)
        if k % 3 == 0:
            q = wl.turn(t_s + k + 0.5, "what is happening now ?")
            marks.append(eng.length("s"))
            sync(torch)
            start = time.perf_counter()
            (_, _, tail2), = eng.decide([("s", reply + q)], [[em.ids("</response>")]])
            next(iter(eng.generate("s", tail2, max_new_tokens=1)))
            sync(torch)
            ttft.append(time.perf_counter() - start)
            history.append(q)
            reply = TokenChunk([em.im_end, *em.ids("\n")])
        eng.append([("s", reply)])
    eng.wait_rebuild("s", 300)
    out = {"t_s": t_s, "overflow": overflow, "capacity": capacity, "prefix_tokens": len(prefix), "start_length": start_length,
           "length_min": min(lengths), "length_max": max(lengths), "shortened": shortened, "stalled_rebuilds": stalls,
           "cached_step": summary(steps_s), "cached_ttft": summary(ttft)}
    eng.close("s")
    return out


def random_streams(em, torch, n, context, int8, engine_cls, config_cls, max_batch):
    """An engine with n streams of ``context`` tokens each (KV filled with random values)."""
    from streamharness.engine.core import _Stream

    eng = engine_cls(em, config_cls(capacity=context + 256, margin=512, slots=n + 8, spare_slots=1, int8_kv=int8,
                                    max_batch=max_batch))
    with torch.inference_mode():  # the pool's buffers are inference tensors
        fill_random(eng.pool, em.shape.layers, int8)
    for i in range(n):
        name = f"t/{i}"
        eng._free.remove(i)
        eng.streams[name] = _Stream(name, i, length=context, next_pos=context, ids=[0] * context, pos_after=list(range(1, context + 1)))
    return eng


def fill_random(pool, layers, int8):
    for layer in range(layers):
        for buf in (pool.k[layer], pool.v[layer]):
            if int8:
                buf.random_(-100, 100)
            else:
                buf.normal_()
        if int8:
            pool.k_scale[layer].fill_(0.01)
            pool.v_scale[layer].fill_(0.01)


def reset(eng, names, context):
    for name in names:  # keep every stream at the same length (no growth across steps)
        s = eng.streams[name]
        s.length, s.next_pos = context, context
        del s.ids[context:], s.pos_after[context:]


def release(torch):
    """Give the GPU memory of the engine just deleted back (the caller drops its reference first)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def concurrency(em, torch, wl, ns, context, reps, int8, engine_cls, config_cls):
    """A batched step of N streams that each hold ``context`` tokens (random KV)."""
    global PROFILE, SYNC_DEBUG
    results = []
    options = [em.ids("</silence>"), em.ids("</response>")]
    for n in ns:
        try:
            eng = random_streams(em, torch, n, context, int8, engine_cls, config_cls, max(ns))
        except RuntimeError as err:  # out of memory: this N does not fit
            results.append({"streams": n, "error": f"does not fit: {err}"[:200]})
            break
        names = [f"t/{i}" for i in range(n)]
        times = []
        for k in range(reps):
            items = [(name, wl.turn(3600.0 + k)) for name in names]
            reset(eng, names, context)
            sync(torch)
            start = time.perf_counter()
            eng.decide(items, [options] * n)
            sync(torch)
            times.append(time.perf_counter() - start)
        if PROFILE and n >= PROFILE_STREAMS:
            from torch.profiler import ProfilerActivity, profile

            reset(eng, names, context)
            items = [(name, wl.turn(3700.0)) for name in names]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                eng.decide(items, [options] * n)
                sync(torch)
            tables = (f"profile: one step of {n} streams ({label(em)})\n"
                      + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70) + "\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
            print(tables, flush=True)
            if PROFILE_OUT is not None:
                PROFILE_OUT.write_text(tables)
            PROFILE = False
        if SYNC_DEBUG and torch.cuda.is_available():
            reset(eng, names, context)
            print(json.dumps({"streams": n, "attention": label(em),
                              "syncs": syncs(torch, eng.decide, [(name, wl.turn(3800.0)) for name in names], [options] * n)}),
                  flush=True)
            SYNC_DEBUG = False
        times = times[1:]  # the first step warms the kernels for this shape
        row = {"streams": n, "attention": label(em), **summary(times), "per_stream_ms": statistics.median(times) * 1e3 / n,
               "kv_bytes_per_stream": eng.pool.bytes // eng.pool.slots,
               "gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}
        results.append(row)
        print(json.dumps(row), flush=True)
        del eng
        release(torch)
        if row["p95_ms"] > SWEEP_STOP_MS:
            break
    return results


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile mid-run shows here)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def syncs(torch, step, *args) -> dict[str, int]:
    """Where ``step(*args)`` makes the host wait for the device: call sites (streamharness and
    transformers frames, innermost first) and how often."""
    import collections
    import traceback
    import warnings

    seen: collections.Counter = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "streamharness" in f.filename or "transformers" in f.filename]
        seen[" <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(frames[-4:]))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return dict(seen.most_common())


def arrivals(em, torch, wl, ns, context, seconds, engine_cls, config_cls, max_batch):
    """N streams at 1 FPS, their seconds spread evenly over the second (stream i's frame k arrives
    at k + i/N), run in real time: every step takes whatever frames have arrived (at most
    ``max_batch``) in one batched step. A frame's latency = its decision's time - its arrival. The
    first second is warm-up; a stream that cannot keep up shows as growing latency."""
    results = []
    options = [em.ids("</silence>"), em.ids("</response>")]
    for n in ns:
        try:
            eng = random_streams(em, torch, n, context, False, engine_cls, config_cls, max_batch)
        except RuntimeError as err:
            results.append({"streams": n, "error": f"does not fit: {err}"[:200]})
            break
        names = [f"t/{i}" for i in range(n)]
        if em.compiles:
            eng.warm_up()  # as the shared engine does at start
        for size in sorted({n, max(1, n // 3), max(1, n // 7), 1}):  # warm the shapes first
            reset(eng, names[:size], context)
            eng.decide([(name, wl.turn(1.0)) for name in names[:size]], [options] * size)
        sync(torch)
        due = [i / n for i in range(n)]
        latencies, batches, timeline = [], [], []
        compiled_before = compiled_graphs()
        start = time.perf_counter()
        while True:
            now = time.perf_counter() - start
            if now >= seconds:
                break
            ready = sorted((i for i in range(n) if due[i] <= now), key=due.__getitem__)[:max_batch]
            if not ready:
                time.sleep(max(0.0, min(due) - now))
                continue
            items = [(names[i], wl.turn(3600.0 + due[i])) for i in ready]
            reset(eng, [names[i] for i in ready], context)
            began = time.perf_counter() - start
            eng.decide(items, [options] * len(items))
            sync(torch)
            done = time.perf_counter() - start
            batches.append(len(ready))
            timeline.append((round(began, 4), len(ready), round((done - began) * 1e3, 2)))
            for i in ready:
                if due[i] >= 1.0:
                    latencies.append(done - due[i])
                due[i] += 1.0
        behind = sum(1 for d in due if d < seconds - 1.0)
        row = {"streams": n, "attention": label(em), "seconds": seconds, **summary(latencies),
               "steps": len(batches), "mean_batch": statistics.fmean(batches) if batches else 0,
               "step_ms": summary([ms / 1e3 for t, _, ms in timeline if t >= 1.0]),
               "graphs_compiled_during_run": compiled_graphs() - compiled_before,
               "timeline": timeline,  # (start s, streams, step ms) of each step
               "frames_per_s": len(latencies) / max(1e-9, seconds - 1.0), "streams_behind_at_end": behind,
               "gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "timeline"}), flush=True)
        del eng
        release(torch)
        if row["p95_ms"] > 1000:
            break
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["qwen2vl-7b", "smollm2", "tiny"], default="smollm2")
    ap.add_argument("--tokens-per-frame", type=int, nargs="+", default=[72, 170])
    ap.add_argument("--times", type=float, nargs="+", default=[60, 600, 1800, 3600, 7200])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--window-s", type=float, default=120)
    ap.add_argument("--streams", type=int, nargs="+", default=[16, 64, 128, 192, 256, 320])
    ap.add_argument("--stream-context", type=int, default=8192)
    ap.add_argument("--skip-points", action="store_true")
    ap.add_argument("--skip-concurrency", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="print torch profiler tables of three cached steps per point")
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", "hybrid", "flex", "flex-heads", "sdpa", "transformers"],
                    help="attention modes: the points and the 1-FPS arrivals use the first; the concurrency sweep compares all "
                    "(flex-heads: FlexAttention with one query block per head, not folded)")
    ap.add_argument("--steady", nargs="*", default=[], choices=["drop", "rebuild"],
                    help="also measure the points with the production bounds (SH_ENGINE_CAPACITY_TOKENS, the policy's prefix "
                         "share and overflow), for each overflow mode given")
    ap.add_argument("--steady-steps", type=int, default=45)
    ap.add_argument("--capacity", type=int, default=4096, help="--steady: the engine's capacity (SH_ENGINE_CAPACITY_TOKENS)")
    ap.add_argument("--prefix-share", type=float, default=0.5, help="--steady: SH_DECISION_MODEL_PREFIX_SHARE")
    ap.add_argument("--cached-only", action="store_true", help="points: time the engine only (not the full and window re-prefills)")
    ap.add_argument("--sweep-stop-ms", type=float, default=400.0, help="the concurrency sweep stops after a step's p95 passes this")
    ap.add_argument("--profile-streams", type=int, default=64, help="the concurrency step that --profile profiles (the first N >= it)")
    ap.add_argument("--arrivals", type=int, nargs="*", default=[], help="N streams at 1 FPS in real time (latency from a frame's arrival)")
    ap.add_argument("--arrival-seconds", type=float, default=8.0)
    ap.add_argument("--max-batch", type=int, default=256, help="the most streams one step of the arrival run takes")
    ap.add_argument("--weights", nargs="+", default=["model"], choices=["model", "fp8"],
                    help="the decoder's weights (SH_ENGINE_WEIGHTS); several: the concurrency and arrival runs of each, side by side")
    ap.add_argument("--compile", nargs="+", default=["auto"], choices=["auto", "on", "off"],
                    help="fused projections and compiled element-wise layers (SH_ENGINE_COMPILE); several: as --weights")
    ap.add_argument("--sync-debug", action="store_true",
                    help="list where one step of the concurrency sweep's first N waits for the device (torch's sync debug mode)")
    ap.add_argument("--skip-int8", action="store_true", help="no int8-KV concurrency sweep")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    global PROFILE, PROFILE_STREAMS, SWEEP_STOP_MS, PROFILE_OUT, CACHED_ONLY, SYNC_DEBUG
    SYNC_DEBUG = args.sync_debug
    PROFILE, PROFILE_STREAMS, SWEEP_STOP_MS = args.profile, args.profile_streams, args.sweep_stop_ms
    PROFILE_OUT, CACHED_ONLY = args.out.with_suffix(".profile.txt"), args.cached_only

    import torch
    import transformers

    from streamharness.engine import EngineConfig, StreamingEngine
    from streamharness.engine.model import load_engine_model

    def build(weights, compile_layers):
        if args.model == "qwen2vl-7b":
            return build_qwen2vl_7b(torch, weights=weights, compile_layers=compile_layers)[0]
        if args.model == "tiny":
            from streamharness.engine import EngineModel
            from streamharness.train.vlm import build_tiny_qwen2_vl

            model, tok, ip = build_tiny_qwen2_vl([VOCAB])
            return EngineModel(model.eval(), tok, ip, weights=weights, compile_layers=compile_layers)
        return load_engine_model(None, device="cpu", threads=args.threads, weights=weights, compile_layers=compile_layers)

    variants = [(w, c) for w in args.weights for c in args.compile]
    em = build(*variants[0])
    from streamharness.engine import EngineModel

    def with_attention(mode, base=None):
        from streamharness.engine import attention

        base = base or em
        attention.FOLD_FLEX = mode != "flex-heads"
        k = base.kernels
        return EngineModel(base.model, base.tokenizer, base.image_processor, attention_mode="flex" if mode == "flex-heads" else mode,
                           weights=k.weights, compile_layers="on" if k.compiled else "off")

    em = with_attention(args.attention[0])
    tpfs = args.tokens_per_frame if em.takes_images else [0]
    report = {"command": " ".join(sys.argv), "model": args.model, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
              "params_b": sum(p.numel() for p in em.model.parameters()) / 1e9, "runs": []}
    for tpf in tpfs:
        wl = Workload(em, torch, tpf)
        run = {"tokens_per_frame": wl.vision_tokens if em.takes_images else 0, "points": [], "concurrency": {}}
        if not args.skip_points:
            for t in args.times:
                point = measure_point(em, torch, wl, t, args.reps, args.window_s, StreamingEngine, EngineConfig, 8192)
                run["points"].append(point)
                print(json.dumps(point), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({**report, "runs": [*report["runs"], run]}, indent=1))
        if args.steady:
            run["steady"] = []
            for overflow in args.steady:
                for t in args.times:
                    point = measure_steady(em, torch, wl, t, args.steady_steps, args.capacity, args.prefix_share, overflow,
                                           StreamingEngine, EngineConfig)
                    run["steady"].append(point)
                    print(json.dumps(point), flush=True)
                    args.out.write_text(json.dumps({**report, "runs": [*report["runs"], run]}, indent=1))
        for v, variant in enumerate(variants):
            if v:  # each variant on a model of its own (installing changes the model in place)
                m = em = wl = None
                release(torch)
                em = build(*variant)
            if not args.skip_concurrency and (torch.cuda.is_available() or args.model == "tiny"):
                for mode in args.attention:
                    m = with_attention(mode)
                    run["concurrency"][f"bf16-{label(m)}"] = concurrency(
                        m, torch, Workload(m, torch, tpf), args.streams, args.stream_context, 8, False, StreamingEngine, EngineConfig)
                    args.out.write_text(json.dumps({**report, "runs": [*report["runs"], run]}, indent=1))
                if not args.skip_int8:
                    m = with_attention(args.attention[0])
                    run["concurrency"][f"int8-{label(m)}"] = concurrency(
                        m, torch, Workload(m, torch, tpf), args.streams, args.stream_context, 8, True, StreamingEngine, EngineConfig)
                    args.out.write_text(json.dumps({**report, "runs": [*report["runs"], run]}, indent=1))
            m = with_attention(args.attention[0])
            if args.arrivals:
                run.setdefault("arrivals", []).extend(arrivals(m, torch, Workload(m, torch, tpf), args.arrivals, args.stream_context,
                                                               args.arrival_seconds, StreamingEngine, EngineConfig, args.max_batch))
                args.out.write_text(json.dumps({**report, "runs": [*report["runs"], run]}, indent=1))
        report["runs"].append(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
