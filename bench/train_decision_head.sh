#!/usr/bin/env bash
# Streaming-Train evidence (docs/benchmarks.md, "The trained decision head"): build the training
# set (procedural streams + evaluation-style episodes of seeds 1000-1011) and the held-out set
# (synthetic episodes of seeds 0-2, never trained on, and the shipped opencv-doc episodes), train
# the head with the paper's trigger weights, with uniform weights and with the repeated-silence
# weight at 0.2 / 0.5 (and normalised by the weights' sum), and compare every policy on the
# held-out episodes' standing instructions. Needs a tritonserver at SH_TRITON_URL
# (`make triton` in another shell). About 25 minutes on 2 cores.
#   bench/train_decision_head.sh [WORK_DIR]
set -euo pipefail
W=${1:-${SH_DEV_CACHE_DIR:-$HOME/.cache/streamharness}/bench-train}
SH=${SH:-.venv/bin/streamharness}
PY=${PY:-.venv/bin/python}
mkdir -p "$W"
$SH train synthesize --out "$W/synth" --streams 96 --duration-s 300 --seed 7 --style mixed
$PY - "$W" <<'PYEOF'
import sys
from streamharness.eval.episodes_builtin import generate_synthetic
w = sys.argv[1]
for s in range(1000, 1012):
    generate_synthetic(f"{w}/eps-train/seed{s}", 300, seed=s)
for s in (0, 1, 2):
    generate_synthetic(f"{w}/eps-heldout/seed{s}", 600, seed=s)
PYEOF
$SH train build-dataset --input "$W/synth/samples.jsonl" --input "$W/eps-train" --out "$W/ds-train" --samples-per-shard 16
$SH train build-dataset --input "$W/eps-heldout" --input eval-jobs/episodes --format episodes --val-fraction 0 --out "$W/ds-heldout"
run() { local name=$1; shift; $SH train train --dataset "$W/ds-train" --trainer head --out "$W/head-$name" "$@"; }
run default
run uniform --uniform-weights
run w02 --repeated-silence-weight 0.2
run w05 --repeated-silence-weight 0.5
SH_TRAIN_NORMALISE=weights run normw
systems=(--system silent --system always --system every-5 --system rules --system untrained)
for v in default uniform w02 w05 normw; do systems+=(--system "trained:$W/head-$v"); done
$SH train evaluate --episodes "$W/eps-heldout" --dataset "$W/ds-heldout" "${systems[@]}" --out "$W/eval-synthetic"
$SH train evaluate --episodes eval-jobs/episodes --dataset "$W/ds-heldout" "${systems[@]}" --out "$W/eval-opencv-doc"
echo "tables: $W/eval-synthetic/table.md $W/eval-opencv-doc/table.md"
