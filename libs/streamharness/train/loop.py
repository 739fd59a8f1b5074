"""What both Streaming-Train trainers (the decision head, the VLM) share: seeding, torchrun's
distributed context, metrics, checkpoints and a progress bar.

* :func:`seed_everything` — Python's, NumPy's and torch's generators (all CUDA devices too).
* :class:`DistributedContext` — rank, world size and device from torchrun's environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a process group is started only when
  ``WORLD_SIZE > 1`` (NCCL on CUDA, else Gloo). ``shard(indices)`` is this rank's part of a list.
* :class:`MetricsWriter` — one JSON line per ``log(step, **metrics)`` (main rank only), the same
  numbers recorded through OpenTelemetry's meter ``streamharness.train``; the provider is whatever
  :func:`streamharness.telemetry.setup_telemetry` installed (the trainer's entry calls it, nothing
  here does), and without ``opentelemetry`` installed only the JSON lines are written.
* :func:`save_checkpoint` / :func:`load_latest_checkpoint` — a checkpoint is a folder
  ``step-00000042/`` (``state.pt``, ``rng.pt``, ``meta.json``) written under a temporary name and
  renamed into place, then named by the ``latest`` pointer file; the last ``keep_last`` are kept.
  Loading restores the RNG states saved with it, so a resumed run draws what the run that saved it
  would have drawn next.
* :func:`progress` — a tqdm bar, disabled off the main rank (a silent stand-in without tqdm).

torch is imported inside the functions that use it (the package cut: torch is the ``models``
extra), so importing this module needs only the standard library and NumPy.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

METER_NAME = "streamharness.train"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def is_main_process() -> bool:
    """Whether this process is rank 0 by torchrun's ``RANK`` (true without torchrun)."""
    return _env_int("RANK", 0) == 0


# -- seeding -----------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every CUDA device as well


