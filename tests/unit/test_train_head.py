"""The decision head: trains on a dataset written by the builder, resumes exactly, exports to ONNX
that agrees with torch, and as the trained policy it changes the decision stage's decisions.

The frame encoder here is a stand-in (the dataset builder takes any encoder with the stage
encoder's ``encode``): a frame's "embedding" is its dominant colour as a noisy one-hot, and a
trigger's text embedding is a bag of hashed words, so the head has to bind the word "red" to the
red frames. The real encoders are used by tests/integration/test_train_e2e.py.
"""

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from streamharness.decision.trained import EMBEDDING_DIM, TEXT_DIM, TrainedPolicy
from streamharness.train.dataset import BuildConfig, EncodedSecond, build_dataset, load_manifest, load_table
from streamharness.train.head import HeadTrainConfig, TorchHeadScorer, build_head, export_head, load_head, train_head
from streamharness.train.loop import read_metrics
from streamharness.train.objective import TriggerWeights
from streamharness.train.samples import StreamSample, TimedText, Trigger

COLOURS = {"red": (0, 0, 255), "green": (0, 200, 0), "blue": (255, 0, 0)}  # BGR


def text_embed(texts):
    out = np.zeros((len(texts), TEXT_DIM), np.float32)
    for i, t in enumerate(texts):
        for word in t.lower().strip(".").split():
            out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % TEXT_DIM] += 1.0
        out[i] /= max(1e-6, np.linalg.norm(out[i]))
    return out


class ColourEncoder:
    """Stands in for the stage encoder: one-hot of the frame's dominant colour, plus noise."""

    def encode(self, frames, fps, stream):
        rng = np.random.default_rng(int(hashlib.md5(stream.encode()).hexdigest()[:8], 16))
        out = []
        for ts, data in frames:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            vec = rng.normal(0, 0.003, EMBEDDING_DIM).astype(np.float32)
            mean = img.reshape(-1, 3).mean(0)
            if mean.max() > 40:
                vec[int(np.argmax(mean))] += 1.0
            vec /= np.linalg.norm(vec)
            out.append(EncodedSecond(ts, data, vec, [("thing", 0.5)], 0, "a thing", "colour-stand-in"))
        return out, []

    def close(self):
        pass


def make_stream(root: Path, index: int, seconds: int = 60) -> StreamSample:
    rng = np.random.default_rng(index)
    frames = root / f"s{index}" / "frames"
    frames.mkdir(parents=True, exist_ok=True)
    schedule, colour, t = [], None, 0
    while t < seconds:
        length = int(rng.integers(4, 9))
        colour = rng.choice([c for c in [*COLOURS, None] if c != colour])
        schedule += [colour] * length
        t += length
    schedule = schedule[:seconds]
    for k, c in enumerate(schedule):
        img = np.zeros((32, 32, 3), np.uint8)
        if c is not None:
            img[:] = COLOURS[c]
        cv2.imwrite(str(frames / f"{k * 1000:06d}.jpg"), img)
    triggers = []
    for j, want in enumerate(COLOURS):
        onsets = [k for k in range(1, seconds) if schedule[k] == want and schedule[k - 1] != want]
        triggers.append(Trigger(trigger_id=f"i{j}", kind="instruction", content=f"Tell me when a {want} shape appears.",
                                time=0.0, responses=[TimedText(content=f"{want}!", time=float(k)) for k in onsets],
                                windows=[(float(k), float(k) + 3.0) for k in onsets]))
    return StreamSample(sample_id=f"s{index}", video_name=f"s{index}", video_path=str(frames), duration_s=seconds,
                        triggers=triggers, split="val" if index % 5 == 4 else "train")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("head")
    samples = [make_stream(root, i) for i in range(30)]
    build_dataset(samples, root / "ds", BuildConfig(samples_per_shard=4, frames=False), encoder=ColourEncoder(),
                  text_embed=text_embed, progress=False)
    return root / "ds"


