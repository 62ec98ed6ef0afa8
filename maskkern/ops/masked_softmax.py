"""masked_softmax: scale + bool/additive mask + key lengths + query lengths + causal, then a
softmax over the last dim, in one pass; fully masked rows give zeros, never NaN.

Layers, top to bottom: the public function (argument checks, normalisation), the opaque custom op
``maskkern::masked_softmax`` and its backward op (backend dispatch; fakes; autograd), and the
per-backend kernels, which all see the same normalised arguments:

    fwd(scores (B, H, Lq, Lk) contiguous, mask None | (B, H, Lq, Lk) strided view,
        lengths None | int64 (B,), query_lengths None | int64 (B,), causal 0|1|2, scale) -> Y
    bwd(grad, Y, mask, lengths, query_lengths, causal, scale) -> dX = scale * Y * (dY - sum(Y * dY))

The backward gets the forward's bool mask (None for an additive one) only to skip what it drops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import masks, reference
from .._backend import native_extension_loaded, resolve_backend
from ._common import (
    FLOAT_DTYPES,
    check_broadcastable,
    check_dtype,
    check_finite_number,
    check_lengths_tensor,
    check_nonnegative_values,
    check_same_device,
    check_tensor,
)


def masked_softmax(
    scores: Tensor,
    mask: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    query_lengths: Tensor | None = None,
    causal: bool | str = False,
    scale: float = 1.0,
    check_lengths: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Softmax over the last dim of ``scores * scale + additive`` with masked positions excluded.

    Replaces ``F.softmax((scores * scale).masked_fill(~keep, float('-inf')), dim=-1)`` where keep
    combines ``mask``, ``lengths``, ``query_lengths`` and ``causal`` — except that a row with
    nothing left is all zeros with zero gradient instead of NaN.

    Args:
        scores: (..., Lq, Lk) float16/bfloat16/float32/float64.
        mask: bool (True = keep) or float (added after scaling; cast to ``scores.dtype``), any shape
            broadcastable to ``scores``; read through its strides, never expanded in memory.
        lengths: int (B,) with B = scores.shape[0] (0-d or (1,) for 2-D scores): keys
            j >= lengths[b] are masked; lengths > Lk act as Lk.
        query_lengths: like ``lengths``; rows i >= query_lengths[b] are all masked (zeros).
        causal: False, True (= "top_left": key j visible to query i when j <= i) or
            "bottom_right" (j <= i + Lk - Lq), relative to the full (Lq, Lk) of ``scores``.
        scale: multiplies the scores before the mask is added.
        check_lengths: raise ValueError on a negative value in ``lengths``/``query_lengths``. On
            CUDA that check synchronises with the host (as eager's ``.item()`` would); False skips
            it, and then a negative length masks its whole row (zeros, zero gradient; nothing is
            read out of bounds), on every backend alike.
        backend: "triton", "cuda", "cpu", "torch" or None (the default for scores' device).

    Returns:
        A tensor of ``scores``' shape and dtype (math in fp32, fp64 for fp64).
    """
    check_tensor(scores, "scores")
    check_dtype(scores, "scores", FLOAT_DTYPES)
    if scores.dim() < 2:
        raise ValueError(f"scores must be (..., Lq, Lk) with >= 2 dims, got shape {tuple(scores.shape)}")
    if mask is not None:
        check_tensor(mask, "mask")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = keep) or floating (additive), got dtype {mask.dtype}")
        check_same_device(mask, "mask", scores, "scores")
        check_broadcastable(mask, "mask", scores.shape, "scores")
        if mask.is_floating_point() and mask.dtype != scores.dtype:
            mask = mask.to(scores.dtype)
    lengths = check_lengths_tensor(lengths, "lengths", scores)
    query_lengths = check_lengths_tensor(query_lengths, "query_lengths", scores)
    code = masks.causal_code(causal)
    scale = check_finite_number(scale, "scale")
    backend = resolve_backend(backend, scores.device, "scores")
    check = bool(check_lengths)
    return torch.ops.maskkern.masked_softmax(
        scores, mask, lengths, query_lengths, code, scale, check, backend
    )


