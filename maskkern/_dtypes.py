"""The dtypes maskkern's ops take and the one their math runs in: shared by the ops, the reference
and the Triton launchers, with no imports of their own (no cycles)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp64 for fp64 data, fp32 otherwise (half arithmetic loses too
    much, and is wrong under the Triton interpreter)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
