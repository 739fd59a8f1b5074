"""The package cut (docs/architecture.md, "Package cut"): the service image installs libs/ with its
base dependencies only, so the runtime must import nothing that only an extra or devinfra brings.

Runtime: every module of libs/streamharness except ``devinfra/`` (development servers), ``eval/``
(Streaming-Eval), ``cli.py`` and ``local_run.py`` (development commands), plus the services'
``services/<name>/main.py``. The source is read with ``ast``, nothing is imported, so these tests
need no extra installed. They check that:

- the runtime never imports ``streamharness.devinfra`` (nor eval, cli, local_run), at module level,
  inside a function, or through ``importlib.import_module``;
- every third-party module the runtime imports is provided by pyproject's base ``dependencies``,
  except in the modules of ``OPTIONAL``, which name the extra they need (and import it only inside
  functions unless marked as an entry point);
- devinfra/ and eval/ import only base dependencies at module level (the ``streamharness`` command
  imports them on every start, in every image) and their own extra inside functions;
- no module imports an entry point that needs an extra at import time (kserve_server), except the
  modules allowed that extra.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = ROOT / "libs" / "streamharness"
SERVICES_DIR = ROOT / "services"
PYPROJECT = ROOT / "libs" / "pyproject.toml"

# Development tools, not runtime: name (module or package) -> the extra their lazy imports may use.
TOOLS: dict[str, str | None] = {
    "streamharness.devinfra": "devinfra",
    "streamharness.eval": "eval",
    # Streaming-Train: torch, peft, pyarrow, tqdm inside functions (the jobs image has the models extra).
    "streamharness.train": "models",
    "streamharness.cli": None,
    "streamharness.local_run": None,
}

# Runtime modules allowed to import an extra, with the extra, and whether at import time.
# at_import=False: only inside functions, reached only where the extra is installed.
OPTIONAL: dict[str, tuple[str, bool]] = {
    # The generator's server: KServe at module level. Only the generator's entry point imports it.
    "streamharness.generation.kserve_server": ("generator", True),
    "services.generator.main": ("generator", False),
    # SmolLM2 in-process: torch and transformers in load(); the generator server, and the
    # responder's development-only SH_GENERATION_BACKEND=local.
    "streamharness.generation.local_smollm2": ("generator", False),
    # export_text_encoder(): torch, sentence-transformers, onnx at build time (Dockerfile stage "export").
    "streamharness.text_encoder": ("models", False),
    # The frame encoder export (images/triton/Dockerfile stage "export", `streamharness dev triton export`).
    "streamharness.models.frame_encoder_export": ("models", False),
    # SH_SUMMARISER_BACKEND=hf-vlm: a local Hugging Face VLM, torch and transformers in load() (an
    # image with [models], e.g. the jobs target; the other backends need the base dependencies only).
    "streamharness.summariser.backends": ("models", False),
    # The streaming engine (SH_DECISION_POLICY=model, SH_GENERATION_BACKEND=engine): torch and
    # transformers inside functions, reached only where a model is loaded (an image with [models]).
    "streamharness.engine.attention": ("models", False),
    "streamharness.engine.kernels": ("models", False),
    "streamharness.engine.kv": ("models", False),
    "streamharness.engine.model": ("models", False),
    # load_pretrained(): a local VLM checkpoint (the engine and the trainer).
    "streamharness.protocol": ("models", False),
}

# Import names of distributions whose import name is not the distribution name with "-" -> "_".
# Every opentelemetry-* distribution provides "opentelemetry".
IMPORT_NAMES: dict[str, tuple[str, ...]] = {
    "grpcio": ("grpc",),
    "grpcio-health-checking": ("grpc_health",),
    "grpcio-reflection": ("grpc_reflection",),
    "grpcio-tools": ("grpc_tools",),
    "protobuf": ("google.protobuf",),
    "kafka-python": ("kafka",),
    "qdrant-edge-py": ("qdrant_edge",),
    "opencv-python-headless": ("cv2",),
    "pillow": ("PIL",),
    "pyjwt": ("jwt",),
    "nvidia-pytriton": ("pytriton",),
    "scikit-image": ("skimage",),
    "pyyaml": ("yaml",),
}

_TOOL_NAMES = tuple(TOOLS)


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name; for `from a import b` both "a" and "a.b" are recorded
    line: int
    lazy: bool  # inside a function: runs only when the function does


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    imports: tuple[Import, ...]


# -- reading the source ----------------------------------------------------------------------------
def _normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _dist_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a distribution name from {requirement!r}"
    return _normalise(match.group(1))


def import_names(dist: str) -> tuple[str, ...]:
    dist = _normalise(dist)
    if dist in IMPORT_NAMES:
        return IMPORT_NAMES[dist]
    if dist.startswith("opentelemetry-"):
        return ("opentelemetry",)
    return (dist.replace("-", "_"),)


def provided_names(pyproject: Path) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """Import names the base dependencies provide, and those of each extra."""
    project = tomllib.loads(pyproject.read_text())["project"]

    def names(requirements: list[str]) -> tuple[str, ...]:
        return tuple(sorted({n for r in requirements for n in import_names(_dist_name(r))}))

    extras = {extra: names(reqs) for extra, reqs in project.get("optional-dependencies", {}).items()}
    return names(project["dependencies"]), extras


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def read_imports(source: str, module: str, is_package: bool) -> tuple[Import, ...]:
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def absolute(level: int, name: str | None) -> str:
        if level == 0:
            return name or ""
        base = package.rsplit(".", level - 1)[0] if level > 1 else package
        return f"{base}.{name}" if name else base

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the `if TYPE_CHECKING:` body never runs
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.level, node.module)
            found.append(Import(base, node.lineno, lazy))
            found.extend(Import(f"{base}.{alias.name}", node.lineno, lazy) for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append(Import(node.args[0].value, node.lineno, lazy))
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(ast.parse(source), False)
    return tuple(found)


def load_modules(package_dir: Path, services_dir: Path | None) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    files = [(p, p.relative_to(package_dir.parent)) for p in sorted(package_dir.rglob("*.py"))]
    if services_dir is not None and services_dir.is_dir():
        files += [(p, p.relative_to(services_dir.parent)) for p in sorted(services_dir.glob("*/main.py"))]
    for path, rel in files:
        parts = rel.with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = Module(name, path, read_imports(path.read_text(), name, is_package))
    return modules


# -- the cut ---------------------------------------------------------------------------------------
def _under(name: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def is_runtime(name: str) -> bool:
    return _under(name, _TOOL_NAMES) is None


def third_party(name: str) -> bool:
    top = name.split(".")[0]
    return top not in sys.stdlib_module_names and top not in ("streamharness", "services")


def _provided(name: str, names: tuple[str, ...]) -> bool:
    return _under(name, names) is not None


def _statements(imports: tuple[Import, ...]) -> list[tuple[Import, ...]]:
    """Third-party imports grouped per statement and top-level name (``from a import b`` records
    both a and a.b: ``from google import protobuf`` is google.protobuf)."""
    groups: dict[tuple[int, str], list[Import]] = {}
    for imp in imports:
        if third_party(imp.module):
            groups.setdefault((imp.line, imp.module.split(".")[0]), []).append(imp)
    return [tuple(g) for g in groups.values()]


def _any_provided(statement: tuple[Import, ...], names: tuple[str, ...]) -> bool:
    return any(_provided(imp.module, names) for imp in statement)


def _where(module: Module, imp: Import) -> str:
    rel = module.path.relative_to(ROOT) if module.path.is_relative_to(ROOT) else module.path
    return f"{rel}:{imp.line} imports {imp.module} {'in a function' if imp.lazy else 'at module level'}"


def devinfra_violations(modules: dict[str, Module]) -> list[str]:
    out = []
    for module in modules.values():
        if not is_runtime(module.name):
            continue
        lines: set[int] = set()
        for imp in module.imports:  # one message per statement
            tool = _under(imp.module, _TOOL_NAMES)
            if tool is not None and imp.line not in lines:
                lines.add(imp.line)
                out.append(f"{_where(module, imp)}: the runtime must not import {tool}")
    return sorted(out)


def dependency_violations(modules: dict[str, Module], pyproject: Path) -> list[str]:
    base, extras = provided_names(pyproject)
    out = []
    for module in modules.values():
        tool = _under(module.name, _TOOL_NAMES)
        if tool is None:
            extra, at_import = OPTIONAL.get(module.name, (None, False))
        else:
            extra, at_import = TOOLS[tool], False
        for statement in _statements(module.imports):
            imp = statement[0]
            in_extra = extra is not None and _any_provided(statement, extras.get(extra, ()))
            if _any_provided(statement, base) or (in_extra and (imp.lazy or at_import)):
                continue
            if in_extra:
                why = f"[{extra}] only inside functions here: importing this module must work with the base dependencies"
            elif tool is None:
                why = "not in the base dependencies of libs/pyproject.toml" + (f" nor in [{extra}]" if extra else "")
            else:
                why = f"{tool} may use the base dependencies" + (f" and [{extra}] inside functions" if extra else "")
            out.append(f"{_where(module, imp)}: {why}")
    return sorted(out)


def _import_time_closure(name: str, modules: dict[str, Module]) -> set[str]:
    """The package's modules that importing ``name`` runs (parents packages included)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        parts = current.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in modules and candidate not in seen:
                seen.add(candidate)
                todo.extend(imp.module for imp in modules[candidate].imports if not imp.lazy)
    return seen


