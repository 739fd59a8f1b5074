"""The decision head: a small network that decides, each second, whether a standing instruction
(or a question) is due a response, trained on a Streaming-Train dataset with the trigger loss,
exported to ONNX and served on Triton as the decision stage's ``trained`` policy.

Inputs (built by :mod:`streamharness.decision.trained`, the same code that serves it): the last W
frame embeddings (1280-d, the encoder stage's), the trigger's MiniLM embedding (384-d) and three
time features. The network projects each frame to ``hidden`` dims, and combines the newest frame,
its change from the previous one and its novelty against the window's mean — each alone and
gated elementwise by the projected text — into one logit of "respond now".

Training positions: every step of every instruction from when it is given until it is withdrawn
(or the stream ends), and of every question from its ask time for ``question_horizon_s``; the
label is 1 at a ground-truth response step; the loss is
:func:`~streamharness.train.objective.weighted_decision_loss` with the role weights
(first silence / repeated silence / response onset) of each trigger's own sequence. The time
features use the ground-truth responses before each step (teacher forcing); serving uses the
policy's own.

After training, a threshold is chosen on the validation split (the one maximising SW-F1 of the
simulated alerts with the stage's minimum gap) and written into the export.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness.decision.trained import EMBEDDING_DIM, TEXT_DIM, TIME_DIM, WINDOW, time_features, window_indices
from streamharness.train.convert import roles_of
from streamharness.train.objective import TriggerWeights

log = logging.getLogger(__name__)
HEAD_FORMAT_VERSION = 1


class HeadTrainConfig(BaseSettings):
    """The decision head's shape and its training run."""

    model_config = SettingsConfigDict(env_prefix="SH_TRAIN_HEAD_", frozen=True, extra="forbid", case_sensitive=False)

    hidden: int = Field(64, ge=4, le=2048, description="Width of the head's projections.")
    window: int = Field(WINDOW, ge=2, le=64, description="Frame embeddings the head sees per step (the newest last).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the head's output layer.")
    steps: int = Field(3000, ge=1, le=10_000_000, description="Optimiser steps.")
    batch_size: int = Field(256, ge=1, le=65536, description="Positions per optimiser step (per process).")
    lr: float = Field(2e-3, gt=0, le=1, description="AdamW learning rate (cosine decay to 10 % after a 5 % warm-up).")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay.")
    seed: int = Field(0, description="Seed of initialisation, batches and dropout.")
    question_horizon_s: float = Field(30.0, ge=1, le=3600, description="Steps of a question trained on, from its ask time.")
    checkpoint_every: int = Field(500, ge=1, description="Steps between checkpoints.")
    eval_every: int = Field(500, ge=1, description="Steps between validation losses.")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="Checkpoints kept (the newest).")
    min_gap_s: float = Field(3.0, ge=0, le=600, description="Minimum gap between two alerts of one instruction, as the stage applies it (used to choose the threshold).")


@dataclass
class Positions:
    """Training positions of one split, as arrays (row = one trigger at one step)."""

    frame_rows: np.ndarray  # int64 [N, W]: rows of the embedding matrix
    text: np.ndarray  # float32 [N, 384]
    time: np.ndarray  # float32 [N, 3]
    target: np.ndarray  # int64 [N] (0/1)
    role: np.ndarray  # object [N]
    trigger: np.ndarray  # int64 [N]: index into triggers
    step: np.ndarray  # int64 [N]
    triggers: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.target)


