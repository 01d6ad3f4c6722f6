#!/usr/bin/env bash
# The issue-15 GPU figures in one run (see bench/gpu_check.py): engine (eager and CUDA graphs) vs
# transformers.generate, GRPO step vs TRL, SFT tokens/s and MFU, peak memory, for a random
# Qwen2.5-0.5B-shaped bf16 model. OUT_DIR/gpu_check.json is rewritten after every part.
#   bench/gpu_check.sh OUT_DIR [--smoke] [--parts generate grpo sft]   (--smoke: tiny model, runs anywhere)
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bench/gpu_check.sh OUT_DIR [--smoke] [--parts generate grpo sft]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec "$PYTHON" bench/gpu_check.py "$@"
