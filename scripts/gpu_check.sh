#!/usr/bin/env bash
# GPU runbook. On a machine with an NVIDIA GPU and no network (torch and triton preinstalled, possibly
# older, e.g. torch 2.11 + triton 3.6; pytest needed for the tests): builds fastbert._C in place for
# the GPU that is present, runs the whole test suite with the GPU tests active, runs the benchmarks
# on the GPU, and leaves every log and result in one folder.
#
#   scripts/gpu_check.sh [OUT_DIR]      default OUT_DIR: gpu-results/<gpu>-<date>
#
# Nothing is pip-installed: the build uses --inplace and PYTHONPATH, so it works offline.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo no-gpu)
OUT=${1:-gpu-results/${gpu}-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
status=0
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }

step "versions"
{ nvidia-smi || true; $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" || true; } >"$OUT/versions.txt" 2>&1

step "build (FASTBERT_BUILD_CUDA=1, arch of the visible GPU)"
export FASTBERT_BUILD_CUDA=1
unset TORCH_CUDA_ARCH_LIST  # setup.py then lets torch target the GPU that is present
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  step "BUILD FAILED (see build.log)"; tail -40 "$OUT/build.log"; exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -m fastbert info >"$OUT/info.txt" 2>&1 || status=1
cat "$OUT/info.txt"

step "tests (GPU tests active)"
if $PY -c "import pytest" 2>/dev/null; then
  $PY -m pytest -q -rs tests --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1 || status=1
  tail -15 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
else
  step "pytest is not installed: tests skipped"; status=1
fi

step "benchmarks (GPU)"
$PY -m benchmarks.run --quick --out "$OUT" >"$OUT/bench.log" 2>&1 || status=1
tail -40 "$OUT/bench.log"
step "done: results in $OUT (exit $status)"
exit $status
