"""Triton kernels of maskkern.pad_embedding: a row gather forward and a deterministic dense
backward.

The caller (maskkern/ops/pad_embedding.py) passes ids (N,) int32/int64 contiguous, weight (V, D)
with unit column stride, grad (N, D) contiguous and ``pad`` = -1 (none) or an id in [0, V).

Forward: a (tokens x columns) tile per program; a token's row is loaded only when its id is in
range and, under zero_pad, not the pad — every other lane reads nothing and stores zeros. Without a
scale the loaded values are stored as they are (bit-exact); with one they are multiplied in fp32
(fp64 for fp64) and rounded once, as eager does.

Backward: the launcher sorts the token positions by id (stable, so a row's tokens stay in token
order; pad and out-of-range ids are keyed past the last row) and finds each row's segment with a
binary search. One program per (row, column block) then owns that piece of grad_weight: it sums its
tokens' grad rows in fp32 (fp64) in order and writes the piece once (zeros for a row without
tokens). No atomics: the same bits on every run.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import cast_out, compute_dtype, num_warps

# Elements per program of the forward tile; columns per program of both kernels (a longer row is
# split over several programs along axis 1).
TILE = 4096
MAX_BLOCK_D = 1024


@triton.jit
def _fwd_kernel(
    out_ptr,  # (N, D) contiguous, weight's dtype
    ids_ptr,  # (N,) int32/int64
    weight_ptr,  # (V, D), unit column stride
    stride_w,  # weight.stride(0), in elements
    scale: tl.float64,  # multiplies the output (used when HAS_SCALE)
    N,  # tokens
    V,  # rows of weight: ids outside [0, V) read nothing and give zeros
    D,  # columns
    pad,  # the pad id, or -1
    ZERO_PAD: tl.constexpr,  # pad positions give zeros without reading the weight
    HAS_SCALE: tl.constexpr,  # scale != 1
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    BLOCK_N: tl.constexpr,  # tokens per program (power of two)
    BLOCK_D: tl.constexpr,  # columns per program (power of two)
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    ids = tl.load(ids_ptr + n, mask=n_ok, other=-1).to(tl.int64)
    read = n_ok & (ids >= 0) & (ids < V)
    if ZERO_PAD:
        read = read & (ids != pad)
    d_ok = d < D
    x = tl.load(
        weight_ptr + ids[:, None] * stride_w + d[None, :], mask=read[:, None] & d_ok[None, :], other=0
    )
    if HAS_SCALE:
        # Eager multiplies fp16/bf16/fp32 by the scale rounded to fp32, fp64 by the fp64 scale.
        x = cast_out(x.to(COMPUTE) * tl.full([], scale, COMPUTE), out_ptr.dtype.element_ty)
    tl.store(out_ptr + n[:, None] * D + d[None, :], x, mask=n_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_kernel(
    grad_weight_ptr,  # (V, D) contiguous, grad's dtype
    grad_ptr,  # (N, D) contiguous
    order_ptr,  # int64 (N,): token positions sorted by id, pad/out-of-range ones last
    starts_ptr,  # int64 (V + 1,): row r's tokens are order[starts[r] .. starts[r + 1])
    scale: tl.float64,  # multiplies every row's sum
    D,  # columns
    FREQ: tl.constexpr,  # scale_grad_by_freq: divide a row's sum by its token count
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    BLOCK_D: tl.constexpr,  # columns per program (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    begin = tl.load(starts_ptr + row)
    end = tl.load(starts_ptr + row + 1)
    acc = tl.zeros([BLOCK_D], dtype=COMPUTE)
    for k in range(begin, end):
        token = tl.load(order_ptr + k)
        acc += tl.load(grad_ptr + token * D + d, mask=d_ok, other=0).to(COMPUTE)
    factor = tl.full([], scale, COMPUTE)
    if FREQ:
        factor = factor / tl.maximum(end - begin, 1).to(COMPUTE)
    tl.store(
        grad_weight_ptr + row * D + d, cast_out(acc * factor, grad_weight_ptr.dtype.element_ty), mask=d_ok
    )


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D)


def pad_embedding_fwd(ids: Tensor, weight: Tensor, pad: int, zero_pad: bool, scale: float) -> Tensor:
    """out (N, D) = weight[ids] * scale; zeros for out-of-range ids and, with ``zero_pad``, pads."""
    N, (V, D) = ids.shape[0], weight.shape
    out = torch.empty((N, D), dtype=weight.dtype, device=weight.device)
    block_d = _block_d(D)
    block_n = max(1, min(TILE // block_d, triton.next_power_of_2(N)))
    grid = (triton.cdiv(N, block_n), triton.cdiv(D, block_d))
    _fwd_kernel[grid](
        out,
        ids,
        weight,
        weight.stride(0),
        scale,
        N,
        V,
        D,
        pad,
        ZERO_PAD=zero_pad,
        HAS_SCALE=scale != 1.0,
        COMPUTE=compute_dtype(weight.dtype),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps(block_n * block_d),
    )
    return out


def pad_embedding_bwd(
    grad: Tensor, ids: Tensor, num_weights: int, pad: int, scale_grad_by_freq: bool, scale: float
) -> Tensor:
    """Dense grad_weight (V, D): per row the in-order sum of its tokens' grad rows, times scale
    (and 1 / count with ``scale_grad_by_freq``); pad and out-of-range ids contribute nothing."""
    D = grad.shape[1]
    grad_weight = torch.empty((num_weights, D), dtype=grad.dtype, device=grad.device)
    if num_weights == 0:
        return grad_weight
    ids = ids.long()
    counted = (ids >= 0) & (ids < num_weights) & (ids != pad)
    keys, order = torch.sort(torch.where(counted, ids, num_weights), stable=True)
    rows = torch.arange(num_weights + 1, device=ids.device)
    starts = torch.searchsorted(keys, rows)
    block_d = _block_d(D)
    _bwd_kernel[(num_weights, triton.cdiv(D, block_d))](
        grad_weight,
        grad,
        order,
        starts,
        scale,
        D,
        FREQ=scale_grad_by_freq,
        COMPUTE=compute_dtype(grad.dtype),
        BLOCK_D=block_d,
        num_warps=num_warps(block_d),
    )
    return grad_weight
