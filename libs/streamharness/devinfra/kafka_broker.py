"""A real Apache Kafka broker (KRaft, one node) for development and integration tests.

Kafka is in neither PyPI nor Debian, so the broker's jars come from Maven Central through
``infra/kafka/pom.xml`` into a cache outside the repo (``$SH_DEV_CACHE_DIR``, default
``~/.cache/streamharness``). The pom is the one place where the Kafka version is pinned; this module
reads it from there. Needs ``java`` (17+) and ``mvn`` on PATH.

    with KafkaBroker() as broker:          # free ports on 127.0.0.1, throw-away work dir
        print(broker.bootstrap_servers)
"""

from __future__ import annotations
from streamharness.devinfra.common import dev_cache_dir as cache_dir, free_port, log_tail, stop_process, port_in_use as _port_in_use

import contextlib
import fcntl
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from tenacity import RetryError, Retrying, retry_if_not_exception_type, stop_after_delay, wait_fixed

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_POM = _REPO_ROOT / "infra" / "kafka" / "pom.xml"
# Frames are up to 8 MiB; leave room for headers and batch overhead.
MESSAGE_MAX_BYTES = 16 * 1024 * 1024
_COMPLETE_MARKER = ".complete"
_POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


class KafkaBrokerError(RuntimeError):
    """The dev broker could not be prepared, started or stopped. The message says why."""



def kafka_version(pom: Path = DEFAULT_POM) -> str:
    """The Kafka version pinned in the pom (``<properties><kafka.version>``)."""
    try:
        root = ET.parse(pom).getroot()
    except (OSError, ET.ParseError) as err:
        raise KafkaBrokerError(f"cannot read the Kafka pom {pom}: {err}") from err
    node = root.find("m:properties/m:kafka.version", _POM_NS)
    if node is None or not (node.text or "").strip():
        raise KafkaBrokerError(f"{pom} has no <properties><kafka.version>")
    return node.text.strip()


def kafka_libs_dir(version: str) -> Path:
    return cache_dir() / f"kafka-{version}" / "libs"


def _jars_complete(libs: Path, version: str) -> bool:
    return (libs / _COMPLETE_MARKER).is_file() and (libs / f"kafka_2.13-{version}.jar").is_file()


def ensure_kafka_jars(pom: Path | None = None, *, show_progress: bool = True) -> Path:
    """Return the folder of the broker's runtime jars, fetching them with Maven if missing.

    Maven writes into a scratch folder that is renamed into place only when complete, under a file
    lock, so an interrupted fetch or two test sessions at once never leave a half-filled cache.
    """
    pom = Path(pom or DEFAULT_POM).resolve()
    version = kafka_version(pom)
    libs = kafka_libs_dir(version)
    if _jars_complete(libs, version):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaBrokerError(
            f"Kafka {version} jars are not in {libs} and 'mvn' is not on PATH to fetch them "
            "(Debian: apt-get install maven openjdk-17-jre-headless)"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching the same version
        if _jars_complete(libs, version):
            return libs
        scratch = libs.parent / "libs.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        cmd = [mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom),
               "dependency:copy-dependencies", f"-DoutputDirectory={scratch}"]
        started = time.monotonic()
        with _progress(f"Fetching Apache Kafka {version} jars with Maven into {libs}", show_progress):
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        if proc.returncode != 0 or not (scratch / f"kafka_2.13-{version}.jar").is_file():
            tail = "\n".join(proc.stdout.strip().splitlines()[-30:])
            raise KafkaBrokerError(f"'{' '.join(cmd)}' failed (exit {proc.returncode}):\n{tail}")
        (scratch / _COMPLETE_MARKER).write_text(f"kafka {version}\n")
        shutil.rmtree(libs, ignore_errors=True)
        scratch.rename(libs)
        log.info("fetched Kafka %s jars into %s in %.1f s", version, libs, time.monotonic() - started)
    return libs


@contextlib.contextmanager
def _progress(message: str, show: bool):
    if not show:
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(message):
        yield
    console.print(f"[green]✓[/green] {message}")



