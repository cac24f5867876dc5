#!/usr/bin/env bash
# One prepared GPU check of the Triton kernels, under 5 minutes on one GPU:
#   1. the gpu-marked kernel tests (bf16 and large shapes, compiled Triton);
#   2. benchmarks/bench_kernels.py: retrieval, mix forward, mix forward+backward and a
#      whole PEER layer step at N = 1024², dim 1024, bf16, heads 8, topk 16, 16k tokens,
#      against the torch reference and peer-pytorch.
# Numbers go to stdout and, when $OUT is set, to $OUT/gpu_check.log and
# $OUT/bench_kernels.md (copy them into benchmarks/RESULTS.md).
# Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-${TMPDIR:-/tmp}/peer_ll_gpu_check}"
mkdir -p "$out_dir"
export TRITON_INTERPRET=0  # compiled kernels; tests/conftest.py only sets it when unset
status=0
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  if ! python -c "import peer_ll, triton, PEER_pytorch, pytest" 2>/dev/null; then
    timeout 120 pip install -q -c constraints.txt -e ".[dev,bench]" || echo "pip install failed"
  fi
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "== gpu tests"
  timeout 120 python -m pytest -q -m gpu tests/kernels -p no:cacheprovider || status=1
  echo "== benchmarks"
  timeout 150 python benchmarks/bench_kernels.py --no-write --out "$out_dir/bench_kernels.md" \
    || status=1
  echo "== done (status $status)"
  exit $status
} 2>&1 | tee "$out_dir/gpu_check.log"
exit "${PIPESTATUS[0]}"
