# Sourced by run_pt.sh / run_sft.sh / run_dpo.sh: picks the interpreter and the process count.
#   PYTHON  default .venv/bin/python when present, else python3
#   NPROC   default one process per visible GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi), else 1 (CPU)
# Sets LAUNCH: torchrun (torch.distributed.run) for several processes, the plain interpreter for one.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${NPROC:-}" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    NPROC=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
  else
    NPROC=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU') || true)
  fi
  [[ "${NPROC:-0}" -ge 1 ]] || NPROC=1
fi
if [[ "$NPROC" -gt 1 ]]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node "$NPROC")
else
  LAUNCH=("$PYTHON")
fi
