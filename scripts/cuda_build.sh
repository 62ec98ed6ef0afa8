#!/usr/bin/env bash
# `make cuda-build`: compile and link maskkern._C with its CUDA sources against a CUDA build of torch,
# on a machine with nvcc but no GPU (CI). Nothing CUDA runs: the .so is only loaded, to prove that it
# links and registers its CUDA kernels.
#
# The CUDA torch lives in its own venv (.venv-cuda, created once and reused) and the build goes to
# build/cuda-temp + build/cuda-lib, so the in-place CPU build everyone uses (maskkern/_C*.so and the
# default build/temp.*) is never touched.
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0: the H100/H200
# test machines; one arch keeps a 2-core compile short), MAX_JOBS (default 2), CUDA_TORCH (the pip
# requirement of the CUDA torch, default torch==2.14.1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv-cuda"
CUDA_TORCH="${CUDA_TORCH:-torch==2.14.1}"
TEMP_DIR="$ROOT/build/cuda-temp"
LIB_DIR="$ROOT/build/cuda-lib"

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "[cuda-build] no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi

# Reuse the venv only when its torch really is a CUDA build: a half-finished install (interrupted
# pip) must not count as done.
torch_is_cuda() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c \
    "import torch, sys; sys.exit(torch.version.cuda is None)" >/dev/null 2>&1
}
if ! torch_is_cuda; then
  echo "[cuda-build] creating $VENV with $CUDA_TORCH (several GB, about a minute)" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  # setuptools: Python >= 3.12 venvs no longer ship it, and setup.py needs it.
  "$VENV/bin/pip" install -q "$CUDA_TORCH" numpy ninja setuptools >&2
  torch_is_cuda || { echo "[cuda-build] $CUDA_TORCH in $VENV is not a CUDA build" >&2; exit 1; }
fi
PY="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"  # ninja

if ! source "$ROOT/scripts/cuda_headers.sh"; then  # this machine's toolkit lacks some of them
  echo "[cuda-build] no nvidia/cu*/include in $VENV's site-packages" >&2
  exit 1
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MASKKERN_CUDA=1
export MASKKERN_CPU_CAPABILITIES=default  # the CPU levels are built by the CPU build; one is enough here
export MAX_JOBS="${MAX_JOBS:-2}"

echo "[cuda-build] torch $("$PY" -c 'import torch; print(torch.__version__)'), nvcc $CUDA_HOME," \
  "arch $TORCH_CUDA_ARCH_LIST, CPATH=$CPATH" >&2
# Incremental (ninja under build/cuda-temp); any compile or link error fails the script (set -e).
mkdir -p "$TEMP_DIR"
"$PY" setup.py -q build_ext --build-temp "$TEMP_DIR" --build-lib "$LIB_DIR" 2>&1 | tee "$TEMP_DIR/build.log"
# Warnings in our own sources (not torch's headers) are listed, not fatal: they are worth fixing.
if grep -E "csrc/[^ ]*(:[0-9]+:[0-9]+: |\([0-9]+\): )warning" "$TEMP_DIR/build.log"; then
  echo "[cuda-build] ^ compiler warnings in csrc/" >&2
fi

SO="$(ls "$LIB_DIR"/maskkern/_C*.so)"
echo "[cuda-build] built $SO"

# Loading it resolves every symbol now (ctypes dlopens with RTLD_NOW) and runs the static
# registrations; no CUDA device is needed for either.
"$PY" - "$SO" <<'EOF'
import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = sorted(
    name
    for name in torch._C._dispatch_get_all_op_names()
    if name.startswith("maskkern::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
)
print("[cuda-build] links and loads; CUDA kernels registered:", ", ".join(ops) or "none")
EOF
