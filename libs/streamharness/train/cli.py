"""``streamharness train …``: the Streaming-Train entry points a Kubernetes Job runs
(training-jobs/). Also runnable as ``python -m streamharness.train.cli`` (torchrun:
``torchrun --nproc_per_node=N -m streamharness.train.cli train …``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Streaming-Train: build per-second training data, train, export.", no_args_is_help=True)
FORMAT_NAMES = ("auto", "streaming-raw", "streaming-converted", "activitynet", "youcook2", "charades-sta", "episodes", "jsonl")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def synthesize(
    out: Path = typer.Option(..., help="Folder for samples.jsonl and the rendered frames."),
    streams: int = typer.Option(100, min=1, help="Streams to generate."),
    duration_s: int = typer.Option(300, min=10, help="Length of each stream (media seconds, 1 FPS)."),
    seed: int = typer.Option(0, help="Seed of the set; stream i's own seed derives from (seed, i)."),
    style: str = typer.Option("mixed", help="single (one centred shape at a time), multi (several moving shapes) or mixed."),
) -> None:
    """Procedural streams with exact ground truth (objects appearing, leaving, moving, changing
    colour; scripted questions and instructions); resumable."""
    from streamharness.train.synthetic import STYLES, synthesize as run

    if style not in STYLES:
        _fail(f"--style must be one of {', '.join(STYLES)}")
    path = run(out, streams=streams, duration_s=duration_s, seed=seed, style=style)
    typer.echo(path)


@app.command("build-dataset")
def build_dataset(
    input: list[Path] = typer.Option(..., "--input", exists=True, help="Annotation file or folder; repeatable."),
    format: str = typer.Option("auto", "--format", help="Reader: " + ", ".join(FORMAT_NAMES) + "."),
    video_root: Path = typer.Option(None, help="Where the videos are (default: beside each annotation file)."),
    out: Path = typer.Option(..., help="Dataset folder (manifest.json, steps/, triggers/)."),
    samples_per_shard: int = typer.Option(64, min=1, help="Samples per Parquet shard (a shard is the unit of resuming)."),
    fps: float = typer.Option(1.0, min=0.1, max=30.0, help="Steps per media second."),
    frames: bool = typer.Option(True, help="Keep each step's JPEG (the VLM trainer needs them; the head does not)."),
    val_fraction: float = typer.Option(0.1, min=0.0, max=0.9, help="Samples moved to the val split (by a hash of their id)."),
    test_fraction: float = typer.Option(0.0, min=0.0, max=0.9, help="Samples moved to the test split (by a hash of their id)."),
    limit: int = typer.Option(0, min=0, help="Only the first N samples (0 = all)."),
    overwrite: bool = typer.Option(False, help="Start again when --out holds a build of other inputs."),
    start_triton: bool = typer.Option(False, help="Start a local tritonserver on the dev model repository instead of using SH_TRITON_URL."),
) -> None:
    """Videos + timed annotations → sharded Parquet of per-second samples, each frame through the
    services' own ingest step and encoder stage (frame encoder on Triton); resumable."""
    from streamharness.train.dataset import BuildConfig, DatasetBuildError
    from streamharness.train.dataset import build_dataset as run
    from streamharness.train.readers import read_annotations
    from streamharness.train.samples import AnnotationFormatError

    if format not in FORMAT_NAMES:
        _fail(f"--format must be one of {', '.join(FORMAT_NAMES)}")
    samples = []
    try:
        for path in input:
            samples += list(read_annotations(path, format, video_root=video_root))
    except AnnotationFormatError as err:
        _fail(str(err))
    if limit:
        samples = samples[:limit]
    if not samples:
        _fail(f"no samples in {', '.join(map(str, input))}")
    config = BuildConfig(fps=fps, samples_per_shard=samples_per_shard, frames=frames, val_fraction=val_fraction,
                         test_fraction=test_fraction)
    server = encoder = None
    try:
        if start_triton:
            from streamharness.devinfra.triton_server import TritonServer
            from streamharness.settings import TritonSettings, load_settings
            from streamharness.train.dataset import StageFrameEncoder

            server = TritonServer(wait_for_models=("frame_encoder", "people_detector")).start()
            encoder = StageFrameEncoder(load_settings(TritonSettings).model_copy(update={"url": server.grpc_url}))
        manifest = run(samples, out, config, encoder=encoder, overwrite=overwrite,
                       inputs={"paths": [str(p) for p in input], "format": format,
                               "video_root": str(video_root) if video_root else None})
    except DatasetBuildError as err:
        _fail(str(err))
    finally:
        if encoder is not None:
            encoder.close()
        if server is not None:
            server.stop()
    s = manifest["stats"]
    typer.echo(f"{out}: {s['samples']} samples, {s['steps']} steps ({s['response_steps']} responses, "
               f"{s['silence_per_response']} silences per response), {s['triggers']} triggers; "
               f"{s['videos_missing']} videos missing, {s['videos_unreadable']} unreadable")


