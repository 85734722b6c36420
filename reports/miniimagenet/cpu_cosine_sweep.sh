#!/usr/bin/env bash
# Test-time settings of MMP's adaptation, chosen on validation (200 episodes, eval.val_seed): one line per
# variant, `bash reports/miniimagenet/cpu_cosine_sweep.sh RUN BN NAME [--set KEY=VALUE ...]`; the table is kept
# as RUN/sweep-NAME-BN.md (each eval writes RUN/eval-val-bn_BN.md, overwritten by the next variant).
set -euo pipefail
run=$1 bn=$2 name=$3; shift 3
DATA=${DATA:-/root/data/miniimagenet}
OMP_NUM_THREADS=1 metaprox eval "$run" --split val --threads 1 --set "task.data_path=\"$DATA\"" \
  --set eval.tasks=200 --set 'eval.steps=[0,4,8,16,32]' --set "eval.bn=\"$bn\"" "$@"
cp "$run/eval-val-bn_$bn.md" "$run/sweep-$name-$bn.md"
cp "$run/eval-val-bn_$bn.json" "$run/sweep-$name-$bn.json"
