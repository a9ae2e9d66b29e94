#!/usr/bin/env bash
# Evaluate chat model(s) on CMB with OpenCompass (configs/eval_chat_demo.py), in its own environment .venv-eval
# (OpenCompass 0.5.4 pins numpy<2 and datasets<4, which clash with trl in .venv), offline, on CPU or GPU.
#
#   ./run_eval.sh                                              # outputs/demo/dpo-merged (the pipeline's last)
#   MODEL_PATH=outputs/demo/sft-merged ./run_eval.sh
#   MODEL_PATHS="base=models/tiny-glm4,sft=outputs/demo/sft-merged" WORK_DIR=outputs/eval ./run_eval.sh
#   EVAL_SETUP_ONLY=1 ./run_eval.sh                            # only create .venv-eval (make eval-setup)
#
# Environment: MODEL_PATH, MODEL_ABBR, MODEL_PATHS, CMB_DATA_DIR (see medllm/evaluation.py), EVAL_BATCH_SIZE,
# EVAL_DTYPE, EVAL_NUM_GPUS (see configs/models/chatglm/hf_glm4_9b_chat.py), WORK_DIR (default outputs/eval);
# relative paths are taken from the repo root. Extra arguments go to opencompass (e.g. -r to reuse a run).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
EVAL_VENV="${EVAL_VENV:-$REPO/.venv-eval}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
STAMP="$EVAL_VENV/.installed"
WORK_DIR="${WORK_DIR:-outputs/eval}"
[[ "$WORK_DIR" = /* ]] || WORK_DIR="$REPO/$WORK_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

# The models and data exist (stdlib only: runs before .venv-eval does).
[[ -n "${EVAL_SETUP_ONLY:-}" ]] || "$PYTHON" -m medllm.evaluation check

# Create the environment once; the stamp makes later runs install nothing. torch first, pinned, so pip keeps
# the build it has (the CPU wheel here) instead of pulling a CUDA one.
if [[ ! -f "$STAMP" || "$REPO/requirements-eval.txt" -nt "$STAMP" ]]; then
  [[ -x "$EVAL_VENV/bin/python" ]] || "$PYTHON" -m venv "$EVAL_VENV"
  "$EVAL_VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
  "$EVAL_VENV/bin/python" -m pip install --quiet -r "$REPO/requirements-eval.txt"
  touch "$STAMP"
fi
[[ -z "${EVAL_SETUP_ONLY:-}" ]] || exit 0

# Nothing from the network: models and data are local folders.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

# OpenCompass writes .cache/, tmp/ and icl_inference_output/ into the current folder: run it in the work dir.
mkdir -p "$WORK_DIR"
(cd "$WORK_DIR" && "$EVAL_VENV/bin/opencompass" "$REPO/configs/eval_chat_demo.py" -w "$WORK_DIR" --debug "$@")
"$PYTHON" -m medllm.evaluation report --work_dir "$WORK_DIR"