def entry_point_violations(modules: dict[str, Module]) -> list[str]:
    """Imports that reach a module needing an extra at import time (kserve_server)."""
    needy = {name: extra for name, (extra, at_import) in OPTIONAL.items() if at_import}
    out = []
    for module in modules.values():
        allowed = OPTIONAL.get(module.name, (None, False))
        for imp in module.imports:
            if third_party(imp.module) or imp.module not in modules:
                continue
            for reached in sorted(_import_time_closure(imp.module, modules) - {module.name}):
                extra = needy.get(reached)
                if extra is None:
                    continue
                if allowed[0] == extra and (imp.lazy or allowed[1]):
                    continue
                out.append(f"{_where(module, imp)}: importing it runs {reached}, which needs [{extra}] at import time")
    return sorted(set(out))


# -- the tests -------------------------------------------------------------------------------------
def _modules() -> dict[str, Module]:
    return load_modules(PACKAGE_DIR, SERVICES_DIR)


def test_runtime_never_imports_devinfra() -> None:
    assert devinfra_violations(_modules()) == []


def test_third_party_imports_come_from_base_or_the_allowed_extra() -> None:
    assert dependency_violations(_modules(), PYPROJECT) == []


def test_no_module_pulls_an_extra_in_through_an_entry_point() -> None:
    assert entry_point_violations(_modules()) == []


