#!/usr/bin/env bash
# One prepared GPU check, about 5 minutes on one GPU:
#   1. every Triton kernel compiles for this GPU's architecture as well as sm_80/sm_90
#      ahead of time (python -m peer_ll.kernels.aot --fast, CPU seconds per configuration);
#   2. the gpu-marked tests: compiled kernels (bf16 and large shapes included) against
#      the torch reference, and the Triton lazy AdamW against the torch row update;
#   3. benchmarks/bench_kernels.py: retrieval, mix forward (achieved GB/s against the
#      measured device copy bandwidth), mix forward+backward, and the whole layer's
#      forward+backward and training step at N = 1024², dim 1024, bf16, heads 8,
#      topk 16, dim_key 128, 16k tokens, against the torch reference and peer-pytorch
#      0.2.2, with peak device memory.
# Numbers go to stdout and, when $OUT is set, to $OUT/gpu_check.log and
# $OUT/bench_kernels.md (copy them into benchmarks/RESULTS.md, "GPU" section).
# Needs the package with its dev and bench extras installed; the device machine has
# no network, so nothing is installed here.
# Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-${TMPDIR:-/tmp}/peer_ll_gpu_check}"
mkdir -p "$out_dir"
export TRITON_INTERPRET=0  # compiled kernels; tests/conftest.py only sets it when unset
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python -c "import torch, triton, PEER_pytorch, pytest; print('torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.cuda.is_available())" || status=1
  echo "== ahead-of-time compile (representative set, sm_80 and sm_90)"
  TRITON_CACHE_DIR="$(mktemp -d)" timeout 120 python -m peer_ll.kernels.aot --fast || status=1
  echo "== gpu tests"
  timeout 150 python -m pytest -q -m gpu tests/kernels -p no:cacheprovider || status=1
  echo "== benchmarks"
  timeout 200 python benchmarks/bench_kernels.py --no-write --out "$out_dir/bench_kernels.md" \
    || status=1
  echo "== done (status $status)"
  exit $status
} 2>&1 | tee "$out_dir/gpu_check.log"
exit "${PIPESTATUS[0]}"
