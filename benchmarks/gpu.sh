#!/usr/bin/env bash
# The GPU benchmark: training samples/s (project vs sentence-transformers at bf16, + torch.compile, + unpadded
# flash attention when flash-attn is installed), encoding passages/s, peak GPU memory. Under 5 minutes on one GPU;
# falls back to CPU (fp32) without one. Usage: bash benchmarks/gpu.sh [--steps 20] [--out gpu.json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
exec timeout 300 "$PY" -m benchmarks.gpu "$@"
