#!/usr/bin/env bash
# miniImageNet on the shared 2-core CPU with the cosine head (model.cosine_scale = 10): the stages of this report's
# CPU run, one per call (`bash reports/miniimagenet/cpu_cosine_drive.sh STAGE`), run from the project root with
# the .venv active. Everything is chosen on validation episodes; test runs once per setting and BN protocol.
#   pretrain  the 1-shot run: Conv-4 (32 filters) pretrained 50 min (2 threads), 0 MMP steps = the prior
#   prior5    the 5-shot run from that backbone (0 MMP steps)
#   pretrain64  stop 19's run: Conv-4 with 64 filters pretrained 90 min on one thread (runs/cpu_c64_5w1s_prior)
#   pretrain64bf  stop 20's run: the same Conv-4-64 pretrained 120 min on two threads with bf16 autocast
#   prior5_64bf   the 5-shot run from that backbone
#   prior5_64   the 5-shot run from stop 19's backbone
#   mmp1      MMP meta-training from the backbone, 1-shot, a weak head pull (λ_head = 0.001: its center stays near zero), ηλ = 0.1 elsewhere, 15 min
#   val RUN BN [--set K=V ...]  validation curve of a run (200 episodes, steps 0/8/16/32; later --set override),
#                       BN = batch | transductive | population
#   test RUN BN STEPS [--set K=V ...]   test accuracy at the validation-chosen step count (TEST episodes, default
#                       2000), e.g. stop 19's prototype head: --set eval.head_init='"prototypes"' --set eval.lr=0.001
set -euo pipefail
DATA=${DATA:-/root/data/miniimagenet}
data=(--set "task.data_path=\"$DATA\"" --set model.cosine_scale=10.0)
case "$1" in
  pretrain)
    OMP_NUM_THREADS=2 metaprox train configs/miniimagenet_5w1s_mmp_pretrain.toml --out runs/cpu_cos_5w1s_prior \
      --no-eval --threads 2 "${data[@]}" --set pretrain.minutes=50 --set outer.minutes=1e-6 \
      --set log.eval_tasks=200 --set log.eval_every=0 ;;
  prior5)
    OMP_NUM_THREADS=1 metaprox train configs/miniimagenet_5w5s_mmp_pretrain.toml --out runs/cpu_cos_5w5s_prior \
      --no-eval --threads 1 "${data[@]}" --set pretrain.backbone='"runs/cpu_cos_5w1s_prior"' \
      --set outer.minutes=1e-6 --set log.eval_tasks=200 --set log.eval_every=0 ;;
  pretrain64)
    OMP_NUM_THREADS=1 metaprox train configs/miniimagenet_5w1s_mmp_pretrain.toml --out runs/cpu_c64_5w1s_prior \
      --no-eval --threads 1 "${data[@]}" --set model.filters=64 --set pretrain.minutes=90 --set outer.minutes=1e-6 \
      --set log.eval_tasks=200 --set log.eval_every=0 ;;
  pretrain64bf)
    OMP_NUM_THREADS=2 metaprox train configs/miniimagenet_5w1s_mmp_pretrain.toml --out runs/cpu_c64bf_5w1s_prior \
      --no-eval --threads 2 "${data[@]}" --set model.filters=64 --set pretrain.minutes=120 \
      --set pretrain.precision='"bfloat16"' --set pretrain.eval_every=1500 --set outer.minutes=1e-6 \
      --set log.eval_tasks=200 --set log.eval_every=0 ;;
  prior5_64bf)
    OMP_NUM_THREADS=1 metaprox train configs/miniimagenet_5w5s_mmp_pretrain.toml --out runs/cpu_c64bf_5w5s_prior \
      --no-eval --threads 1 "${data[@]}" --set model.filters=64 --set pretrain.backbone='"runs/cpu_c64bf_5w1s_prior"' \
      --set outer.minutes=1e-6 --set log.eval_tasks=200 --set log.eval_every=0 ;;
  prior5_64)
    OMP_NUM_THREADS=1 metaprox train configs/miniimagenet_5w5s_mmp_pretrain.toml --out runs/cpu_c64_5w5s_prior \
      --no-eval --threads 1 "${data[@]}" --set model.filters=64 --set pretrain.backbone='"runs/cpu_c64_5w1s_prior"' \
      --set outer.minutes=1e-6 --set log.eval_tasks=200 --set log.eval_every=0 ;;
  mmp1)
    OMP_NUM_THREADS=1 metaprox train configs/miniimagenet_5w1s_mmp_pretrain.toml --out runs/cpu_cos_5w1s_mmp \
      --no-eval --threads 1 "${data[@]}" --set pretrain.backbone='"runs/cpu_cos_5w1s_prior"' \
      --set 'prox.lam={"head.*" = 0.001, "*" = 0.1}' --set outer.lr=1.0 --set outer.minutes=15 \
      --set log.eval_every=50 --set log.eval_tasks=100 --set 'eval.steps=[8,16]' --set log.every=10 ;;
  val)
    OMP_NUM_THREADS=1 metaprox eval "$2" --split val --threads 1 --set "task.data_path=\"$DATA\"" \
      --set eval.tasks=200 --set 'eval.steps=[0,8,16,32]' --set "eval.bn=\"$3\"" "${@:4}" ;;
  test)
    OMP_NUM_THREADS=1 metaprox eval "$2" --threads 1 --set "task.data_path=\"$DATA\"" \
      --set "eval.tasks=${TEST:-2000}" --set "eval.steps=[$4]" --set "eval.bn=\"$3\"" "${@:5}" ;;
  *) echo "unknown stage $1" >&2; exit 2 ;;
esac
