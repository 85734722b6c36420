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
variant literal                                                    # meta-batch 5, full-batch inner, α = 0.8
variant alpha1.6       --set outer.lr=1.6                          # α read as ηλ = 0.8 → η = 1.6
variant alpha1.6_mb10  --set outer.lr=1.6 --set outer.meta_batch=10
variant alpha1.6_mb25  --set outer.lr=1.6 --set outer.meta_batch=25
variant train10pts     --set outer.lr=1.6 --set task.train_points=10
variant ib10           --set outer.lr=1.6 --set inner.batch_size=10  # inner minibatches of 10 of the 50 points
variant ib5            --set outer.lr=1.6 --set inner.batch_size=5
variant ib5_alpha3.2   --set outer.lr=3.2 --set inner.batch_size=5
variant ib5_mb10       --set outer.lr=1.6 --set inner.batch_size=5 --set outer.meta_batch=10
variant ib2            --set outer.lr=1.6 --set inner.batch_size=2
variant ib1            --set outer.lr=1.6 --set inner.batch_size=1
variant ib2_alpha3.2   --set outer.lr=3.2 --set inner.batch_size=2
variant ib2_alpha3.2_mb10 --set outer.lr=3.2 --set inner.batch_size=2 --set outer.meta_batch=10