@app.command()
def train(
    dataset: list[Path] = typer.Option(..., "--dataset", exists=True, file_okay=False, help="Dataset folder; repeatable."),
    trainer: str = typer.Option("head", help="head (the decision head, CPU) or vlm (LoRA on a Hugging Face VLM)."),
    out: Path = typer.Option(..., help="Run folder (checkpoints/, metrics.jsonl, the trained model)."),
    steps: int = typer.Option(None, min=1, help="Optimiser steps (default: SH_TRAIN_HEAD_STEPS / SH_TRAIN_VLM_STEPS)."),
    seed: int = typer.Option(None, help="Seed (default: the trainer's setting)."),
    resume: bool = typer.Option(True, help="Resume from the newest checkpoint in --out."),
    model: str = typer.Option(None, help="vlm: a local Hugging Face checkpoint folder (Qwen2-VL class)."),
    tiny: bool = typer.Option(False, help="vlm: a tiny randomly initialised Qwen2-VL built in code (CI, smoke tests)."),
    repeated_silence_weight: float = typer.Option(None, min=0.0, help="Override SH_TRAIN_WEIGHT_REPEATED_SILENCE."),
    uniform_weights: bool = typer.Option(False, help="All decision positions weighted 1 (the ablation)."),
) -> None:
    """Train on the trigger-weighted objective (resumable, seeded, metrics to metrics.jsonl and OpenTelemetry)."""
    from streamharness.settings import load_settings
    from streamharness.telemetry import setup_telemetry
    from streamharness.train.objective import TriggerWeights

    if trainer not in ("head", "vlm"):
        _fail("--trainer must be head or vlm")
    if trainer == "vlm" and not tiny and not model:
        _fail("--trainer vlm needs --model PATH (a local checkpoint) or --tiny")
    if trainer == "vlm" and len(dataset) != 1:
        _fail("--trainer vlm takes one --dataset")
    weights = TriggerWeights.uniform() if uniform_weights else load_settings(TriggerWeights)
    if repeated_silence_weight is not None:
        weights = weights.model_copy(update={"weight_repeated_silence": repeated_silence_weight})
    setup_telemetry("streamharness-train")
    overrides = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    if trainer == "head":
        from streamharness.train.head import HeadTrainConfig, train_head

        config = load_settings(HeadTrainConfig).model_copy(update=overrides)
        try:
            summary = train_head(dataset, out, config, weights, resume=resume)
        except ValueError as err:
            _fail(str(err))
        if summary:
            v = summary["validation"]
            typer.echo(f"{out}: threshold {summary['threshold']:.2f}, {v['split']} SW-F1 {v['sw_f1']:.3f} "
                       f"(TP {v['tp']}, FP {v['fp']}, FN {v['fn']})")
    elif trainer == "vlm":
        from streamharness.train.vlm import VLMTrainConfig, train_vlm

        config = load_settings(VLMTrainConfig).model_copy(update=overrides)
        summary = train_vlm(dataset[0], out, config, weights, tiny=True if tiny else model, resume=resume)
        typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
def export(
    checkpoint: Path = typer.Option(..., exists=True, file_okay=False, help="A head run folder (train --trainer head --out)."),
    model_repository: Path = typer.Option(Path("model-repository"), help="Triton model repository to write decision_head/ into."),
    version: int = typer.Option(1, min=1, help="Model version folder."),
) -> None:
    """The trained decision head → ONNX in a Triton model repository (checked against torch)."""
    from streamharness.train.head import export_head

    typer.echo(export_head(checkpoint, model_repository, version))


@app.command()
def evaluate(
    episodes: Path = typer.Option(..., exists=True, help="Streaming-Eval episode file or folder (held out from training)."),
    dataset: list[Path] = typer.Option(..., "--dataset", exists=True, file_okay=False,
                                       help="Dataset built from those episodes (--format episodes): their encoded frames."),
    system: list[str] = typer.Option(["silent", "always", "every-5", "rules", "untrained"],
                                     help="rules, trained:<run dir> (head + people rule, as served), head-only:<run dir>, untrained, silent, always, every-<k>; repeatable."),
    out: Path = typer.Option(None, help="Folder for one result JSON and HTML report per system, and table.md."),
) -> None:
    """Decision policies compared on the episodes' standing instructions (when each speaks), through
    the decision stage on the local host; one Streaming-Eval result per system."""
    from rich.console import Console

    from streamharness.eval.episode import load_episodes
    from streamharness.eval.scoring import save_result
    from streamharness.settings import load_settings
    from streamharness.text_encoder import TextEncoder, TextEncoderSettings
    from streamharness.train.evaluate import evaluate_systems, results_table

    eps = load_episodes(episodes)
    embed = TextEncoder(load_settings(TextEncoderSettings)).load().encode
    console = Console()
    with console.status("replaying…") as status:
        try:
            results = evaluate_systems(eps, dataset, system, embed,
                                       progress=lambda name, ep: status.update(f"{name}: {ep.episode_id}"))
        except ValueError as err:
            _fail(str(err))
    table = results_table(results)
    console.print(table)
    if out:
        from streamharness.eval.report import write_report

        out.mkdir(parents=True, exist_ok=True)
        for name, score in results.items():
            stem = name.replace(":", "_").replace("/", "_")
            save_result(score, out / f"{stem}.json")
            write_report(out / f"{stem}.html", score)
        (out / "table.md").write_text(table + "\n")
        console.print(f"results, reports and table.md → {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
