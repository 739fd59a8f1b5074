"""A real Triton Inference Server for development and integration tests.

The server is the ``tritonserver`` binary inside the ``nvidia-pytriton`` wheel (no container, no
download), serving the project's own model repository (``model-repository/``, the same layout the
official ``nvcr.io/nvidia/tritonserver`` image serves). What it takes to run it outside PyTriton:

* Triton looks for the python backend stub only in ``<backend-dir>/python/`` or the model's folder,
  so a backend directory is built in the work dir whose ``python/`` links ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the stub built for the running Python version.
* The stub embeds ``libpython3.X.so``: ``LD_LIBRARY_PATH`` must lead to the running interpreter's own
  ``LIBDIR`` first, or it loads the system's libpython against this interpreter's standard library.
* The stub imports numpy (< 2) and onnxruntime through the ``python3`` on ``PATH``: the running
  interpreter's bin dir (the venv) goes first.

    with TritonServer() as server:          # free ports on 127.0.0.1, throw-away work dir
        print(server.grpc_url)              # "127.0.0.1:PORT", as SH_TRITON_URL expects
"""

from __future__ import annotations
from streamharness.devinfra.common import free_port, log_tail, stop_process, port_in_use as _port_in_use

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MODEL_REPOSITORY = _REPO_ROOT / "model-repository"
FRAME_ENCODER = "frame_encoder"


class TritonServerError(RuntimeError):
    """The dev Triton server could not be prepared, started or stopped. The message says why."""



def tritonserver_dist() -> Path:
    """``pytriton/tritonserver`` inside the installed ``nvidia-pytriton`` wheel."""
    try:
        import pytriton
    except ImportError as err:
        raise TritonServerError("the 'nvidia-pytriton' package (which carries tritonserver) is not installed") from err
    dist = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise TritonServerError(f"no tritonserver binary in {dist}/bin: is nvidia-pytriton installed completely?")
    return dist


def prepare_backend_dir(work_dir: Path, dist: Path | None = None) -> Path:
    """Create ``<work_dir>/backends/python/`` with links to the python backend and this Python's stub."""
    dist = dist or tritonserver_dist()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": dist / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": dist / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": dist / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, src in sources.items():
        if not src.is_file():
            raise TritonServerError(f"{src} is missing: nvidia-pytriton has no python backend for Python {version}?")
    backends = work_dir / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        link = python_dir / name
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == src:
                continue
            link.unlink()
        link.symlink_to(src)
    return backends