def load_positions(dataset_dirs, splits=("train",), window: int = WINDOW, question_horizon_s: float = 30.0,
                   kinds=("instruction", "question")) -> tuple[np.ndarray, Positions]:
    """The embedding matrix (float32 [rows, 1280]) of the chosen splits, and their positions."""
    from streamharness.train.dataset import load_table

    dirs = [dataset_dirs] if isinstance(dataset_dirs, (str, Path)) else list(dataset_dirs)
    mats, offsets, base = [], {}, 0
    trig_rows: list[dict[str, Any]] = []
    for d in dirs:
        steps = load_table(d, "steps", columns=["sample_id", "step", "embedding"], splits=list(splits))
        sid = steps["sample_id"].to_pylist()
        emb = np.asarray(steps["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
        emb = emb.reshape(-1, EMBEDDING_DIM) if len(emb) else np.zeros((0, EMBEDDING_DIM), np.float32)
        step_no = steps["step"].to_numpy()
        for i, (s, k) in enumerate(zip(sid, step_no)):
            if k == 0:
                offsets[(str(d), s)] = base + i
        mats.append(emb)
        for t in load_table(d, "triggers", splits=list(splits)).to_pylist():
            if t["kind"] in kinds and (str(d), t["sample_id"]) in offsets:
                t["_offset"] = offsets[(str(d), t["sample_id"])]
                trig_rows.append(t)
        base += len(emb)
    matrix = np.concatenate(mats) if mats else np.zeros((0, EMBEDDING_DIM), np.float32)
    cols: dict[str, list] = {k: [] for k in ("frame_rows", "text", "time", "target", "role", "trigger", "step")}
    for j, t in enumerate(trig_rows):
        labels = list(t["step_labels"])
        if t["kind"] == "question":
            labels = labels[: int(question_horizon_s) + 1]
        if not labels:
            continue
        roles = roles_of([bool(x) for x in labels])
        start = int(t["start_step"])
        last_response = None
        for k, (y, role) in enumerate(zip(labels, roles)):
            step = start + k
            since_given = float(k)
            since = float(k if last_response is None else step - last_response)
            cols["frame_rows"].append(t["_offset"] + window_indices(step, window))
            cols["text"].append(t["text_embedding"])
            cols["time"].append(time_features(since, last_response is not None, since_given))
            cols["target"].append(int(y))
            cols["role"].append(role)
            cols["trigger"].append(j)
            cols["step"].append(step)
            if y:
                last_response = step
    n = len(cols["target"])
    pos = Positions(
        frame_rows=np.asarray(cols["frame_rows"], np.int64).reshape(n, window),
        text=np.asarray(cols["text"], np.float32).reshape(n, TEXT_DIM),
        time=np.asarray(cols["time"], np.float32).reshape(n, TIME_DIM),
        target=np.asarray(cols["target"], np.int64), role=np.asarray(cols["role"], dtype=object),
        trigger=np.asarray(cols["trigger"], np.int64), step=np.asarray(cols["step"], np.int64), triggers=trig_rows,
    )
    return matrix, pos


def build_head(config: HeadTrainConfig):
    import torch
    from torch import nn

    class DecisionHead(nn.Module):
        def __init__(self, hidden: int, dropout: float) -> None:
            super().__init__()
            self.frame = nn.Sequential(nn.Linear(EMBEDDING_DIM, hidden), nn.GELU())
            self.text = nn.Sequential(nn.Linear(TEXT_DIM, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            self.out = nn.Sequential(nn.Linear(6 * hidden + TIME_DIM, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, 1))

        def forward(self, frames, text, time_feats):
            f = self.frame(frames)  # [B, W, H]
            last, prev = f[:, -1], f[:, -2]
            novelty = last - f[:, :-1].mean(dim=1)
            delta = last - prev
            t = self.text(text)
            h = torch.cat([last * t, delta * t, novelty * t, last, novelty, t, time_feats], dim=-1)
            return self.out(h).squeeze(-1)

    return DecisionHead(config.hidden, config.dropout)


def _batch(matrix: np.ndarray, pos: Positions, idx: np.ndarray, weights: TriggerWeights):
    import torch

    frames = torch.from_numpy(matrix[pos.frame_rows[idx]])
    w = torch.from_numpy(np.asarray([weights.of(r) for r in pos.role[idx]], np.float32))
    return (frames, torch.from_numpy(pos.text[idx]), torch.from_numpy(pos.time[idx]),
            torch.from_numpy(pos.target[idx]), w)


def predict(model, matrix: np.ndarray, pos: Positions, batch: int = 4096) -> np.ndarray:
    """Probabilities at every position (teacher-forced time features)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(pos), batch):
            idx = np.arange(s, min(len(pos), s + batch))
            frames, text, tfeat, _, _ = _batch(matrix, pos, idx, TriggerWeights())
            out.append(torch.sigmoid(model(frames, text, tfeat)).numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def simulate_alerts(probs: np.ndarray, pos: Positions, threshold: float, min_gap_s: float) -> tuple[int, int, int]:
    """TP / FP / FN of alerts fired where ``probs >= threshold`` (at most one per ``min_gap_s``),
    judged against each trigger's windows as Streaming-Eval does (one TP per window)."""
    tp = fp = fn = 0
    for j in np.unique(pos.trigger):
        sel = np.where(pos.trigger == j)[0]
        t = pos.triggers[j]
        windows = t["windows"] or [[r, r + 3.0] for r in t["response_times"]]
        fired, last = [], None
        for i in sel:
            if probs[i] >= threshold and (last is None or pos.step[i] - last >= min_gap_s):
                fired.append(float(pos.step[i]))
                last = pos.step[i]
        hit = [False] * len(windows)
        for f in fired:
            k = next((k for k, (a, b) in enumerate(windows) if a - 1e-6 <= f <= b + 1e-6), None)
            if k is None or hit[k]:
                fp += 1
            else:
                hit[k] = True
                tp += 1
        fn += hit.count(False)
    return tp, fp, fn


def choose_threshold(probs: np.ndarray, pos: Positions, min_gap_s: float) -> tuple[float, float]:
    """The threshold with the best simulated SW-F1 on ``pos`` (0.5 when there is nothing to judge)."""
    from streamharness.eval.scoring import sw_f1

    best = (0.5, -1.0)
    for thr in np.round(np.arange(0.05, 0.96, 0.05), 2):
        f1 = sw_f1(*simulate_alerts(probs, pos, float(thr), min_gap_s))
        if f1 is not None and f1 > best[1]:
            best = (float(thr), f1)
    return best


def train_head(dataset_dirs, out_dir: Path | str, config: HeadTrainConfig | None = None,
               weights: TriggerWeights | None = None, *, resume: bool = True, progress: bool = True,
               stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) the head; writes ``out_dir/checkpoints/``, ``metrics.jsonl``, ``head.pt``
    and ``head.json`` (config, weights, threshold, validation scores). Returns head.json's content.
    ``stop_after``: stop after that step as if the process were killed there (tests of resuming)."""
    import torch

    from streamharness.train.loop import (
        DistributedContext,
        MetricsWriter,
        load_latest_checkpoint,
        lr_factor,
        save_checkpoint,
        seed_everything,
    )
    from streamharness.train.loop import progress as progress_bar
    from streamharness.train.objective import weighted_decision_loss

    config = config or HeadTrainConfig()
    weights = weights or TriggerWeights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dist = DistributedContext.from_env(device="cpu")  # a head this small trains fastest on the CPU
    seed_everything(config.seed + dist.rank)
    matrix, train_pos = load_positions(dataset_dirs, ("train",), config.window, config.question_horizon_s)
    val_matrix, val_pos = load_positions(dataset_dirs, ("val",), config.window, config.question_horizon_s)
    if len(train_pos) == 0:
        raise ValueError(f"no training positions in {dataset_dirs}: no triggers in the train split")
    model = build_head(config)
    if dist.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warm = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total=config.steps, warmup=warm, schedule="cosine", min_ratio=0.1))
    start = 0
    ckpt_dir = out / "checkpoints"
    if resume:
        found = load_latest_checkpoint(ckpt_dir)
        if found is not None:
            start, state = found
            _unwrap(model).load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            log.info("resumed from step %d", start)
    metrics = MetricsWriter(out / "metrics.jsonl", prefix="head") if dist.is_main else None
    if metrics is not None and start:
        metrics.rewind(start)
    # The batch order is a function of the step alone, so a resumed run draws what an uninterrupted one would.
    my_rows = np.asarray(dist.shard(range(len(train_pos))), np.int64)
    val_loss = None  # the validation loss at the last step, logged and reported in head.json
    bar = progress_bar(config.steps, "decision head", initial=start) if progress else progress_bar(config.steps, main=False)
    t0 = time.monotonic()
    for step in range(start, config.steps):
        order_rng = np.random.default_rng([config.seed, dist.rank, step])
        idx = my_rows[order_rng.integers(0, len(my_rows), size=config.batch_size)]
        frames, text, tfeat, target, w = _batch(matrix, train_pos, idx, weights)
        loss = weighted_decision_loss(model(frames, text, tfeat), target, w, weights.normalise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)
        done = step + 1
        if metrics is not None and (done % 50 == 0 or done in (1, config.steps)):
            metrics.log(done, loss=float(loss.detach()), lr=float(sched.get_last_lr()[0]),
                        positions_per_s=config.batch_size * (done - start) / max(1e-9, time.monotonic() - t0))
        if metrics is not None and len(val_pos) and (done % config.eval_every == 0 or done == config.steps):
            val_loss = _loss_on(_unwrap(model), val_matrix, val_pos, weights)
            metrics.log(done, val_loss=val_loss)
        if dist.is_main and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(ckpt_dir, done, {"model": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                                             "scheduler": sched.state_dict()}, keep_last=config.keep_checkpoints)
        if stop_after is not None and done >= stop_after:
            bar.close()
            if metrics is not None:
                metrics.close()
            dist.close()
            return {}
    bar.close()
    summary: dict[str, Any] = {}
    if dist.is_main:
        head = _unwrap(model)
        judge_matrix, judge_pos = (val_matrix, val_pos) if len(val_pos) else (matrix, train_pos)
        instr = _only_kind(judge_pos, "instruction")
        probs = predict(head, judge_matrix, instr)
        threshold, val_f1 = choose_threshold(probs, instr, config.min_gap_s)
        tp, fp, fn = simulate_alerts(probs, instr, threshold, config.min_gap_s)
        summary = {
            "format_version": HEAD_FORMAT_VERSION, "config": config.model_dump(), "weights": weights.model_dump(),
            "threshold": threshold, "window": config.window,
            "validation": {"split": "val" if len(val_pos) else "train", "sw_f1": val_f1, "tp": tp, "fp": fp, "fn": fn,
                           "loss": val_loss if val_loss is not None else _loss_on(head, judge_matrix, judge_pos, weights)},
            "train_positions": len(train_pos), "val_positions": len(val_pos),
            "datasets": [str(d) for d in ([dataset_dirs] if isinstance(dataset_dirs, (str, Path)) else dataset_dirs)],
        }
        torch.save(head.state_dict(), out / "head.pt")
        (out / "head.json").write_text(json.dumps(summary, indent=2))
    if metrics is not None:
        metrics.close()
    dist.close()
    return summary


def _only_kind(pos: Positions, kind: str) -> Positions:
    keep = np.asarray([pos.triggers[j]["kind"] == kind for j in pos.trigger], bool)
    return Positions(pos.frame_rows[keep], pos.text[keep], pos.time[keep], pos.target[keep], pos.role[keep],
                     pos.trigger[keep], pos.step[keep], pos.triggers)


def _loss_on(model, matrix: np.ndarray, pos: Positions, weights: TriggerWeights) -> float:
    import torch

    from streamharness.train.objective import weighted_decision_loss

    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(pos), 4096):
            idx = np.arange(s, min(len(pos), s + 4096))
            frames, text, tfeat, target, w = _batch(matrix, pos, idx, weights)
            total += float(weighted_decision_loss(model(frames, text, tfeat), target, w, weights.normalise)) * len(idx)
            n += len(idx)
    model.train()
    return total / max(1, n)


def _unwrap(model):
    return getattr(model, "module", model)


def load_head(run_dir: Path | str):
    """The trained head of a run folder (``head.pt`` + ``head.json``), in eval mode, and its summary."""
    import torch

    run = Path(run_dir)
    summary = json.loads((run / "head.json").read_text())
    model = build_head(HeadTrainConfig(**summary["config"]))
    model.load_state_dict(torch.load(run / "head.pt", weights_only=True))
    model.eval()
    return model, summary


class TorchHeadScorer:
    """A trained head scored in this process (tests and offline evaluation); the service uses
    :class:`~streamharness.decision.trained.HeadScorer` on Triton instead."""

    def __init__(self, model, threshold: float, window: int) -> None:
        self.model, self.threshold, self.window = model, threshold, window

    def score(self, frames: np.ndarray, text: np.ndarray, time_feats: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return torch.sigmoid(self.model(torch.from_numpy(frames), torch.from_numpy(text), torch.from_numpy(time_feats))).numpy()


def export_head(run_dir: Path | str, model_repository: Path | str, version: int = 1) -> Path:
    """Write the head as ONNX into ``<model_repository>/decision_head/<version>/model.onnx``, with
    the threshold and window in the model's ``config.pbtxt`` parameters; checks the ONNX against
    torch on random inputs. Returns the ONNX path."""
    import onnxruntime as ort
    import torch

    model, summary = load_head(run_dir)

    class WithProbability(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, frames, text, time_feats):
            logit = self.inner(frames, text, time_feats)
            return torch.sigmoid(logit).unsqueeze(-1), logit.unsqueeze(-1)

    window = int(summary["window"])
    repo = Path(model_repository)
    folder = repo / "decision_head"
    (folder / str(version)).mkdir(parents=True, exist_ok=True)
    path = folder / str(version) / "model.onnx"
    tmp = path.with_name("model.onnx.part")
    g = torch.Generator().manual_seed(0)
    sample = (torch.randn(3, window, EMBEDDING_DIM, generator=g), torch.randn(3, TEXT_DIM, generator=g),
              torch.rand(3, TIME_DIM, generator=g))
    wrapped = WithProbability(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False: no onnxscript needed) warns that it is the legacy one.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(wrapped, sample, str(tmp), input_names=["frames", "text", "time"],
                          output_names=["probability", "logit"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in ("frames", "text", "time", "probability", "logit")})
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(["probability"], {"frames": sample[0].numpy(), "text": sample[1].numpy(), "time": sample[2].numpy()})[0]
    with torch.no_grad():
        want = wrapped(*sample)[0].numpy()
    if not np.allclose(got, want, atol=1e-5):
        raise RuntimeError(f"the ONNX export disagrees with torch (max diff {np.abs(got - want).max():.2e})")
    tmp.replace(path)
    (folder / "config.pbtxt").write_text(decision_head_config(summary["threshold"], window))
    (folder / str(version) / "head.json").write_text(json.dumps(summary, indent=2))
    return path


def decision_head_config(threshold: float, window: int) -> str:
    """The Triton config of the exported head (python backend running the ONNX with onnxruntime)."""
    return f'''# The Streaming-Train decision head (written by `streamharness train export`; see docs/training.md).
# Per row: FRAMES = the last {window} frame embeddings (oldest first), TEXT = the instruction's MiniLM
# embedding, TIME = streamharness.decision.trained.time_features; PROBABILITY = P(respond now).
name: "decision_head"
backend: "python"
max_batch_size: 256

input [
  {{ name: "FRAMES" data_type: TYPE_FP32 dims: [ {window}, {EMBEDDING_DIM} ] }},
  {{ name: "TEXT" data_type: TYPE_FP32 dims: [ {TEXT_DIM} ] }},
  {{ name: "TIME" data_type: TYPE_FP32 dims: [ {TIME_DIM} ] }}
]
output [
  {{ name: "PROBABILITY" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "LOGIT" data_type: TYPE_FP32 dims: [ 1 ] }}
]

dynamic_batching {{
  max_queue_delay_microseconds: 1000
}}

parameters [
  {{ key: "onnx_file" value: {{ string_value: "model.onnx" }} }},
  {{ key: "threshold" value: {{ string_value: "{threshold:.4f}" }} }},
  {{ key: "window" value: {{ string_value: "{window}" }} }},
  {{ key: "intra_op_threads" value: {{ string_value: "1" }} }}
]
'''
