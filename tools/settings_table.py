"""Print the Markdown table of every StreamHarness setting (pasted into docs/operations.md;
tests/unit/test_docs.py checks that every variable is documented there)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import importlib

from pydantic_settings import BaseSettings

# The Jobs' settings (Streaming-Train), which no stage reads.
JOB_SETTINGS_MODULES = ("streamharness.train.objective", "streamharness.train.head", "streamharness.train.vlm")


def _settings_modules() -> tuple[str, ...]:
    """Every module that defines a settings class: the common ones, then each stage's, from the
    topology (a new stage's settings appear here by its topology row, with nothing to add), then
    the training Jobs'."""
    from streamharness.topology import COMMON_SETTINGS, TOPOLOGY

    modules: list[str] = []
    for path in [*COMMON_SETTINGS, *(p for spec in TOPOLOGY.values() for p in spec.settings), *JOB_SETTINGS_MODULES]:
        module = path.partition(":")[0]
        if module not in modules:
            modules.append(module)
    return tuple(modules)


SETTINGS_MODULES = _settings_modules()


def settings_classes() -> list[type[BaseSettings]]:
    found: list[type[BaseSettings]] = []
    for name in SETTINGS_MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, BaseSettings) and obj is not BaseSettings
                    and obj.__module__ == module.__name__ and obj not in found):
                found.append(obj)
    return found


def variables(cls: type[BaseSettings]) -> list[tuple[str, str, str, str]]:
    prefix = (cls.model_config.get("env_prefix") or "").upper()
    rows = []
    for name, field in cls.model_fields.items():
        default = field.default if field.default_factory is None else "(computed)"
        rows.append((f"{prefix}{name.upper()}", str(field.annotation).replace("typing.", ""), repr(default), field.description or ""))
    return rows


def render() -> str:
    out = []
    for cls in settings_classes():
        out.append(f"### {cls.__name__}\n\n{(cls.__doc__ or '').strip()}\n")
        out.append("| variable | type | default | meaning |\n|---|---|---|---|")
        for var, typ, default, desc in variables(cls):
            typ = typ.replace("|", "\\|").replace("<class '", "").replace("'>", "").replace("pydantic.types.", "")
            out.append(f"| `{var}` | {typ} | `{default}` | {desc} |")
        out.append("")
    return "\n".join(out)


START, END = "<!-- settings:start (tools/settings_table.py --write) -->", "<!-- settings:end -->"
DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update the table in docs/operations.md")
    parser.add_argument("--check", action="store_true", help="fail if docs/operations.md is stale")
    opts = parser.parse_args()
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    fresh = f"{head}{START}\n{render()}\n{END}{tail}"
    if opts.check:
        if fresh != text:
            print("docs/operations.md settings table is stale: run python tools/settings_table.py --write", file=sys.stderr)
            return 1
        return 0
    if opts.write:
        DOC.write_text(fresh)
        return 0
    print(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
