"""Every service loads every setting it reads before anything starts, and a bad one exits 2 with a
message naming the variable — the same way for every service (no broker, Triton or model needed:
nothing may be touched before the settings are checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from streamharness.stage import settings_classes
from streamharness.topology import TOPOLOGY

ROOT = Path(__file__).resolve().parents[2]


def bad_variable(cls: type[BaseSettings]) -> tuple[str, str]:
    """A variable of ``cls`` and a value it must refuse (the first numeric field, else the first)."""
    prefix = (cls.model_config.get("env_prefix") or "").upper()
    for name, field in cls.model_fields.items():
        if field.annotation in (int, float):
            return f"{prefix}{name.upper()}", "not-a-number"
    name = next(iter(cls.model_fields))
    return f"{prefix}{name.upper()}", "x" * 100_000


CASES = [(stage, cls) for stage in TOPOLOGY for cls in settings_classes(TOPOLOGY[stage])]
CASES += [(stage, "SH_KAFKA_PARTITIONS") for stage in TOPOLOGY]


@pytest.mark.parametrize(("stage", "cls"), CASES, ids=[f"{s}-{getattr(c, '__name__', c)}" for s, c in CASES])
def test_a_bad_setting_exits_2_naming_the_variable(stage, cls, tmp_path):
    variable, value = ("SH_KAFKA_PARTITIONS", "0") if isinstance(cls, str) else bad_variable(cls)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SH_")}
    env.update({variable: value, "SH_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "SH_DEV_CACHE_DIR": str(tmp_path)})
    proc = subprocess.run([sys.executable, str(ROOT / "services" / stage / "main.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert out.startswith("error: invalid settings") and f"{variable}=" in out, out
    assert "Traceback" not in out
