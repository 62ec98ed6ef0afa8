#!/usr/bin/env bash
# A portable build: `pip wheel --no-build-isolation .` gives a wheel that installs in a fresh venv
# and passes a smoke test natively and on an emulated CPU without AVX-512 (qemu-x86_64 -cpu
# EPYC-Rome: Zen 2, AVX2; and Westmere, no AVX), where the avx2 (default) build of the CPU kernels
# must be the one loaded.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source scripts/env.sh
OUT="$ROOT/build/portable"
rm -rf "$OUT/wheel" "$OUT/venv"
mkdir -p "$OUT"

echo "[portable] building the wheel (log: $OUT/wheel.log)" >&2
if ! "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$OUT/wheel" . >"$OUT/wheel.log" 2>&1; then
  cat "$OUT/wheel.log" >&2
  exit 1
fi
WHEEL="$(ls "$OUT"/wheel/maskkern-*.whl)"
echo "[portable] $(basename "$WHEEL"): $(unzip -l "$WHEEL" | grep -c '\.so$') native libraries" >&2

TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
python3 -m venv "$OUT/venv"
"$OUT/venv/bin/pip" install -q "torch==$TORCH_VERSION" numpy >&2
"$OUT/venv/bin/pip" install -q --no-deps "$WHEEL" >&2

# Each op once against its eager reference, fwd + bwd, on the cpu backend.
SMOKE='
import sys
import torch
import maskkern as mk
from maskkern import reference
from maskkern._backend import cpu_capability

want = sys.argv[1]
assert cpu_capability() == want, (cpu_capability(), want)
torch.manual_seed(0)
q, k, v = (torch.randn(2, 4, 70, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
lengths = torch.tensor([33, 70])
out = mk.attention(q, k, v, lengths=lengths, causal=True, backend="cpu")
ref = reference.attention(q, k, v, lengths=lengths, causal=True)
torch.testing.assert_close(out, ref)
torch.testing.assert_close(torch.autograd.grad(out.sum(), q), torch.autograd.grad(ref.sum(), q))
s = torch.randn(2, 3, 9, 40)
torch.testing.assert_close(
    mk.masked_softmax(s, lengths=torch.tensor([5, 40]), causal=True, backend="cpu"),
    reference.masked_softmax(s, lengths=torch.tensor([5, 40]), causal=True),
)
x, t = torch.randn(64, 1000), torch.randint(0, 1000, (64,))
torch.testing.assert_close(mk.masked_cross_entropy(x, t, backend="cpu"), torch.nn.functional.cross_entropy(x, t))
w, ids = torch.randn(100, 48), torch.randint(0, 100, (8, 9))
torch.testing.assert_close(mk.pad_embedding(ids, w, 0, backend="cpu"), torch.nn.functional.embedding(ids, w, 0))
print("smoke ok on", want)
'
NATIVE="$("$OUT/venv/bin/python" -c 'import torch; c = torch.backends.cpu.get_cpu_capability().lower(); print(c if c in ("avx2", "avx512") else "default")')"
(cd / && "$OUT/venv/bin/python" -c "$SMOKE" "$NATIVE")
if [ "$(uname -m)" = x86_64 ]; then
  if ! command -v qemu-x86_64 >/dev/null; then
    echo "[portable] qemu-x86_64 missing: apt-get install qemu-user" >&2
    exit 1
  fi
  # qemu's TCG lists the EPYC-Rome features it cannot emulate (none of them vector ones).
  (cd / && qemu-x86_64 -cpu EPYC-Rome "$OUT/venv/bin/python" -c "$SMOKE" avx2 2> >(grep -v "TCG doesn't support" >&2))
  # And a CPU without AVX at all (Westmere: SSE4.2), where only the baseline build runs.
  (cd / && qemu-x86_64 -cpu Westmere "$OUT/venv/bin/python" -c "$SMOKE" default 2> >(grep -v "TCG doesn't support" >&2))
fi
echo "[portable] ok" >&2