def test_builder_output_for_the_head(dataset):
    manifest = load_manifest(dataset)
    assert manifest["stats"]["samples"] == 30 and manifest["stats"]["steps"] == 1800
    assert len(manifest["shards"]) == 8
    triggers = load_table(dataset, "triggers").to_pylist()
    assert len(triggers) == 90 and all(len(t["text_embedding"]) == TEXT_DIM for t in triggers)
    steps = load_table(dataset, "steps", columns=["embedding", "frame_jpeg"])
    assert steps["frame_jpeg"].null_count == steps.num_rows  # --no-frames
    assert load_table(dataset, "steps", splits=["val"]).num_rows == 360


def test_training_reduces_the_loss_and_learns_the_binding(dataset, tmp_path):
    config = HeadTrainConfig(steps=300, batch_size=128, hidden=32, checkpoint_every=100, eval_every=100, seed=1)
    summary = train_head(dataset, tmp_path / "run", config, progress=False)
    lines = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in m]
    first, last = lines[0]["loss"], np.mean([m["loss"] for m in lines[-2:]])
    assert last < 0.6 * first, (first, last)
    v = summary["validation"]
    assert v["split"] == "val" and v["tp"] > v["fn"]  # most red/green/blue onsets of held-out streams found


def test_resume_gives_the_same_next_steps(dataset, tmp_path):
    config = HeadTrainConfig(steps=40, batch_size=64, hidden=16, checkpoint_every=20, eval_every=1000, seed=3)
    train_head(dataset, tmp_path / "straight", config, progress=False)
    train_head(dataset, tmp_path / "resumed", config, progress=False, stop_after=20)
    train_head(dataset, tmp_path / "resumed", config, progress=False)  # resumes at step 20
    a = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in m}
    b = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "loss" in m}
    assert 40 in a and 40 in b and 1 in b
    for step in set(a) & set(b):
        assert a[step] == pytest.approx(b[step], rel=1e-6), step
    ma, _ = load_head(tmp_path / "straight")
    mb, _ = load_head(tmp_path / "resumed")
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb and np.allclose(pa.numpy(), pb.numpy(), atol=1e-6), na


def test_export_agrees_with_torch_and_writes_the_triton_config(dataset, tmp_path):
    import onnxruntime as ort

    config = HeadTrainConfig(steps=30, batch_size=64, hidden=16, seed=0)
    train_head(dataset, tmp_path / "run", config, progress=False)
    path = export_head(tmp_path / "run", tmp_path / "repo", version=2)
    assert path == tmp_path / "repo" / "decision_head" / "2" / "model.onnx"
    cfg = (tmp_path / "repo" / "decision_head" / "config.pbtxt").read_text()
    summary = json.loads((tmp_path / "run" / "head.json").read_text())
    assert f'string_value: "{summary["threshold"]:.4f}"' in cfg and 'name: "decision_head"' in cfg
    model, _ = load_head(tmp_path / "run")
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(5, 8, EMBEDDING_DIM)).astype(np.float32)
    text = rng.normal(size=(5, TEXT_DIM)).astype(np.float32)
    time = rng.random((5, 3)).astype(np.float32)
    got = ort.InferenceSession(str(path)).run(["probability"], {"frames": frames, "text": text, "time": time})[0][:, 0]
    want = TorchHeadScorer(model, 0.5, 8).score(frames, text, time)
    assert np.allclose(got, want, atol=1e-5)


def test_trained_policy_changes_the_decisions(dataset, tmp_path):
    """Replayed through the decision stage on the local host, the trained head fires on the red
    onsets of a held-out stream; the untrained network does not fire there."""
    from streamharness.eval.episode import parse_episode
    from streamharness.eval.scoring import AnswerMatcher, score_run
    from streamharness.train.evaluate import encoded_frames_of, run_decisions

    train_head(dataset, tmp_path / "run", HeadTrainConfig(steps=300, batch_size=128, hidden=32, seed=1), progress=False)
    model, summary = load_head(tmp_path / "run")
    sample = make_stream(tmp_path, 4)  # a val stream: never trained on
    red = next(t for t in sample.triggers if "red" in t.content)
    episode = parse_episode({"format_version": 1, "episode_id": "s4", "video": "frames", "duration_s": 60.0, "source": "test",
                             "events": [{"type": "instruction", "event_id": "red", "given_at_s": 0.0, "text": red.content,
                                         "windows": [list(w) for w in red.windows], "mode": "proactive", "position": "forward"}]})
    frames = encoded_frames_of([dataset], ["s4"])["s4"]
    trained = run_decisions(episode, frames, TrainedPolicy(text_embed, TorchHeadScorer(model, summary["threshold"], 8)),
                            system="trained")
    untrained = run_decisions(episode, frames, TrainedPolicy(text_embed, TorchHeadScorer(build_head(HeadTrainConfig(hidden=32)).eval(), 0.5, 8)),
                              system="untrained")
    assert [r.media_ts_s for r in trained.responses] != [r.media_ts_s for r in untrained.responses]
    good = score_run([episode], [trained], AnswerMatcher()).total
    bad = score_run([episode], [untrained], AnswerMatcher()).total
    assert good.tp >= len(red.windows) - 1 and good.sw_f1 > (bad.sw_f1 or 0.0)