def test_optional_list_is_current() -> None:
    """Each OPTIONAL entry exists and still imports something of its extra the base lacks."""
    modules = _modules()
    base, extras = provided_names(PYPROJECT)
    stale = []
    for name, (extra, _) in OPTIONAL.items():
        assert extra in extras, f"{name}: pyproject has no extra [{extra}]"
        if name not in modules:
            stale.append(f"{name}: no such module")
            continue
        imports = modules[name].imports
        needs = [st for st in _statements(imports) if not _any_provided(st, base) and _any_provided(st, extras[extra])]
        reaches = [i for i in imports if not third_party(i.module) and i.module in modules
                   and any(OPTIONAL.get(m, ("", False))[1] for m in _import_time_closure(i.module, modules) - {name})]
        if not needs and not reaches:
            stale.append(f"{name}: imports nothing of [{extra}] any more; take it off OPTIONAL")
    assert stale == []


def test_checker_catches_violations(tmp_path: Path) -> None:
    """The checks fail on real violations, written into a small copy of the layout."""
    pkg = tmp_path / "libs" / "streamharness"
    files = {
        "__init__.py": "",
        "devinfra/__init__.py": "",
        "devinfra/common.py": "import pytriton\n",  # not at module level: devinfra's extra goes lazy
        "devinfra/ok.py": "def f():\n    import pytriton\n",
        "eval/__init__.py": "",
        "eval/report.py": "def plot():\n    import matplotlib\n",
        "cli.py": "def main():\n    from streamharness.devinfra import ok\n",
        "paths.py": "import os\nfrom pathlib import Path\nfrom google import protobuf\n",
        "media.py": "from streamharness.devinfra.common import dev_cache_dir\n",
        "memory/__init__.py": "",
        "memory/service.py": "def f():\n    from ..devinfra import common\n",
        "loader.py": "import importlib\ndef f():\n    importlib.import_module('streamharness.devinfra.ok')\n",
        "plots.py": "import matplotlib.pyplot as plt\nimport numpy as np\nimport cv2\n",
        "generation/__init__.py": "",
        "generation/kserve_server.py": "import kserve\nimport fastapi\n",
        "generation/local_smollm2.py": "import torch\n",
        "responder.py": "from streamharness.generation import kserve_server\n",
        "text_encoder.py": "def export():\n    import torch\n",
        "typing_only.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import matplotlib\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    modules = load_modules(pkg, None)

    devinfra = devinfra_violations(modules)
    for rel in ("media.py:1", "memory/service.py:2", "loader.py:3"):
        assert any(rel in v for v in devinfra), (rel, devinfra)
    assert not any("cli.py" in v or "devinfra/ok.py" in v for v in devinfra), devinfra

    deps = dependency_violations(modules, PYPROJECT)
    assert any("plots.py:1 imports matplotlib" in v for v in deps), deps
    assert any("generation/local_smollm2.py:1 imports torch at module level" in v and "inside functions" in v for v in deps), deps
    assert any("devinfra/common.py:1 imports pytriton" in v for v in deps), deps
    assert not any(part in v for v in deps for part in (
        "plots.py:2", "plots.py:3", "paths.py", "kserve_server.py", "text_encoder.py", "devinfra/ok.py", "eval/report.py", "typing_only.py",
    )), deps

    entry = entry_point_violations(modules)
    assert any("responder.py:1" in v and "kserve_server" in v for v in entry), entry
