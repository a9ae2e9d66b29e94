#!/usr/bin/env bash
# Stage 1: continued pretraining (LoRA) on one machine, one process per visible GPU (CPU: one process).
#   MODEL=models/tiny-glm4 DATA_DIR=data/pretrain OUTPUT_DIR=outputs-pt-v1 ./run_pt.sh [extra flags]
# Extra flags are appended, so they override the ones below (e.g. --use_peft False, --max_steps 10).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-models/tiny-glm4}
DATA_DIR=${DATA_DIR:-./data/pretrain}
EVAL_DIR=${EVAL_DIR:-$DATA_DIR}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-pt-v1}
CACHE_DIR=${CACHE_DIR:-./cache}
source scripts/launch.sh  # sets PYTHON, NPROC and LAUNCH

"${LAUNCH[@]}" pretraining.py \
  --model_type auto \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$DATA_DIR" \
  --validation_file_dir "$EVAL_DIR" \
  --per_device_train_batch_size 4 \
  --per_device_eval_batch_size 4 \
  --do_train \
  --do_eval \
  --use_peft True \
  --seed 42 \
  --max_train_samples 10000 \
  --max_eval_samples 10 \
  --num_train_epochs 0.5 \
  --learning_rate 2e-4 \
  --warmup_ratio 0.05 \
  --weight_decay 0.01 \
  --logging_strategy steps \
  --logging_steps 10 \
  --eval_steps 50 \
  --evaluation_strategy steps \
  --save_steps 500 \
  --save_strategy steps \
  --save_total_limit 13 \
  --gradient_accumulation_steps 1 \
  --preprocessing_num_workers 10 \
  --block_size 512 \
  --group_by_length True \
  --output_dir "$OUTPUT_DIR" \
  --overwrite_output_dir \
  --ddp_timeout 30000 \
  --logging_first_step True \
  --target_modules all \
  --lora_rank 8 \
  --lora_alpha 16 \
  --lora_dropout 0.05 \
  --torch_dtype bfloat16 \
  --bf16 \
  --device_map auto \
  --report_to tensorboard \
  --ddp_find_unused_parameters False \
  --gradient_checkpointing True \
  --cache_dir "$CACHE_DIR" \
  "$@"
