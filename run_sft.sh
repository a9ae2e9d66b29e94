#!/usr/bin/env bash
# Stage 2: supervised fine-tuning (LoRA) on one machine, one process per visible GPU (CPU: one process).
#   MODEL=models/tiny-glm4 DATA_DIR=data/finetune OUTPUT_DIR=outputs-sft-v1 ./run_sft.sh [extra flags]
# Extra flags are appended, so they override the ones below (e.g. --use_peft False, --max_steps 10).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-models/tiny-glm4}
DATA_DIR=${DATA_DIR:-./data/finetune}
EVAL_DIR=${EVAL_DIR:-$DATA_DIR}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-sft-v1}
TEMPLATE=${TEMPLATE:-glm4}
CACHE_DIR=${CACHE_DIR:-./cache}
source scripts/launch.sh  # sets PYTHON, NPROC and LAUNCH

"${LAUNCH[@]}" supervised_finetuning.py \
  --model_type chatglm \
  --model_name_or_path "$MODEL" \
  --train_file_dir "$DATA_DIR" \
  --validation_file_dir "$EVAL_DIR" \
  --per_device_train_batch_size 2 \
  --per_device_eval_batch_size 2 \
  --do_train \
  --do_eval \
  --template_name "$TEMPLATE" \
  --use_peft True \
  --max_train_samples 1000 \
  --max_eval_samples 10 \
  --model_max_length 4096 \
  --num_train_epochs 1 \
  --learning_rate 2e-5 \
  --warmup_ratio 0.05 \
  --weight_decay 0.05 \
  --logging_strategy steps \
  --logging_steps 10 \
  --eval_steps 50 \
  --evaluation_strategy steps \
  --save_steps 500 \
  --save_strategy steps \
  --save_total_limit 13 \
  --gradient_accumulation_steps 1 \
  --preprocessing_num_workers 4 \
  --output_dir "$OUTPUT_DIR" \
  --overwrite_output_dir \
  --ddp_timeout 30000 \
  --logging_first_step True \
  --target_modules all \
  --lora_rank 8 \
  --lora_alpha 16 \
  --lora_dropout 0.05 \
  --torch_dtype float16 \
  --fp16 \
  --device_map auto \
  --report_to tensorboard \
  --ddp_find_unused_parameters False \
  --gradient_checkpointing True \
  --cache_dir "$CACHE_DIR" \
  "$@"
