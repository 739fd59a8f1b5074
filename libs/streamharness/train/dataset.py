"""The Streaming-Train dataset builder: samples (from any reader) + their videos → sharded Parquet
of per-second streaming steps, with a manifest and statistics.

Layout of a dataset folder::

    manifest.json                 what was built, from what, with which encoders; statistics
    steps/shard-00000.parquet     one row per stream-second (STEP_SCHEMA)
    triggers/shard-00000.parquet  one row per question / instruction (TRIGGER_SCHEMA)
    build-state.json              resume state (finished shards and the build's parameters)

Each second's frame goes through **ingest's per-frame step and the encoder stage** — the services'
own code (:class:`~streamharness.ingest.service.IngestStage`,
:class:`~streamharness.encoder.service.EncoderStage`) on the local host, with the frame encoder
and the people detector on Triton — so a model trained here sees exactly the embeddings, labels,
people counts and captions the decision stage sees live. Trigger texts are embedded with the
MiniLM text encoder the decision and memory stages use.

A shard holds whole samples (``samples_per_shard`` of them, in input order), written atomically;
a build that stops resumes at the first unfinished shard (same inputs and parameters: else it
refuses, naming what changed). A sample whose video is missing or unreadable is reported, counted
in the manifest (``videos_missing`` / ``videos_unreadable``) and left out; it never stops the build.
A response after the end of its video is dropped and counted (``responses_after_video_end``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streamharness.errors import DependencyUnavailable
from streamharness.train.convert import step_count, to_steps, trigger_labels
from streamharness.train.samples import StreamSample

log = logging.getLogger(__name__)
DATASET_FORMAT_VERSION = 1
STATE_FILE = "build-state.json"


def _schemas():
    import pyarrow as pa

    label = pa.struct([("name", pa.string()), ("score", pa.float32())])
    steps = pa.schema([
        ("sample_id", pa.string()), ("video_name", pa.string()), ("source", pa.string()), ("task_type", pa.string()),
        ("split", pa.string()), ("step", pa.int32()), ("t_s", pa.float64()), ("frame_ts_ms", pa.int64()),
        ("user", pa.string()), ("target", pa.string()), ("role", pa.string()),
        ("said", pa.list_(pa.string())), ("responding", pa.list_(pa.string())),
        ("frame_jpeg", pa.binary()), ("embedding", pa.list_(pa.float32())), ("embedding_model", pa.string()),
        ("labels", pa.list_(label)), ("person_count", pa.int32()), ("caption", pa.string()),
    ])
    triggers = pa.schema([
        ("sample_id", pa.string()), ("split", pa.string()), ("source", pa.string()), ("task_type", pa.string()),
        ("trigger_id", pa.string()), ("kind", pa.string()), ("content", pa.string()),
        ("time", pa.float64()), ("withdrawn", pa.float64()), ("start_step", pa.int32()),
        ("step_labels", pa.list_(pa.int8())), ("windows", pa.list_(pa.list_(pa.float64()))),
        ("response_times", pa.list_(pa.float64())), ("response_texts", pa.list_(pa.string())),
        ("mode", pa.string()), ("position", pa.string()), ("text_embedding", pa.list_(pa.float32())),
    ])
    return steps, triggers


@dataclass(frozen=True)
class EncodedSecond:
    """What the encoder stage published for one kept frame."""

    ts_ms: int
    jpeg: bytes
    embedding: np.ndarray
    labels: list[tuple[str, float]]
    person_count: int
    caption: str
    model: str


class StageFrameEncoder:
    """Frames → what the encoder stage publishes, through ingest's per-frame step and the
    :class:`~streamharness.encoder.service.EncoderStage` on a :class:`~streamharness.hosts.local.LocalHost`."""

    GROUP = "train-builder"

    def __init__(self, triton=None, batch: int = 16) -> None:
        from streamharness.encoder.service import EncoderSettings, EncoderStage
        from streamharness.hosts.local import LocalHost
        from streamharness.ingest.service import IngestSettings, IngestStage
        from streamharness.settings import KafkaSettings, TritonSettings, load_settings

        self.kafka = KafkaSettings()
        self.host = LocalHost(self.kafka)
        encoder_settings = load_settings(EncoderSettings).model_copy(update={"max_batch": batch})
        self.encoder = self.host.add(EncoderStage(encoder_settings, triton or load_settings(TritonSettings)))
        self.ingest_stage = self.host.add(IngestStage(load_settings(IngestSettings)))
        from streamharness import topics

        self._topics = topics
        self._dead_seen = 0
        self.host.bus.subscribe(self.GROUP, [self.kafka.topic(topics.FRAMES), self.kafka.topic(topics.EMBEDDINGS)])

    def ready(self) -> bool:
        return self.host.healthy()

    def encode(self, frames: Iterable[tuple[int, bytes]], fps: float, stream: str) -> tuple[list[EncodedSecond], list[str]]:
        """Encode one video's frames (``(media ms, JPEG/PNG bytes)`` in order) kept at ``fps``;
        returns the encoded seconds and the errors of frames refused on the way."""
        from streamharness.ingest.frames import Resampler
        from streamharness.inprocess import image_encoding
        from streamharness.keys import make_key
        from streamharness.records import DLQ_ERROR
        from streamharness.v1 import events_pb2, ingest_pb2

        key = make_key("train", stream[:128] or "stream")
        session = uuid.uuid4().hex
        resampler = Resampler(fps)
        errors: list[str] = []
        jpegs: dict[int, bytes] = {}
        out: list[EncodedSecond] = []
        servicer = self.ingest_stage.servicer

        def drain() -> None:
            self.host.run_until_idle()
            for rec in self.host.bus.take(self._topics.FRAMES, self.GROUP):
                f = events_pb2.FrameEvent.FromString(rec.value)
                jpegs[f.media_ts_ms] = f.jpeg
            for rec in self.host.bus.take(self._topics.EMBEDDINGS, self.GROUP):
                e = events_pb2.EncodedFrameEvent.FromString(rec.value)
                out.append(EncodedSecond(e.media_ts_ms, jpegs.pop(e.media_ts_ms, b""), np.asarray(e.embedding, np.float32),
                                         [(lab.name, lab.score) for lab in e.labels], e.person_count, e.caption, e.embedding_model))

        pending = 0
        for seq, (ts, image) in enumerate(frames, start=1):
            req = ingest_pb2.IngestFrameRequest(key=key, session_id=session, media_ts_ms=ts, seq=seq, image=image,
                                                encoding=image_encoding(image), decision_fps=fps)
            res = servicer.ingest_one(req, key, resampler)
            if res.status == ingest_pb2.IngestFrameResult.STATUS_REJECTED:
                errors.append(res.error)
            elif res.status == ingest_pb2.IngestFrameResult.STATUS_PUBLISHED:
                pending += 1
                if pending >= self.encoder.settings.max_batch:
                    drain()
                    pending = 0
        drain()
        letters = self.host.bus.dead_letters
        errors += [dict(d.headers).get(DLQ_ERROR, b"").decode("utf-8", "replace") for d in letters[self._dead_seen:]]
        self._dead_seen = len(letters)
        out.sort(key=lambda s: s.ts_ms)
        return out, errors

    def close(self) -> None:
        self.host.close()


@dataclass
class BuildStats:
    samples: int = 0
    steps: int = 0
    triggers: int = 0
    roles: Counter = field(default_factory=Counter)
    task_types: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    splits: Counter = field(default_factory=Counter)
    trigger_kinds: Counter = field(default_factory=Counter)
    durations_s: list[float] = field(default_factory=list)
    videos_missing: int = 0
    videos_unreadable: int = 0
    frames_rejected: int = 0
    responses_after_video_end: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)

    def add(self, other: dict[str, Any]) -> None:
        for name in ("samples", "steps", "triggers", "videos_missing", "videos_unreadable", "frames_rejected",
                     "responses_after_video_end"):
            setattr(self, name, getattr(self, name) + other.get(name, 0))
        for name in ("roles", "task_types", "sources", "splits", "trigger_kinds"):
            getattr(self, name).update(other.get(name, {}))
        self.durations_s += other.get("durations_s", [])
        self.problems += other.get("problems", [])

    def to_json(self) -> dict[str, Any]:
        d = np.asarray(self.durations_s or [0.0])
        responses = self.roles.get("response", 0)
        silences = self.roles.get("first_silence", 0) + self.roles.get("repeated_silence", 0)
        return {
            "samples": self.samples, "steps": self.steps, "triggers": self.triggers,
            "response_steps": responses, "silence_steps": silences,
            "silence_per_response": round(silences / responses, 3) if responses else None,
            "response_fraction": round(responses / self.steps, 5) if self.steps else None,
            "roles": dict(self.roles), "task_types": dict(self.task_types), "sources": dict(self.sources),
            "splits": dict(self.splits), "trigger_kinds": dict(self.trigger_kinds),
            "duration_s": {"total": float(d.sum()), "mean": float(d.mean()), "min": float(d.min()), "max": float(d.max())},
            "videos_missing": self.videos_missing, "videos_unreadable": self.videos_unreadable,
            "frames_rejected": self.frames_rejected, "responses_after_video_end": self.responses_after_video_end,
            "problems": self.problems[:200], "problems_total": len(self.problems),
        }


@dataclass(frozen=True)
class BuildConfig:
    fps: float = 1.0
    samples_per_shard: int = 64
    frames: bool = True  # keep each second's JPEG (the VLM trainer needs it; the head needs only embeddings)
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    base_dir: str | None = None  # relative video paths resolve against it

    def fingerprint(self, sample_ids: Sequence[str]) -> str:
        h = hashlib.sha256(json.dumps([self.fps, self.samples_per_shard, self.frames, self.val_fraction,
                                       self.test_fraction, list(sample_ids)]).encode())
        return h.hexdigest()[:16]


def assign_split(sample: StreamSample, val_fraction: float, test_fraction: float) -> str:
    """A sample keeps a split its annotation gives (val / test); a "train" one goes to val or test by
    a hash of its id (stable across builds and machines)."""
    if sample.split != "train" or not (val_fraction or test_fraction):
        return sample.split
    u = int(hashlib.sha256(sample.sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def _frames_of(video: Path, fps: float) -> Iterable[tuple[int, bytes]]:
    from streamharness.replay import encoded_frames

    for f in encoded_frames(video, fps):
        yield f.media_ts_ms, f.image


def build_sample_rows(sample: StreamSample, encoded: Sequence[EncodedSecond], config: BuildConfig, split: str,
                      text_embed: Callable[[list[str]], np.ndarray]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The step and trigger rows of one sample, from its encoded seconds."""
    fps = config.fps
    n_video = len(encoded)
    # The annotated duration cut at the video's end; without a duration (Charades-STA), the video's length.
    n = n_video if sample.duration_s is None else min(step_count(sample, fps), n_video)
    steps = to_steps(sample, fps, duration_s=n / fps)
    late = sum(1 for t in sample.triggers for r in t.responses if r.time * fps >= n)
    stats: dict[str, Any] = {"responses_after_video_end": late}
    step_rows = []
    idx = 0  # steps go forward in time: the frame pointer only moves on
    for s in steps:
        # The frame of step k: the latest kept frame at or before t (the first one before that).
        t_ms = int(round(s.t_s * 1000))
        while idx + 1 < n_video and encoded[idx + 1].ts_ms <= t_ms:
            idx += 1
        e = encoded[idx]
        step_rows.append({
            "sample_id": sample.sample_id, "video_name": sample.video_name, "source": sample.source,
            "task_type": sample.task_type, "split": split, "step": s.index, "t_s": s.t_s, "frame_ts_ms": e.ts_ms,
            "user": s.user, "target": s.target, "role": s.role, "said": list(s.said), "responding": list(s.responding),
            "frame_jpeg": e.jpeg if config.frames else None, "embedding": e.embedding, "embedding_model": e.model,
            "labels": [{"name": a, "score": float(b)} for a, b in e.labels], "person_count": e.person_count,
            "caption": e.caption,
        })
    triggers = [t for t in sample.triggers if t.time * fps < n]
    vectors = text_embed([t.content for t in triggers]) if triggers else np.zeros((0, 384), np.float32)
    trigger_rows = []
    for t, vec in zip(triggers, vectors):
        start, labels = trigger_labels(t, n, fps)
        trigger_rows.append({
            "sample_id": sample.sample_id, "split": split, "source": sample.source, "task_type": sample.task_type,
            "trigger_id": t.trigger_id, "kind": t.kind, "content": t.content, "time": t.time, "withdrawn": t.withdrawn,
            "start_step": start, "step_labels": labels, "windows": [list(w) for w in t.windows],
            "response_times": [r.time for r in t.responses], "response_texts": [r.content for r in t.responses],
            "mode": t.mode, "position": t.position, "text_embedding": np.asarray(vec, np.float32),
        })
    stats.update({
        "samples": 1, "steps": len(step_rows), "triggers": len(trigger_rows), "roles": Counter(s.role for s in steps),
        "task_types": Counter([sample.task_type or "unknown"]), "sources": Counter([sample.source or "unknown"]),
        "splits": Counter([split]), "trigger_kinds": Counter(t.kind for t in triggers), "durations_s": [n / fps],
    })
    return step_rows, trigger_rows, stats


