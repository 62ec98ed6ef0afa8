"""What maskkern's tests and benchmarks hold every op to, in one place."""

from __future__ import annotations

import torch

# (rtol, atol) of an op's output against the reference computed in fp32/fp64 and rounded once.
# bf16 allows 2 ulp: the Triton interpreter truncates fp32 -> bf16 instead of rounding.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}