def render_server_properties(
    *,
    port: int,
    controller_port: int,
    log_dir: Path,
    host: str = "127.0.0.1",
    node_id: int = 1,
    extra: Mapping[str, str] | None = None,
) -> str:
    """``server.properties`` for a one-node KRaft cluster (broker and controller in one process).

    Listens on ``host`` only (loopback by default): a dev broker has no authentication.
    """
    props: dict[str, str] = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.quorum.bootstrap.servers": f"{host}:{controller_port}",
        "log.dirs": str(log_dir),
        # One node: every internal topic must have replication factor 1 or it is never created.
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Fewer internal partitions: the first consumer group on a fresh broker joins faster.
        "offsets.topic.num.partitions": "5",
        "transaction.state.log.num.partitions": "5",
        "share.coordinator.state.topic.num.partitions": "5",
        # Tests start consumer groups all the time; do not wait 3 s for more members to join.
        "group.initial.rebalance.delay.ms": "0",
        # Topics are created on purpose (ensure_topics), never by a typo in a producer.
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        # Frames are large (8 MiB records): the broker must accept and serve them.
        "message.max.bytes": str(MESSAGE_MAX_BYTES),
    }
    props.update(extra or {})
    lines = ["# Written by streamharness.devinfra.kafka_broker: a one-node dev/test cluster."]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


