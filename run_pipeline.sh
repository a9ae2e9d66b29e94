#!/usr/bin/env bash
# The whole chain on one model: PT -> merge -> SFT -> merge -> DPO -> merge -> batch inference ->
# OpenCompass CMB evaluation (the base and every merged stage) -> report.
#
#   ./run_pipeline.sh                                   # the tiny default (what `make demo` runs)
#   PIPELINE_CONFIG=configs/pipeline/glm4-9b.env MODEL=/models/glm-4-9b-chat ./run_pipeline.sh
#
# A stage whose output exists is reused; FRESH=1 starts over. A failing stage stops the chain and
# names its log. Settings (model, data, per-stage flags) come from $PIPELINE_CONFIG, then the environment.
set -euo pipefail
cd "$(dirname "$0")"

PIPELINE_CONFIG=${PIPELINE_CONFIG:-configs/pipeline/tiny.env}
# shellcheck source=configs/pipeline/tiny.env
source "$PIPELINE_CONFIG"
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-outputs/demo}
FRESH=${FRESH:-0}
export PYTHON TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "$FRESH" = 1 ]; then rm -rf "$OUT"; fi
mkdir -p "$OUT/logs"

# run_stage NAME DONE_FILE COMMAND...: skip when DONE_FILE exists, else run with a log and a timing.
run_stage() {
  local name=$1 done_file=$2 log="$OUT/logs/$1.log" start
  shift 2
  if [ -e "$done_file" ]; then
    echo "[$name] reusing $done_file (FRESH=1 to redo)"
    return
  fi
  echo "[$name] running; log: $log"
  start=$(date +%s)
  if ! "$@" >"$log" 2>&1; then
    echo "[$name] FAILED; see $log" >&2
    tail -n 5 "$log" >&2
    exit 1
  fi
  printf '%s\t%s\n' "$name" "$(( $(date +%s) - start ))" >>"$OUT/timings.tsv"
}

if [ ! -f "$MODEL/config.json" ] && [ -n "${BUILD_TINY:-}" ]; then
  run_stage tiny "$MODEL/config.json" "$PYTHON" -m medllm.tiny --output_dir "$MODEL" $BUILD_TINY
fi

# merge_stage NAME BASE ADAPTER OUTPUT
merge_stage() {
  run_stage "merge-$1" "$4/config.json" "$PYTHON" merge_peft_adapter.py --base_model "$2" --lora_model "$3" \
    --output_dir "$4" --overwrite --verify
}

MODEL="$MODEL" DATA_DIR="$PT_DATA" OUTPUT_DIR="$OUT/pt" \
  run_stage pt "$OUT/pt/adapter_config.json" ./run_pt.sh $PT_ARGS
merge_stage pt "$MODEL" "$OUT/pt" "$OUT/pt-merged"

MODEL="$OUT/pt-merged" DATA_DIR="$SFT_DATA" OUTPUT_DIR="$OUT/sft" TEMPLATE="$TEMPLATE" \
  run_stage sft "$OUT/sft/adapter_config.json" ./run_sft.sh $SFT_ARGS
merge_stage sft "$OUT/pt-merged" "$OUT/sft" "$OUT/sft-merged"

MODEL="$OUT/sft-merged" DATA_DIR="$DPO_DATA" OUTPUT_DIR="$OUT/dpo" TEMPLATE="$TEMPLATE" \
  run_stage dpo "$OUT/dpo/adapter_config.json" ./run_dpo.sh $DPO_ARGS
merge_stage dpo "$OUT/sft-merged" "$OUT/dpo" "$OUT/dpo-merged"

run_stage inference "$OUT/predictions.json" "$PYTHON" inference.py --base_model "$OUT/dpo-merged" \
  --template_name "$TEMPLATE" --data_file "$QUESTIONS" --output_file "$OUT/predictions.json" $INFERENCE_ARGS

MODELS="base=$MODEL,pt=$OUT/pt-merged,sft=$OUT/sft-merged,dpo=$OUT/dpo-merged"
MODEL_PATHS="$MODELS" CMB_DATA_DIR="$CMB_DATA" \
  WORK_DIR="$OUT/eval" run_stage eval "$OUT/eval/.done" bash -c './run_eval.sh && touch "$WORK_DIR/.done"'
# The same questions as a cloze test (knowledge without the answer-letter skill; base models too).
run_stage cloze "$OUT/cloze.json" "$PYTHON" -m medllm.cloze --models "$MODELS" --data_dir "$CMB_DATA" \
  --output_file "$OUT/cloze.json"

"$PYTHON" -m medllm.report --pipeline_dir "$OUT"
