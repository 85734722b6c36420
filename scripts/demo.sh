#!/usr/bin/env bash
# The main job: meta-train MMP on sine waves with the paper's recipe (configs/sine.toml), evaluate on 5- and
# 10-shot test tasks, and leave the plots in runs/sine/plots. Extra arguments go to `metaprox train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
OUT=${OUT:-runs/sine}
if [ -f "$OUT/checkpoint.json" ]; then
  .venv/bin/metaprox train configs/sine.toml --out "$OUT" --resume "$@"
else
  .venv/bin/metaprox train configs/sine.toml --out "$OUT" "$@"
fi
echo "plots: $OUT/plots/ (learning_curve.png, sine_fits.png, adaptation.png); table: $OUT/eval.md"
