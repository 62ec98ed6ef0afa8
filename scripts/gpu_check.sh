#!/usr/bin/env bash
# The checks that need a GPU, as one command for a lent GPU machine, whose minutes are few:
#   build      maskkern._C with the CUDA kernels, with the machine's own torch, triton and nvcc
#   test       the test suite, spread over the cores (pytest-xdist), the GPU's backends included
#   sanitize   compute-sanitizer memcheck over the CUDA and Triton kernels' tests on the GPU
#   bench      the benchmark suite on the GPU (BENCH_ARGS; default a --quick run of the three ops
#              with GPU targets, about 4 minutes: the full run is ~15-20, mostly torch.compile)
# Each step has a time box and a log, and a failed step does not stop the next. Everything lands
# in $OUT (the device tool's folder that comes back: at most 8 files, so the bench results are one
# tarball) or, where OUT is unset, bench/results/tmp/gpu-check/. The last lines printed are the
# summary.
#
#   bash scripts/gpu_check.sh [step ...]       (make gpu-check; default: every step, in order)
#
# Time boxes in seconds: BUILD_S (200), TEST_S (180), SANITIZE_S (100), BENCH_S (300); one device
# call may run 600 s, so run `build test sanitize` and then, at once, `bench` (bench/README.md).
# Wheels in .whl/ (liger-kernel, a peer of the benchmark, is not on the GPU image) are installed
# first; carry .whl with the call.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench/results/tmp/gpu-check}"
mkdir -p "$OUT"
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(build test sanitize bench)
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1
# The Python that scripts/env.sh picks: the checkout's .venv where there is one (this machine),
# else the machine's python3 (a GPU box has torch and triton installed).
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
# The CUDA headers torch's headers include, from its CUDA wheels, in case the toolkit lacks some.
source scripts/cuda_headers.sh || true
SUMMARY=()

# step NAME SECONDS COMMAND...: runs COMMAND under a time box, logging to $OUT/NAME.log.
step() {
  local name="$1" limit="$2" start rc
  shift 2
  start=$(date +%s)
  echo "== $name (time box ${limit}s): $*"
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-9s rc=%-3s %4ss%s' "$name" "$rc" "$(($(date +%s) - start))" \
    "$([ "$rc" = 124 ] && echo '  (time box hit)')")")
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem \
    --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"
  nvcc --version 2>&1 | tail -n 2
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for s in "${STEPS[@]}"; do
  case "$s" in
    build)
      # env.sh: uses the machine's python3 (torch + triton there), installs maskkern editable and
      # builds _C in place; with nvcc and a CUDA torch that includes the CUDA kernels, for the
      # architecture of the GPU it finds.
      step build "${BUILD_S:-200}" bash -c 'source scripts/env.sh && $PY -m maskkern.info' ;;
    test)
      # With pytest-xdist (the GPU image has it), workers share the cores with 2 threads each.
      xdist=()
      "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "$(($(nproc) / 2))")
      step test "${TEST_S:-180}" env OMP_NUM_THREADS=2 "$PY" -m pytest tests -q -p no:cacheprovider \
        "${xdist[@]}" --durations=15 ;;
    sanitize)
      if ! command -v compute-sanitizer >/dev/null; then
        SUMMARY+=("sanitize  skipped: no compute-sanitizer"); continue
      fi
      # The op tests of the triton and cuda backends on the GPU; gradcheck, torch.compile and the
      # property tests are left out for time: memcheck slows every kernel launch, PyTorch's too.
      step sanitize "${SANITIZE_S:-100}" compute-sanitizer --tool memcheck --error-exitcode 9 \
        --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider --maxfail=10 \
        tests/test_masked_softmax.py tests/test_pad_embedding.py tests/test_masked_cross_entropy.py \
        tests/test_attention.py -k "cuda and not torch-cuda and not gradcheck and not compile" ;;
    bench)
      # Through env.sh: a no-op after `build`; on a fresh machine it installs maskkern and builds
      # _C, without which the table lacks the cuda backend (triton, the default, needs no build).
      step bench "${BENCH_S:-300}" bash -c "source scripts/env.sh && \$PY bench/run.py --out '$OUT/bench' \
        ${BENCH_ARGS:---quick --only masked_softmax,masked_cross_entropy,pad_embedding}"
      tar czf "$OUT/bench-results.tgz" -C "$OUT" bench && rm -rf "$OUT/bench" ;;
    *) echo "unknown step: $s (build, test, sanitize, bench)" >&2; exit 2 ;;
  esac
done

echo "== summary ($(date -u +%H:%M:%S) UTC; logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
