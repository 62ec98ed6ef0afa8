"""Eager PyTorch references: the semantics oracle for every op and backend (tests and bench).

Each function takes the public op's arguments (validated by the caller) and is differentiable with
plain autograd, so its gradients are the reference gradients too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import masks
from ._dtypes import compute_dtype


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
    z = scores.to(compute_dtype(scores.dtype)) * scale
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
    y = out.to(compute_dtype(out.dtype))
    g = grad.to(y.dtype)
    yg = y * g
    return (scale * (yg - y * yg.sum(-1, keepdim=True))).to(out.dtype)


def masked_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Tensor:
    """``F.cross_entropy`` with class-index targets (int32 or int64), plus ``mask`` (True = the
    target counts) and ``z_loss`` (z·logsumexp² per counted row, unweighted; divided by the number
    of counted rows under "mean"). Layouts (C,), (N, C), (N, C, d1, ...).

    Without ``mask`` and ``z_loss`` this is PyTorch's formula, label smoothing with class weights
    included: loss_i = (1-ε)·w[y_i]·(lse_i - x_iy) + ε/C·Σ_c w_c·(lse_i - x_ic) over counted rows,
    and "mean" divides by Σ w[y_i] over them (NaN when that is 0/0, with a zero gradient).
    """
    cdim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[cdim]
    x = input.to(compute_dtype(input.dtype))
    valid = target != ignore_index
    if mask is not None:
        valid = valid & mask
    safe = target.long().masked_fill(~valid, 0)
    lse = torch.logsumexp(x, cdim)
    logp = x - lse.unsqueeze(cdim)
    w_y = torch.ones_like(lse) if weight is None else weight.to(x.dtype)[safe]
    loss = -(1 - label_smoothing) * w_y * logp.gather(cdim, safe.unsqueeze(cdim)).squeeze(cdim)
    if label_smoothing:
        wb = 1 if weight is None else weight.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - cdim - 1))
        loss = loss - label_smoothing / n_classes * (logp * wb).sum(cdim)
    # where, not a product: the rows that do not count give no NaN and get a zero gradient.
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    loss = torch.where(valid, loss, zero)
    zterm = torch.where(valid, z_loss * lse * lse, zero)
    if reduction == "none":
        out = loss + zterm
    elif reduction == "sum":
        out = loss.sum() + zterm.sum()
    else:
        out = loss.sum() / torch.where(valid, w_y, zero).sum() + zterm.sum() / valid.sum()
    return out.to(input.dtype)


def masked_cross_entropy_rows(
    logits: Tensor,
    target: Tensor,
    valid: Tensor,
    weight: Tensor | None,
    label_smoothing: float,
    z_loss: float,
    grad_scale: Tensor | None,
    grad: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The row kernel's contract in eager PyTorch (the ``torch`` backend of the kernel ops).

    logits (N, C); target int64 (N,); valid bool (N,); weight (C,) in the compute dtype or None.
    Returns (ce, lse), both (N,) in the compute dtype and 0 on rows that do not count, where
    ce_i = (1-ε)·w[y_i]·(lse_i - x_iy) + ε/C·Σ_c w_c·(lse_i - x_ic). When ``grad`` is given it
    receives s_ce·d(ce_i)/dx_i + s_z·d(z_loss·lse_i²)/dx_i (zeros on rows that do not count), where
    (s_ce, s_z) = grad_scale, (1, 1) when None.
    """
    n_classes = logits.shape[1]
    x = logits.to(compute_dtype(logits.dtype))
    safe = target.masked_fill(~valid, 0)
    lse = torch.logsumexp(x, 1)
    w = torch.ones(n_classes, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    w_y = w[safe]
    eps = label_smoothing / n_classes
    x_y = x.gather(1, safe[:, None])[:, 0]
    ce = (1 - label_smoothing) * w_y * (lse - x_y)
    if label_smoothing:
        ce = ce + eps * (w.sum() * lse - x @ w)
    keep = valid[:, None]
    if grad is not None:
        s_ce, s_z = (1.0, 1.0) if grad_scale is None else grad_scale.to(x.dtype).unbind()
        p = torch.exp(x - lse[:, None])
        coef = s_ce * ((1 - label_smoothing) * w_y + eps * w.sum()) + s_z * 2 * z_loss * lse
        g = p * coef[:, None] - s_ce * eps * w
        g.scatter_add_(1, safe[:, None], -(s_ce * (1 - label_smoothing) * w_y)[:, None])
        grad.copy_(torch.where(keep, g, 0))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(valid, ce, zero), torch.where(valid, lse, zero)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> Tensor:
    """``masked_cross_entropy(hidden @ weight.T + bias, target, ...)`` with the full logits held:
    the eager expression that ``linear_cross_entropy`` replaces. hidden (..., H), target (...)."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return masked_cross_entropy(
        logits.reshape(-1, weight.shape[0]),
        target.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
    ).reshape(target.shape if reduction == "none" else ())


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
    g = grad.reshape(-1, grad.shape[-1]).to(compute_dtype(grad.dtype))
    ids = input.reshape(-1)
    gw = torch.ops.aten.embedding_dense_backward(g, ids, num_weights, padding_idx, scale_grad_by_freq)
    return (gw * scale).to(grad.dtype)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    lengths: Tensor | None = None,
    query_lengths: Tensor | None = None,
    causal: bool | str = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``masked_softmax(q @ k.mT, mask & window, ..., scale) @ v`` in the compute dtype: the eager
    expression ``attention`` replaces, with the (Lq, Lk) scores held. A query that sees no key
    gives zeros. ``enable_gqa``: k and v's heads (dim -3) are repeated to q's."""
    ct = compute_dtype(q.dtype)
    if enable_gqa and q.dim() >= 3:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    if scale is None:
        scale = q.shape[-1] ** -0.5 if q.shape[-1] else 1.0
    scores = q.to(ct) @ k.to(ct).transpose(-2, -1)
    # v's batch dims are the scores' too (as in SDPA): masks and lengths index them.
    scores = scores.expand(*torch.broadcast_shapes(scores.shape[:-2], v.shape[:-2]), *scores.shape[-2:])
    left, right = masks.check_window(window)
    if (left, right) != (-1, -1):
        code = masks.causal_code(causal)
        align = masks.ALIGNMENTS[code - 1] if code else "top_left"
        keep = masks.window_mask(q.shape[-2], k.shape[-2], (left, right), align=align, device=q.device)
        if mask is None or mask.dtype == torch.bool:
            mask = masks.combine_masks(mask, keep)
        else:
            mask = mask.to(ct).masked_fill(~keep, float("-inf"))
    probs = masked_softmax(
        scores, mask, lengths=lengths, query_lengths=query_lengths, causal=causal, scale=scale
    )
    return (probs @ v.to(ct)).to(q.dtype)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """``attention`` on each packed sequence alone: q (total_q, Hq, D), k/v (total_k, Hkv, D);
    sequence s is rows ``cu_seqlens[s]:cu_seqlens[s + 1]``. ``kwargs``: causal, scale, window,
    enable_gqa (causal and window align to each sequence's own lengths)."""
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_k.tolist()
    for s in range(len(bounds_q) - 1):
        (q0, q1), (k0, k1) = bounds_q[s : s + 2], bounds_k[s : s + 2]
        if q1 > q0:
            part = attention(*(x.transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1])), **kwargs)
            out[q0:q1] = part.transpose(0, 1)
    return out
