"""Triton kernels of maskkern.masked_softmax: forward and backward, rows of any length.

The caller (maskkern/ops/masked_softmax.py) passes scores / grad / out as contiguous (B, H, Lq, Lk);
a row is one query (b, h, i), flattened as row = (b * H + h) * Lq + i. lengths, query_lengths and
causal only ever cut a row down to its first ``extent`` keys:

    extent = min(Lk, lengths[b], i + 1 (top-left) or i + 1 + Lk - Lq (bottom-right)),
            0 when i >= query_lengths[b]

so nothing at or past ``extent`` is loaded; it is written as zeros. A bool (True = keep) or additive
mask is read through its 4 strides (0 on broadcast dims), never expanded, and only inside ``extent``.

A row whose block fits in registers is done in one read and one write, several short rows per
program (``_fwd_rows_kernel``). A longer row is done in chunks with an online softmax: one pass for
the max and the sum, one pass for the output (``_fwd_long_kernel``). The backward kernels have the
same two shapes. The math runs in fp32 (fp64 for fp64 data); a row with nothing kept is all zeros.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._utils import cast_out, compute_dtype, num_warps, row_block, rows_per_program, safe_max

# --- shared pieces of the kernels ---------------------------------------------------------------


@triton.jit
def _row_extent(rows, row_ok, H, Lq, Lk, lengths_ptr, qlens_ptr, CAUSAL, HAS_LENGTHS, HAS_QLENS):
    """(b, h, i, extent) of flat row indices (b * H + h) * Lq + i, the first three as int64 (ready to
    multiply by strides); extent = the count of leading keys a row may see, 0 where not ``row_ok``
    (so that all its loads are masked off)."""
    bh = rows // Lq
    i = (rows % Lq).to(tl.int64)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    extent = tl.where(row_ok, Lk, 0).to(tl.int64)
    if HAS_LENGTHS:
        extent = tl.minimum(extent, tl.load(lengths_ptr + b, mask=row_ok, other=0))
    if CAUSAL == 1:
        extent = tl.minimum(extent, i + 1)
    if CAUSAL == 2:
        extent = tl.minimum(extent, i + (Lk - Lq + 1))
    if HAS_QLENS:
        extent = tl.where(i < tl.load(qlens_ptr + b, mask=row_ok, other=0), extent, 0)
    return b, h, i, tl.maximum(extent, 0)


@triton.jit
def _load_logits(scores_ptr, offs, mask_ptr, mask_offs, keep, scale, MASK_KIND, COMPUTE):
    """scores * scale (+ additive mask) in COMPUTE, -inf where ``keep`` (the in-row part) is False
    or the bool mask says drop. Only ``keep`` positions are loaded."""
    z = tl.load(scores_ptr + offs, mask=keep, other=0.0).to(COMPUTE) * scale
    if MASK_KIND == 1:
        keep = keep & (tl.load(mask_ptr + mask_offs, mask=keep, other=0) != 0)
    if MASK_KIND == 2:
        z += tl.load(mask_ptr + mask_offs, mask=keep, other=0.0).to(COMPUTE)
    # A select, not an other=-inf load: a negative or zero scale would turn -inf into +inf or NaN.
    return tl.where(keep, z, float("-inf"))


# --- forward ------------------------------------------------------------------------------------


@triton.jit
def _fwd_rows_kernel(
    out_ptr,  # (B, H, Lq, Lk) contiguous, scores' dtype: the softmax
    scores_ptr,  # (B, H, Lq, Lk) contiguous
    mask_ptr,  # bool keep-mask or additive mask of scores' dtype, (B, H, Lq, Lk) via strides; or None
    smb,  # mask stride of b, in elements (0 where broadcast)
    smh,  # mask stride of h
    smq,  # mask stride of i
    smk,  # mask stride of the key index
    lengths_ptr,  # int64 (B,) key counts, or None
    qlens_ptr,  # int64 (B,) query counts, or None
    scale: tl.float64,  # multiplies the scores; fp64 so that fp64 data is scaled exactly
    n_rows,  # B * H * Lq
    H,  # heads (all dims between batch and Lq)
    Lq,  # queries per (b, h)
    Lk,  # keys per row
    CAUSAL: tl.constexpr,  # 0 none, 1 top-left, 2 bottom-right
    HAS_LENGTHS: tl.constexpr,  # lengths_ptr is a tensor
    HAS_QLENS: tl.constexpr,  # qlens_ptr is a tensor
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    BLOCK: tl.constexpr,  # power of two >= Lk: a whole row
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool keep-mask, 2 additive
    ROWS: tl.constexpr,  # rows per program (power of two)
    IDX: tl.constexpr,  # tl.int32 when every row index fits: 32-bit division is much cheaper
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    b, h, i, extent = _row_extent(
        rows.to(IDX), row_ok, H, Lq, Lk, lengths_ptr, qlens_ptr, CAUSAL, HAS_LENGTHS, HAS_QLENS
    )
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * Lk + cols[None, :]
    mask_offs = (b * smb + h * smh + i * smq)[:, None] + cols[None, :].to(tl.int64) * smk
    keep = cols[None, :] < extent[:, None]
    z = _load_logits(
        scores_ptr, offs, mask_ptr, mask_offs, keep, tl.full([], scale, COMPUTE), MASK_KIND, COMPUTE
    )

    e = tl.exp(z - safe_max(tl.max(z, axis=1))[:, None])
    s = tl.sum(e, axis=1)[:, None]
    # s == 0 only where every e is 0 (nothing kept): divide by 1 there, giving zeros, not NaN.
    y = e / tl.where(s == 0, 1.0, s)
    tl.store(
        out_ptr + offs, cast_out(y, out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < Lk)
    )


@triton.jit
def _fwd_long_kernel(
    out_ptr,  # (B, H, Lq, Lk) contiguous, scores' dtype: the softmax
    scores_ptr,  # (B, H, Lq, Lk) contiguous
    mask_ptr,  # bool keep-mask or additive mask of scores' dtype, (B, H, Lq, Lk) via strides; or None
    smb,  # mask stride of b, in elements (0 where broadcast)
    smh,  # mask stride of h
    smq,  # mask stride of i
    smk,  # mask stride of the key index
    lengths_ptr,  # int64 (B,) key counts, or None
    qlens_ptr,  # int64 (B,) query counts, or None
    scale: tl.float64,  # multiplies the scores; fp64 so that fp64 data is scaled exactly
    n_rows,  # B * H * Lq (the grid: one row per program)
    H,  # heads (all dims between batch and Lq)
    Lq,  # queries per (b, h)
    Lk,  # keys per row
    CAUSAL: tl.constexpr,  # 0 none, 1 top-left, 2 bottom-right
    HAS_LENGTHS: tl.constexpr,  # lengths_ptr is a tensor
    HAS_QLENS: tl.constexpr,  # qlens_ptr is a tensor
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    BLOCK: tl.constexpr,  # chunk of a row (power of two, < Lk); one row per program
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool keep-mask, 2 additive
):
    row = tl.program_id(0).to(tl.int64)
    b, h, i, extent = _row_extent(
        row, True, H, Lq, Lk, lengths_ptr, qlens_ptr, CAUSAL, HAS_LENGTHS, HAS_QLENS
    )
    cols = tl.arange(0, BLOCK)
    base = row * Lk
    mask_base = b * smb + h * smh + i * smq
    scale = tl.full([], scale, COMPUTE)

    # Pass 1 over the extent only: running max m and sum s of exp(z - m).
    m = tl.full([], float("-inf"), COMPUTE)
    s = tl.zeros([], COMPUTE)
    for start in range(0, extent, BLOCK):
        k = start + cols
        z = _load_logits(
            scores_ptr,
            base + k,
            mask_ptr,
            mask_base + k.to(tl.int64) * smk,
            k < extent,
            scale,
            MASK_KIND,
            COMPUTE,
        )
        m_new = tl.maximum(m, tl.max(z, axis=0))
        shift = safe_max(m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new

    # Pass 2 over the whole row: the masked tail is written as zeros without being loaded.
    shift = safe_max(m)
    s = tl.where(s == 0, 1.0, s)  # nothing kept: every exp() below is 0, so the row is zeros
    for start in range(0, Lk, BLOCK):
        k = start + cols
        z = _load_logits(
            scores_ptr,
            base + k,
            mask_ptr,
            mask_base + k.to(tl.int64) * smk,
            k < extent,
            scale,
            MASK_KIND,
            COMPUTE,
        )
        y = tl.exp(z - shift) / s
        tl.store(out_ptr + base + k, cast_out(y, out_ptr.dtype.element_ty), mask=k < Lk)


# --- backward: dX = scale * Y * (dY - sum(Y * dY)) -----------------------------------------------


@triton.jit
def _bwd_rows_kernel(
    dx_ptr,  # (B, H, Lq, Lk) contiguous, out's dtype: the gradient of the scores
    grad_ptr,  # (B, H, Lq, Lk) contiguous: dY
    out_ptr,  # (B, H, Lq, Lk) contiguous: Y, the forward's output
    lengths_ptr,  # int64 (B,) key counts, or None
    qlens_ptr,  # int64 (B,) query counts, or None
    scale: tl.float64,  # the forward's scale
    n_rows,  # B * H * Lq
    H,  # heads (all dims between batch and Lq)
    Lq,  # queries per (b, h)
    Lk,  # keys per row
    CAUSAL: tl.constexpr,  # 0 none, 1 top-left, 2 bottom-right
    HAS_LENGTHS: tl.constexpr,  # lengths_ptr is a tensor
    HAS_QLENS: tl.constexpr,  # qlens_ptr is a tensor
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    BLOCK: tl.constexpr,  # power of two >= Lk: a whole row
    ROWS: tl.constexpr,  # rows per program (power of two)
    IDX: tl.constexpr,  # tl.int32 when every row index fits: 32-bit division is much cheaper
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    _, _, _, extent = _row_extent(
        rows.to(IDX), row_ok, H, Lq, Lk, lengths_ptr, qlens_ptr, CAUSAL, HAS_LENGTHS, HAS_QLENS
    )
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * Lk + cols[None, :]
    keep = cols[None, :] < extent[:, None]
    # Y is 0 past extent, so dX is too: those positions are not loaded.
    y = tl.load(out_ptr + offs, mask=keep, other=0.0).to(COMPUTE)
    g = tl.load(grad_ptr + offs, mask=keep, other=0.0).to(COMPUTE)
    dot = tl.sum(y * g, axis=1)[:, None]
    dx = tl.full([], scale, COMPUTE) * y * (g - dot)
    tl.store(
        dx_ptr + offs, cast_out(dx, dx_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < Lk)
    )


@triton.jit
def _bwd_long_kernel(
    dx_ptr,  # (B, H, Lq, Lk) contiguous, out's dtype: the gradient of the scores
    grad_ptr,  # (B, H, Lq, Lk) contiguous: dY
    out_ptr,  # (B, H, Lq, Lk) contiguous: Y, the forward's output
    lengths_ptr,  # int64 (B,) key counts, or None
    qlens_ptr,  # int64 (B,) query counts, or None
    scale: tl.float64,  # the forward's scale
    n_rows,  # B * H * Lq (the grid: one row per program)
    H,  # heads (all dims between batch and Lq)
    Lq,  # queries per (b, h)
    Lk,  # keys per row
    CAUSAL: tl.constexpr,  # 0 none, 1 top-left, 2 bottom-right
    HAS_LENGTHS: tl.constexpr,  # lengths_ptr is a tensor
    HAS_QLENS: tl.constexpr,  # qlens_ptr is a tensor
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    BLOCK: tl.constexpr,  # chunk of a row (power of two, < Lk); one row per program
):
    row = tl.program_id(0).to(tl.int64)
    _, _, _, extent = _row_extent(
        row, True, H, Lq, Lk, lengths_ptr, qlens_ptr, CAUSAL, HAS_LENGTHS, HAS_QLENS
    )
    cols = tl.arange(0, BLOCK)
    base = row * Lk

    # Pass 1 over the extent only; a per-lane accumulator, summed once, loses less to rounding.
    acc = tl.zeros([BLOCK], COMPUTE)
    for start in range(0, extent, BLOCK):
        k = start + cols
        y = tl.load(out_ptr + base + k, mask=k < extent, other=0.0).to(COMPUTE)
        g = tl.load(grad_ptr + base + k, mask=k < extent, other=0.0).to(COMPUTE)
        acc += y * g
    dot = tl.sum(acc, axis=0)

    # Pass 2 over the whole row: the masked tail is written as zeros without being loaded.
    scale = tl.full([], scale, COMPUTE)
    for start in range(0, Lk, BLOCK):
        k = start + cols
        y = tl.load(out_ptr + base + k, mask=k < extent, other=0.0).to(COMPUTE)
        g = tl.load(grad_ptr + base + k, mask=k < extent, other=0.0).to(COMPUTE)
        tl.store(dx_ptr + base + k, cast_out(scale * y * (g - dot), dx_ptr.dtype.element_ty), mask=k < Lk)


# --- launchers ----------------------------------------------------------------------------------


def _launch(
    rows_kernel: triton.JITFunction,
    long_kernel: triton.JITFunction,
    tensor_args: tuple,
    like: Tensor,
    lengths: Tensor | None,
    query_lengths: Tensor | None,
    causal: int,
    scale: float,
    **meta: object,
) -> None:
    """Runs ``rows_kernel`` (several whole rows per program) when a row of ``like`` (B, H, Lq, Lk)
    fits in registers, else ``long_kernel`` (one row per program, in chunks). Both take
    ``tensor_args`` first, then the row geometry."""
    B, H, Lq, Lk = like.shape
    n_rows = B * H * Lq
    # The kernels index lengths[b] as contiguous: a strided view (a sliced int64 lengths) is
    # copied, as the C++ kernels do.
    lengths = None if lengths is None else lengths.contiguous()
    query_lengths = None if query_lengths is None else query_lengths.contiguous()
    block, fits = row_block(Lk, like.dtype)
    args = (*tensor_args, lengths, query_lengths, scale, n_rows, H, Lq, Lk)
    meta |= {
        "CAUSAL": causal,
        "HAS_LENGTHS": lengths is not None,
        "HAS_QLENS": query_lengths is not None,
        "COMPUTE": compute_dtype(like.dtype),
        "BLOCK": block,
    }
    if fits:
        rows = rows_per_program(block, n_rows)
        idx = tl.int32 if n_rows + rows <= 2**31 else tl.int64
        grid = (triton.cdiv(n_rows, rows),)
        rows_kernel[grid](*args, ROWS=rows, IDX=idx, num_warps=num_warps(rows * block), **meta)
    else:
        long_kernel[(n_rows,)](*args, num_warps=num_warps(block), **meta)


def masked_softmax_fwd(
    scores: Tensor,
    mask: Tensor | None,
    lengths: Tensor | None,
    query_lengths: Tensor | None,
    causal: int,
    scale: float,
) -> Tensor:
    """Masked softmax over the last dim of contiguous (B, H, Lq, Lk) ``scores``.

    ``mask``: None, or a (B, H, Lq, Lk) strided view, bool (True = keep) or additive of scores'
    dtype. ``lengths`` / ``query_lengths``: None or int64 (B,), values >= 0. ``causal``: 0 none,
    1 top-left, 2 bottom-right. Returns a new contiguous tensor of scores' dtype.
    """
    out = torch.empty_like(scores)
    if mask is None:
        mask_args, kind = (None, 0, 0, 0, 0), 0
    else:
        mask_args, kind = (mask, *mask.stride()), 1 if mask.dtype == torch.bool else 2
    _launch(
        _fwd_rows_kernel,
        _fwd_long_kernel,
        (out, scores, *mask_args),
        scores,
        lengths,
        query_lengths,
        causal,
        scale,
        MASK_KIND=kind,
    )
    return out


def masked_softmax_bwd(
    grad: Tensor,
    out: Tensor,
    mask: Tensor | None,
    lengths: Tensor | None,
    query_lengths: Tensor | None,
    causal: int,
    scale: float,
) -> Tensor:
    """dX = scale * Y * (dY - sum(Y * dY)) for contiguous (B, H, Lq, Lk) ``grad`` = dY and
    ``out`` = Y; the tail cut off by lengths / causal / query_lengths is written as zeros unread
    (``mask``, the forward's, is not used here: the rows are read up to that extent).
    Returns a new contiguous tensor of out's dtype."""
    dx = torch.empty_like(out)
    _launch(_bwd_rows_kernel, _bwd_long_kernel, (dx, grad, out), out, lengths, query_lengths, causal, scale)
    return dx