def _as_4d(x: Tensor) -> Tensor:
    """(..., Lq, Lk) -> (B, H, Lq, Lk): B is dim 0 (what lengths index), H all dims between."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[:, None]
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def _shaped(x: Tensor, shape: torch.Size) -> Tensor:
    """x (a kernel's 4-D result) viewed as shape, without a view op when it already has it."""
    return x if x.shape == shape else x.view(shape)


# --- per-backend kernels ------------------------------------------------------------------------


def _torch_fwd(scores, mask, lengths, query_lengths, causal, scale):
    return reference.masked_softmax(
        scores,
        mask,
        lengths=lengths,
        query_lengths=query_lengths,
        causal=(False, "top_left", "bottom_right")[causal],
        scale=scale,
    )


def _torch_bwd(grad, out, mask, lengths, query_lengths, causal, scale):
    return reference.masked_softmax_backward(grad, out, scale)


def _kernels(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.maskkern.masked_softmax_fwd, torch.ops.maskkern.masked_softmax_bwd
    if backend == "triton":
        from ..triton_kernels import masked_softmax as tk

        return tk.masked_softmax_fwd, tk.masked_softmax_bwd
    return _torch_fwd, _torch_bwd


# --- the custom ops -----------------------------------------------------------------------------


@torch.library.custom_op("maskkern::masked_softmax", mutates_args=())
def _masked_softmax_op(
    scores: Tensor,
    mask: Tensor | None,
    lengths: Tensor | None,
    query_lengths: Tensor | None,
    causal: int,
    scale: float,
    check_lengths: bool,
    backend: str,
) -> Tensor:
    if check_lengths:
        check_nonnegative_values(lengths, "lengths")
        check_nonnegative_values(query_lengths, "query_lengths")
    if scores.numel() == 0:
        return torch.empty_like(scores, memory_format=torch.contiguous_format)
    mask4 = None if mask is None else _as_4d(mask.expand(scores.shape))
    fwd = _kernels(backend)[0]
    out = fwd(_as_4d(scores.contiguous()), mask4, lengths, query_lengths, causal, scale)
    return _shaped(out, scores.shape)


@_masked_softmax_op.register_fake
def _(scores, mask, lengths, query_lengths, causal, scale, check_lengths, backend):
    return torch.empty_like(scores, memory_format=torch.contiguous_format)


@torch.library.custom_op("maskkern::masked_softmax_backward", mutates_args=())
def _masked_softmax_backward_op(
    grad: Tensor,
    out: Tensor,
    mask: Tensor | None,
    lengths: Tensor | None,
    query_lengths: Tensor | None,
    causal: int,
    scale: float,
    backend: str,
) -> Tensor:
    if out.numel() == 0:
        return torch.empty_like(out, memory_format=torch.contiguous_format)
    bwd = _kernels(backend)[1]
    mask4 = None if mask is None else _as_4d(mask.expand(out.shape))
    # Autograd may hand us an expanded or strided grad; the kernels read rows contiguously.
    grad4, out4 = _as_4d(grad.contiguous()), _as_4d(out.contiguous())
    dx = bwd(grad4, out4, mask4, lengths, query_lengths, causal, scale)
    return _shaped(dx, out.shape)


@_masked_softmax_backward_op.register_fake
def _(grad, out, mask, lengths, query_lengths, causal, scale, backend):
    return torch.empty_like(out, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, mask, lengths, query_lengths, causal, scale, _, backend = inputs
    keep = mask if mask is not None and mask.dtype == torch.bool else None  # lets bwd skip tails
    ctx.save_for_backward(output, keep, lengths, query_lengths)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mask_shape = None if mask is None else mask.shape


def _backward(ctx, grad):
    out, keep, lengths, query_lengths = ctx.saved_tensors
    bwd = torch.ops.maskkern.masked_softmax_backward
    dscores = dmask = None
    if ctx.needs_input_grad[1]:
        # d/dmask of (scale * s + mask) is 1: the unscaled gradient, summed over broadcast dims.
        g = bwd(grad, out, keep, lengths, query_lengths, ctx.causal, 1.0, ctx.backend)
        dmask = g.sum_to_size(ctx.mask_shape)
        if ctx.needs_input_grad[0]:
            dscores = g * ctx.scale
    elif ctx.needs_input_grad[0]:
        dscores = bwd(grad, out, keep, lengths, query_lengths, ctx.causal, ctx.scale, ctx.backend)
    return dscores, dmask, None, None, None, None, None, None


_masked_softmax_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    """The C++ kernel ops are called inside the opaque op above, but get fakes too so that
    opcheck and tracing can see them on their own."""

    @torch.library.register_fake("maskkern::masked_softmax_fwd")
    def _(scores, mask, lengths, query_lengths, causal, scale):
        return torch.empty_like(scores, memory_format=torch.contiguous_format)

    @torch.library.register_fake("maskkern::masked_softmax_bwd")
    def _(grad, out, mask, lengths, query_lengths, causal, scale):
        return torch.empty_like(out, memory_format=torch.contiguous_format)


# --- module -------------------------------------------------------------------------------------


class MaskedSoftmax(nn.Module):
    """``nn.Softmax(dim=-1)`` with masks: ``MaskedSoftmax(scale=d**-0.5, causal=True)(scores,
    mask, lengths=...)``. Only the last dim is supported (the attention layout)."""

    def __init__(
        self,
        dim: int = -1,
        *,
        scale: float = 1.0,
        causal: bool | str = False,
        check_lengths: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if dim != -1:
            raise ValueError(f"dim must be -1 (softmax over the keys), got {dim}")
        masks.causal_code(causal)
        self.dim, self.scale, self.causal, self.backend = dim, scale, causal, backend
        self.check_lengths = check_lengths

    def forward(
        self,
        scores: Tensor,
        mask: Tensor | None = None,
        *,
        lengths: Tensor | None = None,
        query_lengths: Tensor | None = None,
    ) -> Tensor:
        return masked_softmax(
            scores,
            mask,
            lengths=lengths,
            query_lengths=query_lengths,
            causal=self.causal,
            scale=self.scale,
            check_lengths=self.check_lengths,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale}, causal={self.causal!r}, backend={self.backend!r}"


if native_extension_loaded():
    _register_native_fakes()
