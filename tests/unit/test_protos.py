"""The generated code under libs/streamharness/v1 is what protos/ produces today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current():
    proc = subprocess.run([sys.executable, "tools/gen_protos.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stale_code_is_detected(tmp_path):
    # Copy the tree, change one proto, and the check must fail on the copy.
    import shutil

    for part in ("protos", "libs/streamharness/v1", "tools"):
        shutil.copytree(ROOT / part, tmp_path / part)
    proto = tmp_path / "protos/streamharness/v1/common.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { string x = 1; }\n")
    proc = subprocess.run([sys.executable, "tools/gen_protos.py", "--check"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "common_pb2.py" in proc.stderr


def test_round_trip_of_a_kafka_payload():
    from streamharness.keys import key_str, make_key, parse_key
    from streamharness.v1 import events_pb2

    event = events_pb2.EncodedFrameEvent(key=make_key("acme", "cam-1"), media_ts_ms=1000, embedding=[0.5] * 1280)
    back = events_pb2.EncodedFrameEvent.FromString(event.SerializeToString())
    assert back.media_ts_ms == 1000 and len(back.embedding) == 1280
    assert key_str(back.key) == "acme/cam-1"
    assert parse_key("acme/cam-1") == back.key
