#!/usr/bin/env bash
# The CPU-backend tests against a build of maskkern._C instrumented with AddressSanitizer and
# UndefinedBehaviorSanitizer. The instrumented .so goes into a copy of the package under
# build/asan/ (the in-place build stays untouched) that PYTHONPATH puts first.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh

OUT="$ROOT/build/asan"
rm -rf "$OUT/pkg"
mkdir -p "$OUT/pkg"
# Only this CPU's instruction-set level (and the baseline, always built): the one the tests load.
LEVEL="$("$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability().lower())')"
case "$LEVEL" in avx2 | avx512) ;; *) LEVEL=default ;; esac
MASKKERN_SANITIZE=1 MASKKERN_CUDA=0 MASKKERN_CPU_CAPABILITIES="$LEVEL" MAX_JOBS="${MAX_JOBS:-2}" \
  "$PY" setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" >&2
cp -r maskkern "$OUT/pkg/maskkern"
rm -f "$OUT/pkg/maskkern/"_C*.so "$OUT/pkg/maskkern/"_cpu_*.so
cp -r triton_kernels "$OUT/pkg/maskkern/triton_kernels"
cp "$OUT"/lib/maskkern/_C*.so "$OUT"/lib/maskkern/_cpu_*.so "$OUT/pkg/maskkern/"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$OUT/pkg"
# Only the native CPU kernels are instrumented: run the tests that exercise them — ids "[cpu-cpu]"
# (backend-device), "[...-cpu]" (backend last) and the native-op tests. append: pytest
# must not put the checkout (and its uninstrumented maskkern/_C) ahead of PYTHONPATH.
(cd / && "$PY" -c "import maskkern; assert maskkern.__file__.startswith('$OUT/pkg'), maskkern.__file__")
# The pytest script, not `python -m pytest`, which would put the cwd (the checkout) first on sys.path.
"$(dirname "$PY")/pytest" tests -p no:cacheprovider --import-mode=append \
  -k "(cpu-cpu or native or cpu]) and not torch-cpu] and not triton-cpu] and not triton]" ${PYTEST_ARGS:-}
