"""attention: q·kᵀ -> masked_softmax -> ·v, a drop-in for ``F.scaled_dot_product_attention`` that
takes maskkern's masks (bool/additive ``mask``, key ``lengths``, ``query_lengths``, ``causal``) and
gives zeros, never NaN, for a query that sees no key.

A composite of two torch matmuls around the opaque custom op ``maskkern::masked_softmax``: its
autograd and fake make this differentiable and traceable by torch.compile(fullgraph=True) without
a custom op of its own.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import masks
from .._backend import resolve_backend
from ._common import (
    FLOAT_DTYPES,
    check_broadcastable,
    check_dtype,
    check_finite_number,
    check_same_device,
    check_tensor,
)
from .masked_softmax import _check_lengths, masked_softmax


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
    check_lengths: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Scaled dot-product attention over the keys that ``mask``/``lengths``/``causal`` leave visible.

    Replaces ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
    scale=scale)`` and the eager ``F.softmax((q @ k.mT * scale).masked_fill(~keep, -inf), -1) @ v``;
    a query row that sees no key (all masked, ``query_lengths``, ``lengths`` of 0) gives zeros with
    zero gradient instead of NaN.

    Args:
        q: (..., Lq, D) float16/bfloat16/float32/float64.
        k: (..., Lk, D), same dtype and device as ``q``.
        v: (..., Lk, Dv), same dtype and device as ``q``. The batch dims ``...`` of q, k and v
            broadcast together (as in torch.matmul); the scores q·kᵀ have shape (..., Lq, Lk).
        mask: bool (True = keep) or float (added to the scaled scores), broadcastable to the
            scores (..., Lq, Lk); never expanded in memory.
        lengths: int (B,) with B = the scores' dim 0: keys j >= lengths[b] are masked.
        query_lengths: like ``lengths``: queries i >= query_lengths[b] output zeros.
        causal: False, True (= "top_left", SDPA's ``is_causal``: key j visible to query i when
            j <= i) or "bottom_right" (j <= i + Lk - Lq, KV-cache decoding).
        scale: multiplies q·kᵀ; default 1/sqrt(D), as SDPA.
        check_lengths: as in ``masked_softmax``: False skips the check for negative lengths,
            which synchronises with the host on CUDA.
        backend: the backend of the masked softmax: "triton", "cuda", "cpu", "torch" or None
            (the default for q's device). The matmuls are torch's.

    Returns:
        (..., Lq, Dv) in q's dtype.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name)
        check_dtype(x, name, FLOAT_DTYPES)
        if x.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., L, D), got shape {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        check_same_device(x, name, q, "q")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's last dim D = {q.shape[-1]}, got shape {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have k's Lk = {k.shape[-2]} rows (dim -2), got shape {tuple(v.shape)}")
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the batch dims of q {tuple(q.shape[:-2])}, k {tuple(k.shape[:-2])} and "
            f"v {tuple(v.shape[:-2])} do not broadcast together"
        ) from None
    scores_shape = torch.Size((*batch, q.shape[-2], k.shape[-2]))
    # A free stand-in with the scores' shape, device and dtype: the mask and lengths are checked
    # against it before the first matmul runs.
    scores_like = q.new_empty(()).expand(scores_shape)
    if mask is not None:
        check_tensor(mask, "mask")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = keep) or floating (additive), got dtype {mask.dtype}")
        check_same_device(mask, "mask", q, "q")
        check_broadcastable(mask, "mask", scores_shape, "the scores q·kᵀ")
    _check_lengths(lengths, "lengths", scores_like)
    _check_lengths(query_lengths, "query_lengths", scores_like)
    masks.causal_code(causal)
    if scale is None:
        # D = 0 gives all-zero scores; 1/sqrt(0) would turn them into NaN.
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    scale = check_finite_number(scale, "scale")
    backend = resolve_backend(backend, q.device, "q")
    # Scale q (Lq·D values) rather than the scores (Lq·Lk), which also keeps fp16/bf16 scores in
    # range, as SDPA's math path does.
    if scale != 1.0:
        q = q * scale
    scores = q @ k.transpose(-2, -1)
    if scores.shape != scores_shape:
        # v's batch dims are the scores' too (the mask and lengths were checked against them), but
        # q·kᵀ does not have them: broadcast it (a free view; masked_softmax reads it once).
        scores = scores.expand(scores_shape)
    probs = masked_softmax(
        scores,
        mask,
        lengths=lengths,
        query_lengths=query_lengths,
        causal=causal,
        check_lengths=check_lengths,
        backend=backend,
    )
    return probs @ v
