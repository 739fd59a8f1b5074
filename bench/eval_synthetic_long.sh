#!/usr/bin/env bash
# Streaming-Eval on the multi-hour synthetic episode (2 h of media at 1 FPS: 7200 frames, 24 blocks
# of the nine mode x position cells), through the in-process pipeline: the services' own code
# (ingest, encoder on a local tritonserver with EfficientNet-Lite0 + HOG, Qdrant-engine memory,
# the summariser writing chunk summaries with the same SmolLM2, the rule decision policy, the
# responder with SmolLM2-135M in this process), no Kafka.
# Writes the result, the raw responses, the HTML report and the run's resource use to docs/bench/.
#
#   bench/eval_synthetic_long.sh [DURATION_S] [TAG]     (default 7200; TAG names the outputs
#                                                        eval-synthetic-<D>s-<TAG>.*, to keep an older run)
#   SH_GENERATION_BACKEND=engine bench/eval_synthetic_long.sh 7200 engine
#   SH_DECISION_POLICY=model SH_GENERATION_BACKEND=engine bench/eval_synthetic_long.sh 7200 model
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${1:-7200}"
PY=.venv/bin/python
OUT=docs/bench
NAME="eval-synthetic-${DURATION}s${2:+-$2}"
EPISODE_DIR="$($PY -c 'from streamharness.eval.episodes_builtin import episodes_cache_dir; print(episodes_cache_dir())')"
mkdir -p "$OUT"
$PY -m streamharness.cli eval build-episodes --short-duration-s 0 --long-duration-s "$DURATION" >/dev/null
# SH_GENERATION_BACKEND=engine (set it before calling) answers on the streaming engine's per-stream
# KV cache instead of re-prefilling every prompt (issue 12); the default is the plain local model.
export SH_GENERATION_BACKEND="${SH_GENERATION_BACKEND:-local}" SH_GENERATION_TORCH_THREADS=1 SH_ENGINE_TORCH_THREADS=1
# The rule policy, as in the runs this one is compared with (the default is the trained head);
# SH_DECISION_POLICY=model (set it before calling) lets SmolLM2 decide each second on the engine.
export SH_DECISION_POLICY="${SH_DECISION_POLICY:-rules}"
# Multiple-choice answers need a letter, not a paragraph: shorter answers keep a CPU run bounded.
export SH_RESPONDER_QUESTION_MAX_NEW_TOKENS=32
export SH_MEMORY_DATA_DIR="$(mktemp -d)"
/usr/bin/time -v -o "$OUT/$NAME.time.txt" \
  $PY -m streamharness.cli eval run \
    --episodes "$EPISODE_DIR/synthetic-${DURATION}s-seed0/episode.json" \
    --in-process --start-triton --send-fps 1 --system "$SH_DECISION_POLICY+smollm2-135m (in-process, $SH_GENERATION_BACKEND${2:+, $2})" \
    --out "$OUT/$NAME.json" --runs-out "$OUT/$NAME.runs.jsonl" --report "$OUT/$NAME.html"
du -sh "$SH_MEMORY_DATA_DIR" | tee "$OUT/$NAME.memory-size.txt"
rm -rf "$SH_MEMORY_DATA_DIR"
grep -E "Elapsed|Maximum resident" "$OUT/$NAME.time.txt"