def test_weights_change_what_is_learned(dataset, tmp_path):
    """The trigger weights are used: with the repeated-silence weight at 0.2 the trained head's
    probabilities on silent steps are higher than with 0.8 (silence is pushed down less)."""
    from streamharness.train.head import load_positions, predict

    config = HeadTrainConfig(steps=150, batch_size=128, hidden=16, seed=2)
    train_head(dataset, tmp_path / "w02", config, TriggerWeights(weight_repeated_silence=0.2), progress=False)
    train_head(dataset, tmp_path / "w08", config, TriggerWeights(weight_repeated_silence=0.8), progress=False)
    matrix, pos = load_positions(dataset, ("train",))
    silent = pos.target == 0
    p02 = predict(load_head(tmp_path / "w02")[0], matrix, pos)[silent].mean()
    p08 = predict(load_head(tmp_path / "w08")[0], matrix, pos)[silent].mean()
    assert p02 > p08


def test_a_stopped_build_resumes_at_the_first_unfinished_shard(tmp_path):
    """Shards are the unit of resuming: a shard whose file and state entry are there is not
    encoded again; a lost one is rebuilt, identical."""
    import pyarrow.parquet as pq

    class Counting(ColourEncoder):
        calls: list[str] = []

        def encode(self, frames, fps, stream):
            self.calls.append(stream)
            return super().encode(frames, fps, stream)

    samples = [make_stream(tmp_path, i, seconds=20) for i in range(6)]
    encoder = Counting()
    out = tmp_path / "ds"
    build_dataset(samples, out, BuildConfig(samples_per_shard=2, frames=False), encoder=encoder, text_embed=text_embed, progress=False)
    first = pq.read_table(out / "steps" / "shard-00001.parquet")
    assert encoder.calls == [s.sample_id for s in samples]
    state = json.loads((out / "build-state.json").read_text())
    del state["shards"]["shard-00001"]  # as if the build had stopped while writing it
    (out / "build-state.json").write_text(json.dumps(state))
    (out / "steps" / "shard-00001.parquet").unlink()
    encoder.calls.clear()
    manifest = build_dataset(samples, out, BuildConfig(samples_per_shard=2, frames=False), encoder=encoder,
                             text_embed=text_embed, progress=False)
    assert encoder.calls == ["s2", "s3"]
    assert pq.read_table(out / "steps" / "shard-00001.parquet").equals(first)
    assert manifest["stats"]["samples"] == 6 and [s["name"] for s in manifest["shards"]] == [f"shard-0000{i}" for i in range(3)]


def test_missing_and_unreadable_videos_are_counted_not_fatal(tmp_path):
    good = make_stream(tmp_path, 0, seconds=10)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video" * 100)
    unreadable = good.model_copy(update={"sample_id": "junk", "video_path": str(junk)})
    missing = good.model_copy(update={"sample_id": "gone", "video_path": str(tmp_path / "gone.mp4")})
    manifest = build_dataset([missing, good, unreadable], tmp_path / "ds", BuildConfig(frames=False), encoder=ColourEncoder(),
                             text_embed=text_embed, progress=False)
    stats = manifest["stats"]
    assert (stats["samples"], stats["videos_missing"], stats["videos_unreadable"]) == (1, 1, 1)
    assert {p["sample_id"]: p["problem"].split(":")[0] for p in stats["problems"]} == {
        "gone": "video not found", "junk": "no frame could be read"}
