#!/usr/bin/env bash
# FSDP2 on this machine's GPUs (benchmarks/gpu_fsdp_check.py says what is checked).
#   benchmarks/gpu_fsdp_check.sh [processes] [--allow-cpu] [--out FILE]
# processes: default every GPU (nvidia-smi -L). Exit 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-}"
if [[ -z "$n" || "$n" == -* ]]; then
  n="$(nvidia-smi -L 2>/dev/null | wc -l)"; [[ "$n" -ge 1 ]] || n=1
else
  shift
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m torch.distributed.run --standalone --nnodes=1 \
  --nproc-per-node="$n" benchmarks/gpu_fsdp_check.py "$@"
