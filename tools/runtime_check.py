"""Check the package cut for real: in an environment with only the base dependencies
(``pip install -c requirements.lock ./libs``, what the service image installs), every stage of the
topology imports, its settings load, and each service's entry point runs up to its settings check
(a bad setting exits 2 naming the variable) — with no extra (torch, kserve, matplotlib, the
tritonserver wheel) installed. ``make runtime-check`` builds that environment and runs this."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS_ONLY = ("torch", "transformers", "kserve", "matplotlib", "pytriton", "pytest")


def main() -> int:
    from streamharness.stage import import_object, settings_classes
    from streamharness.topology import COMMON_SETTINGS, TOPOLOGY

    problems: list[str] = []
    present = [m for m in EXTRAS_ONLY if importlib.util.find_spec(m) is not None]
    if present:
        problems.append(f"not a runtime-only environment: {', '.join(present)} installed")
    import streamharness.hosts.kafka  # noqa: F401
    import streamharness.hosts.local  # noqa: F401

    for path in COMMON_SETTINGS:
        import_object(path)()
    for name, spec in TOPOLOGY.items():
        try:
            import_object(spec.factory)
            for cls in settings_classes(spec):
                cls()
        except Exception as err:  # noqa: BLE001 - reported below
            problems.append(f"{name}: {err!r}")
            continue
        env = {k: v for k, v in os.environ.items() if not k.startswith("SH_")}
        env["SH_KAFKA_PARTITIONS"] = "0"
        proc = subprocess.run([sys.executable, str(ROOT / "services" / name / "main.py")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 2 or "SH_KAFKA_PARTITIONS" not in proc.stdout:
            problems.append(f"services/{name}/main.py: exit {proc.returncode}: {(proc.stdout + proc.stderr)[-500:]}")
        else:
            print(f"{name}: imports and checks its settings on the runtime dependencies alone")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
