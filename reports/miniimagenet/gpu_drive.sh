#!/usr/bin/env bash
# miniImageNet on the lent GPU, one call: pretrain once (1-shot config), MMP 1-shot and 5-shot from that backbone.
# Plain BN: the train command's own validation (step 0 = the pretrained prior, and the end; log.eval_tasks
# episodes) and test. Transductive BN: a validation eval and a test eval per run. Each stage is time-boxed; the
# results go back as one tarball, re-packed after each stage ($OUT takes at most 8 files).
# env: DATA DEVICE PRE_MIN MMP_MIN TEST_TASKS VAL_TASKS LOG_EVAL STEPS TS (timeout scale) PY OUT
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src METAPROX_CACHE=${METAPROX_CACHE:-/tmp/mpcache} PYTHONUNBUFFERED=1
PY=${PY:-python3}; DEV=${DEVICE:-cuda}; OUT=${OUT:-/tmp/out}; STEPS=${STEPS:-[0,8,16]}; TS=${TS:-1}
mkdir -p runs "$OUT"
RES=$(mktemp -d)
t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/drive.log"; }
save() {
  for r in "$@"; do mkdir -p "$RES/$r"; cp runs/$r/*.json runs/$r/*.jsonl runs/$r/*.md runs/$r/*.safetensors \
    "$RES/$r/" 2>/dev/null; done
  cp "$OUT/drive.log" "$RES/"; tar czf "$OUT/results.tgz.tmp" -C "$RES" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}
common=(--set "task.data_path=\"$DATA\"" --set "device=\"$DEV\"" --set model.channels_last=false --quiet
        --set log.eval_every=100000 --set "log.eval_tasks=${LOG_EVAL:-200}" --set "eval.steps=$STEPS"
        --set "eval.tasks=$TEST_TASKS")
ev=(--set "task.data_path=\"$DATA\"" --set "device=\"$DEV\"" --set "eval.steps=$STEPS" --set 'eval.bn="transductive"')
nvidia-smi -L 2>/dev/null | tee -a "$OUT/drive.log"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/drive.log"
log "1-shot: pretrain ${PRE_MIN} min + MMP ${MMP_MIN} min + test (plain BN, $TEST_TASKS episodes)"
timeout $((330 * TS)) $PY -m metaprox.cli train configs/miniimagenet_5w1s_mmp_pretrain.toml --out runs/m1 \
  "${common[@]}" --set pretrain.minutes=$PRE_MIN --set outer.minutes=$MMP_MIN >> "$OUT/drive.log" 2>&1
log "exit $?"; save m1
log "5-shot: MMP ${MMP_MIN} min from the 1-shot run's backbone + test (plain BN)"
timeout $((150 * TS)) $PY -m metaprox.cli train configs/miniimagenet_5w5s_mmp_pretrain.toml --out runs/m5 \
  "${common[@]}" --set pretrain.backbone='"runs/m1"' --set outer.minutes=$MMP_MIN >> "$OUT/drive.log" 2>&1
log "exit $?"; save m5
for r in m1 m5; do
  log "$r validation, transductive BN, $VAL_TASKS episodes"
  timeout $((35 * TS)) $PY -m metaprox.cli eval runs/$r --split val "${ev[@]}" --set eval.tasks=$VAL_TASKS \
    >> "$OUT/drive.log" 2>&1; log "exit $?"; save $r
  log "$r test, transductive BN, $TEST_TASKS episodes"
  timeout $((40 * TS)) $PY -m metaprox.cli eval runs/$r "${ev[@]}" --set eval.tasks=$TEST_TASKS \
    >> "$OUT/drive.log" 2>&1; log "exit $?"; save $r
done
log "done"
