"""The whole pipeline on one machine: a real Kafka broker, a real tritonserver, the generation
server (KServe), and every stage of :data:`streamharness.topology.TOPOLOGY` as a separate process,
each started from its ``services/<name>/main.py`` with the same ``SH_*`` settings the chart sets. Used by
``streamharness up`` and the end-to-end tests.

Faults, for the fault-injection tests (``tests/e2e/test_faults.py``): :meth:`LocalStack.kill` (SIGKILL
a service), :meth:`LocalStack.restart` (start it again on the same port with the same settings),
:meth:`LocalStack.restart_broker` (the broker stopped and started again on its port and data) and
:meth:`LocalStack.pause_triton` / :meth:`LocalStack.resume_triton` (SIGSTOP / SIGCONT of tritonserver).
Call them from the thread that started the stack: the servers are tied to their parent thread
(``PR_SET_PDEATHSIG``), so a broker started again from a short-lived thread dies with that thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streamharness.devinfra.common import free_port, log_tail, wait_http_ok
from streamharness.devinfra.kafka_broker import KafkaBroker
from streamharness.devinfra.triton_server import TritonServer
from streamharness.topology import TOPOLOGY

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    port: int
    log_path: Path
    # How it was spawned, so that restart() starts it again the same way.
    script: str = ""
    env_extra: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    restarts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


@dataclass(frozen=True)
class StageProc:
    """One stage process the stack starts."""

    name: str
    stage: str
    script: str
    port: int
    env: dict[str, str]


class LocalStack:
    """Start with ``start()`` (or ``with``); ``gateways`` > 1 runs several gateway replicas."""

    def __init__(self, work_dir: Path | None = None, *, gateways: int = 1, partitions: int = 3,
                 extra_env: dict[str, str] | None = None, start_timeout_s: float = 240.0):
        self._tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="streamharness-stack-")
        self.work_dir = Path(work_dir or self._tmp.name)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.gateways = gateways
        self.partitions = partitions
        self.extra_env = dict(extra_env or {})
        self.start_timeout_s = start_timeout_s
        self.broker: KafkaBroker | None = None
        self.triton: TritonServer | None = None
        self.procs: list[Proc] = []
        # One internal identity secret per stack (the chart makes one per release).
        self.internal_secret = os.environ.get("SH_AUTH_INTERNAL_SECRET") or secrets.token_urlsafe(48)

    # -- addresses ------------------------------------------------------------------------------
    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    @property
    def gateway_addresses(self) -> list[str]:
        return [p.address for p in self.procs if p.name.startswith("gateway")]

    @property
    def http_urls(self) -> list[str]:
        """Base URLs of the gateways' HTTP APIs (``/v1``) and live views (``/view``)."""
        return [f"http://127.0.0.1:{p.env_extra['SH_GATEWAY_HTTP_PORT']}" for p in self.procs if p.name.startswith("gateway")]

    # -- lifecycle ------------------------------------------------------------------------------
    def _env(self, name: str, port: int) -> dict[str, str]:
        env = {
            **os.environ,
            "SH_SERVICE_NAME": name,
            "SH_GRPC_HOST": "127.0.0.1",
            "SH_GRPC_PORT": str(port),
            "SH_READINESS_INTERVAL_S": "0.5",
            "SH_SHUTDOWN_GRACE_S": "10",
            "SH_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "SH_KAFKA_PARTITIONS": str(self.partitions),
            "SH_TRITON_URL": self.triton.grpc_url,
            "SH_MEMORY_DATA_DIR": str(self.work_dir / "memory"),
            "SH_TELEMETRY_LOG_LEVEL": os.environ.get("SH_TELEMETRY_LOG_LEVEL", "INFO"),
            "SH_AUTH_INTERNAL_SECRET": self.internal_secret,
            # A development stack pulls cameras and files from this machine and its network.
            "SH_SOURCE_ALLOW_PRIVATE_NETWORKS": "true",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        return env

    def _spawn(self, name: str, script: str, env_extra: dict[str, str] | None = None, args: list[str] | None = None,
               port: int | None = None) -> Proc:
        port = port or free_port()
        log_path = self.work_dir / f"{name}.log"
        proc = Proc(name, self._popen(name, script, port, env_extra or {}, args or [], log_path, "wb"), port, log_path,
                    script, dict(env_extra or {}), list(args or []))
        self.procs.append(proc)
        return proc

    def _popen(self, name: str, script: str, port: int, env_extra: dict[str, str], args: list[str], log_path: Path,
               mode: str) -> subprocess.Popen:
        env = {**self._env(name, port), **env_extra}
        with open(log_path, mode) as out:
            return subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_serving(self, proc: Proc, deadline: float) -> None:
        channel = grpc.insecure_channel(proc.address)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            while time.monotonic() < deadline:
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)
            raise TimeoutError(f"{proc.name} not SERVING after {self.start_timeout_s:.0f}s:\n{proc.log_tail()}")
        finally:
            channel.close()

    def plan(self, generator_address: str) -> list[StageProc]:
        """Every stage of the topology as the processes to start, each from its
        ``services/<name>/main.py``; ports are chosen first so that each one's address is known to
        the stages that call it (gateway → ingest, decision, responder and summariser → memory, the last two → the generator)."""
        replicas = {name: (self.gateways if name == "gateway" else 1) for name in TOPOLOGY}
        ports = {(name, i): free_port() for name, n in replicas.items() for i in range(n)}
        addresses = {name: f"127.0.0.1:{ports[(name, 0)]}" for name in TOPOLOGY}
        wiring = {
            # A development stack: anonymous tenants (x-tenant) unless extra_env names an API keys file.
            "gateway": {"SH_GATEWAY_INGEST_ADDRESS": addresses["ingest"],
                        **({} if "SH_GATEWAY_API_KEYS_FILE" in self.extra_env else {"SH_GATEWAY_ALLOW_ANONYMOUS": "true"})},
            "decision": {"SH_DECISION_MEMORY_ADDRESS": addresses["memory"]},  # the model policy's stable prefix
            "summariser": {
                "SH_SUMMARISER_MEMORY_ADDRESS": addresses["memory"],
                "SH_GENERATION_BACKEND": "openai",
                "SH_GENERATION_BASE_URL": f"http://{generator_address}/openai/v1",
            },
            "responder": {
                "SH_RESPONDER_MEMORY_ADDRESS": addresses["memory"],
                "SH_GENERATION_BACKEND": "openai",
                "SH_GENERATION_BASE_URL": f"http://{generator_address}/openai/v1",
            },
        }
        planned: list[StageProc] = []
        for name, n in replicas.items():
            for i in range(n):
                proc_name = f"{name}-{i + 1}" if name == "gateway" else name
                env = dict(wiring.get(name, {}))
                if name == "gateway":
                    env["SH_GATEWAY_REPLICA_ID"] = proc_name
                    # The HTTP API and live view of each replica (extra_env may fix the first's port).
                    env["SH_GATEWAY_HTTP_PORT"] = self.extra_env.get("SH_GATEWAY_HTTP_PORT", "0") if i == 0 else "0"
                    env["SH_GATEWAY_HTTP_PORT"] = str(int(env["SH_GATEWAY_HTTP_PORT"]) or free_port())
                planned.append(StageProc(proc_name, name, f"services/{name}/main.py", ports[(name, i)], env))
        return planned

    def start(self) -> LocalStack:
        try:
            self.broker = KafkaBroker(self.work_dir / "kafka", show_progress=False).start()
            self.triton = TritonServer(work_dir=self.work_dir / "triton",
                                       wait_for_models=("frame_encoder", "people_detector")).start()
            deadline = time.monotonic() + self.start_timeout_s
            gen_port = free_port()
            generator = self._spawn("generator", "services/generator/main.py", port=gen_port,
                                    args=["--model_name", "smollm2", "--http_port", str(gen_port), "--host", "127.0.0.1"])
            waiting = [self._spawn(p.name, p.script, p.env, port=p.port) for p in self.plan(generator.address)]
            wait_http_ok(f"http://{generator.address}/v2/health/ready", generator.popen, deadline - time.monotonic(),
                         generator.name, generator.log_tail)
            for proc in waiting:
                self._wait_serving(proc, deadline)
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every service (gateways first, memory last), then the servers. Returns exit codes."""
        codes: dict[str, int | None] = {}
        # Upstream first: the gateways stop taking sessions before the stages behind them go; memory
        # (which the responder calls) and the generator last.
        order = ("gateway", "ingest", "encoder", "decision", "responder", "summariser", "memory", "generator")
        procs = sorted(self.procs, key=lambda p: order.index(p.name.split("-")[0]) if p.name.split("-")[0] in order else 0)
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                codes[proc.name] = proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                codes[proc.name] = proc.popen.wait()
        self.procs.clear()
        if self.triton is not None:
            if self.triton.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.triton.pid, signal.SIGCONT)  # a paused server (pause_triton) cannot act on SIGTERM
            self.triton.stop()
            self.triton = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        return codes

    # -- faults (tests/e2e/test_faults.py) ---------------------------------------------------------
    def kill(self, name: str) -> int:
        """SIGKILL service ``name`` ("decision", "gateway-1", "generator", ...) and every process it
        started (each service leads its own session): no drain, no offset commit, no goodbye. Returns
        the exit code (-9)."""
        proc = self.proc(name)
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
        code = proc.popen.wait(timeout=30)
        log.info("killed %s (pid %s): exit %s", name, proc.popen.pid, code)
        return code

    def restart(self, name: str, timeout_s: float | None = None) -> float:
        """Start service ``name`` again (killed, or still running: then SIGTERM first) on the same port
        with the same settings, and wait until it is SERVING over gRPC health (the generator: ready
        over HTTP). Returns the seconds from the spawn to SERVING. Its log is appended to, so the lines
        before the fault stay there."""
        proc = self.proc(name)
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill(name)
        with open(proc.log_path, "ab") as out:
            out.write(f"\n=== restart {proc.restarts + 1} of {name} at {time.strftime('%H:%M:%S')} ===\n".encode())
        started = time.monotonic()
        proc.popen = self._popen(name, proc.script, proc.port, proc.env_extra, proc.args, proc.log_path, "ab")
        proc.restarts += 1
        limit = self.start_timeout_s if timeout_s is None else timeout_s
        if name == "generator":
            wait_http_ok(f"http://{proc.address}/v2/health/ready", proc.popen, limit, name, proc.log_tail)
        else:
            self._wait_serving(proc, started + limit)
        took = time.monotonic() - started
        log.info("restarted %s on %s: SERVING after %.1f s", name, proc.address, took)
        return took

    def restart_broker(self) -> float:
        """Stop the Kafka broker (SIGTERM: it closes its logs cleanly) and start it again on the same
        ports and data dir, so that no acknowledged record is lost. Returns the seconds it was away
        (stop + start until it serves)."""
        if self.broker is None:
            raise RuntimeError("the stack is not started")
        started = time.monotonic()
        self.broker.stop()  # the stack's broker has a work dir of its own: kept, as are its ports
        self.broker.start()
        took = time.monotonic() - started
        log.info("Kafka broker restarted on %s after %.1f s", self.broker.bootstrap_servers, took)
        return took

    def pause_triton(self) -> None:
        """SIGSTOP tritonserver: calls to it hang (a frozen server, not a refused connection)."""
        os.kill(self._triton_pid(), signal.SIGSTOP)

    def resume_triton(self) -> None:
        """SIGCONT tritonserver after :meth:`pause_triton`."""
        os.kill(self._triton_pid(), signal.SIGCONT)

    def _triton_pid(self) -> int:
        pid = self.triton.pid if self.triton is not None else None
        if pid is None:
            raise RuntimeError("tritonserver is not running")
        return pid

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
