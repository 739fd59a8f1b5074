"""Generate Python code (+ .pyi stubs) from protos/ into libs/, or check that it is current.

    python tools/gen_protos.py           # regenerate
    python tools/gen_protos.py --check   # exit 1 and list the files that differ
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "libs"
GENERATED_DIR = Path("streamharness") / "v1"


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # dev dependency, imported only here
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / GENERATED_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / GENERATED_DIR}")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    init = out_root / GENERATED_DIR / "__init__.py"
    init.write_text('"""Generated from protos/streamharness/v1 by tools/gen_protos.py. Do not edit."""\n')


def generated_files(root: Path) -> dict[str, Path]:
    base = root / GENERATED_DIR
    return {p.name: p for p in base.glob("*") if p.suffix in {".py", ".pyi"}} if base.exists() else {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    opts = parser.parse_args()
    if not opts.check:
        target = OUT_ROOT / GENERATED_DIR
        for old in generated_files(OUT_ROOT).values():
            old.unlink()
        target.mkdir(parents=True, exist_ok=True)
        generate(OUT_ROOT)
        print(f"generated {len(generated_files(OUT_ROOT))} files in {target.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh, current = generated_files(fresh_root), generated_files(OUT_ROOT)
        problems = sorted(set(fresh) ^ set(current))
        problems += sorted(n for n in set(fresh) & set(current) if not filecmp.cmp(fresh[n], current[n], shallow=False))
        if problems:
            print("generated code is stale; run `python tools/gen_protos.py`. Differs: " + ", ".join(problems), file=sys.stderr)
            return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
