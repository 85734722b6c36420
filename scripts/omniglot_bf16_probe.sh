#!/usr/bin/env bash
# Paired 5-minute validation probe of the shipped 5-way 1-shot CPU recipe in float32 and under bfloat16
# autocast (precision = "bf16"), one thread each, side by side (reports/omniglot_cpu).
#   bash scripts/omniglot_bf16_probe.sh [DATA]      (DATA: folder with omniglot28.npz + split lists)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/omniglot}
OUT=runs/bf16_probe
mkdir -p "$OUT"
probe() {  # probe NAME overrides...
  local name=$1; shift
  local sets=()
  for o in "$@"; do sets+=(--set "$o"); done
  OMP_NUM_THREADS=1 python benchmarks/budgeted_fewshot.py configs/omniglot_5w1s_mmp_cpu.toml --out "$OUT/$name" \
    --minutes 5 --splits val --set task.data_path="\"$DATA\"" --set eval.tasks=200 --set log.eval_every=1000 \
    --set log.eval_tasks=50 --set 'eval.steps=[0,4,8,16]' --set name="\"probe-$name\"" "${sets[@]}" > "$OUT/$name.log" 2>&1
}
probe fp32 & probe bf16 'precision="bf16"'; wait
grep -h "best\|ms/iteration" "$OUT"/*.log
