#!/usr/bin/env bash
# Stage 3: direct preference optimisation (LoRA) on chosen/rejected pairs, one process per visible GPU (CPU: one).
#   MODEL=outputs-sft-merged DATA_DIR=data/reward OUTPUT_DIR=outputs-dpo-v1 ./run_dpo.sh [extra flags]
# Extra flags are appended, so they override the ones below (e.g. --use_peft False --precompute_ref_log_probs True,
# --max_steps 10, --beta 0.1, --group_by_length). --fp16/--torch_dtype float16 are set aside on a CPU.
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-models/tiny-glm4}
DATA_DIR=${DATA_DIR:-./data/reward}
EVAL_DIR=${EVAL_DIR:-$DATA_DIR}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-dpo-v1}
TEMPLATE=${TEMPLATE:-glm4}
CACHE_DIR=${CACHE_DIR:-./cache}
source scripts/launch.sh  # sets PYTHON, NPROC and LAUNCH

"${LAUNCH[@]}" dpo_training.py \
  --model_type auto \
  --model_name_or_path "$MODEL" \
  --template_name "$TEMPLATE" \
  --train_file_dir "$DATA_DIR" \
  --validation_file_dir "$EVAL_DIR" \
  --per_device_train_batch_size 4 \
  --per_device_eval_batch_size 1 \
  --do_train \
  --do_eval \
  --use_peft True \
  --max_train_samples 1000 \
  --max_eval_samples 10 \
  --max_steps 100 \
  --eval_steps 20 \
  --save_steps 50 \
  --max_source_length 1024 \
  --max_target_length 512 \
  --output_dir "$OUTPUT_DIR" \
  --overwrite_output_dir \
  --target_modules all \
  --lora_rank 8 \
  --lora_alpha 16 \
  --lora_dropout 0.05 \
  --torch_dtype float16 \
  --fp16 \
  --report_to tensorboard \
  --remove_unused_columns False \
  --gradient_checkpointing True \
  --evaluation_strategy steps \
  --cache_dir "$CACHE_DIR" \
  "$@"
