"""streamharness.train.vlm on a tiny random Qwen2-VL (CPU, seconds): the labels and weights of a
window, the streaming tokens, windows and their carried context, training, and resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
cv2 = pytest.importorskip("cv2")

from streamharness.train import vlm
from streamharness.train.convert import roles_of, target_text, time_tag, user_turn
from streamharness.train.loop import read_metrics
from streamharness.train.objective import (
    IGNORE_INDEX,
    TriggerWeights,
    shift_for_causal_lm,
)

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def _jpeg(k: int, size: int = 64) -> bytes:
    img = np.full((size, size, 3), 40 + 20 * (k % 5), np.uint8)
    cv2.circle(img, (10 + (7 * k) % 44, 32), 8, (255, 255 - 30 * (k % 7), 0), -1)
    cv2.rectangle(img, (40, 5 + (5 * k) % 40), (58, 20 + (5 * k) % 40), (0, 0, 255), -1)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return buf.tobytes()


def _sample_rows(sample_id: str, n: int, said: dict[int, list[tuple[str, str]]], responses: dict[int, tuple[str, str]],
                 split: str = "train", null_frames: tuple[int, ...] = ()) -> list[dict]:
    roles = roles_of([k in responses for k in range(n)])
    rows = []
    for k in range(n):
        texts = [text for _, text in said.get(k, [])]
        rows.append({
            "sample_id": sample_id, "video_name": f"{sample_id}.mp4", "source": "synthetic", "task_type": "qa",
            "split": split, "step": k, "t_s": float(k), "user": user_turn(float(k), texts),
            "target": target_text([responses[k][1]] if k in responses else []), "role": roles[k],
            "said": [i for i, _ in said.get(k, [])], "responding": [responses[k][0]] if k in responses else [],
            "frame_jpeg": None if k in null_frames else _jpeg(k), "embedding": [0.0] * 1280, "embedding_model": "none",
            "labels": [{"name": "person", "score": 0.9}], "person_count": 1, "caption": "",
        })
    return rows


def write_dataset(root: Path) -> Path:
    """Two train samples and one val sample, as the builder lays them out."""
    rows = (_sample_rows("a", 8, {1: [("q1", "How many people?")]}, {3: ("q1", "Five people."), 6: ("q1", "Four people now.")})
            + _sample_rows("b", 8, {0: [("i1", "Tell me when the red box moves.")], 5: [("i1", "Stop: Tell me when the red box moves.")]},
                           {2: ("i1", "The red box moved.")}, null_frames=(4,))
            + _sample_rows("c", 4, {}, {}, split="val"))
    label = pa.struct([("name", pa.string()), ("score", pa.float32())])
    schema = pa.schema([
        ("sample_id", pa.string()), ("video_name", pa.string()), ("source", pa.string()), ("task_type", pa.string()),
        ("split", pa.string()), ("step", pa.int32()), ("t_s", pa.float64()), ("user", pa.string()),
        ("target", pa.string()), ("role", pa.string()), ("said", pa.list_(pa.string())),
        ("responding", pa.list_(pa.string())), ("frame_jpeg", pa.binary()), ("embedding", pa.list_(pa.float32())),
        ("embedding_model", pa.string()), ("labels", pa.list_(label)), ("person_count", pa.int32()),
        ("caption", pa.string()),
    ])
    (root / "steps").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:8], schema=schema), root / "steps" / "shard-00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows[8:], schema=schema), root / "steps" / "shard-00001.parquet")
    (root / "manifest.json").write_text(json.dumps({"kind": "streamharness-streaming-train", "fps": 1.0}))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def tiny():
    texts = ["How many people?", "Five people.", "The red box moved.", "<0.0 seconds>"]
    model, tokenizer, processor = vlm.build_tiny_qwen2_vl(texts, seed=0)
    tokens = vlm.add_streaming_tokens(tokenizer, model)
    return model, tokenizer, processor, tokens, vlm.VisionFormat.from_model(model.config, tokenizer, processor)


def _step(k: int, role: str, target: str, said=(), frame=True) -> vlm.StepRow:
    return vlm.StepRow(step=k, t_s=float(k), user=user_turn(float(k), list(said)), target=target, role=role,
                       frame=_jpeg(k) if frame else None)


def test_streaming_tokens_are_single_special_tokens(tiny):
    model, tokenizer, _, tokens, _ = tiny
    for text, tid in ((vlm.SILENCE, tokens.silence), (vlm.RESPONSE, tokens.response)):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [tid]
        assert tokenizer(f"{vlm.IM_START}assistant\n{text} Five", add_special_tokens=False)["input_ids"].count(tid) == 1
        assert tid in tokenizer.all_special_ids
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    again = vlm.add_streaming_tokens(tokenizer, model)
    assert again == tokens


def test_time_tags_tokenise_the_same_wherever_they_stand(tiny):
    _, tokenizer, _, _, vision = tiny
    for t in (0.0, 4.0, 12.0, 123.0):
        tag = tokenizer(time_tag(t), add_special_tokens=False)["input_ids"]
        assert vlm.UNK not in tokenizer.convert_ids_to_tokens(tag)
        for said in ([], ["How many people?"]):
            for placeholder in (None, vision.start + vision.pad * 4 + vision.end):
                ids = vlm.encode_user_turn(tokenizer, user_turn(t, said), placeholder)
                assert any(ids[i:i + len(tag)] == tag for i in range(len(ids))), (t, said, placeholder)


def test_labels_and_weights_of_a_hand_made_window(tiny):
    _, tokenizer, processor, tokens, vision = tiny
    weights = TriggerWeights(lm_weight=0.5)
    window = vlm.Window("w", (
        _step(0, "first_silence", vlm.SILENCE, said=["How many people?"]),
        _step(1, "response", f"{vlm.RESPONSE} Five people."),
        _step(2, "first_silence", vlm.SILENCE),
    ))
    ex = vlm.encode_window(window, tokenizer, processor, vision, tokens, weights)

    # the sequence is the ChatML text, whole, with 4 image pads per 56×56 frame
    frame = vision.start + vision.pad * 4 + vision.end
    text = (f"{vlm.IM_START}user\nHow many people?\n<0.0 seconds>\n{frame}{vlm.IM_END}\n{vlm.IM_START}assistant\n"
            f"{vlm.SILENCE}{vlm.IM_END}\n"
            f"{vlm.IM_START}user\n<1.0 seconds>\n{frame}{vlm.IM_END}\n{vlm.IM_START}assistant\n"
            f"{vlm.RESPONSE} Five people.{vlm.IM_END}\n"
            f"{vlm.IM_START}user\n<2.0 seconds>\n{frame}{vlm.IM_END}\n{vlm.IM_START}assistant\n"
            f"{vlm.SILENCE}{vlm.IM_END}\n")
    assert ex.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ex.image_grid_thw.tolist() == [[1, 4, 4]] * 3 and ex.pixel_values.shape[0] == 3 * 16

    ids = ex.input_ids
    im_end = tokenizer.convert_tokens_to_ids(vlm.IM_END)
    assistant = tokenizer(f"{vlm.IM_START}assistant\n", add_special_tokens=False)["input_ids"]
    starts = [i + len(assistant) for i in range(len(ids)) if ids[i:i + len(assistant)] == assistant]
    assert len(starts) == 3
    five = tokenizer(" Five people.", add_special_tokens=False)["input_ids"]
    expected = {  # position -> (label, weight)
        starts[0]: (tokens.silence, 1.0), starts[0] + 1: (im_end, 0.5),
        starts[1]: (tokens.response, 1.5),
        **{starts[1] + 1 + j: (tid, 0.5) for j, tid in enumerate(five)}, starts[1] + 1 + len(five): (im_end, 0.5),
        starts[2]: (tokens.silence, 1.0), starts[2] + 1: (im_end, 0.5),
    }
    for i, (label, weight) in enumerate(zip(ex.labels, ex.loss_weights, strict=True)):
        if i in expected:
            assert (label, weight) == expected[i], i
            assert label == ids[i]
        else:
            assert (label, weight) == (IGNORE_INDEX, 0.0), (i, tokenizer.convert_ids_to_tokens([ids[i]]))
    assert [ex.kinds[p] for p in sorted(expected)] == [vlm.DECISION, vlm.TEXT, vlm.DECISION, *[vlm.TEXT] * (len(five) + 1),
                                                      vlm.DECISION, vlm.TEXT]
    pads = [i for i, t in enumerate(ids) if t == vision.image_token_id]
    assert len(pads) == 12 and all(ex.labels[i] == IGNORE_INDEX for i in pads)

    # shifted: logits at i are scored against the token at i + 1, with its weight
    batch = vlm.collate([ex], tokenizer.pad_token_id, vision.image_token_id)
    labels, w = shift_for_causal_lm(batch.labels, batch.loss_weights)
    assert labels[0, starts[1] - 1].item() == tokens.response and w[0, starts[1] - 1].item() == 1.5
    assert labels[0, -1].item() == IGNORE_INDEX and int((labels != IGNORE_INDEX).sum()) == len(expected)
    assert int(batch.mm_token_type_ids.sum()) == 12


def test_repeated_silence_weighs_less_and_a_missing_frame_has_no_image(tiny):
    _, tokenizer, processor, tokens, vision = tiny
    window = vlm.Window("w", (_step(0, "first_silence", vlm.SILENCE), _step(1, "repeated_silence", vlm.SILENCE, frame=False)))
    ex = vlm.encode_window(window, tokenizer, processor, vision, tokens, TriggerWeights())
    decisions = [(label, w) for label, w, k in zip(ex.labels, ex.loss_weights, ex.kinds, strict=True) if k == vlm.DECISION]
    assert decisions == [(tokens.silence, 1.0), (tokens.silence, pytest.approx(0.8))]
    assert ex.image_grid_thw.shape[0] == 1 and ex.input_ids.count(vision.image_token_id) == 4
    with pytest.raises(ValueError, match="does not match"):
        bad = vlm.Window("w", (_step(0, "response", vlm.SILENCE),))
        vlm.encode_window(bad, tokenizer, processor, vision, tokens, TriggerWeights())


def test_windows_carry_the_open_questions(dataset):
    windows = vlm.read_windows(dataset, "train", window_steps=3)
    by_sample = {}
    for w in windows:
        by_sample.setdefault(w.sample_id, []).append(w)
    assert [len(w.steps) for w in by_sample["a"]] == [3, 3, 2] and [len(w.steps) for w in by_sample["b"]] == [3, 3, 2]
    # a: asked at 1, answered at 3 and again at 6 -> open at 3 and at 6
    assert [w.context for w in by_sample["a"]] == [(), ("How many people?",), ("How many people?",)]
    # b: given at 0, answered at 2, withdrawn at 5 -> not open at 3 (answered, no later answer), nor at 6
    assert [w.context for w in by_sample["b"]] == [(), (), ()]
    assert by_sample["b"][1].steps[1].frame is None
    assert [w.sample_id for w in vlm.read_windows(dataset, "val", window_steps=16)] == ["c"]
    no_context = vlm.read_windows(dataset, "train", window_steps=3, carry_context=False)
    assert all(w.context == () for w in no_context)


def _config(**kw) -> vlm.VLMTrainConfig:
    base = {"window_steps": 4, "lr": 5e-3, "schedule": "constant", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1,
            "min_pixels": 56 * 56, "max_pixels": 56 * 56, "telemetry": False, "device": "cpu", "save_every": 2}
    return vlm.VLMTrainConfig(**{**base, **kw})


def test_training_reduces_the_loss_and_saves_the_adapter(dataset, tmp_path):
    summary = vlm.train_vlm(dataset, tmp_path, _config(steps=12, batch_size=2), TriggerWeights(), tiny=True)
    losses = [line["loss"] for line in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) * 0.9, losses
    line = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert {"loss", "decision_loss", "lm_loss", "tokens_per_s", "step_time_s", "max_memory_gb", "lr"} <= set(line)
    assert summary["finished"] and summary["steps"] == 12
    adapter = Path(summary["adapter"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "tokenizer.json").is_file()
    assert vlm.SILENCE in (adapter / "tokenizer.json").read_text()


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(dataset, tmp_path):
    config = _config(steps=4, grad_accum=2, schedule="cosine", warmup_steps=1)
    vlm.train_vlm(dataset, tmp_path / "whole", config, TriggerWeights(), tiny=True)
    first = vlm.train_vlm(dataset, tmp_path / "cut", config, TriggerWeights(), tiny=True, stop_after=2)
    assert not first["finished"] and not (tmp_path / "cut" / "adapter").exists()
    second = vlm.train_vlm(dataset, tmp_path / "cut", config, TriggerWeights(), tiny=True)
    assert second["resumed_from"] == 2 and second["finished"]
    whole = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "whole" / "metrics.jsonl")}
    cut = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "cut" / "metrics.jsonl")}
    assert sorted(cut) == [1, 2, 3, 4]
    for step in (3, 4):
        assert cut[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-7), (step, cut, whole)
    with pytest.raises(ValueError, match="other"):
        vlm.train_vlm(dataset, tmp_path / "cut", config.model_copy(update={"seed": 1}), TriggerWeights(), tiny=True)
    with pytest.raises(ValueError, match="holds checkpoints"):
        vlm.train_vlm(dataset, tmp_path / "cut", config, TriggerWeights(), tiny=True, resume=False)


def test_imports_and_computes_the_loss_without_pydantic():
    """The bare GPU image has no pydantic: vlm (and the objective it uses) must import there."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('pydantic', 'pydantic_settings', 'opentelemetry'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from streamharness.train import vlm\n"
        "w = vlm.TriggerWeights(weight_response=2.0)\n"
        "assert w.of('response') == 2.0 and w.of('repeated_silence') == 0.8 and w.normalise == 'positions'\n"
        "c = vlm.VLMTrainConfig(window_steps=4)\n"
        "assert c.window_steps == 4 and c.lora_r == 16 and c.lora_targets[0] == 'q_proj'\n"
        "logits = torch.zeros(1, 2, 5); labels = torch.tensor([[1, -100]]); wt = torch.tensor([[1.5, 0.0]])\n"
        "print(float(vlm.weighted_token_loss(logits, labels, wt)))\n"
        "assert 'pydantic' not in sys.modules\n"
    )
    env_path = str(ROOT / "libs")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == pytest.approx(1.5 * np.log(5))


def test_gpu_bench_runs_tiny_on_cpu(tmp_path):
    """bench/train_vlm_gpu.py --tiny: the GPU benchmark's code path, in seconds."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_vlm_gpu.py"), "--tiny", "--steps", "2",
                           "--window-steps", "4", "--windows", "2", "--warmup", "0", "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=240, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["steps"] == 2 and result["data"]["vision_tokens_per_window"] == 16
    assert result["step_time_s"]["p50"] > 0 and np.isfinite(result["loss"]["last"])
