#!/usr/bin/env bash
# GPU runbook: one run of at most ~9 minutes on one GPU (H100-class, 16 cores), torch and triton
# preinstalled (e.g. torch 2.11 + triton 3.6), pytest for the tests, no network, nothing pip-installed.
#
#   scripts/gpu_check.sh [OUT_DIR]      default OUT_DIR: gpu-results/<gpu>-<date>
#
# Stages, each under its own time limit (a stage that runs over is killed, recorded as exit 124 and
# the run goes on). Expected times on one H100 with 16 cores, and the limits:
#   build      ~70 s (limit 100): fastbert._C in place, CUDA kernels for the present GPU's arch
#                 only (here, 2 cores, one arch: ~6 min)
#   tests      ~120 s (limit 150): `pytest -m gpu` (~1250 CUDA-tensor tests: every op on the cuda,
#                 triton and reference backends vs the fp64 reference, the Triton varlen attention,
#                 the fused BERT vs unfused on CUDA), split over 6 parallel pytest processes (Triton
#                 JIT compiles dominate). In parallel with:
#   sanitize   ~100 s (limit 150): compute-sanitizer memcheck and racecheck (at once) over a short
#                 run of every op forward and backward on the cuda and the triton backend
#                 (scripts/gpu_check.py sanitize; here on CPU tensors: ~30 s)
#   bench      ~110 s (limit 150): the op benchmarks on the GPU (--quick, bf16, 1 s per case, 27
#                 cases): each op vs eager and torch.compile (compiled per case), GB/s and the
#                 fraction of the measured copy bandwidth
#   bert       ~90 s (limit 110): one BERT-base pretraining step (batch 32 x 128, padded execution:
#                 no data-dependent packing), eager, torch.compile and torch.compile(mode=
#                 "reduce-overhead") (CUDA graphs): step times, losses, cudagraph skip reasons
#                 (here, `--preset tiny --device cpu`: ~3 min)
# Total expected ~6.5 min; the limits add up to 8.5 min (tests and sanitize overlap).
#
# Files written to OUT_DIR (8 at most): summary.txt (versions, `fastbert info`, one line per stage,
# the tails), results.json (stages, test counts, sanitizer errors, bench rows, BERT step),
# build.log, tests.log, sanitizer.log, bench.log, bert.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo no-gpu)
OUT=${1:-gpu-results/${gpu}-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
status=0
: >"$OUT/summary.txt"
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
# stage NAME LIMIT_S LOG CMD...: runs CMD under `timeout`, output to LOG, one "stage" line in summary
stage() {
  local name=$1 limit=$2 log=$3 t0 rc
  shift 3
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  say "stage $name $(( $(date +%s) - t0 )) s exit $rc"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

say "== versions"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" || true
  git rev-parse --short HEAD 2>/dev/null || true; } 2>&1 | tee -a "$OUT/summary.txt"

arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo "9.0")
export FASTBERT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! stage build 100 "$OUT/build.log" $PY setup.py build_ext --inplace; then
  tail -40 "$OUT/build.log"; $PY scripts/gpu_check.py summarize "$OUT"; exit 1
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
$PY -m fastbert info 2>&1 | tee -a "$OUT/summary.txt"

# sanitizers in the background, alongside the tests (neither is timed): memcheck and racecheck at
# once, each over every op on the cuda and the triton backend
san() {
  compute-sanitizer --tool "$1" --error-exitcode 3 $PY scripts/gpu_check.py sanitize --backend cuda triton \
    >"$TMP/san.$1.log" 2>&1
}
if command -v compute-sanitizer >/dev/null; then
  export -f san; export PY TMP
  ( stage sanitize 150 "$OUT/sanitizer.log" bash -c 'san memcheck & a=$!; san racecheck & b=$!; wait $a; x=$?; wait $b; y=$?; exit $(( x | y ))' ) &
  san_pid=$!
else
  say "compute-sanitizer not found: sanitize skipped"; san_pid=
fi

stage tests 150 "$OUT/tests.log" $PY scripts/gpu_check.py tests --shards 6 tests
grep -hE "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -30 | tee -a "$OUT/summary.txt"
if [ -n "$san_pid" ]; then
  wait "$san_pid" || status=1
  for tool in memcheck racecheck; do
    { echo "## compute-sanitizer --tool $tool"; cat "$TMP/san.$tool.log"; } >>"$OUT/sanitizer.log" 2>/dev/null
    grep -E "ERROR SUMMARY|^MISMATCH" "$TMP/san.$tool.log" | sed "s/^/$tool: /" | tee -a "$OUT/summary.txt"
  done
fi

stage bench 150 "$OUT/bench.log" $PY -m fastbert.bench.run --quick --device cuda --case-seconds 1 --no-plots --dtype bfloat16 \
  --ops gelu layernorm_residual masked_softmax gather_mlm varlen_attention --out "$TMP/bench"
cp "$TMP"/bench/*[0-9].json "$TMP/bench.json" 2>/dev/null || true
tail -30 "$OUT/bench.log" | tee -a "$OUT/summary.txt"

stage bert 110 "$OUT/bert.log" $PY scripts/gpu_check.py bert-step --no-unpad --out "$TMP/bert.json"
tail -4 "$OUT/bert.log" | tee -a "$OUT/summary.txt"

$PY scripts/gpu_check.py summarize "$OUT" --bench "$TMP/bench.json" --bert "$TMP/bert.json" || status=1
say "done: results in $OUT (exit $status)"
exit $status
