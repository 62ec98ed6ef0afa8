# Sourced by the Makefile: sets PY to a Python that has torch, triton, numpy, ninja and pytest,
# creating .venv on a fresh machine, and builds maskkern._C in place (incremental, ninja).
# A machine that already has torch + triton (e.g. a GPU box with no network) uses them as they are.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
DEPS="torch==2.13.0 triton>=3.4 numpy ninja pytest hypothesis ruff clang-format matplotlib tqdm transformers==5.24.0"

if [ -x "$VENV/bin/python" ]; then
  PY="$VENV/bin/python"
elif python3 -c "import torch, triton" >/dev/null 2>&1; then
  PY="$(command -v python3)"
else
  echo "[env] creating $VENV with: $DEPS" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q $DEPS >&2
  PY="$VENV/bin/python"
fi
export PY
export PATH="$(dirname "$PY"):$PATH"  # ruff, clang-format from the same environment

# Checked from / so that the checkout itself (the cwd) does not count as an installation.
if ! (cd / && "$PY" -c "import maskkern.triton_kernels") >/dev/null 2>&1 || [ "${MASKKERN_REINSTALL:-0}" = 1 ]; then
  echo "[env] installing maskkern (editable) into $PY" >&2
  (cd "$ROOT" && MASKKERN_SKIP_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2)
fi
# The editable install points at the checkout; rebuilding in place picks up csrc/ changes.
# flock: several builds at once (parallel shells) would race on build/ and the .so.
# The compiler's output goes to build/build.log, shown only when the build fails.
mkdir -p "$ROOT/build"
# (Written under the lock: a second build waiting for it must not truncate the first one's log.)
if ! (cd "$ROOT" && MAX_JOBS="${MAX_JOBS:-2}" flock "$ROOT/build.lock" \
  bash -c '"$1" setup.py -q build_ext --inplace >"$2" 2>&1' _ "$PY" "$ROOT/build/build.log"); then
  cat "$ROOT/build/build.log" >&2
  echo "[env] building maskkern._C failed (log: build/build.log)" >&2
  false
fi
