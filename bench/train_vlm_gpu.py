"""Benchmark: LoRA training steps of a Qwen2-VL-7B-shaped model on streaming windows, through
streamharness.train.vlm's own code path (encode_window → collate → train_step → window_loss).

The model is a real-size Qwen2-VL-7B configuration (hidden 3584, 28 layers, 28 heads, 4 KV heads,
intermediate 18944, vocabulary 152064; vision depth 32, embed_dim 1280, patch 14, merge 2) with
random bf16 weights made on the GPU — no download. The data is synthetic and in memory: windows of
``--window-steps`` one-second steps with one ``--frame``×``--frame`` JPEG frame each (224: 64 vision
tokens a frame), questions, silences and responses in the converted format. Training is LoRA
(r=16 on q/k/v/o of the language model, the decision tokens' embedding / lm_head rows trainable),
gradient checkpointing, AdamW, bf16 autocast, one window per step. Writes JSON: step time
p50/p95, tokens/s, peak memory, loss first/last, and the setup.

On the GPU machine (one H200; finishes in well under 8 minutes, ``--max-seconds`` caps the loop)::

    PYTHONUNBUFFERED=1 python3 bench/train_vlm_gpu.py --steps 300 --out $OUT/train_vlm_gpu.json

Here, on CPU, in seconds (tiny sizes, 56×56 frames)::

    .venv/bin/python bench/train_vlm_gpu.py --tiny --out /tmp/train_vlm_tiny.json

Needs torch, transformers, peft, tokenizers, Pillow and NumPy only (no pydantic, OpenTelemetry or
tqdm: streamharness.train.vlm imports without them).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "libs"))

QWEN2_VL_7B = {"vocab_size": 152064, "hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "intermediate": 18944,
               "vision_depth": 32, "vision_embed_dim": 1280, "vision_heads": 16, "patch": 14, "merge": 2}
TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "vision_depth": 2,
        "vision_embed_dim": 32, "vision_heads": 4, "patch": 14, "merge": 2}
QUESTIONS = ["How many people are there?", "Tell me when the red box moves.", "What colour is the circle?",
             "Is anyone at the door?"]
ANSWERS = ["Five people.", "The red box moved to the left.", "The circle is yellow.", "Nobody is at the door yet."]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95 = np.percentile(values, [50, 95])
    return {"n": len(values), "p50": float(p50), "p95": float(p95), "mean": float(np.mean(values)),
            "min": float(min(values)), "max": float(max(values))}


def frame_jpeg(k: int, size: int, rng: np.random.Generator) -> bytes:
    """A drawn frame: background, a moving square and a circle, some noise; as JPEG."""
    from PIL import Image

    img = np.full((size, size, 3), 30 + 10 * (k % 7), np.uint8)
    s = max(4, size // 6)
    x = (k * size // 9) % (size - s)
    img[size // 3:size // 3 + s, x:x + s] = (220, 30, 30)
    yy, xx = np.ogrid[:size, :size]
    img[(yy - size * 2 // 3) ** 2 + (xx - (size - x - 1)) ** 2 < (s // 2) ** 2] = (230, 220, 40)
    img = np.clip(img.astype(np.int16) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def synthetic_windows(vlm, n_windows: int, window_steps: int, frame: int, seed: int):
    """Windows in the converted format: a question at a random step, a response a few steps later
    (sometimes a second one), silence elsewhere; roles by convert.roles_of."""
    from streamharness.train.convert import roles_of, target_text, user_turn

    rng = np.random.default_rng(seed)
    windows = []
    for w in range(n_windows):
        q = int(rng.integers(0, len(QUESTIONS)))
        asked = int(rng.integers(0, max(1, window_steps // 2)))
        answers = {min(window_steps - 1, asked + int(rng.integers(1, 4)))}
        if rng.random() < 0.5:
            answers.add(min(window_steps - 1, asked + int(rng.integers(4, max(5, window_steps)))))
        roles = roles_of([k in answers for k in range(window_steps)])
        steps = []
        for k in range(window_steps):
            t = float(w * window_steps + k)
            said = [QUESTIONS[q]] if k == asked else []
            steps.append(vlm.StepRow(step=k, t_s=t, user=user_turn(t, said),
                                     target=target_text([ANSWERS[q]] if k in answers else []), role=roles[k],
                                     frame=frame_jpeg(w * window_steps + k, frame, rng)))
        windows.append(vlm.Window(f"synthetic-{w}", tuple(steps)))
    return windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; 8 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (a check that runs in seconds)")
    parser.add_argument("--window-steps", type=int, default=16, help="stream-seconds (frames) per window")
    parser.add_argument("--frame", type=int, default=None, help="frame side in pixels (default 224; 56 with --tiny)")
    parser.add_argument("--windows", type=int, default=8, help="distinct synthetic windows, cycled")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing statistics")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="stop the loop after this much wall time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = args.steps or (8 if args.tiny else 300)
    frame = args.frame or (56 if args.tiny else 224)
    t_start = time.perf_counter()

    import peft
    import torch
    import transformers
    from streamharness.train import vlm
    from streamharness.train.loop import seed_everything
    from transformers import Qwen2VLForConditionalGeneration

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    seed_everything(args.seed)

    windows = synthetic_windows(vlm, args.windows, args.window_steps, frame, args.seed)
    tokenizer = vlm.build_tiny_tokenizer(vlm.window_texts(windows))
    sizes = TINY if args.tiny else QWEN2_VL_7B
    config = vlm.qwen2_vl_config(tokenizer, **sizes)
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e9:.2f} B parameters ({dtype}) built in {build_s:.1f} s")

    tokens = vlm.add_streaming_tokens(tokenizer, model)
    processor = vlm.make_image_processor(frame * frame, frame * frame, sizes["patch"], sizes["merge"])
    vision = vlm.VisionFormat.from_model(model.config, tokenizer, processor)
    use_mm = vlm.accepts_mm_token_type_ids(model)
    model = vlm.apply_lora(model, tokens, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05,
                           gradient_checkpointing=not args.no_grad_ckpt)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = vlm.TriggerWeights()
    optimizer, scheduler = vlm.make_optimizer(model, lr=args.lr, total_steps=steps, warmup_steps=min(10, steps // 10),
                                              schedule="cosine")

    t0 = time.perf_counter()
    examples = [vlm.encode_window(w, tokenizer, processor, vision, tokens, weights) for w in windows]
    encode_s = (time.perf_counter() - t0) / len(examples)
    pad_id = tokenizer.pad_token_id
    seq = [len(e) for e in examples]
    vision_tokens = [e.input_ids.count(vision.image_token_id) for e in examples]
    log(f"{len(examples)} windows of {args.window_steps} steps: {np.mean(seq):.0f} tokens each "
        f"({np.mean(vision_tokens):.0f} vision), encoded in {encode_s * 1e3:.0f} ms a window; "
        f"trainable {trainable / 1e6:.2f} M")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    times, losses, decision, lm, n_tokens = [], [], [], [], []
    t_loop = time.perf_counter()
    stopped_early = False
    for step in range(1, steps + 1):
        batch = vlm.collate([examples[(step - 1) % len(examples)]], pad_id, vision.image_token_id).to(device)
        t0 = time.perf_counter()
        result = vlm.train_step(model, optimizer, scheduler, [batch], normalise=weights.normalise, max_grad_norm=1.0,
                                autocast_dtype=torch.bfloat16 if cuda else None, mm_token_type_ids=use_mm)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(result.loss)
        decision.append(result.decision_loss)
        lm.append(result.lm_loss)
        n_tokens.append(result.tokens)
        if step == 1 or step % 10 == 0 or step == steps:
            log(f"step {step}/{steps}: loss {result.loss:.4f} (decision {result.decision_loss:.4f}, "
                f"lm {result.lm_loss:.4f}), {times[-1]:.3f} s, {result.tokens / times[-1]:.0f} tokens/s")
        if time.perf_counter() - t_loop > args.max_seconds:
            log(f"stopping after {step} steps: --max-seconds {args.max_seconds} reached")
            stopped_early = True
            break

    timed = times[args.warmup:] if len(times) > args.warmup else times
    tok_timed = n_tokens[args.warmup:] if len(n_tokens) > args.warmup else n_tokens
    k = min(10, len(losses))
    result = {
        "bench": "train_vlm_gpu", "tiny": args.tiny, "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "model": {"sizes": sizes, "parameters": n_params, "trainable": trainable, "dtype": str(dtype),
                  "build_s": build_s, "gradient_checkpointing": not args.no_grad_ckpt, "lora_r": args.lora_r},
        "data": {"window_steps": args.window_steps, "frame": frame, "windows": len(examples),
                 "tokens_per_window": float(np.mean(seq)), "vision_tokens_per_window": float(np.mean(vision_tokens)),
                 "encode_s_per_window": encode_s},
        "steps": len(times), "steps_asked": steps, "stopped_early": stopped_early, "timing_warmup_steps": args.warmup,
        "step_time_s": pct(timed),
        "tokens_per_s": float(np.sum(tok_timed) / np.sum(timed)) if timed else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "loss": {"first": losses[0], "last": losses[-1], "first10_mean": float(np.mean(losses[:k])),
                 "last10_mean": float(np.mean(losses[-k:]))},
        "decision_loss": {"first": decision[0], "last": decision[-1]},
        "lm_loss": {"first": lm[0], "last": lm[-1]},
        "loop_s": time.perf_counter() - t_loop, "total_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out}: step p50 {result['step_time_s'].get('p50', float('nan')):.3f} s, "
        f"{result['tokens_per_s']:.0f} tokens/s, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
        f"total {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
