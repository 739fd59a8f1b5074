"""Streaming-Train end to end on real components: procedural streams → the dataset builder (frames
through ingest's step and the encoder stage on the real tritonserver, MiniLM text embeddings) →
the decision head (trigger loss) → its ONNX export served by a second real tritonserver → the
decision stage's ``trained`` policy replaying a held-out episode, scored by Streaming-Eval; and the
VLM trainer (tiny Qwen2-VL built in code) a few steps on the same dataset's frames."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from streamharness.decision.service import DecisionSettings, make_policy
from streamharness.decision.trained import HeadScorer, TrainedPolicy
from streamharness.devinfra.triton_server import TritonServer
from streamharness.eval.episodes_builtin import generate_synthetic
from streamharness.eval.episode import load_episode
from streamharness.eval.scoring import AnswerMatcher, score_run
from streamharness.settings import TritonSettings, load_settings
from streamharness.text_encoder import TextEncoder, TextEncoderSettings
from streamharness.train.dataset import BuildConfig, StageFrameEncoder, build_dataset, load_manifest, load_table
from streamharness.train.evaluate import encoded_frames_of, instruction_episode, run_decisions
from streamharness.train.head import HeadTrainConfig, TorchHeadScorer, export_head, load_head, train_head
from streamharness.train.readers import read_annotations
from streamharness.train.synthetic import synthesize

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(load_settings(TextEncoderSettings)).load()


@pytest.fixture(scope="module")
def built(tmp_path_factory, triton_settings, minilm):
    root = tmp_path_factory.mktemp("train-e2e")
    synthesize(root / "synth", streams=16, duration_s=90, seed=11, style="single", progress=False)
    generate_synthetic(root / "heldout", 300, seed=4242)  # an evaluation episode, never trained on
    train = list(read_annotations(root / "synth" / "samples.jsonl", "jsonl"))
    heldout = list(read_annotations(root / "heldout", "episodes"))
    missing = train[0].model_copy(update={"sample_id": "missing-video", "video_path": str(root / "nope.mp4")})
    encoder = StageFrameEncoder(triton_settings)
    try:
        build_dataset([*train, missing], root / "ds", BuildConfig(samples_per_shard=8, val_fraction=0.2), encoder=encoder,
                      text_embed=minilm.encode, progress=False)
        build_dataset(heldout, root / "ds-heldout", BuildConfig(samples_per_shard=8, frames=False), encoder=encoder,
                      text_embed=minilm.encode, progress=False)
    finally:
        encoder.close()
    return root


def test_the_dataset_is_what_the_services_see(built):
    manifest = load_manifest(built / "ds")
    stats = manifest["stats"]
    assert stats["samples"] == 16 and stats["steps"] == 16 * 90 and stats["videos_missing"] == 1
    assert stats["problems"][0]["sample_id"] == "missing-video"
    assert 0 < stats["response_steps"] < stats["silence_steps"]
    rows = load_table(built / "ds", "steps", columns=["embedding", "embedding_model", "caption", "frame_jpeg", "user"]).slice(0, 3).to_pylist()
    for r in rows:
        v = np.asarray(r["embedding"])
        assert v.shape == (1280,) and abs(np.linalg.norm(v) - 1.0) < 1e-3  # the encoder's unit vectors
        assert r["embedding_model"] == "frame_encoder" and r["frame_jpeg"][:2] == b"\xff\xd8" and r["caption"]
    assert rows[1]["user"].endswith("<1.0 seconds>\n<image>")
    # Resuming a finished build does nothing and refuses other parameters.
    from streamharness.train.dataset import DatasetBuildError

    with pytest.raises(DatasetBuildError, match="other inputs or parameters"):
        build_dataset(list(read_annotations(built / "synth" / "samples.jsonl", "jsonl"))[:3], built / "ds", progress=False,
                      text_embed=lambda texts: np.zeros((len(texts), 384), np.float32))


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    """A head trained on the built set and exported into a model repository of its own."""
    root = tmp_path_factory.mktemp("head")
    summary = train_head([built / "ds"], root / "head", HeadTrainConfig(steps=400, batch_size=128, seed=0), progress=False)
    repo = root / "repo"
    shutil.copytree(ROOT / "model-repository" / "decision_head", repo / "decision_head",
                    ignore=shutil.ignore_patterns("*.onnx", "head.json", "__pycache__"))
    export_head(root / "head", repo)
    return root / "head", repo, summary


def test_build_train_export_serve_and_evaluate(built, exported, minilm, tmp_path):
    run_dir, repo, summary = exported
    assert summary["threshold"] > 0 and summary["train_positions"] > 1000
    with TritonServer(repo, tmp_path / "triton", wait_for_models=("decision_head",)) as server:
        triton = load_settings(TritonSettings, url=server.grpc_url)
        policy = make_policy(DecisionSettings(policy="trained"), minilm.encode, triton)
        assert isinstance(policy, TrainedPolicy) and isinstance(policy.scorer, HeadScorer)
        assert policy.threshold == pytest.approx(summary["threshold"], abs=1e-4)  # read from the served config
        episode = instruction_episode(load_episode(built / "heldout" / "episode.json"))
        frames = encoded_frames_of([built / "ds-heldout"], [episode.episode_id])[episode.episode_id]
        served = run_decisions(episode, frames, policy, system="trained (Triton)")
    model, info = load_head(run_dir)
    local = run_decisions(episode, frames, TrainedPolicy(minilm.encode, TorchHeadScorer(model, info["threshold"], info["window"])),
                          system="trained (torch)")
    # The served ONNX decides exactly as the trained network does.
    assert [(r.event_id, r.media_ts_s) for r in served.responses] == [(r.event_id, r.media_ts_s) for r in local.responses]
    rules = make_policy(DecisionSettings(policy="rules"), minilm.encode)
    by_rules = run_decisions(episode, frames, rules, system="rules")
    trained_score = score_run([episode], [served], AnswerMatcher()).total
    rules_score = score_run([episode], [by_rules], AnswerMatcher()).total
    assert trained_score.tp > 0 and (trained_score.sw_f1 or 0) > (rules_score.sw_f1 or 0)


def test_the_stage_takes_the_head_once_it_is_served(built, exported, minilm, tmp_path):
    """Triton up without the head (a rollout, or the decision pod started first): the stage decides
    by the rules, then takes the head over for the running stream's instructions once it is served."""
    import tritonclient.grpc as grpcclient

    from streamharness.decision.policy import RulePolicy
    from streamharness.decision.service import DecisionStage
    from streamharness.hosts.local import LocalHost

    _, repo, _ = exported
    with TritonServer(repo, tmp_path / "triton", model_control_mode="explicit", wait_for_models=()) as server:
        triton = load_settings(TritonSettings, url=server.grpc_url)
        host = LocalHost()
        try:
            stage = host.add(DecisionStage(DecisionSettings(policy="trained"), triton=triton, text_encoder=minilm))
            assert isinstance(stage.policy, RulePolicy)
            episode = load_episode(built / "heldout" / "episode.json")
            frames = encoded_frames_of([built / "ds-heldout"], [episode.episode_id])[episode.episode_id]
            from streamharness import topics
            from streamharness.keys import make_key
            from streamharness.v1 import common_pb2, events_pb2

            key = make_key("t", "upgrade")
            Q = events_pb2.QueryEvent
            host.bus.send(topics.QUERIES, key, Q(key=key, session_id="s", kind=Q.KIND_SESSION_START, instructions=[
                common_pb2.StandingInstruction(instruction_id="red", text="Tell me when a red shape appears.")]))

            def play(part):
                for f in part:
                    msg = events_pb2.EncodedFrameEvent()
                    msg.CopyFrom(f)
                    msg.key.CopyFrom(key)
                    msg.session_id = "s"
                    host.bus.send(topics.EMBEDDINGS, key, msg)
                    host.run_until_idle()

            play(frames[:20])
            assert isinstance(stage.policy, RulePolicy)
            grpcclient.InferenceServerClient(server.grpc_url).load_model("decision_head")
            stage.UPGRADE_EVERY_S = 0.0
            play(frames[20:40])
            assert isinstance(stage.policy, TrainedPolicy)
            state = next(iter(stage.states.values()))
            assert state.instructions["red"].kind == "trained"  # taken over, not dropped
        finally:
            host.close()


def test_trained_policy_falls_back_to_the_rules_when_no_head_is_served(minilm, triton_settings):
    from streamharness.decision.policy import RulePolicy

    missing = triton_settings.model_copy(update={})
    policy = make_policy(DecisionSettings(policy="trained", trained_model="no_such_head"), minilm.encode, missing)
    assert isinstance(policy, RulePolicy)
    assert make_policy(DecisionSettings(policy="trained", trained_model="no_such_head", trained_fallback=False),
                       minilm.encode, missing) is None


def test_the_vlm_trainer_runs_on_the_built_frames(built, tmp_path):
    from streamharness.train.objective import TriggerWeights
    from streamharness.train.vlm import VLMTrainConfig, train_vlm

    config = VLMTrainConfig(steps=6, window_steps=8, seed=0, save_every=3, max_pixels=56 * 56, min_pixels=56 * 56)
    summary = train_vlm(built / "ds", tmp_path / "vlm", config, TriggerWeights(), tiny=True)
    assert (tmp_path / "vlm" / "adapter").is_dir()
    assert summary["steps"] == 6 and summary["finished"] and summary["last_loss"] < summary["first_loss"]
