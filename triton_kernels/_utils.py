"""Launch heuristics shared by the row-wise Triton kernels (a row = the last dim of a tensor).

One config per shape, no autotuning: under TRITON_INTERPRET=1 autotuning over several configs fails
on CPU, and on a GPU these kernels are memory-bound, where the block size matters far more than the
tuning knobs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from .._dtypes import compute_dtype as torch_compute_dtype

# A row held whole in registers: 64 KiB of compute values (16384 fp32, 8192 fp64) across 16 warps is
# 32 registers of data per thread. At this cap ptxas (sm_90; Triton 3.6 and 3.9) gives the
# masked-softmax forward 55-84 registers and the backward 96-112, with no spill (`make
# triton-compile`); the looped kernel would read the row twice. Longer rows are processed in chunks
# of this size by a looped kernel.
MAX_ROW_BYTES = 64 * 1024
# Short rows are packed several to a program up to this many elements, so that a program has
# enough independent loads in flight to cover memory latency.
ROWS_TILE = 2048
# About 8 elements per thread: 16 bytes of fp16 / 32 of fp32 per thread per load.
ELEMENTS_PER_WARP = 256


def compute_dtype(dtype: torch.dtype) -> tl.dtype:
    """maskkern._dtypes.compute_dtype as a Triton dtype: the COMPUTE of the kernels."""
    return tl.float64 if torch_compute_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def safe_max(m):
    """What a row is shifted by before exp: its max, or 0 while everything so far is -inf, where
    exp(-inf - -inf) would be NaN (exp(-inf - 0) = 0)."""
    return tl.where(m == float("-inf"), 0.0, m)


def row_block(n_cols: int, dtype: torch.dtype) -> tuple[int, bool]:
    """(BLOCK, fits): the block covering a row of ``n_cols`` when that fits in registers (fits=True),
    else the chunk size of the looped kernel (fits=False)."""
    cap = MAX_ROW_BYTES // (8 if dtype == torch.float64 else 4)
    block = triton.next_power_of_2(max(n_cols, 1))
    return (block, True) if block <= cap else (cap, False)


def rows_per_program(block: int, n_rows: int) -> int:
    """How many rows of ``block`` columns one program handles (a power of two)."""
    return max(1, min(ROWS_TILE // block, triton.next_power_of_2(n_rows)))


def num_warps(tile_elements: int) -> int:
    """Warps for a program working on ``tile_elements`` values at once (1 to 16)."""
    return min(16, max(1, triton.next_power_of_2(tile_elements) // ELEMENTS_PER_WARP))


# The interpreter casts fp32 -> bf16 by truncation (up to 1 ulp off, e.g. 0.9996 -> 0.9961 rather
# than 1.0) where a GPU rounds to nearest even; in a softmax backward, Y * (1 - Y) amplifies that.
_ROUND_BF16_BY_HAND = tl.constexpr(triton_interpreting())


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounded to nearest even, also for bf16 under the interpreter."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        # A NaN keeps its high half with the quiet bit set: rounding (or truncating) one whose
        # payload sits in the low half would make it inf.
        bits = tl.where(x != x, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
