"""streamharness.train.loop: checkpoints (atomic, last N kept, RNG restored), metrics lines,
rank shards, seeding."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from streamharness.train.loop import (
    LATEST,
    DistributedContext,
    MetricsWriter,
    latest_checkpoint,
    load_latest_checkpoint,
    progress,
    read_metrics,
    save_checkpoint,
    seed_everything,
)


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_checkpoint_round_trip_restores_state_and_rng(tmp_path):
    seed_everything(7)
    _draws()  # move the generators off their seeded start
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 5, "name": "x", "lrs": [0.1, 0.2]}
    path = save_checkpoint(tmp_path, 5, state)
    after_save = _draws()
    _draws()  # and further, so that a restore has something to undo

    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None
    step, restored = loaded
    assert step == 5 and path.name == "step-00000005"
    assert torch.equal(restored["model"]["w"], state["model"]["w"])
    assert restored["step"] == 5 and restored["name"] == "x" and restored["lrs"] == [0.1, 0.2]
    assert _draws() == after_save


def test_checkpoint_keeps_the_last_n_and_points_latest_at_the_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [LATEST, "step-00000004", "step-00000005"]
    assert (tmp_path / LATEST).read_text().strip() == "step-00000005"
    step, state = load_latest_checkpoint(tmp_path, restore_rng=False)
    assert step == 5 and state == {"step": 5}


def test_checkpoint_survives_a_torn_save_and_a_missing_pointer(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 3, {"step": 3})
    (tmp_path / ".tmp-step-00000004-999").mkdir()  # a save that crashed before its rename
    (tmp_path / "step-00000009").mkdir()  # no meta.json: never completed
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    (tmp_path / LATEST).unlink()
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    save_checkpoint(tmp_path, 4, {"step": 4})
    assert not list(tmp_path.glob(".tmp-*"))
    assert load_latest_checkpoint(tmp_path, restore_rng=False)[0] == 4


def test_metrics_writer_lines_rewind_and_off_main(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    with MetricsWriter(path, "vlm", main=True) as w:
        assert w.instrument_name("loss") == "streamharness.train.vlm.loss"
        for step in (1, 2, 3):
            w.log(step, loss=1.0 / step, step_time_s=0.5, tokens_per_s=np.float32(10.0), note="ok")
        w.rewind(2)
        w.log(3, loss=0.25)
    lines = read_metrics(path)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[0]["loss"] == 1.0 and lines[0]["note"] == "ok" and lines[0]["tokens_per_s"] == 10.0
    assert lines[-1]["loss"] == 0.25
    assert all(isinstance(json.dumps(line), str) for line in lines)

    other = tmp_path / "rank1.jsonl"
    MetricsWriter(other, "vlm", main=False).log(1, loss=1.0)
    assert not other.exists()


def test_shard_partitions_indices():
    indices = list(range(11))
    parts = [DistributedContext(rank=r, world_size=3).shard(indices) for r in range(3)]
    assert sorted(i for p in parts for i in p) == indices
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert [len(p) for p in parts] == [4, 4, 3]
    assert DistributedContext().shard(indices) == indices


def test_single_process_context_from_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with DistributedContext.from_env(device="cpu") as ctx:
        assert ctx.is_main and not ctx.distributed and ctx.device.type == "cpu"
        ctx.barrier()
        assert ctx.mean(2.5) == 2.5


def test_seed_everything_repeats_draws():
    seed_everything(3)
    first = _draws()
    seed_everything(3)
    assert _draws() == first


def test_progress_disabled_off_main():
    bar = progress(3, "x", main=False)
    bar.update(1)
    bar.close()


def test_metrics_writer_records_to_opentelemetry(tmp_path):
    sdk_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    meter = sdk_metrics.MeterProvider(metric_readers=[reader]).get_meter("streamharness.train")
    w = MetricsWriter(tmp_path / "m.jsonl", "vlm", main=True, meter=meter)
    w.log(1, loss=0.5, step_time_s=0.25, note="text is not a metric")
    w.close()
    found = {m.name: m.data.data_points[0] for rm in reader.get_metrics_data().resource_metrics
             for sm in rm.scope_metrics for m in sm.metrics}
    assert set(found) == {"streamharness.train.vlm.loss", "streamharness.train.vlm.step_time_s"}
    assert found["streamharness.train.vlm.loss"].value == 0.5
    assert found["streamharness.train.vlm.step_time_s"].sum == 0.25
