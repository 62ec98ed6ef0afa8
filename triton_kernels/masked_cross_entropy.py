"""Triton kernels of maskkern.masked_cross_entropy: per-row loss, logsumexp and logits gradient
(forward), and the backward's in-place scale of that gradient by the incoming one.

The caller (maskkern/ops/masked_cross_entropy.py) passes logits (N, C) with class stride 1, int64
targets, a bool ``valid`` per row and the reduction's gradient scales; the contract is the same as
the C++ kernels' (csrc/maskkern.cpp). One program per row, in chunks of BLOCK classes:

- a row that does not count is never read: ce = lse = 0 and, with a gradient, a row of zeros;
- pass 1: online max and sum of exp (and, with label smoothing, sum of w_c and of w_c * x_c);
- pass 2: the gradient p_c * coef - s_ce * eps/C * w_c, minus s_ce * (1-eps) * w_y at the target,
  subtracted in fp32 before the one rounding to the logits' dtype (Liger PR #1329's bug).

The gradient may be written over the logits themselves (the caller's own copy): each chunk is
loaded before it is overwritten. Math in fp32 (fp64 for fp64 data); row offsets are int64.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._dtypes import compute_dtype as torch_compute_dtype
from ._utils import cast_out, compute_dtype, num_warps, row_block, safe_max


@triton.jit
def _cross_entropy_kernel(
    ce_ptr,  # (N,) COMPUTE out: the row's cross-entropy (smoothing, class weight in), 0 if not counted
    lse_ptr,  # (N,) COMPUTE out: the row's logsumexp, 0 if not counted
    grad_ptr,  # (N, C) contiguous, logits' dtype, out (may be logits_ptr itself), or None
    logits_ptr,  # (N, C), class stride 1
    target_ptr,  # (N,) int64 class indices
    valid_ptr,  # (N,) bool: the row counts
    weight_ptr,  # (C,) COMPUTE class weights, or None
    scale_ptr,  # (2,) COMPUTE (s_ce, s_z): scales of the CE and z-loss parts of the gradient, or None
    row_stride,  # logits' stride between rows, in elements
    C,  # classes per row
    smoothing: tl.float64,  # label_smoothing in [0, 1]; fp64 so that fp64 data sees it exactly
    z_loss: tl.float64,  # coefficient of lse^2 in the gradient
    HAS_WEIGHT: tl.constexpr,  # weight_ptr is a tensor
    HAS_SCALE: tl.constexpr,  # scale_ptr is a tensor (else s_ce = s_z = 1)
    HAS_GRAD: tl.constexpr,  # grad_ptr is a tensor
    SMOOTH: tl.constexpr,  # smoothing > 0
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    BLOCK: tl.constexpr,  # classes per chunk (power of two)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x_row = logits_ptr + row * row_stride
    t = tl.load(target_ptr + row)
    counted = tl.load(valid_ptr + row) != 0
    if not counted:
        tl.store(ce_ptr + row, tl.zeros([], COMPUTE))
        tl.store(lse_ptr + row, tl.zeros([], COMPUTE))
        if HAS_GRAD:
            g_row = grad_ptr + row * C
            for start in range(0, C, BLOCK):
                k = start + cols
                tl.store(g_row + k, tl.zeros([BLOCK], COMPUTE).to(grad_ptr.dtype.element_ty), mask=k < C)
    else:
        # The caller checked the target; an unchecked one still reads nothing out of bounds.
        t_ok = (t >= 0) & (t < C)
        # A new name: the compiler will not let one branch retype a parameter (fp64 -> COMPUTE).
        smooth = tl.full([], smoothing, COMPUTE)
        eps = smooth / C
        m = tl.full([], float("-inf"), COMPUTE)
        s = tl.zeros([], COMPUTE)
        w_sum = tl.zeros([], COMPUTE) + C
        wx_sum = tl.zeros([], COMPUTE)
        if HAS_WEIGHT:
            w_sum = tl.zeros([], COMPUTE)
        for start in range(0, C, BLOCK):
            k = start + cols
            inb = k < C
            x = tl.load(x_row + k, mask=inb, other=float("-inf")).to(COMPUTE)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = safe_max(m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
            if SMOOTH:
                w = tl.full([BLOCK], 1.0, COMPUTE)
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + k, mask=inb, other=0.0)
                    w_sum += tl.sum(w, axis=0)
                wx_sum += tl.sum(w * tl.where(inb, x, 0.0), axis=0)  # no 0 * -inf past the row
        lse = m + tl.log(s)
        x_t = tl.load(x_row + t, mask=t_ok, other=float("nan")).to(COMPUTE)
        w_t = tl.full([], 1.0, COMPUTE)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t, mask=t_ok, other=float("nan"))
        ce = (1 - smooth) * w_t * (lse - x_t)
        if SMOOTH:
            ce += eps * (w_sum * lse - wx_sum)
        tl.store(ce_ptr + row, ce)
        tl.store(lse_ptr + row, lse)
        if HAS_GRAD:
            s_ce = tl.full([], 1.0, COMPUTE)
            s_z = tl.full([], 1.0, COMPUTE)
            if HAS_SCALE:
                s_ce = tl.load(scale_ptr)
                s_z = tl.load(scale_ptr + 1)
            coef = (
                s_ce * ((1 - smooth) * w_t + eps * w_sum) + s_z * 2 * tl.full([], z_loss, COMPUTE) * lse
            ) / s
            true_class = s_ce * (1 - smooth) * w_t
            g_row = grad_ptr + row * C
            for start in range(0, C, BLOCK):
                k = start + cols
                inb = k < C
                x = tl.load(x_row + k, mask=inb, other=0.0).to(COMPUTE)
                g = tl.exp(x - m) * coef
                if SMOOTH:
                    w = tl.full([BLOCK], 1.0, COMPUTE)
                    if HAS_WEIGHT:
                        w = tl.load(weight_ptr + k, mask=inb, other=0.0)
                    g -= s_ce * eps * w
                g = tl.where(k == t, g - true_class, g)
                g = tl.where(t_ok, g, float("nan"))
                tl.store(g_row + k, cast_out(g, grad_ptr.dtype.element_ty), mask=inb)


def masked_cross_entropy_fwd(
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    z_loss: float,
    grad_scale: Tensor | None,
    grad: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """(ce, lse), (N,) in the compute dtype, for logits (N, C) with class stride 1; writes the
    logits gradient into ``grad`` ((N, C) contiguous, may be ``logits``) when given. See the module
    docstring and csrc/maskkern.cpp for the contract."""
    n, c = logits.shape
    cdt = torch_compute_dtype(logits.dtype)
    ce = torch.empty(n, dtype=cdt, device=logits.device)
    lse = torch.empty(n, dtype=cdt, device=logits.device)
    if n == 0:
        return ce, lse
    block, _ = row_block(c, logits.dtype)
    # The kernel indexes these as contiguous vectors: a strided view (a sliced class weight, a
    # strided int64 target) is copied, as the C++ kernel does.
    target, valid = target.contiguous(), valid.contiguous()
    weight = None if weight is None else weight.contiguous()
    grad_scale = None if grad_scale is None else grad_scale.contiguous()
    _cross_entropy_kernel[(n,)](
        ce,
        lse,
        grad,
        logits,
        target,
        valid,
        weight,
        grad_scale,
        logits.stride(0),
        c,
        label_smoothing,
        z_loss,
        HAS_WEIGHT=weight is not None,
        HAS_SCALE=grad_scale is not None,
        HAS_GRAD=grad is not None,
        SMOOTH=label_smoothing > 0,
        COMPUTE=compute_dtype(logits.dtype),
        BLOCK=block,
        num_warps=num_warps(block),
    )
    return ce, lse


@triton.jit
def _scale_kernel(
    grad_ptr,  # (N, C) contiguous, scaled in place: the logits gradient the forward wrote
    valid_ptr,  # (N,) bool: the row counts
    factor_ptr,  # (N,) or (1,) COMPUTE: each row's incoming gradient (factor_stride 0: one for all)
    factor_stride,  # 1, or 0 for a single factor (a mean or sum loss)
    C,  # classes per row
    BLOCK: tl.constexpr,  # classes per chunk (power of two); one row per program
):
    row = tl.program_id(0).to(tl.int64)
    f = tl.load(factor_ptr + row * factor_stride)
    # A row that does not count is zeros and stays zeros whatever its factor (0 * inf would be
    # NaN, eager gives 0); a factor of 1 (loss.backward() of a mean or sum) changes nothing. Neither
    # is read: with a mean loss this whole pass reads N factors and flags.
    if (tl.load(valid_ptr + row) != 0) & (f != 1.0):
        g_row = grad_ptr + row * C
        cols = tl.arange(0, BLOCK)
        for start in range(0, C, BLOCK):
            k = start + cols
            g = tl.load(g_row + k, mask=k < C, other=0.0).to(f.dtype) * f
            tl.store(g_row + k, cast_out(g, grad_ptr.dtype.element_ty), mask=k < C)


def masked_cross_entropy_scale_(grad: Tensor, valid: Tensor, grad_loss: Tensor) -> None:
    """Scales the rows of ``grad`` ((N, C) contiguous) that count by their incoming gradient
    ``grad_loss`` (1 or N values of the compute dtype), in place; the contract of the C++ op of
    the same name (csrc/maskkern.cpp)."""
    n, c = grad.shape
    if n == 0 or c == 0:
        return
    block = min(row_block(c, grad.dtype)[0], 4096)  # a streaming pass: no need for a whole row
    grad_loss = grad_loss.contiguous()
    _scale_kernel[(n,)](
        grad,
        valid.contiguous(),
        grad_loss,
        0 if grad_loss.numel() == 1 else 1,
        c,
        BLOCK=block,
        num_warps=num_warps(block),
    )