def _write_parquet(rows: list[dict], schema, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {name: [r[name] for r in rows] for name in schema.names}
    for name in ("embedding", "text_embedding"):
        if name in cols:
            cols[name] = [None if v is None else np.asarray(v, np.float32) for v in cols[name]]
    table = pa.table(cols, schema=schema)
    tmp = path.with_name(path.name + ".part")
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)


def _load_state(out: Path) -> dict[str, Any] | None:
    p = out / STATE_FILE
    return json.loads(p.read_text()) if p.exists() else None


def _save_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


class DatasetBuildError(RuntimeError):
    """The build cannot go on (e.g. resuming with other inputs or parameters)."""


def build_dataset(samples: Sequence[StreamSample], out_dir: Path | str, config: BuildConfig = BuildConfig(), *,
                  encoder: StageFrameEncoder | None = None, text_embed: Callable[[list[str]], np.ndarray] | None = None,
                  inputs: dict[str, Any] | None = None, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Build (or resume) a dataset in ``out_dir``; returns the manifest. ``encoder`` and
    ``text_embed`` default to the services' own (Triton at ``SH_TRITON_URL``, MiniLM export)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    out = Path(out_dir)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    (out / "triggers").mkdir(parents=True, exist_ok=True)
    ids = [s.sample_id for s in samples]
    if len(ids) != len(set(ids)):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DatasetBuildError(f"sample id {dup!r} occurs more than once in the inputs")
    fingerprint = config.fingerprint(ids)
    state = _load_state(out)
    if state is not None and state.get("fingerprint") != fingerprint:
        if not overwrite:
            raise DatasetBuildError(
                f"{out} holds a build of other inputs or parameters (state {state.get('fingerprint')}, now {fingerprint}); "
                "use another --out, or --overwrite to start again")
        state = None
    if state is None:
        for old in [*(out / "steps").glob("shard-*"), *(out / "triggers").glob("shard-*")]:
            old.unlink()
        state = {"fingerprint": fingerprint, "shards": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _save_json(out / STATE_FILE, state)
    own_encoder = encoder is None
    if text_embed is None:
        from streamharness.settings import load_settings
        from streamharness.text_encoder import TextEncoder, TextEncoderSettings

        text_embed = TextEncoder(load_settings(TextEncoderSettings)).load().encode
    shards = [list(samples[i:i + config.samples_per_shard]) for i in range(0, len(samples), config.samples_per_shard)]
    step_schema, trigger_schema = _schemas()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("samples"),
               TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("building", total=len(samples))
            for k, shard in enumerate(shards):
                name = f"shard-{k:05d}"
                if name in state["shards"] and (out / "steps" / f"{name}.parquet").exists():
                    bar.advance(task, len(shard))
                    continue
                if encoder is None:
                    encoder = StageFrameEncoder()
                    if not encoder.ready():
                        raise DatasetBuildError("the frame encoder is not ready: is Triton serving frame_encoder "
                                                "and people_detector at SH_TRITON_URL? (or use --start-triton)")
                step_rows: list[dict] = []
                trigger_rows: list[dict] = []
                shard_stats = BuildStats()
                for sample in shard:
                    bar.update(task, description=f"{name} {sample.sample_id[:40]}")
                    video = sample.resolve_video(config.base_dir)
                    if not video.exists():
                        shard_stats.videos_missing += 1
                        shard_stats.problems.append({"sample_id": sample.sample_id, "video": str(video), "problem": "video not found"})
                        log.warning("%s: video %s not found; sample left out", sample.sample_id, video)
                        bar.advance(task)
                        continue
                    try:
                        encoded, errors = encoder.encode(_frames_of(video, config.fps), config.fps, sample.sample_id)
                    except DependencyUnavailable:
                        raise  # Triton is not there: the build stops (and resumes at this shard), nothing is miscounted
                    except Exception as err:  # noqa: BLE001 - a video that cannot be read is counted, not fatal
                        encoded, errors = [], [f"{type(err).__name__}: {err}"]
                    shard_stats.frames_rejected += len(errors)
                    if not encoded:
                        shard_stats.videos_unreadable += 1
                        shard_stats.problems.append({"sample_id": sample.sample_id, "video": str(video),
                                                     "problem": "no frame could be read" + (f": {errors[0]}" if errors else "")})
                        log.warning("%s: no frame of %s could be read; sample left out", sample.sample_id, video)
                        bar.advance(task)
                        continue
                    split = assign_split(sample, config.val_fraction, config.test_fraction)
                    srows, trows, stats = build_sample_rows(sample, encoded, config, split, text_embed)
                    step_rows += srows
                    trigger_rows += trows
                    shard_stats.add(stats)
                    bar.advance(task)
                _write_parquet(step_rows, step_schema, out / "steps" / f"{name}.parquet")
                _write_parquet(trigger_rows, trigger_schema, out / "triggers" / f"{name}.parquet")
                state["shards"][name] = {"samples": [s.sample_id for s in shard], "stats": _stats_json(shard_stats)}
                _save_json(out / STATE_FILE, state)
    finally:
        if own_encoder and encoder is not None:
            encoder.close()
    return _write_manifest(out, state, config, inputs or {})


def _stats_json(stats: BuildStats) -> dict[str, Any]:
    return {"samples": stats.samples, "steps": stats.steps, "triggers": stats.triggers, "roles": dict(stats.roles),
            "task_types": dict(stats.task_types), "sources": dict(stats.sources), "splits": dict(stats.splits),
            "trigger_kinds": dict(stats.trigger_kinds), "durations_s": stats.durations_s,
            "videos_missing": stats.videos_missing, "videos_unreadable": stats.videos_unreadable,
            "frames_rejected": stats.frames_rejected, "responses_after_video_end": stats.responses_after_video_end,
            "problems": stats.problems}


def _write_manifest(out: Path, state: dict[str, Any], config: BuildConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    from streamharness.settings import TritonSettings, load_settings

    total = BuildStats()
    shards = []
    for name in sorted(state["shards"]):
        entry = state["shards"][name]
        total.add(entry["stats"])
        shards.append({"name": name, "steps": f"steps/{name}.parquet", "triggers": f"triggers/{name}.parquet",
                       "samples": len(entry["samples"]), "step_rows": entry["stats"]["steps"],
                       "trigger_rows": entry["stats"]["triggers"]})
    manifest = {
        "format_version": DATASET_FORMAT_VERSION, "kind": "streamharness-streaming-train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fingerprint": state["fingerprint"],
        "inputs": inputs, "fps": config.fps, "frames": config.frames, "samples_per_shard": config.samples_per_shard,
        "frame_encoder": load_settings(TritonSettings).frame_encoder_model, "text_encoder": "all-MiniLM-L6-v2 (384-d)",
        "protocol": {"user": "<T seconds>\\n<image> (a question first: question\\n<T seconds>\\n<image>)",
                     "assistant": "</silence> | </response> text"},
        "shards": shards, "stats": total.to_json(),
    }
    _save_json(out / "manifest.json", manifest)
    return manifest


def load_manifest(dataset_dir: Path | str) -> dict[str, Any]:
    path = Path(dataset_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {dataset_dir} a dataset built by `streamharness train build-dataset`?")
    return json.loads(path.read_text())


def load_table(dataset_dir: Path | str, which: str = "steps", columns: Sequence[str] | None = None, splits: Sequence[str] | None = None):
    """All shards of ``which`` ("steps" or "triggers") as one pyarrow Table, optionally only some
    columns and splits. Datasets given as several folders: call once per folder and concatenate."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest = load_manifest(dataset_dir)
    cols = None if columns is None else list(dict.fromkeys([*columns, "split"]))
    tables = [pq.read_table(Path(dataset_dir) / s[which], columns=cols) for s in manifest["shards"]]
    if not tables:
        return pa.table({})
    table = pa.concat_tables(tables)
    if splits is not None:
        table = table.filter(pc.is_in(table["split"], value_set=pa.array(list(splits))))
    return table
