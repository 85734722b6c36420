#!/usr/bin/env bash
# Test (and transductive validation) of the validation-chosen prior: the pretrained backbone with a zero head
# (0 MMP outer steps), adapted by MMP's test-time solver. Runs were made from the GPU-pretrained backbone with
# outer.minutes=1e-6 (they hold step 0). env: DATA DEVICE TEST_TASKS VAL_TASKS STEPS PY OUT RUNS
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src METAPROX_CACHE=${METAPROX_CACHE:-/tmp/mpcache} PYTHONUNBUFFERED=1
PY=${PY:-python3}; DEV=${DEVICE:-cuda}; OUT=${OUT:-/tmp/out}; STEPS=${STEPS:-[0,8,16]}; RUNS=${RUNS:-/tmp/priors}
mkdir -p "$OUT"; RES=$(mktemp -d); t0=$(date +%s)
log() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/drive.log"; }
save() {
  for r in p1 p5; do mkdir -p "$RES/$r"; cp $RUNS/$r/eval* $RUNS/$r/config.json "$RES/$r/" 2>/dev/null; done
  cp "$OUT/drive.log" "$RES/"; tar czf "$OUT/results.tgz.tmp" -C "$RES" . && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
}
ev=(--set "task.data_path=\"$DATA\"" --set "device=\"$DEV\"" --set "eval.steps=$STEPS")
for job in "p1 test batch" "p1 test transductive" "p5 test batch" "p5 test transductive" \
           "p1 val transductive" "p5 val transductive"; do
  set -- $job
  n=$TEST_TASKS; [ "$2" = val ] && n=$VAL_TASKS
  log "$1 $2 $3 BN, $n episodes"
  timeout 100 $PY -m metaprox.cli eval $RUNS/$1 --split $2 "${ev[@]}" --set eval.tasks=$n --set "eval.bn=\"$3\"" \
    >> "$OUT/drive.log" 2>&1; log "exit $?"; save
done
log done
