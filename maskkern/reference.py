"""Eager PyTorch references: the semantics oracle for every op and backend (tests and bench).

Each function takes the public op's arguments (validated by the caller) and is differentiable with
plain autograd, so its gradients are the reference gradients too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import masks

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax_keep(
    shape: torch.Size,
    device: torch.device,
    mask: Tensor | None = None,
    lengths: Tensor | None = None,
    query_lengths: Tensor | None = None,
    causal: bool | str = False,
) -> Tensor | None:
    """The bool keep-mask (broadcastable to ``shape`` = (..., Lq, Lk)) that the arguments of
    ``masked_softmax`` describe; a float ``mask`` does not take part. None when nothing is masked.
    """
    Lq, Lk = shape[-2], shape[-1]
    # lengths index dim 0: view them as (B, 1, ..., 1, 1, 1) against the (..., Lq, Lk) scores.
    lead = (-1,) + (1,) * (len(shape) - 3) if len(shape) > 2 else ()
    parts = []
    if mask is not None and mask.dtype == torch.bool:
        parts.append(mask)
    if lengths is not None:
        keys = torch.arange(Lk, device=device)
        parts.append(keys < lengths.reshape(lead)[..., None, None])
    if query_lengths is not None:
        rows = torch.arange(Lq, device=device)[:, None]
        parts.append(rows < query_lengths.reshape(lead)[..., None, None])
    code = masks.causal_code(causal)
    if code:
        parts.append(masks.causal_mask(Lq, Lk, align=masks.ALIGNMENTS[code - 1], device=device))
    return masks.combine_masks(*parts)


def masked_softmax(
    scores: Tensor,
    mask: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    query_lengths: Tensor | None = None,
    causal: bool | str = False,
    scale: float = 1.0,
) -> Tensor:
    """softmax(scores * scale + additive, -1) over the kept positions; a row with nothing kept
    (every position masked or -inf) is all zeros with zero gradient instead of NaN.

    Replaces ``F.softmax((scores * scale).masked_fill(~keep, -inf), -1)`` (which gives NaN on
    fully masked rows); bool ``mask`` is True = keep, a float ``mask`` is added after scaling.
    """
    z = scores.to(_compute_dtype(scores.dtype)) * scale
    if mask is not None and mask.dtype != torch.bool:
        z = z + mask.to(z.dtype)
    keep = masked_softmax_keep(scores.shape, scores.device, mask, lengths, query_lengths, causal)
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    # Rows whose max is -inf have nothing left: softmax there is 0/0. Give them finite inputs so
    # neither the forward nor the backward produces NaN, then zero them.
    dead = z.amax(-1, keepdim=True) == float("-inf") if z.shape[-1] else None
    if dead is not None:
        z = z.masked_fill(dead, 0.0)
    y = torch.softmax(z, dim=-1)
    if dead is not None:
        y = y.masked_fill(dead, 0.0)
    return y.to(scores.dtype)


def masked_softmax_backward(grad: Tensor, out: Tensor, scale: float) -> Tensor:
    """dX = scale * Y * (dY - sum(Y * dY)), in the compute dtype, returned in ``out``'s dtype."""
    y = out.to(_compute_dtype(out.dtype))
    g = grad.to(y.dtype)
    yg = y * g
    return (scale * (yg - y * yg.sum(-1, keepdim=True))).to(out.dtype)


def pad_embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    *,
    zero_pad: bool = False,
    scale: float | None = None,
    scale_grad_by_freq: bool = False,
) -> Tensor:
    """``F.embedding(input, weight, padding_idx, scale_grad_by_freq=...)``, times ``scale``; with
    ``zero_pad`` the pad positions are exact zeros (``masked_fill``, so a NaN pad row gives 0 too).

    The eager expression that ``pad_embedding`` replaces; its autograd gradient is the reference.
    """
    out = torch.nn.functional.embedding(input, weight, padding_idx, scale_grad_by_freq=scale_grad_by_freq)
    if scale is not None:
        out = out * scale
    if zero_pad and padding_idx is not None:
        pad = padding_idx % weight.shape[0]
        out = out.masked_fill((input == pad)[..., None], 0)
    return out


def pad_embedding_backward(
    grad: Tensor,
    input: Tensor,
    num_weights: int,
    padding_idx: int,
    scale: float,
    scale_grad_by_freq: bool,
) -> Tensor:
    """The dense grad_weight (num_weights, D) of ``pad_embedding``, as the kernels define it: for each
    row the sum of its tokens' grad rows in the compute dtype (pad tokens, ``padding_idx`` >= 0,
    skipped), times ``scale`` (and 1/count with ``scale_grad_by_freq``), rounded once."""
    g = grad.reshape(-1, grad.shape[-1]).to(_compute_dtype(grad.dtype))
    ids = input.reshape(-1)
    gw = torch.ops.aten.embedding_dense_backward(g, ids, num_weights, padding_idx, scale_grad_by_freq)
    return (gw * scale).to(grad.dtype)
