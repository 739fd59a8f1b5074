"""Decision policies judged by Streaming-Eval on what they alone decide: the decision stage on the
local host, fed each second's encoded frame from a built dataset (the encoder stage's own output,
:mod:`streamharness.train.dataset`), with the episode's questions and instructions at their media
times. No generator runs, so what is compared is *when* each policy speaks — the part a decision
policy owns.

Scored events: the episodes' standing instructions (every proactive cell, and contextual ×
forward), with their references dropped, so that any alert inside a window counts (the words of
an alert are the responder's job, measured by the full pipeline run). Questions are left out:
every policy here answers a question in the second it is asked, so they would add the same numbers
to every row.

Systems: ``rules``, ``trained:<run dir>`` (a trained head scored in-process, as exported, with
instructions about people left to the people-detector rule as the stage does by default),
``head-only:<run dir>`` (the head decides every instruction),
``untrained`` (the same network, random weights, threshold 0.5), and the timing baselines
``silent``, ``always`` and ``every-<k>`` (:func:`streamharness.eval.runner.run_baseline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamharness.eval.episode import Episode, EpisodeRun, ResponseRecord


def instruction_episode(episode: Episode) -> Episode:
    """The episode's instructions only, references dropped (timing is what is judged)."""
    events = [e.model_copy(update={"reference": None}) for e in episode.instructions]
    return episode.model_copy(update={"events": events})


def encoded_frames_of(dataset_dirs: Sequence[Path | str], sample_ids: Sequence[str]) -> dict[str, list]:
    """Each sample's per-second ``EncodedFrameEvent``s (as the encoder stage published them)."""
    from streamharness.train.dataset import load_table
    from streamharness.v1 import events_pb2

    wanted = set(sample_ids)
    out: dict[str, list] = {}
    cols = ["sample_id", "step", "frame_ts_ms", "embedding", "embedding_model", "labels", "person_count", "caption"]
    for d in dataset_dirs:
        for row in load_table(d, "steps", columns=cols).to_pylist():
            if row["sample_id"] not in wanted:
                continue
            out.setdefault(row["sample_id"], []).append(events_pb2.EncodedFrameEvent(
                media_ts_ms=int(round(row["step"] * 1000)), embedding=row["embedding"], embedding_model=row["embedding_model"],
                labels=[events_pb2.Label(name=lab["name"], score=lab["score"]) for lab in row["labels"]],
                person_count=row["person_count"], caption=row["caption"]))
    return out


def run_decisions(episode: Episode, frames: Sequence, policy, *, system: str) -> EpisodeRun:
    """Replay one episode's encoded frames and timed queries through a :class:`DecisionStage`
    with ``policy`` on the local host; every decision to respond is a response record. The queries
    are the ones the in-process runner gives a session (:func:`~streamharness.eval.runner.episode_queries`),
    made into records by the gateway's own :class:`~streamharness.session.SessionMapper`."""
    from streamharness import topics
    from streamharness.decision.service import DecisionSettings, DecisionStage
    from streamharness.eval.runner import episode_queries
    from streamharness.hosts.local import LocalHost
    from streamharness.inprocess import client_message
    from streamharness.session import SessionMapper
    from streamharness.v1 import common_pb2, events_pb2, session_pb2

    initial, queries = episode_queries(episode)
    queries.sort(key=lambda q: q.media_ts_ms)
    mapper = SessionMapper("eval", "decisions")
    start = mapper.start(session_pb2.ClientMessage(start=session_pb2.SessionStart(
        stream_id=f"decisions-{episode.episode_id}"[:128].replace("/", "-"), decision_fps=1.0,
        instructions=[common_pb2.StandingInstruction(instruction_id=i, text=t) for i, t in initial.items()])))
    host = LocalHost()
    try:
        host.add(DecisionStage(DecisionSettings(), policy=policy))
        host.bus.subscribe("reader", [host.kafka.topic(topics.DECISIONS)])
        host.bus.send(topics.QUERIES, mapper.key, start)
        k, last = 0, -1
        for f in frames:
            if f.media_ts_ms > episode.duration_s * 1000:
                break
            while k < len(queries) and queries[k].media_ts_ms <= f.media_ts_ms:
                host.bus.send(topics.QUERIES, mapper.key, mapper.query(client_message(queries[k]))[0])
                k += 1
            msg = events_pb2.EncodedFrameEvent()
            msg.CopyFrom(f)
            msg.key.CopyFrom(mapper.key)
            msg.session_id = mapper.session_id
            host.bus.send(topics.EMBEDDINGS, mapper.key, msg)
            last = f.media_ts_ms
            host.run_until_idle()
        for q in queries[k:]:
            host.bus.send(topics.QUERIES, mapper.key, mapper.query(client_message(q))[0])
        host.bus.send(topics.QUERIES, mapper.key, mapper.end(last))
        host.run_until_idle()
        records = []
        for rec in host.bus.take(topics.DECISIONS, "reader"):
            d = events_pb2.DecisionEvent.FromString(rec.value)
            records.append(ResponseRecord(event_id=d.question_id or d.instruction_id or None, media_ts_s=d.media_ts_ms / 1000,
                                          text=f"({d.policy}) {d.reason}"))
    finally:
        host.close()
    return EpisodeRun(episode_id=episode.episode_id, system=system, responses=records, metadata={"decisions_only": True})


