"""The ``streamharness`` command.

    streamharness up                    # the whole pipeline locally, a real video through it
    streamharness stream VIDEO          # play a video through a running gateway
    streamharness dev kafka run|fetch   # development Kafka broker
    streamharness dev triton run|export # development tritonserver / ONNX export
    streamharness eval …                # Streaming-Eval
    streamharness train …               # Streaming-Train: build-dataset, train, export
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="StreamHarness: live video for vision-language models.", no_args_is_help=True)
dev_app = typer.Typer(help="Real infrastructure for development: Kafka broker, tritonserver.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")


def _mount_dev_apps() -> None:
    # Imported here, not at module top, so `import streamharness.cli` stays cheap.
    from streamharness.devinfra import kafka_cli, text_encoder_cli, triton_cli

    dev_app.add_typer(kafka_cli.app, name="kafka", help="Development Kafka broker (KRaft, single node, 127.0.0.1).")
    dev_app.add_typer(triton_cli.app, name="triton", help="Development tritonserver serving model-repository/.")
    dev_app.add_typer(text_encoder_cli.app, name="text-encoder", help="MiniLM text encoder export (ONNX).")
    from streamharness.eval.cli import app as eval_app

    app.add_typer(eval_app, name="eval", help="Streaming-Eval: replay episodes, score them on time, report.")
    from streamharness.train.cli import app as train_app

    app.add_typer(train_app, name="train", help="Streaming-Train: build per-second training data, train, export.")


@app.command()
def up(
    video: str = typer.Option("vtest.avi", help="A video file, or the name of an opencv-doc sample."),
    ask: list[str] = typer.Option(["20:How many people are in the street?"], help="SECONDS:QUESTION; repeatable."),
    watch_for: list[str] = typer.Option(["tell me when someone walks in"], help="A standing instruction; repeatable."),
    speed: float = typer.Option(2.0, min=0.0, help="Playback speed on media time (1 = real time, 0 = as fast as possible)."),
    limit_s: float = typer.Option(40.0, min=1.0, help="Media seconds of the video to play."),
    keep_running: bool = typer.Option(False, help="Leave the stack running after the video (Ctrl-C stops it)."),
) -> None:
    """Start Kafka, Triton, the generator and all six services locally, stream a real video with a
    question and a standing instruction through the gateway, and print the responses."""
    import asyncio
    import signal
    import threading
    from pathlib import Path

    from rich.console import Console

    from streamharness.devinfra.stack import LocalStack
    from streamharness.media import sample_path
    from streamharness.player import TimedQuestion, play

    console = Console()
    questions = [TimedQuestion.parse(spec) for spec in ask]
    path = Path(video) if Path(video).exists() else sample_path(video)
    with console.status("starting Kafka, Triton, the generator and six services (about a minute on 2 cores)…"):
        stack = LocalStack().start()
    try:
        console.print(f"gateway on [bold]{stack.gateway_addresses[0]}[/] (gRPC), [bold]{stack.http_urls[0]}/v1[/] (HTTP, OpenAI-compatible); "
                      f"live view: [bold]{stack.http_urls[0]}/view[/]; logs in {stack.work_dir}")
        for q in questions:
            console.print(f"  will ask at t={q.at_ms / 1000:.0f}s: {q.text}")
        for w in watch_for:
            console.print(f"  standing instruction: {w}")

        def show(r) -> None:
            who = "[magenta]proactive[/]" if r.proactive else "[cyan]answer[/]"
            console.print(f"[bold]t={r.media_ts_ms / 1000:6.1f}s[/] {who}: {r.text.strip()}")

        result = asyncio.run(play(stack.gateway_addresses[0], path, questions=questions, watch_for=watch_for,
                                  speed=speed, send_fps=2.0, limit_s=limit_s, on_response=show))
        console.print(f"{result.frames_sent} frames sent, {result.frames_sampled} decided on, "
                      f"{len(result.responses)} responses")
        if keep_running:
            console.print(f"stack running; stream more with: streamharness stream VIDEO --gateway {stack.gateway_addresses[0]}")
            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            stop.wait()
    finally:
        with console.status("stopping…"):
            codes = stack.stop()
        bad = {name: code for name, code in codes.items() if code != 0}
        if bad:
            console.print(f"[red]services that did not stop cleanly: {bad}")


@dev_app.command("encode-video")
def encode_video(
    video: str = typer.Option("vtest.avi", help="A video file, or the name of an opencv-doc sample."),
    fps: float = typer.Option(1.0, min=0.1, max=30.0, help="Frames kept per media second."),
    speed: float = typer.Option(4.0, min=0.0, help="Playback speed on media time (0 = as fast as possible)."),
    tenant: str = typer.Option("demo", help="Tenant of the stream key."),
    stream: str = typer.Option("cam-1", help="Stream id of the stream key."),
    limit_s: float = typer.Option(0.0, min=0.0, help="Stop after this much media time (0 = the whole video)."),
) -> None:
    """Infrastructure check: Kafka + Triton only, a real video through the frame encoder."""
    from streamharness.local_run import run_foundation_demo

    raise typer.Exit(run_foundation_demo(video=video, fps=fps, speed=speed, tenant=tenant, stream=stream, limit_s=limit_s))


@app.command()
def stream(
    video: str = typer.Argument(..., help="A video file, or the name of an opencv-doc sample (vtest.avi)."),
    gateway: str = typer.Option("127.0.0.1:50051", envvar="SH_CLIENT_GATEWAY", help="Gateway host:port."),
    ask: list[str] = typer.Option([], help="SECONDS:QUESTION, asked at that media time; repeatable."),
    watch_for: list[str] = typer.Option([], help="A standing instruction, e.g. 'tell me when someone walks in'; repeatable."),
    speed: float = typer.Option(1.0, min=0.0, help="Playback speed on media time (1 = real time, 0 = as fast as possible)."),
    fps: float = typer.Option(1.0, min=0.1, max=30.0, help="Decision rate asked of the server."),
    stream_id: str = typer.Option("cam-1", help="Stream id."),
    api_key: str = typer.Option(None, envvar="SH_CLIENT_API_KEY", help="Tenant API key (x-api-key)."),
    token: str = typer.Option(None, envvar="SH_CLIENT_TOKEN", help="A JWT from an issuer the gateway accepts (instead of an API key)."),
    tls: bool = typer.Option(False, "--tls", envvar="SH_CLIENT_TLS", help="Connect over TLS (the system's CA roots)."),
    tls_ca: Path = typer.Option(None, envvar="SH_CLIENT_TLS_CA", exists=True, dir_okay=False, help="PEM CA bundle of the gateway's certificate (implies --tls)."),
    limit_s: float = typer.Option(None, help="Stop after this much media time."),
) -> None:
    """Play a video through the gateway and print responses live with their media timestamps."""
    import asyncio
    from pathlib import Path

    from rich.console import Console

    from streamharness.media import sample_path
    from streamharness.player import TimedQuestion, play

    console = Console()
    try:
        questions = [TimedQuestion.parse(spec) for spec in ask]
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    path = Path(video) if Path(video).exists() else sample_path(video)

    def show(r) -> None:
        who = f"[magenta]proactive ({r.instruction_id})[/]" if r.proactive else f"[cyan]answer ({r.question_id})[/]"
        console.print(f"[bold]t={r.media_ts_ms / 1000:6.1f}s[/] {who}: {r.text.strip()}")

    def error(e) -> None:
        console.print(f"[yellow]frame {e.seq} at {e.media_ts_ms / 1000:.1f}s rejected: {e.message}[/]")

    result = asyncio.run(play(gateway, path, stream_id=stream_id, questions=questions, watch_for=watch_for,
                              speed=speed, decision_fps=fps, limit_s=limit_s, api_key=api_key,
                              on_response=show, on_error=error, bearer_token=token, tls=tls,
                              root_certificates=tls_ca.read_bytes() if tls_ca else None))
    console.print(f"{result.frames_sent} frames sent, {result.frames_sampled} kept at {fps:g}/s, "
                  f"{len(result.responses)} responses, {len(result.errors)} rejected frames")


@app.command()
def pull(
    source: str = typer.Argument(..., help="A camera or file URL the platform pulls (rtsp://, rtmp://, http(s):// file or HLS .m3u8), "
                                           "or a local video file to upload in the session."),
    gateway: str = typer.Option("127.0.0.1:50051", envvar="SH_CLIENT_GATEWAY", help="Gateway host:port."),
    ask: list[str] = typer.Option([], help="SECONDS:QUESTION, asked at that media time; repeatable."),
    watch_for: list[str] = typer.Option([], help="A standing instruction; repeatable."),
    speed: float = typer.Option(0.0, min=0.0, help="Files and uploads: 0 = as fast as it decodes, 1 = real time."),
    rtsp_transport: str = typer.Option("tcp", help="RTSP over tcp or udp."),
    fps: float = typer.Option(1.0, min=0.1, max=30.0, help="Decision rate asked of the server."),
    stream_id: str = typer.Option("cam-1", help="Stream id."),
    duration_s: float = typer.Option(None, help="A live source: end the session after this many seconds (default: until Ctrl-C)."),
    api_key: str = typer.Option(None, envvar="SH_CLIENT_API_KEY", help="Tenant API key (x-api-key)."),
    token: str = typer.Option(None, envvar="SH_CLIENT_TOKEN", help="A JWT from an issuer the gateway accepts (instead of an API key)."),
) -> None:
    """Open a session the platform feeds itself: from a camera/file URL, or an uploaded file; print
    what the source does (connected, gaps, end) and the responses with their media timestamps."""
    import asyncio
    import time as _time
    from pathlib import Path

    from rich.console import Console

    from streamharness.client import Session
    from streamharness.player import TimedQuestion
    from streamharness.v1 import common_pb2

    console = Console()
    try:
        questions = sorted((TimedQuestion.parse(spec) for spec in ask), key=lambda q: q.at_ms)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    upload = Path(source) if "://" not in source else None
    if upload is not None and not upload.is_file():
        raise typer.BadParameter(f"{source} is neither a URL nor a file")
    src = common_pb2.Source(upload=True, speed=speed) if upload else common_pb2.Source(url=source, speed=speed, rtsp_transport=rtsp_transport)
    K = common_pb2.SourceStatus  # noqa: N806

    async def run() -> int:
        responses = 0
        async with Session(gateway, stream_id=stream_id, decision_fps=fps, source=src, api_key=api_key, bearer_token=token,
                           instructions={f"watch-{i + 1}": t for i, t in enumerate(watch_for)}) as s:
            started = _time.monotonic()
            if upload is not None or speed == 0:
                for q in questions:  # on media time: the decision stage holds them until their second
                    await s.ask(q.text, at_ms=q.at_ms)
                questions.clear()
            if upload is not None:
                await s.upload(str(upload))

            async def timed() -> None:
                for q in questions:
                    await asyncio.sleep(max(0.0, q.at_ms / 1000 - (_time.monotonic() - started)))
                    await s.ask(q.text, at_ms=q.at_ms)
                if duration_s is not None:
                    await asyncio.sleep(max(0.0, duration_s - (_time.monotonic() - started)))
                    await s.end()

            asker = asyncio.create_task(timed())

            def seen(m) -> None:
                kind = m.WhichOneof("message")
                if kind == "source":
                    st = m.source
                    extra = f" gap {st.gap_ms / 1000:.1f}s" if st.kind == K.KIND_GAP else ""
                    console.print(f"[dim]t={st.media_ts_ms / 1000:6.1f}s source {K.Kind.Name(st.kind)[5:].lower()}{extra} {st.message}[/]")
                elif kind == "error":
                    console.print(f"[yellow]{m.error.message}[/]")

            try:
                async for r in s.responses(on_message=seen):
                    responses += 1
                    who = f"[magenta]proactive ({r.instruction_id})[/]" if r.proactive else f"[cyan]answer ({r.question_id})[/]"
                    console.print(f"[bold]t={r.media_ts_ms / 1000:6.1f}s[/] {who}: {r.text.strip()}")
            finally:
                asker.cancel()
        return responses

    count = asyncio.run(run())
    console.print(f"{count} responses")


keys_app = typer.Typer(help="Tenants' API keys in a keys file (SH_GATEWAY_API_KEYS_FILE): only hashes are stored.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
_KEYS_FILE = typer.Option(..., "--file", envvar="SH_GATEWAY_API_KEYS_FILE", dir_okay=False, help="The keys file (created if missing).")


@keys_app.command("new")
def keys_new(tenant: str = typer.Option(..., help="The tenant the key authenticates."), file: Path = _KEYS_FILE) -> None:
    """Make a random key for TENANT, add its hash to the file, print the key once (it is stored nowhere)."""
    from streamharness.auth import add_api_key, key_id, new_api_key
    from streamharness.errors import InvalidInput

    key = new_api_key()
    try:
        digest = add_api_key(file, tenant, key)
    except (ValueError, InvalidInput) as err:
        raise typer.BadParameter(f"{file}: {err}") from None
    typer.echo(key)
    typer.echo(f"key id {key_id(digest)} added for tenant {tenant} to {file}; the gateway re-reads it by itself", err=True)


@keys_app.command("remove")
def keys_remove(tenant: str = typer.Option(...), key_id: str = typer.Option(..., help="The key's id (`keys list`) or its sha256: hash."),
                file: Path = _KEYS_FILE) -> None:
    """Remove a key of TENANT (rotation: add the new key, move the clients, remove the old one)."""
    from streamharness.auth import remove_api_key
    from streamharness.errors import InvalidInput

    try:
        removed = remove_api_key(file, tenant, key_id)
    except (OSError, ValueError, InvalidInput) as err:
        raise typer.BadParameter(f"{file}: {err}") from None
    if not removed:
        raise typer.BadParameter(f"tenant {tenant} has no key {key_id!r} in {file}")
    typer.echo(f"removed {removed} key(s) of tenant {tenant}")


@keys_app.command("list")
def keys_list(file: Path = _KEYS_FILE) -> None:
    """Each tenant with the ids of its keys (never the keys: the file holds only their hashes)."""
    from streamharness.auth import key_id, read_api_keys
    from streamharness.errors import InvalidInput

    try:
        keys = read_api_keys(file)
    except (OSError, ValueError, InvalidInput) as err:
        raise typer.BadParameter(f"{file}: {err}") from None
    for tenant, hashes in sorted(keys.items()):
        typer.echo(f"{tenant}: {', '.join(key_id(h) for h in hashes) or '(no keys)'}")


def main() -> None:
    _mount_dev_apps()
    app()


if __name__ == "__main__":
    main()
