#!/usr/bin/env bash
# miniImageNet pretrain-then-meta-train, one setting per call, on any device (reports/miniimagenet):
#   bash scripts/miniimagenet_pipeline.sh SHOTS OUT [key=value ...]
# SHOTS is 1 or 5 (configs/miniimagenet_5w{SHOTS}s_mmp_pretrain.toml); the key=value pairs are --set overrides,
# e.g. task.data_path='"/data/miniimagenet"' device='"cuda"' model.channels_last=false pretrain.minutes=3
# outer.minutes=1.5 (1-shot), or pretrain.backbone='"OUT_OF_THE_1SHOT_RUN"' to reuse that run's backbone (5-shot).
# Steps: (1) train = pretrain + MMP meta-training + the test evaluation with the config's BatchNorm protocol
# (model.bn, plain = "batch"); (2) the test evaluation with the other protocol; (3) both protocols on validation
# episodes (VAL_TASKS, default 600) — the test-time step count is chosen there, never on test.
# Environment: PYTHON (default python), VAL_TASKS, and the usual METAPROX_CACHE (decoded-image cache).
set -euo pipefail
cd "$(dirname "$0")/.."
shots=$1 out=$2
shift 2
py=${PYTHON:-python}
sets=()
evalsets=()
for o in "$@"; do
  sets+=(--set "$o")
  case $o in device=*|task.data_path=*|task.cache_dir=*|task.decode_workers=*|eval.*) evalsets+=(--set "$o") ;; esac
done
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
cfg=configs/miniimagenet_5w${shots}s_mmp_pretrain.toml
start=$(date +%s)
$py -m metaprox.cli train "$cfg" --out "$out" --quiet "${sets[@]}"
echo "train (pretrain + meta-train + plain-BN test): $(( $(date +%s) - start )) s wall"
$py -m metaprox.cli eval "$out" "${evalsets[@]}" --set eval.bn='"transductive"'
$py -m metaprox.cli eval "$out" --split val "${evalsets[@]}" --set eval.tasks="${VAL_TASKS:-600}" \
  --set eval.bn='"batch"'
$py -m metaprox.cli eval "$out" --split val "${evalsets[@]}" --set eval.tasks="${VAL_TASKS:-600}" \
  --set eval.bn='"transductive"'
echo "done: $(( $(date +%s) - start )) s wall; results in $out/eval*.md"
