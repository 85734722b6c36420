#!/usr/bin/env bash
# How the unstated details of the paper's sine recipe were chosen: short runs (S = 6,000) of configs/sine.toml
# with one detail changed each, scored on VALIDATION tasks only (fresh sine tasks, eval.val_seed), never on the
# test tasks. Prints one line per variant: MSE after 32 test-time steps at 5 and 10 shots (200 tasks each).
#   bash scripts/sine_validation_sweep.sh [OUT_DIR]        (~1 minute per variant on one core)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/sine_sweep}
M=.venv/bin/metaprox
variant() {
  name=$1; shift
  [ -f "$OUT/$name/checkpoint.json" ] || OMP_NUM_THREADS=1 $M train configs/sine.toml --out "$OUT/$name" --quiet \
      --no-eval --set outer.steps=6000 --set log.every=500 "$@" >/dev/null 2>&1
  $M eval "$OUT/$name" --split val --json | .venv/bin/python -c "
import json, sys; r = json.load(sys.stdin)['sets']
print(f\"$name: 5-shot {r['5-shot']['32']['loss']:.3f} ± {r['5-shot']['32']['loss_ci95']:.3f}, \"
      f\"10-shot {r['10-shot']['32']['loss']:.3f} ± {r['10-shot']['32']['loss_ci95']:.3f}  ($*)\")"
}
# Every variant states the three validated details explicitly (inner minibatch, outer α, meta-batch), so the
# sweep does not depend on what configs/sine.toml currently holds.
B="--set inner.batch_size"; A="--set outer.lr"; MB="--set outer.meta_batch"
variant literal           $B=0  $A=0.8 $MB=5       # paper as written: full-batch inner, α = 0.8, meta-batch 5
variant alpha1.6          $B=0  $A=1.6 $MB=5       # α read as ηλ = 0.8 → η = 1.6
variant alpha1.6_mb10     $B=0  $A=1.6 $MB=10
variant alpha1.6_mb25     $B=0  $A=1.6 $MB=25
variant train10pts        $B=0  $A=1.6 $MB=5 --set task.train_points=10
variant ib10              $B=10 $A=1.6 $MB=5       # inner minibatches of 10 of the 50 points
variant ib5               $B=5  $A=1.6 $MB=5
variant ib5_alpha3.2      $B=5  $A=3.2 $MB=5
variant ib5_mb10          $B=5  $A=1.6 $MB=10
variant ib2               $B=2  $A=1.6 $MB=5
variant ib1               $B=1  $A=1.6 $MB=5
variant ib2_alpha3.2      $B=2  $A=3.2 $MB=5       # → configs/sine.toml
variant ib2_alpha3.2_mb10 $B=2  $A=3.2 $MB=10
variant ib2_alpha3.8      $B=2  $A=3.8 $MB=5
