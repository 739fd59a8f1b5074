"""``streamharness dev kafka ...``: a local Kafka broker for development.

    streamharness dev kafka fetch      # only download the broker's jars (Maven) into the dev cache
    streamharness dev kafka run        # broker on 127.0.0.1:9092 until Ctrl-C; data kept between runs
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from streamharness.devinfra.kafka_broker import KafkaBroker, KafkaBrokerError, cache_dir, ensure_kafka_jars

app = typer.Typer(help="A local Apache Kafka broker (KRaft, one node, 127.0.0.1 only).", no_args_is_help=True)


@app.command()
def run(
    port: Annotated[int, typer.Option(help="Client (PLAINTEXT) port; SH_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:<port>.")] = 9092,
    controller_port: Annotated[int | None, typer.Option(help="KRaft controller port (default: port + 1).")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Work dir: config, broker.log and data, kept between runs (default: $SH_DEV_CACHE_DIR/kafka-data)."),
    ] = None,
    heap: Annotated[str, typer.Option(help="JVM heap (-Xmx).")] = "512m",
) -> None:
    """Start the broker in the foreground; Ctrl-C or SIGTERM stops it cleanly."""
    work_dir = data_dir or cache_dir() / "kafka-data"
    broker = KafkaBroker(work_dir, port=port, controller_port=controller_port or port + 1, heap=heap)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            broker.start()
        except KafkaBrokerError as err:
            typer.secho(str(err), fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        typer.secho(f"Kafka broker serving on {broker.bootstrap_servers} (started in {broker.startup_s:.1f} s)", fg=typer.colors.GREEN)
        typer.echo(f"  export SH_KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}")
        typer.echo(f"  data and broker.log in {broker.work_dir}; Ctrl-C stops it")
        while not stop.wait(1.0):
            if not broker.is_running():
                typer.secho(f"the broker exited on its own; last lines of {broker.log_path}:\n{broker.log_tail()}", fg=typer.colors.RED, err=True)
                raise typer.Exit(1)
    finally:
        typer.echo("stopping the Kafka broker ...")
        code = broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The JVM exits with 143 (128 + SIGTERM) after its shutdown hooks ran: that is a clean stop.
    if code in (0, 143, None):
        typer.echo("stopped")
    else:
        typer.secho(f"the broker exited with code {code}; see {broker.log_path}", fg=typer.colors.YELLOW, err=True)


@app.command()
def fetch() -> None:
    """Download the broker's jars into the dev cache (no broker is started)."""
    try:
        libs = ensure_kafka_jars()
    except KafkaBrokerError as err:
        typer.secho(str(err), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(str(libs))


if __name__ == "__main__":
    app()