def rng_state() -> dict[str, Any]:
    """The generators' states, in a form ``torch.load(weights_only=True)`` reads back."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# -- distributed ---------------------------------------------------------------------------------------
@dataclass
class DistributedContext:
    """This process's place in a torchrun job; a single process without torchrun.

    Use :meth:`from_env` (or ``with DistributedContext.from_env() as ctx:``, which closes it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = "cpu"  # a torch.device once from_env has run
    backend: str | None = None  # the process group's, when this context started one
    _owns_group: bool = field(default=False, repr=False)

    @classmethod
    def from_env(cls, device: str | None = None) -> DistributedContext:
        """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; start the process group when the world
        is larger than one (NCCL when CUDA is there, else Gloo). ``device``: ``"cpu"`` / ``"cuda"``
        to force one (default: ``cuda:LOCAL_RANK`` when CUDA is there, else CPU)."""
        import torch
        import torch.distributed as dist

        rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
        use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        ctx = cls(rank=rank, world_size=world, local_rank=local, device=dev)
        if world > 1 and not dist.is_initialized():
            ctx.backend = "nccl" if use_cuda else "gloo"
            dist.init_process_group(backend=ctx.backend, init_method="env://", rank=rank, world_size=world)
            ctx._owns_group = True
        return ctx

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, indices):
        """This rank's part of ``indices``: every ``world_size``-th item from ``rank`` on. The parts
        of all ranks partition the list (sizes differ by at most one)."""
        return list(indices)[self.rank :: self.world_size]

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks (itself in a single process)."""
        import torch
        import torch.distributed as dist

        if not (self.distributed and dist.is_initialized()):
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def close(self) -> None:
        """End the process group this context started (none otherwise)."""
        import torch.distributed as dist

        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- metrics -------------------------------------------------------------------------------------------
def _global_meter():
    try:
        from opentelemetry import metrics as otel_metrics
    except ImportError:  # a bare environment (the GPU bench): JSON lines only
        return None
    return otel_metrics.get_meter(METER_NAME)


class MetricsWriter:
    """Training metrics: a JSON-lines file and OpenTelemetry instruments.

    ``log(step, **metrics)`` appends ``{"step": step, "time": <unix s>, **metrics}`` to ``path`` and
    records every number as ``streamharness.train.<prefix>.<name>`` (``streamharness.train.<name>``
    without a prefix) on the meter ``streamharness.train``: a histogram for durations (names
    ending in ``_s``), a gauge for the rest (loss, lr, tokens/s, memory). Only the main rank
    writes (``main``: default from ``RANK``); elsewhere ``log`` does nothing. After a resume,
    :meth:`rewind` drops the lines of steps past the checkpoint so that each step is in the file
    once. ``meter``: an OpenTelemetry meter to record to instead of the global provider's.
    """

    def __init__(self, path: str | Path, prefix: str = "", *, main: bool | None = None, meter: Any = None) -> None:
        self.path = Path(path)
        self.prefix = prefix.strip(".")
        self.enabled = is_main_process() if main is None else main
        self._instruments: dict[str, Any] = {}
        self._meter = None
        self._file = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
            self._meter = meter if meter is not None else _global_meter()

    def instrument_name(self, name: str) -> str:
        return f"{METER_NAME}.{self.prefix}.{name}" if self.prefix else f"{METER_NAME}.{name}"

    def _record(self, name: str, value: float) -> None:
        if self._meter is None:
            return
        inst = self._instruments.get(name)
        if inst is None:
            full = self.instrument_name(name)
            if name.endswith("_s"):
                inst = self._meter.create_histogram(full, unit="s", description=f"Streaming-Train {name}, per step.")
            else:
                inst = self._meter.create_gauge(full, description=f"Streaming-Train {name}, per step.")
            self._instruments[name] = inst
        if name.endswith("_s"):
            inst.record(value)
        else:
            inst.set(value)

    def log(self, step: int, **metrics: Any) -> None:
        """One line for ``step``; numbers go to OpenTelemetry as well."""
        if not self.enabled or self._file is None:
            return
        line = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in metrics.items():
            if isinstance(value, (np.floating, np.integer)):
                value = value.item()
            line[name] = value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._record(name, float(value))
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def rewind(self, step: int) -> None:
        """Drop the lines of steps after ``step`` (a run resumed from the checkpoint of ``step``)."""
        if not self.enabled or self._file is None:
            return
        self._file.close()
        kept = []
        for raw in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(raw)["step"]) <= step:
                    kept.append(raw)
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a crash
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a metrics file."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# -- checkpoints -----------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step-{int(step):08d}"


def _complete_steps(directory: Path) -> list[tuple[int, Path]]:
    found = []
    if directory.is_dir():
        for p in directory.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / "meta.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], *, keep_last: int = 3) -> Path:
    """Write ``state`` (tensors and plain containers / numbers / strings: it is read back with
    ``torch.load(weights_only=True)``) and this process's RNG states as the checkpoint of ``step``
    under ``directory``; point ``latest`` at it; keep the last ``keep_last`` checkpoints.

    Atomic: the folder is written as ``.tmp-step-…`` and renamed into place, and ``latest`` is
    replaced by a rename, so a crash leaves the previous checkpoint as the latest. Call it on the
    main rank only; a resumed multi-rank run restores the main rank's RNG on every rank.
    """
    import torch

    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    tmp = directory / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": int(step), "time": time.time()}), encoding="utf-8")
    _fsync_dir(tmp)
    final = directory / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = directory / f".{LATEST}.tmp-{os.getpid()}"
    pointer.write_text(name + "\n", encoding="utf-8")
    os.replace(pointer, directory / LATEST)
    _fsync_dir(directory)
    for _, old in _complete_steps(directory)[:-keep_last]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".tmp-step-*"):  # folders of a save that crashed
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The folder ``latest`` names, else the highest complete ``step-*`` folder, else None."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        target = directory / pointer.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(target.name) and (target / "meta.json").is_file():
            return target
    complete = _complete_steps(directory)
    return complete[-1][1] if complete else None


def load_latest_checkpoint(directory: str | Path, *, map_location: Any = "cpu",
                           restore_rng: bool = True) -> tuple[int, dict[str, Any]] | None:
    """``(step, state)`` of the latest checkpoint under ``directory``, or None when there is none;
    restores the RNG states saved with it (unless ``restore_rng`` is false)."""
    import torch

    path = latest_checkpoint(directory)
    if path is None:
        return None
    step = int(json.loads((path / "meta.json").read_text(encoding="utf-8"))["step"])
    state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    if restore_rng and (path / "rng.pt").is_file():
        set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    return step, state


# -- learning rate ---------------------------------------------------------------------------------
def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """The LR multiplier after ``step`` optimizer steps: linear warmup over ``warmup`` steps, then
    constant or a cosine from 1 down to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress_))


# -- progress ------------------------------------------------------------------------------------------
class _SilentBar:
    """What :func:`progress` returns where tqdm is missing: the calls a trainer makes, doing nothing."""

    def __init__(self, total: int | None = None, initial: int = 0) -> None:
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass

    def write(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None, desc: str = "", *, initial: int = 0, main: bool | None = None):
    """A tqdm bar over ``total`` steps (starting at ``initial``, for a resumed run), disabled off
    the main rank (``main``: default from ``RANK``)."""
    enabled = is_main_process() if main is None else main
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _SilentBar(total, initial)
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True)
