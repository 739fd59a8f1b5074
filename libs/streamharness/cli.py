"""The ``streamharness`` command.

    streamharness up                    # Kafka + Triton locally, a real video through them
    streamharness dev kafka run|fetch   # development Kafka broker
    streamharness dev triton run|export # development tritonserver / ONNX export
"""

from __future__ import annotations

import typer

app = typer.Typer(help="StreamHarness: live video for vision-language models.", no_args_is_help=True)
dev_app = typer.Typer(help="Real infrastructure for development: Kafka broker, tritonserver.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")


def _mount_dev_apps() -> None:
    # Imported here, not at module top, so `import streamharness.cli` stays cheap.
    from streamharness.devinfra import kafka_cli, triton_cli

    dev_app.add_typer(kafka_cli.app, name="kafka", help="Development Kafka broker (KRaft, single node, 127.0.0.1).")
    dev_app.add_typer(triton_cli.app, name="triton", help="Development tritonserver serving model-repository/.")


@app.command()
def up(
    video: str = typer.Option("vtest.avi", help="A video file, or the name of an opencv-doc sample."),
    fps: float = typer.Option(1.0, min=0.1, max=30.0, help="Decision rate: frames kept per media second."),
    speed: float = typer.Option(4.0, min=0.0, help="Playback speed on media time (1 = real time, 0 = as fast as possible)."),
    tenant: str = typer.Option("demo", help="Tenant of the stream key."),
    stream: str = typer.Option("cam-1", help="Stream id of the stream key."),
    limit_s: float = typer.Option(0.0, min=0.0, help="Stop after this much media time (0 = the whole video)."),
) -> None:
    """Start Kafka and Triton, play a real video through them, print what the encoder sees."""
    from streamharness.local_run import run_foundation_demo

    raise typer.Exit(run_foundation_demo(video=video, fps=fps, speed=speed, tenant=tenant, stream=stream, limit_s=limit_s))


def main() -> None:
    _mount_dev_apps()
    app()


if __name__ == "__main__":
    main()
