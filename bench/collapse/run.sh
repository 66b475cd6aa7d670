#!/usr/bin/env bash
# The collapse guard on the embedded model (issue 5's evidence), one command:
#   bench/collapse/run.sh [WORK_DIR]        (default outputs/bench-collapse; about 45 min on 2 cores)
# The case measured in ../shared/METHOD.md: RLSC L2 on 12 generated train questions, one question per
# step, 12 steps, full fine-tuning at the paper's lr 1e-5. Three runs on the same questions and the
# same held-out set (data.eval, 128 generated problems):
#   guard-on   : the default guard (rollback rules)                 -> should stop near the onset
#   guard-warn : every rule demoted to warn (the unguarded run)     -> shows the collapse and its onset
#   lora       : LoRA r16 at lr 1e-4 with the default guard         -> healthy, should run untouched
# then bench/collapse/summarize.py writes bench/collapse/results.{json,md} and the plot.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-outputs/bench-collapse}
RLSC=${RLSC:-.venv/bin/rlsc}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON=(-q --set paths.work_dir="$W" --set data.train=synthetic:12:1 --set train.steps=12
        --set train.questions_per_step=1 --set train.checkpoint_every=100)
FULL=(--set model.lora.enabled=false --set train.lr=1e-5 --set model.gradient_checkpointing=true)
WARN_ONLY=(--set guard.rules.cross_question_identical.action=warn --set guard.rules.few_shot_copy.action=warn
           --set guard.rules.length_ratio.action=warn)

"$RLSC" prepare "${COMMON[@]}" >/dev/null
"$RLSC" check "${COMMON[@]}"
[ -f "$W/eval/base/metrics.json" ] || "$RLSC" evaluate "${COMMON[@]}" --problems "$W/data/eval.jsonl" --out "$W/eval/base" >/dev/null
for run in guard-on lora guard-warn; do
  case $run in
    guard-on) extra=("${FULL[@]}") ;;
    guard-warn) extra=("${FULL[@]}" "${WARN_ONLY[@]}") ;;
    lora) extra=(--set train.lr=1e-4) ;;
  esac
  if [ ! -f "$W/$run/final/.done" ]; then
    rm -rf "$W/$run"
    /usr/bin/time -v -o "$W/$run.time" "$RLSC" train "${COMMON[@]}" "${extra[@]}" \
      --problems "$W/data/train.jsonl" --out "$W/$run" >/dev/null
    touch "$W/$run/final/.done"
  fi
  [ -f "$W/eval/$run/metrics.json" ] || "$RLSC" evaluate "${COMMON[@]}" "${extra[@]}" \
      --trained "$W/$run/final" --problems "$W/data/eval.jsonl" --out "$W/eval/$run" >/dev/null
done
"${PY:-.venv/bin/python}" bench/collapse/summarize.py "$W"