def make_system(name: str, embed, *, seed: int = 0):
    """The decision policy a system name stands for (None for the timing baselines)."""
    from streamharness.decision.policy import RulePolicy
    from streamharness.decision.trained import TrainedPolicy

    if name == "rules":
        return RulePolicy(embed)
    if name.startswith(("trained:", "head-only:")):
        from streamharness.train.head import TorchHeadScorer, load_head

        model, summary = load_head(name.split(":", 1)[1])
        people = RulePolicy(embed) if name.startswith("trained:") else None
        return TrainedPolicy(embed, TorchHeadScorer(model, summary["threshold"], summary["window"]), people_rules=people)
    if name == "untrained":
        import torch

        from streamharness.train.head import HeadTrainConfig, TorchHeadScorer, build_head

        torch.manual_seed(seed)
        config = HeadTrainConfig()
        return TrainedPolicy(embed, TorchHeadScorer(build_head(config).eval(), 0.5, config.window))
    return None


def evaluate_systems(episodes: Sequence[Episode], dataset_dirs: Sequence[Path | str], systems: Sequence[str], embed,
                     *, progress=None) -> dict[str, Any]:
    """Score each system on the instruction events of ``episodes``; returns name → RunScore."""
    from streamharness.eval.runner import run_baseline
    from streamharness.eval.scoring import AnswerMatcher, score_run

    eps = [instruction_episode(e) for e in episodes]
    frames = encoded_frames_of(dataset_dirs, [e.episode_id for e in eps])
    missing = [e.episode_id for e in eps if e.episode_id not in frames]
    if missing:
        raise ValueError(f"no encoded frames for episodes {missing} in {list(map(str, dataset_dirs))}: build a dataset "
                         "of those episodes first (streamharness train build-dataset --format episodes)")
    results = {}
    for name in systems:
        runs = []
        for ep in eps:
            if name in ("silent", "always") or name.startswith("every-"):
                base, k = (name, 1) if not name.startswith("every-") else ("every-k", int(name.split("-", 1)[1]))
                runs.append(run_baseline(ep, base, k=k).model_copy(update={"system": name}))
            else:
                policy = make_system(name, embed)
                if policy is None:
                    raise ValueError(f"unknown system {name!r}: rules, trained:<run dir>, head-only:<run dir>, untrained, silent, "
                                     "always, every-<k>")
                runs.append(run_decisions(ep, frames[ep.episode_id], policy, system=name))
            if progress is not None:
                progress(name, ep)
        results[name] = score_run(eps, runs, AnswerMatcher(), system=name)
    return results


def results_table(results: dict[str, Any]) -> str:
    """Markdown: SW-F1 (TP/FP/FN) total and per cell that has events, one row per system."""
    from streamharness.eval.episode import MODES, POSITIONS

    first = next(iter(results.values()))
    cells = [(m, p) for m in MODES for p in POSITIONS if first.cell(m, p).events]
    head = "| system | SW-F1 | TP | FP | FN | " + " | ".join(f"{m} × {p}" for m, p in cells) + " |"
    rule = "|---" * (5 + len(cells)) + "|"
    lines = [head, rule]

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    for name, score in results.items():
        t = score.total
        lines.append(f"| {name} | {fmt(t.sw_f1)} | {t.tp} | {t.fp} | {t.fn} | "
                     + " | ".join(fmt(score.cell(m, p).sw_f1) for m, p in cells) + " |")
    return "\n".join(lines)


__all__ = ["encoded_frames_of", "evaluate_systems", "instruction_episode", "make_system", "results_table", "run_decisions"]
