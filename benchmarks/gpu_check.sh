#!/usr/bin/env bash
# One prepared check on a GPU machine (one H100/H200): PT, SFT and DPO with LoRA in bf16 on the `base`
# model of the tiny builder (~0.4B parameters, random weights), then merge and batched inference, with
# real tokens/s, peak GPU memory and MFU against the bf16 matrix-product peak measured in the same run
# (all through benchmarks/bench.py). Results (log, bench.json, bench.md) go to $OUT when set.
#
#   benchmarks/gpu_check.sh --dry-run     # print the plan, no GPU needed
#   benchmarks/gpu_check.sh               # on the GPU machine
#
# The GPU machine has no network: packages it lacks (trl, datasets, ...) travel as wheels in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-10}
RUNS=${RUNS:-pt packed,sft packed,dpo padded}
SIZES=${SIZES:-base}
RESULTS=${OUT:-outputs/gpu_check}
WORK=${WORK:-/tmp/medllm-gpu-check}
PYTHON=${PYTHON:-python3}

plan() {
  echo "GPU check plan:"
  echo "  1. install carried wheels from .whl/ (if present) into /tmp/site"
  echo "  2. record the machine: nvidia-smi, torch/transformers/peft/trl versions"
  echo "  3. build the '$SIZES' model(s), measure the bf16 matrix-product peak"
  echo "  4. train, $STEPS steps each, bf16, LoRA: $RUNS"
  echo "  5. merge the SFT adapter, batched inference at batch 1 and 8"
  echo "  6. write bench.json / bench.md / gpu_check.log to $RESULTS"
}

if [[ "${1:-}" == "--dry-run" ]]; then
  plan
  exit 0
fi

mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
plan
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" -c "import torch, transformers, peft, trl, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__, '| datasets', datasets.__version__)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" benchmarks/bench.py --sizes "$SIZES" --runs "$RUNS" --steps "$STEPS" --repeats 1 --no_cli --work_dir "$WORK" --timeout 240
cp "$WORK/bench.json" "$WORK/bench.md" "$RESULTS/"