class KafkaBroker:
    """One ``kafka.Kafka`` JVM, started in ``start()`` (or ``with``) and stopped in ``stop()``.

    ``work_dir`` holds ``server.properties``, ``broker.log`` and the data (``data/``); when None, a
    temporary folder is used and removed on stop. An existing, formatted work dir is reused as is
    (data kept between runs). Ports 0 pick free ports on ``host``.
    """

    def __init__(
        self,
        work_dir: Path | str | None = None,
        *,
        port: int = 0,
        controller_port: int = 0,
        host: str = "127.0.0.1",
        pom: Path | str | None = None,
        heap: str = "512m",
        start_timeout_s: float = 90.0,
        stop_timeout_s: float = 30.0,
        extra_properties: Mapping[str, str] | None = None,
        show_progress: bool = True,
    ) -> None:
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir).expanduser().resolve() if work_dir else None
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.pom = Path(pom) if pom else DEFAULT_POM
        self.heap = heap
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_properties = dict(extra_properties or {})
        self.show_progress = show_progress
        self.cluster_id: str | None = None
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None

    # -- paths -------------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        if not self.port:
            raise KafkaBrokerError("the broker has no port yet: call start() first")
        return f"{self.host}:{self.port}"

    @property
    def properties_path(self) -> Path:
        return self._dir() / "server.properties"

    @property
    def log_path(self) -> Path:
        return self._dir() / "broker.log"

    @property
    def data_dir(self) -> Path:
        return self._dir() / "data"

    def _dir(self) -> Path:
        if self.work_dir is None:
            raise KafkaBrokerError("the broker has no work dir yet: call start() first")
        return self.work_dir

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------
    def write_config(self) -> Path:
        """Pick ports (if 0), write ``server.properties``; no java needed (unit-testable)."""
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="sh-kafka-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        if not self.controller_port:
            self.controller_port = free_port(self.host)
            while self.controller_port == self.port:
                self.controller_port = free_port(self.host)
        self.properties_path.write_text(
            render_server_properties(
                port=self.port,
                controller_port=self.controller_port,
                log_dir=self.data_dir,
                host=self.host,
                extra=self.extra_properties,
            )
        )
        return self.properties_path

    def start(self) -> KafkaBroker:
        """Fetch jars if needed, write config, format storage if new, start and wait until serving."""
        if self.is_running():
            return self
        try:
            self._start()
        except BaseException:
            self.stop()  # no half-started JVM, no leftover temporary work dir
            raise
        return self

    def _start(self) -> None:
        java = shutil.which("java")
        if java is None:
            raise KafkaBrokerError("'java' is not on PATH: the Kafka broker needs Java 17+ (apt-get install openjdk-17-jre-headless)")
        libs = ensure_kafka_jars(self.pom, show_progress=self.show_progress)
        classpath = f"{libs}/*"
        self.write_config()
        for name, port in (("port", self.port), ("controller port", self.controller_port)):
            if _port_in_use(self.host, port):
                raise KafkaBrokerError(f"{name} {self.host}:{port} is already in use (another broker running?)")
        self._format_storage(java, classpath)

        started = time.monotonic()
        self._log_file = open(self.log_path, "ab")
        cmd = [
            java,
            f"-Xmx{self.heap}",
            "-Xms64m",
            "-Djava.awt.headless=true",
            # slf4j-simple writes to stderr, which goes to broker.log.
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSS",
            "-cp",
            classpath,
            "kafka.Kafka",
            str(self.properties_path),
        ]
        log.info("starting Kafka broker on %s (work dir %s)", self.bootstrap_servers, self.work_dir)
        # Die with the parent: util-linux's setpriv sets PR_SET_PDEATHSIG and execs the JVM (same
        # pid). A Python pre-exec hook does the same but runs Python in the forked child, which can
        # crash when the parent has many threads (a broker restarted mid-test); it is the fallback.
        setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.work_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own session: a terminal's Ctrl-C reaches us, and we stop the broker in order.
            start_new_session=True,
            preexec_fn=None if setpriv else _die_with_parent_hook(),
        )
        self._wait_until_serving()
        self.startup_s = time.monotonic() - started
        log.info("Kafka broker serving on %s after %.1f s", self.bootstrap_servers, self.startup_s)

    def _format_storage(self, java: str, classpath: str) -> None:
        meta = self.data_dir / "meta.properties"
        if meta.is_file():
            for line in meta.read_text().splitlines():
                if line.startswith("cluster.id="):
                    self.cluster_id = line.partition("=")[2].strip()
            return
        tool = [java, "-Xmx256m", "-cp", classpath, "kafka.tools.StorageTool"]
        uuid = self._run(tool + ["random-uuid"]).strip().splitlines()[-1].strip()
        self._run(tool + ["format", "--standalone", "-t", uuid, "-c", str(self.properties_path)])
        self.cluster_id = uuid

    @staticmethod
    def _run(cmd: list[str]) -> str:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            what = " ".join(cmd[cmd.index("kafka.tools.StorageTool"):][:2])
            raise KafkaBrokerError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        return proc.stdout

    def _wait_until_serving(self) -> None:
        from kafka import KafkaAdminClient

        def probe() -> None:
            if self._proc is not None and self._proc.poll() is not None:
                raise _BrokerExited(self._proc.returncode)
            with socket.create_connection((self.host, self.port), timeout=1):
                pass
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers,
                client_id="sh-dev-broker-probe",
                request_timeout_ms=5000,
                bootstrap_timeout_ms=5000,
            )
            try:
                admin.list_topics()
            finally:
                admin.close()

        try:
            for attempt in Retrying(
                stop=stop_after_delay(self.start_timeout_s),
                wait=wait_fixed(0.3),
                retry=retry_if_not_exception_type(_BrokerExited),
                reraise=False,
            ):
                with attempt:
                    probe()
        except _BrokerExited as err:
            raise KafkaBrokerError(
                f"the Kafka broker exited with code {err.args[0]} before serving; last lines of {self.log_path}:\n{self.log_tail()}"
            ) from None
        except RetryError as err:
            cause = err.last_attempt.exception()
            raise KafkaBrokerError(
                f"the Kafka broker on {self.bootstrap_servers} did not serve within {self.start_timeout_s:g} s "
                f"(last probe: {cause!r}); last lines of {self.log_path}:\n{self.log_tail()}"
            ) from None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines, "(no broker log)")

    def stop(self) -> int | None:
        """SIGTERM (Kafka's shutdown hook closes logs cleanly), SIGKILL after ``stop_timeout_s``."""
        code = None
        proc, self._proc = self._proc, None
        if proc is not None:
            # SIGTERM: Kafka's shutdown hook closes its logs cleanly.
            code = stop_process(proc, self.stop_timeout_s, "Kafka broker")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None
        return code

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class _BrokerExited(Exception):
    pass


def _die_with_parent_hook():
    """A pre-exec hook that makes Linux SIGTERM the broker when its parent dies (no orphan JVMs
    after a killed test run), or None elsewhere. libc is loaded here, before the fork, so the child
    only makes one system call. Linux ties this to the parent *thread*: start brokers from a thread
    that lives as long as the broker (the main thread, a pytest session fixture)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return hook
