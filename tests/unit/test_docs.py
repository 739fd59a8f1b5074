"""docs/ stays true: every setting is documented with its current default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_operations_settings_table_is_current():
    proc = subprocess.run([sys.executable, "tools/settings_table.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_variable_is_in_operations_doc():
    sys.path.insert(0, str(ROOT / "tools"))
    from settings_table import settings_classes, variables

    doc = (ROOT / "docs" / "operations.md").read_text()
    missing = [var for cls in settings_classes() for var, *_ in variables(cls) if f"`{var}`" not in doc]
    assert not missing, missing
