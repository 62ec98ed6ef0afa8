"""Helpers shared by the op tests: which backends run on which device, per-dtype tolerances."""

from __future__ import annotations

import pytest
import torch

import maskkern
from maskkern._backend import triton_interpreting

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# (rtol, atol) of an op's output against the reference computed in fp32/fp64 and rounded once.
# bf16 allows 2 ulp: the Triton interpreter truncates fp32 -> bf16 instead of rounding.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}

# The Triton interpreter computes inf - inf with numpy, which warns; that NaN is what is tested.
INF_MINUS_INF = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")


def available_backends(device: str) -> list[str]:
    """The backends that run on ``device`` here (triton on CPU only under TRITON_INTERPRET=1)."""
    status = maskkern.backends()
    ok = {name for name, s in status.items() if s.available}
    if device == "cuda":
        candidates = ["triton", "cuda", "torch"]
    else:  # Triton runs CPU tensors only in its interpreter (on a GPU machine it is off)
        candidates = ["cpu", "torch"] + (["triton"] if triton_interpreting() else [])
    return [b for b in candidates if b in ok]


def backend_device_params() -> list[tuple[str, str]]:
    """(backend, device) pairs for parametrize: every backend on every device it can serve."""
    return [(b, d) for d in DEVICES for b in available_backends(d)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=True)