def server_env(dist: Path | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: this interpreter's libpython and venv first, the wheel's libs."""
    dist = dist or tritonserver_dist()
    env = dict(os.environ if base is None else base)
    lib_dirs = [str(sysconfig.get_config_var("LIBDIR")), str(dist.parent.parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env



class TritonServer:
    """One ``tritonserver`` process, started in ``start()`` (or ``with``) and stopped in ``stop()``.

    ``work_dir`` holds the backend directory and ``tritonserver.log``; when None, a temporary folder
    is used and removed on stop. Ports 0 pick free ports on ``host``. ``start()`` returns once every
    model in ``wait_for_models`` is ready (per-model readiness: with ``--exit-on-error=false`` a broken
    model leaves the others serving and only server-wide readiness false).

    A missing frame encoder ONNX file is exported first (needs the ``models`` extra: torch).
    """

    def __init__(
        self,
        model_repository: Path | str = DEFAULT_MODEL_REPOSITORY,
        work_dir: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        model_control_mode: str = "none",
        load_models: Sequence[str] = (),
        wait_for_models: Sequence[str] = (FRAME_ENCODER,),
        export_missing: bool = True,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        start_timeout_s: float = 120.0,
        exit_timeout_s: int = 20,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.model_repository = Path(model_repository).expanduser().resolve()
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir).expanduser().resolve() if work_dir else None
        self.host = host
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.wait_for_models = tuple(wait_for_models)
        self.export_missing = export_missing
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.start_timeout_s = start_timeout_s
        # Triton waits up to exit_timeout_s for in-flight requests after SIGTERM; we kill after stop_timeout_s.
        self.exit_timeout_s = exit_timeout_s
        self.stop_timeout_s = max(stop_timeout_s, exit_timeout_s + 5.0)
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint (the form ``tritonclient`` and ``SH_TRITON_URL`` take)."""
        self._need_ports()
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP/REST endpoint (the form ``tritonclient.http`` takes)."""
        self._need_ports()
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        self._need_ports()
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def _need_ports(self) -> None:
        if not (self.grpc_port and self.http_port):
            raise TritonServerError("the server has no ports yet: call start() first")

    @property
    def log_path(self) -> Path:
        if self.work_dir is None:
            raise TritonServerError("the server has no work dir yet: call start() first")
        return self.work_dir / "tritonserver.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ---------------------------------------------------------------------------
    def command(self, backend_dir: Path, binary: Path) -> list[str]:
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--model-control-mode={self.model_control_mode}",
            "--exit-on-error=false",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
        ]
        cmd += [f"--load-model={name}" for name in self.load_models]
        return cmd + list(self.extra_args)

    def start(self) -> TritonServer:
        if self.is_running():
            return self
        if not (self.model_repository / FRAME_ENCODER / "config.pbtxt").is_file() and FRAME_ENCODER in self.wait_for_models:
            raise TritonServerError(f"{self.model_repository} has no {FRAME_ENCODER}/config.pbtxt: wrong model repository?")
        if self.export_missing and (self.model_repository / FRAME_ENCODER).is_dir():
            from streamharness.models.frame_encoder_export import export_frame_encoder

            export_frame_encoder(self.model_repository)  # no-op when the file is there

        dist = tritonserver_dist()
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="sh-triton-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        backend_dir = prepare_backend_dir(self.work_dir, dist)
        self._pick_ports()

        cmd = self.command(backend_dir, dist / "bin" / "tritonserver")
        started = time.monotonic()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        log.info("starting tritonserver: grpc %s, http %s (log %s)", self.grpc_url, self.http_url, self.log_path)
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.work_dir,
            env=server_env(dist),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            # Own session: a terminal's Ctrl-C reaches us, and we stop the server in order.
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        log.info("tritonserver ready after %.1f s: %s", self.startup_s, ", ".join(self.wait_for_models) or "(no models awaited)")
        return self

    def _pick_ports(self) -> None:
        chosen: set[int] = set()
        for attr in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, attr)
            if not port:
                port = free_port(self.host)
                while port in chosen:
                    port = free_port(self.host)
                setattr(self, attr, port)
            elif _port_in_use(self.host, port):
                raise TritonServerError(f"{attr.replace('_', ' ')} {self.host}:{port} is already in use (another Triton running?)")
            chosen.add(port)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        pending = list(self.wait_for_models)
        last = "no answer yet"
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self._proc.returncode} before its models were ready; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if not self._get("/v2/health/live"):
                    last = "server not live"
                else:
                    pending = [name for name in pending if not self.is_model_ready(name)]
                    if not pending:
                        return
                    self._raise_if_failed(pending)
                    last = f"not ready: {', '.join(pending)}"
            except OSError as err:
                last = repr(err)
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver on {self.http_url} was not ready within {self.start_timeout_s:.0f} s ({last}); "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def _raise_if_failed(self, names: list[str]) -> None:
        """Fail fast when a model awaited has failed to load, or is not in the repository at all
        (the live server already tried: with --exit-on-error=false it keeps serving the others)."""
        states = {entry["name"]: entry for entry in self.repository_index()}
        for name in names:
            entry = states.get(name)
            if entry is None:
                raise TritonServerError(f"there is no model {name!r} in {self.model_repository}")
            reason = entry.get("reason", "")
            if entry.get("state") == "UNAVAILABLE" and reason and reason != "unloaded":
                raise TritonServerError(
                    f"model {name!r} failed to load: {reason.strip()}\nlast lines of {self.log_path}:\n{self.log_tail()}"
                )

    def repository_index(self) -> list[dict]:
        """The models of the repository with their state and, after a failed load, the reason."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read())

    def is_model_ready(self, name: str, version: str = "") -> bool:
        """Per-model readiness over HTTP (``GET /v2/models/<name>[/versions/<v>]/ready``)."""
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
        try:
            return self._get(path)
        except OSError:
            return False

    def model_statistics(self, name: str = FRAME_ENCODER) -> dict:
        """Triton's inference statistics of one model (request, execution and batch counts)."""
        url = f"http://{self.http_url}/v2/models/{name}/stats"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())["model_stats"][0]

    def _get(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as resp:
                return resp.status == 200
        except urllib.error.HTTPError:
            return False  # 400/404/503: answered, not ready

    def log_tail(self, lines: int = 40) -> str:
        try:
            path = self.log_path
        except TritonServerError:  # no work dir yet
            return "(no tritonserver log)"
        return log_tail(path, lines, "(no tritonserver log)")

    def stop(self) -> int | None:
        """SIGTERM (Triton unloads models and stops its stubs), SIGKILL after ``stop_timeout_s``."""
        code = None
        proc, self._proc = self._proc, None
        if proc is not None:
            # The server leads its own session (start_new_session): a kill reaches its stubs, nothing else.
            code = stop_process(proc, self.stop_timeout_s, "tritonserver", kill_group=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None
        return code

    def wait(self) -> int:
        """Block until the server exits on its own; return its exit code."""
        if self._proc is None:
            raise TritonServerError("the server is not running")
        return self._proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM the server if its parent dies (no orphan servers after a
    killed test run). Linux ties this to the parent *thread*: start servers from a long-lived thread."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
