"""attention and varlen_attention: flash-style fused attention with maskkern's masks — bool or
additive ``mask``, key ``lengths``, ``query_lengths``, ``causal`` (both alignments), a sliding
``window``, grouped-query heads and packed variable-length sequences — giving zeros, never NaN, for
a query that sees no key.

Layers, top to bottom: the public functions (argument checks, normalisation to 4-D), the opaque
custom op ``maskkern::attention`` and its backward op ``maskkern::attention_backward`` (backend
dispatch, fakes, autograd), and the per-backend kernels, which all see the same normalised
arguments (the schema comment in csrc/maskkern.cpp is their contract):

    fwd(q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), mask, mask_tiles, lengths,
        query_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
        window_left, window_right, scale, block_q, block_k) -> (out, lse)
    bwd(grad_out, q, k, v, out, lse, <the same masks>) -> (dq, dk, dv)

The backends:

- ``cpu`` and ``triton`` are fused: they never allocate (Lq, Lk), skip the tiles the masks leave
  empty, save only the output and the row logsumexp, and recompute the probabilities in the
  backward. A bool mask's tile summary (``mask_tiles``) is computed once per call, in the forward
  op, and saved for the backward.
- ``cuda`` is the composite of the CUDA masked softmax kernel between two cuBLAS matmuls (not
  fused): (q·scale)·kᵀ -> ``maskkern::masked_softmax(backend="cuda")`` -> ·v in q's dtype, and in
  the backward ``maskkern::masked_softmax_backward(backend="cuda")`` between the matmuls, holding
  the (Lq, Lk) scores and probabilities. The window and packed sequences, which the softmax has no
  argument for, reach it as a bool mask.
- ``torch`` is the reference composite, all torch ops in the compute dtype (fp32, fp64 for fp64),
  holding the (Lq, Lk) scores.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import masks
from .._backend import native_extension_loaded, resolve_backend
from .._dtypes import compute_dtype
from ._common import (
    FLOAT_DTYPES,
    check_broadcastable,
    check_cu_seqlens,
    check_cu_seqlens_values,
    check_dtype,
    check_finite_number,
    check_int,
    check_lengths_tensor,
    check_nonnegative_values,
    check_same_device,
    check_tensor,
)

# The cpu kernel's tiles (queries x keys): mask_tiles is built on this grid.
CPU_BLOCKS = (64, 64)
# The backends whose kernels are fused (tiled, nothing (Lq, Lk)-sized allocated).
FUSED = ("cpu", "triton")


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
    check_lengths: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Scaled dot-product attention over the keys that the masks leave visible, in one fused kernel.

    Replaces ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
    scale=scale, enable_gqa=enable_gqa)`` and the eager
    ``F.softmax((q @ k.mT * scale).masked_fill(~keep, -inf), -1) @ v``; a query that sees no key
    (all masked, ``query_lengths``, ``lengths`` of 0) gives zeros with zero gradient, not NaN.

    Args:
        q: (..., Lq, D) float16/bfloat16/float32/float64, D from 1 to 256 on the fused backends.
        k: (..., Lk, D), same dtype and device as ``q``.
        v: (..., Lk, Dv), same dtype and device. The batch dims ``...`` of q, k and v broadcast
            together (as in torch.matmul); the scores q·kᵀ have shape (..., Lq, Lk). Read through
            their strides: a transposed view of (B, L, H, D) memory is not copied, nor is a
            broadcast k or v, unless its batch dims cannot be viewed as one (a broadcast dim
            before one that is not: k of (B, 1, H2, Lk, D) against q of (B, H1, H2, Lq, D)).
        mask: bool (True = keep) or float (added to the scaled scores), broadcastable to the
            scores; never expanded in memory. A bool mask is summarised per tile once per call, so
            that its empty tiles are skipped and its full ones cost no mask reads.
        lengths: int (B,) with B = the scores' dim 0: keys j >= lengths[b] are masked.
        query_lengths: like ``lengths``: queries i >= query_lengths[b] output zeros.
        causal: False, True (= "top_left", SDPA's ``is_causal``: key j visible to query i when
            j <= i) or "bottom_right" (j <= i + Lk - Lq, KV-cache decoding).
        scale: multiplies q·kᵀ; default 1/sqrt(D), as SDPA.
        window: (left, right): key j visible to query i when i + o - left <= j <= i + o + right,
            o = the offset of the diagonal ``causal`` aligns to (0 unless "bottom_right"); -1 =
            unbounded (flash-attn's ``window_size``; Mistral's sliding window w is ``(w - 1, 0)``).
        enable_gqa: k and v have Hkv heads at dim -3 with Hq % Hkv == 0; query head h reads kv
            head h // (Hq // Hkv), without repeating k and v in memory (as SDPA's).
        check_lengths: False skips the check for negative lengths, which synchronises with the
            host on CUDA; a negative length then masks its whole row, on every backend alike.
        backend: "triton", "cuda", "cpu", "torch" or None (the default for q's device). "cpu" and
            "triton" run the fused kernels; "cuda" runs cuBLAS matmuls around the CUDA masked
            softmax kernel (forward and backward), holding the (Lq, Lk) scores: not fused;
            "torch" runs the reference composite in torch ops.

    Returns:
        (..., Lq, Dv) in q's dtype (the memory of a 4-D result is laid out (B, Lq, H, Dv), as
        SDPA's CPU flash kernel returns it).
    """
    _check_qkv(q, k, v, min_dim=3 if enable_gqa else 2)
    if enable_gqa:
        if q.dim() < 4:
            raise ValueError(f"enable_gqa needs q of (B, H, L, D) or more dims, got shape {tuple(q.shape)}")
        hq, hkv = q.shape[-3], k.shape[-3]
        if v.shape[-3] != hkv:
            raise ValueError(f"v must have k's {hkv} heads (dim -3), got shape {tuple(v.shape)}")
        if hkv == 0 or hq % hkv:
            raise ValueError(f"enable_gqa needs q's heads {hq} to be a multiple of k's heads {hkv}")
        lead = (q.shape[:-3], k.shape[:-3], v.shape[:-3])
    else:
        lead = (q.shape[:-2], k.shape[:-2], v.shape[:-2])
    try:
        batch = torch.broadcast_shapes(*lead)
    except RuntimeError:
        raise ValueError(
            f"the batch dims of q {tuple(lead[0])}, k {tuple(lead[1])} and v {tuple(lead[2])} "
            f"do not broadcast together{_heads_hint(q, k, enable_gqa)}"
        ) from None
    Lq, Lk = q.shape[-2], k.shape[-2]
    heads = (q.shape[-3],) if enable_gqa else ()
    scores_shape = torch.Size((*batch, *heads, Lq, Lk))
    # A free stand-in with the scores' shape, device and dtype for the mask and lengths checks.
    scores_like = q.new_empty(()).expand(scores_shape)
    if mask is not None:
        check_tensor(mask, "mask")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = keep) or floating (additive), got dtype {mask.dtype}")
        check_same_device(mask, "mask", q, "q")
        check_broadcastable(mask, "mask", scores_shape, "the scores q·kᵀ")
        if mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
    lengths = check_lengths_tensor(lengths, "lengths", scores_like)
    query_lengths = check_lengths_tensor(query_lengths, "query_lengths", scores_like)
    code = masks.causal_code(causal)
    left, right = masks.check_window(window)
    scale = _check_scale(scale, q)
    backend = resolve_backend(backend, q.device, "q")
    _check_head_dim(q, v, backend)

    B = scores_shape[0] if len(scores_shape) > 2 else 1
    if enable_gqa:
        q4 = _fold(q, (*batch, q.shape[-3]), B)
        k4, v4 = (_fold(x, (*batch, x.shape[-3]), B) for x in (k, v))
    else:
        q4, k4, v4 = (_fold(x, batch, B) for x in (q, k, v))
    mask4 = None if mask is None else _fold_mask(mask, scores_shape)
    out, _, _ = torch.ops.maskkern.attention(
        q4, k4, v4, mask4, lengths, query_lengths, None, None, Lq, Lk,
        code, left, right, scale, bool(check_lengths), backend,
    )  # fmt: skip
    return out.reshape(*scores_shape[:-1], v.shape[-1])


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor | None = None,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    causal: bool | str = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    enable_gqa: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Attention over packed variable-length sequences: each sequence attends only to itself.

    Replaces flash-attn's ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k, causal=..., window_size=...)`` and the loop
    ``[attention(q[a:b], k[c:d], v[c:d]) for each sequence]`` over the padding-free layout of
    ``masks.unpad`` and Hugging Face's ``DataCollatorWithFlattening``.

    Args:
        q: (total_q, Hq, D); k: (total_k, Hkv, D); v: (total_k, Hkv, Dv); same dtype and device.
            Hkv = Hq unless ``enable_gqa`` (then Hq % Hkv == 0).
        cu_seqlens_q: int32/int64 (n + 1,), 0 = cu[0] <= cu[1] <= ... <= cu[n] = total_q:
            sequence s is rows cu[s]:cu[s + 1]; empty sequences are allowed.
        cu_seqlens_k: the same for k and v; default ``cu_seqlens_q``.
        max_seqlen_q, max_seqlen_k: the longest sequence, read from cu_seqlens when None (a host
            synchronisation, which torch.compile(fullgraph=True) cannot trace: give them there).
        causal: as in ``attention``, aligned to each sequence's own lengths: True = "top_left";
            flash-attn's causal is "bottom_right" (the two differ only when Lq != Lk).
        scale, window, enable_gqa, backend: as in ``attention``.

    Returns:
        (total_q, Hq, Dv) in q's dtype, contiguous.
    """
    _check_qkv(q, k, v, min_dim=3, packed=True)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be (total, heads, dim), got shape {tuple(x.shape)}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"v must have k's {k.shape[1]} heads (dim 1), got shape {tuple(v.shape)}")
    hq, hkv = q.shape[1], k.shape[1]
    if enable_gqa:
        if hkv == 0 or hq % hkv:
            raise ValueError(f"enable_gqa needs q's heads {hq} to be a multiple of k's heads {hkv}")
    elif hq != hkv:
        raise ValueError(f"k must have q's {hq} heads (dim 1) unless enable_gqa, got shape {tuple(k.shape)}")
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, "q")
    max_q = _max_seqlen(max_seqlen_q, "max_seqlen_q", cu_q)
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                f"cu_seqlens_k is needed when k's total {k.shape[0]} differs from q's {q.shape[0]}"
            )
        cu_k = cu_q
        max_k = max_q if max_seqlen_k is None else _max_seqlen(max_seqlen_k, "max_seqlen_k", cu_k)
    else:
        cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k, "k")
        max_k = _max_seqlen(max_seqlen_k, "max_seqlen_k", cu_k)
    if cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's {cu_q.numel()} entries, got {cu_k.numel()}")
    code = masks.causal_code(causal)
    left, right = masks.check_window(window)
    scale = _check_scale(scale, q)
    backend = resolve_backend(backend, q.device, "q")
    _check_head_dim(q, v, backend)
    q4, k4, v4 = (_rows_last_dim_contiguous(x).transpose(0, 1)[None] for x in (q, k, v))
    out, _, _ = torch.ops.maskkern.attention(
        q4, k4, v4, None, None, None, cu_q, cu_k, max_q, max_k,
        code, left, right, scale, True, backend,
    )  # fmt: skip
    # squeeze, not out[0]: its backward is a view, where select's zero-fills and copies the gradient.
    return out.squeeze(0).transpose(0, 1)


# --- argument checks ----------------------------------------------------------------------------

# The fused kernels keep a row of q, k and v per tile in registers / L1: D and Dv are capped.
MAX_HEAD_DIM = 256


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, min_dim: int, packed: bool = False) -> None:
    """Types, dtypes and devices of q, k, v, their D, and v's key count: dim -2, or dim 0 when
    ``packed`` (total, heads, dim)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(x, name)
        check_dtype(x, name, FLOAT_DTYPES)
        if x.dim() < min_dim:
            raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        check_same_device(x, name, q, "q")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's last dim D = {q.shape[-1]}, got shape {tuple(k.shape)}")
    keys = 0 if packed else -2
    if v.shape[keys] != k.shape[keys]:
        raise ValueError(f"v must have k's number of keys, got k {tuple(k.shape)} and v {tuple(v.shape)}")


def _heads_hint(q: Tensor, k: Tensor, enable_gqa: bool) -> str:
    """What to add to the batch dims' error: the heads' part in it."""
    if enable_gqa:
        return " (heads at dim -3 excluded: enable_gqa)"
    if q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        return (
            f": q has {q.shape[-3]} heads (dim -3) and k {k.shape[-3]}; grouped-query heads "
            "(q's a multiple of k's) need enable_gqa=True"
        )
    return ""


def _check_head_dim(q: Tensor, v: Tensor, backend: str) -> None:
    if backend in FUSED:
        for name, d in (("D (q's last dim)", q.shape[-1]), ("Dv (v's last dim)", v.shape[-1])):
            if d > MAX_HEAD_DIM:
                raise ValueError(f"{name} must be <= {MAX_HEAD_DIM} on the {backend} backend, got {d}")


def _check_scale(scale: float | None, q: Tensor) -> float:
    if scale is None:
        # D = 0 gives all-zero scores; 1/sqrt(0) would turn them into NaN.
        return 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    return check_finite_number(scale, "scale")


def _max_seqlen(max_seqlen: int | None, name: str, cu: Tensor) -> int:
    """``max_seqlen`` checked, or read from ``cu`` when None: a host synchronisation that
    torch.compile(fullgraph=True) cannot trace (give it there). That no sequence is longer is
    checked with cu's values, inside the custom op."""
    if max_seqlen is None:
        return int(cu.diff().max()) if cu.numel() > 1 else 0
    if check_int(max_seqlen, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {max_seqlen}")
    return max_seqlen


# --- normalisation to (B, H, L, D) ----------------------------------------------------------------


def _rows_last_dim_contiguous(x: Tensor) -> Tensor:
    """The kernels read rows through any strides but want unit stride along D."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _stored(x: Tensor) -> Tensor:
    """``x`` with each broadcast (stride-0) dim narrowed to size 1: the elements it holds."""
    return x[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in x.stride())]


def _as_bhld(x: Tensor, B: int) -> Tensor:
    """(..., L, D) as (B, H, L, D): dim 0 is B, the dims between fold into H (a view when their
    strides allow one, else a copy: reshape)."""
    return x.reshape(B, math.prod(x.shape[1:-2]), *x.shape[-2:])


def _fold(x: Tensor, lead: tuple[int, ...], B: int) -> Tensor:
    """x (..., L, D) broadcast to the batch dims ``lead`` and viewed as (B, H, L, D): dim 0 is B
    (what lengths index), the rest fold into H. Broadcast dims stay stride 0, not copied, where
    the folded dims can be viewed as one; where they cannot (a broadcast dim before one that is
    not: k (B, 1, H2, L, D) against q (B, H1, H2, L, D)), x is copied into the folded shape."""
    return _as_bhld(_rows_last_dim_contiguous(x).expand(*lead, *x.shape[-2:]), B)


def _fold_mask(mask: Tensor, scores_shape: torch.Size) -> Tensor:
    """The mask as (B|1, H|1, Lq|1, Lk|1), H > 1 only where the mask has more than one head,
    folded as q's heads are; a bool mask over the elements it stores (a broadcast, stride-0 dim
    becomes size 1), so that its tile summary is computed once per distinct tile. (A float mask
    keeps its broadcast dims: where one requires grad, each of its elements gets its own.) A
    view, except when its head dims are broadcast in part in a way no one stride spans (a mask
    (3, 1, Lq, Lk) against heads (3, 4)): then they are copied."""
    m = _stored(mask) if mask.dtype == torch.bool else mask
    m = m[(None,) * (len(scores_shape) - m.dim())]
    if m.dim() == 2:
        return m[None, None]
    if m.dim() == 3:
        return m[:, None]
    if all(h == 1 for h in m.shape[1:-2]):
        return _as_bhld(m, m.shape[0])
    return _as_bhld(m.expand(m.shape[0], *scores_shape[1:-2], *m.shape[-2:]), m.shape[0])


def mask_tiles(mask: Tensor, block_q: int, block_k: int) -> Tensor:
    """int8 summary of a bool mask's (block_q x block_k) tiles over its last two dims: 0 = the
    tile keeps nothing, 1 = some, 2 = all; over the elements the mask stores (a broadcast, stride-0
    dim counts as size 1: expand the result to the kernel's grid), and a last dim of size 1 stays
    one tile. block_q is at most 255 (a tile's column counts are uint8).

    Replaces ``c = m.unflatten(-1, (nk, block_k)).unflatten(-3, (nq, block_q)).sum((-3, -1))``
    then ``0 if c == 0 else 2 if c == block_q * block_k else 1`` on a mask padded to whole tiles,
    without allocating anything of the mask's size: a block of tile rows at a time, each tile's
    kept rows are counted per column (uint8, read through a view of the mask), then the counts'
    min and max over the tile's columns say whether it keeps all, some or none.
    """
    if block_q > 255:
        raise ValueError(f"block_q must be at most 255 (the counts are uint8), got {block_q}")
    m = _stored(mask)
    *lead, mq, mk = m.shape
    tq, tk = (1 if mq == 1 else block_q), (1 if mk == 1 else block_k)
    if m.numel() == 0:
        return torch.zeros((*lead, -(-mq // tq), -(-mk // tk)), dtype=torch.int8, device=m.device)
    kept = m.view(torch.uint8)
    whole = mq - mq % tq
    step = tq * _TILE_ROWS_PER_STEP
    blocks = [(r, min(r + step, whole), tq) for r in range(0, whole, step)]
    blocks += [(whole, mq, mq % tq)] if mq % tq else []
    return torch.cat([_summarise(kept[..., r0:r1, :], height, tk) for r0, r1, height in blocks], -2)


# Tile rows mask_tiles summarises at a time: its temporaries stay within this many uint8 rows of
# the mask's width per head of the mask, whatever Lq.
_TILE_ROWS_PER_STEP = 16


def _summarise(kept: Tensor, height: int, tk: int) -> Tensor:
    """mask_tiles of ``kept`` (..., R, C) uint8, R a multiple of ``height``: tiles of height x tk
    (the last column of tiles narrower when tk does not divide C)."""
    counts = kept.unflatten(-2, (-1, height)).sum(-2, dtype=torch.uint8)  # kept rows per column
    whole = counts.shape[-1] - counts.shape[-1] % tk
    spans = [counts[..., :whole].unflatten(-1, (-1, tk))] if whole else []
    spans += [counts[..., whole:].unsqueeze(-2)] if whole < counts.shape[-1] else []
    lows, highs = zip(*(span.aminmax(dim=-1) for span in spans), strict=True)
    low, high = torch.cat(lows, -1), torch.cat(highs, -1)
    return (high > 0).to(torch.int8) + (low == height).to(torch.int8)


# --- per-backend kernels ------------------------------------------------------------------------


def _blocks(backend: str, q: Tensor) -> tuple[int, int]:
    if backend == "triton":
        from ..triton_kernels import attention as tk

        return tk.attention_blocks(q.shape[-1], q.dtype)
    return CPU_BLOCKS


def _kernels(backend: str):
    if backend == "cpu":
        return torch.ops.maskkern.attention_fwd, torch.ops.maskkern.attention_bwd
    if backend == "triton":
        from ..triton_kernels import attention as tk

        return tk.attention_fwd, tk.attention_bwd
    if backend == "cuda":
        return _softmax_composite("cuda")
    return _materialised_fwd, _materialised_bwd


def _visible(Lq, Lk, lengths, query_lengths, cu_q, cu_k, causal, left, right, device) -> Tensor:
    """Bool (B|1, 1, Lq, Lk): which keys each query may see by the arithmetic masks."""
    i, j = torch.arange(Lq, device=device)[:, None], torch.arange(Lk, device=device)[None, :]
    keep = torch.ones((1, 1, Lq, Lk), dtype=torch.bool, device=device)
    if cu_q is not None:
        # Row t of the packed tensor belongs to sequence seq[t] (n for rows past cu[n]).
        seq_q = torch.bucketize(i[:, 0], cu_q[1:], right=True)
        seq_k = torch.bucketize(j[0], cu_k[1:], right=True)
        n = cu_q.numel() - 1
        n_q, n_k = cu_q.diff(), cu_k.diff()
        keep = keep & (seq_q[:, None] == seq_k[None, :]) & (seq_q < n)[:, None]
        seq = seq_q.clamp(max=max(n - 1, 0))
        i = i - cu_q[seq][:, None] if n else i
        j = j - cu_k[seq_k.clamp(max=max(n - 1, 0))][None, :] if n else j
        offset = (n_k - n_q)[seq][:, None] if causal == 2 and n else 0
    else:
        offset = Lk - Lq if causal == 2 else 0
        if lengths is not None:
            keep = keep & (j < lengths.view(-1, 1, 1, 1))
        if query_lengths is not None:
            keep = keep & (i < query_lengths.view(-1, 1, 1, 1))
    if causal:  # the window's right bound at the diagonal
        right = 0 if right < 0 else min(right, 0)
    return keep & masks.window_keep(i, j, (left, right), offset)


def _materialised_probs(q, k, mask, lse, lengths, query_lengths, cu_q, cu_k, causal, left, right, scale):
    """(P, lse, k repeated to q's heads) with the (B, Hq, Lq, Lk) scores held: the composite."""
    ct = compute_dtype(q.dtype)
    group = q.shape[1] // max(k.shape[1], 1)
    kf = k.to(ct).repeat_interleave(group, 1)
    s = (q.to(ct) @ kf.transpose(-2, -1)) * scale
    if mask is not None and mask.dtype != torch.bool:
        s = s + mask.to(ct)
    keep = _visible(q.shape[2], k.shape[2], lengths, query_lengths, cu_q, cu_k, causal, left, right, q.device)
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, -1)
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # no key seen: exp(s - lse) = 0
    return torch.exp(s - lse[..., None]), lse, kf


def _blhd(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, H, L, D) in ``dtype`` as a view of (B, L, H, D) memory: the kernels' output layout."""
    return x.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)


def _materialised_fwd(q, k, v, mask, tiles, lengths, query_lengths, cu_q, cu_k, max_q, max_k,
                      causal, left, right, scale, block_q, block_k):  # fmt: skip
    p, lse, _ = _materialised_probs(
        q, k, mask, None, lengths, query_lengths, cu_q, cu_k, causal, left, right, scale
    )
    group = q.shape[1] // max(k.shape[1], 1)
    out = p @ v.to(p.dtype).repeat_interleave(group, 1)
    return _blhd(out, q.dtype), lse


def _materialised_bwd(grad, q, k, v, out, lse, mask, tiles, lengths, query_lengths, cu_q, cu_k, max_q,
                      max_k, causal, left, right, scale, block_q, block_k, want_ds=False):  # fmt: skip
    p, _, kf = _materialised_probs(
        q, k, mask, lse, lengths, query_lengths, cu_q, cu_k, causal, left, right, scale
    )
    ct, (B, Hkv), group = p.dtype, k.shape[:2], q.shape[1] // max(k.shape[1], 1)
    do = grad.to(ct)
    vf = v.to(ct).repeat_interleave(group, 1)
    ds = p * (do @ vf.transpose(-2, -1) - (do * out.to(ct)).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = ((ds.transpose(-2, -1) @ q.to(ct)) * scale).reshape(B, Hkv, group, *k.shape[2:]).sum(2)
    dv = (p.transpose(-2, -1) @ do).reshape(B, Hkv, group, *v.shape[2:]).sum(2)
    grads = tuple(_blhd(g, q.dtype) for g in (dq, dk, dv))
    return (*grads, ds) if want_ds else grads


def _softmax_composite(softmax_backend: str):
    """(fwd, bwd) of the composite around maskkern's masked softmax on ``softmax_backend``: the
    ``cuda`` backend's kernels (cuBLAS matmuls around the CUDA masked softmax kernel)."""
    return (
        functools.partial(_softmax_composite_fwd, softmax_backend=softmax_backend),
        functools.partial(_softmax_composite_bwd, softmax_backend=softmax_backend),
    )


def _by_kv_head(x: Tensor, hkv: int) -> Tensor:
    """(B, Hq, L, d) -> (B, Hkv, group * L, d): the rows of the query heads that read one kv head
    stacked, so that one matmul per kv head serves its whole group (k and v are not repeated)."""
    return x.reshape(x.shape[0], hkv, x.shape[1] * x.shape[2] // max(hkv, 1), x.shape[3])


def _softmax_masks(q, k, mask, cu_q, cu_k, causal, left, right):
    """(mask, causal) for the masked softmax: the masks it has no argument for, packed sequences
    (with each one's causal diagonal) and the window, as a bool mask ANDed into a bool ``mask``
    or filled with -inf into an additive one. Packed, its own causal is off: it would align to
    the whole packed (total_q, total_k) matrix."""
    if cu_q is None and left < 0 and right < 0:
        return mask, causal
    keep = _visible(q.shape[2], k.shape[2], None, None, cu_q, cu_k, causal, left, right, q.device)
    causal = causal if cu_q is None else 0
    if mask is None:
        return keep, causal
    if mask.dtype == torch.bool:
        return mask & keep, causal
    return mask.masked_fill(~keep, float("-inf")), causal


def _softmax_composite_probs(q, k, mask, lengths, query_lengths, cu_q, cu_k, causal, left, right, scale,
                             softmax_backend):  # fmt: skip
    """(P (B, Hq, Lq, Lk), q·scale stacked by kv head, the softmax's mask and causal): the scores
    (q·scale)·kᵀ in q's dtype (scaling q keeps fp16 scores in range), then the masked softmax."""
    qs = _by_kv_head(q * scale, k.shape[1])
    s = (qs @ k.transpose(-2, -1)).view(*q.shape[:3], k.shape[2])
    mask, causal = _softmax_masks(q, k, mask, cu_q, cu_k, causal, left, right)
    # Negative lengths were checked (or let through) by the attention op already.
    p = torch.ops.maskkern.masked_softmax(
        s, mask, lengths, query_lengths, causal, 1.0, False, softmax_backend
    )
    return p, qs, mask, causal


def _softmax_composite_fwd(q, k, v, mask, tiles, lengths, query_lengths, cu_q, cu_k, max_q, max_k,
                           causal, left, right, scale, block_q, block_k, *, softmax_backend):  # fmt: skip
    """(out, lse = empty): the backward recomputes P with the masked softmax, not from lse."""
    p, _, _, _ = _softmax_composite_probs(
        q, k, mask, lengths, query_lengths, cu_q, cu_k, causal, left, right, scale, softmax_backend
    )
    out = (_by_kv_head(p, k.shape[1]) @ v).view(*q.shape[:3], v.shape[3])
    return _blhd(out, q.dtype), q.new_empty((0,), dtype=compute_dtype(q.dtype))


def _softmax_composite_bwd(grad, q, k, v, out, lse, mask, tiles, lengths, query_lengths, cu_q, cu_k,
                           max_q, max_k, causal, left, right, scale, block_q, block_k, want_ds=False, *,
                           softmax_backend):  # fmt: skip
    """(dq, dk, dv[, dS]) through the masked softmax's backward kernel; dS, the gradient of the
    scaled scores, is also an additive mask's."""
    p, qs, soft_mask, soft_causal = _softmax_composite_probs(
        q, k, mask, lengths, query_lengths, cu_q, cu_k, causal, left, right, scale, softmax_backend
    )
    hkv = k.shape[1]
    do = _by_kv_head(grad, hkv)
    dp = (do @ v.transpose(-2, -1)).view(p.shape)
    keep = soft_mask if soft_mask is not None and soft_mask.dtype == torch.bool else None
    ds = torch.ops.maskkern.masked_softmax_backward(
        dp, p, keep, lengths, query_lengths, soft_causal, 1.0, softmax_backend
    )
    ds_rows = _by_kv_head(ds, hkv)
    dq = (ds_rows @ k).view(q.shape) * scale
    dk = ds_rows.transpose(-2, -1) @ qs
    dv = _by_kv_head(p, hkv).transpose(-2, -1) @ do
    grads = tuple(_blhd(g, q.dtype) for g in (dq, dk, dv))
    return (*grads, ds) if want_ds else grads


# --- the custom ops -----------------------------------------------------------------------------


def _kernel_backend(backend: str, q: Tensor, k: Tensor, v: Tensor) -> str:
    """``backend``, or "torch" where a fused one has nothing to tile: the composite then gives the
    empty or all-zero result."""
    if backend in FUSED and (q.numel() == 0 or k.numel() == 0 or v.numel() == 0):
        return "torch"
    return backend


def _tile_summary(q: Tensor, mask: Tensor | None, backend: str) -> Tensor:
    """A bool mask's mask_tiles on the fused ``backend``'s grid; empty otherwise."""
    if mask is None or mask.dtype != torch.bool or backend not in FUSED:
        return q.new_empty((0,), dtype=torch.int8)
    return mask_tiles(mask, *_blocks(backend, q))


def _expanded(q, k, mask, tiles, backend):
    """The mask expanded to (B, Hq, Lq, Lk) and, on a fused backend, its tile summary expanded to
    the kernel's grid: views, for the kernels."""
    if mask is None:
        return None, None
    B, Hq, Lq, Lk = shape = _scores_shape(q, k)
    if tiles is None or not tiles.numel() or backend not in FUSED:
        return mask.expand(shape), None
    block_q, block_k = _blocks(backend, q)
    return mask.expand(shape), tiles.expand(B, Hq, -(-Lq // block_q), -(-Lk // block_k))


def _out_like(q, v, backend):
    """Empty (out, lse) as the forward kernels return them (lse is empty on cuda)."""
    B, Hq, Lq = q.shape[:3]
    out = q.new_empty((B, Lq, Hq, v.shape[-1])).transpose(1, 2)
    lse_shape = (0,) if backend == "cuda" else (B, Hq, Lq)
    return out, q.new_empty(lse_shape, dtype=compute_dtype(q.dtype))


@torch.library.custom_op("maskkern::attention", mutates_args=())
def _attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    lengths: Tensor | None,
    query_lengths: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: int,
    window_left: int,
    window_right: int,
    scale: float,
    check_lengths: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse, mask_tiles): lse, the rows' logsumexp, is empty on cuda (its backward
    recomputes the probabilities with the masked softmax); mask_tiles, a bool mask's tile summary
    on a fused backend (else empty), is computed here once per call and saved for the backward."""
    if check_lengths:
        check_nonnegative_values(lengths, "lengths")
        check_nonnegative_values(query_lengths, "query_lengths")
    if cu_seqlens_q is not None:
        check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", q.shape[2], "q", max_seqlen_q, "max_seqlen_q")
        check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", k.shape[2], "k", max_seqlen_k, "max_seqlen_k")
    tiles = _tile_summary(q, mask, backend)
    run = _kernel_backend(backend, q, k, v)
    mask4, tiles4 = _expanded(q, k, mask, tiles, run)
    out, lse = _kernels(run)[0](
        q, k, v, mask4, tiles4, lengths, query_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, causal, window_left, window_right, scale, *_blocks(run, q),
    )  # fmt: skip
    return out, lse, tiles


@_attention_op.register_fake
def _(
    q,
    k,
    v,
    mask,
    lengths,
    query_lengths,
    cu_q,
    cu_k,
    max_q,
    max_k,
    causal,
    left,
    right,
    scale,
    check,
    backend,
):
    return (*_out_like(q, v, backend), _tile_summary(q, mask, backend))


@torch.library.custom_op("maskkern::attention_backward", mutates_args=())
def _attention_backward_op(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    mask_tiles: Tensor | None,
    lengths: Tensor | None,
    query_lengths: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: int,
    window_left: int,
    window_right: int,
    scale: float,
    mask_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask): dmask (B, Hq, Lq, Lk) only when ``mask_grad`` (a float mask that
    requires grad: its gradient is (Lq, Lk)-sized, so a fused backend runs the torch composite),
    else empty. ``mask_tiles``: the forward's (None or empty: the mask's elements are read)."""
    args = (lengths, query_lengths, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    args += (causal, window_left, window_right, scale)
    run = _kernel_backend(backend, q, k, v)
    grad = _rows_last_dim_contiguous(grad)
    mask4, tiles = _expanded(q, k, mask, mask_tiles, run)
    if mask_grad:
        bwd = _kernels("cuda" if run == "cuda" else "torch")[1]
        dq, dk, dv, ds = bwd(grad, q, k, v, out, lse, mask4, None, *args, 0, 0, want_ds=True)
        return dq, dk, dv, ds.to(mask.dtype)
    dq, dk, dv = _kernels(run)[1](grad, q, k, v, out, lse, mask4, tiles, *args, *_blocks(run, q))
    return dq, dk, dv, q.new_empty((0,))


def _scores_shape(q: Tensor, k: Tensor) -> tuple[int, int, int, int]:
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


@_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, mask, mask_tiles, lengths, query_lengths, cu_q, cu_k, max_q, max_k, causal,
      left, right, scale, mask_grad, backend):  # fmt: skip
    grads = tuple(_blhd(torch.empty_like(x), x.dtype) for x in (q, k, v))
    dmask = q.new_empty(_scores_shape(q, k)) if mask_grad else q.new_empty((0,))
    return (*grads, dmask)


def _setup_context(ctx, inputs, output):
    (
        q,
        k,
        v,
        mask,
        lengths,
        query_lengths,
        cu_q,
        cu_k,
        max_q,
        max_k,
        causal,
        left,
        right,
        scale,
        _,
        backend,
    ) = inputs
    out, lse, tiles = output
    ctx.save_for_backward(q, k, v, out, lse, mask, tiles, lengths, query_lengths, cu_q, cu_k)
    ctx.config = (max_q, max_k, causal, left, right, scale)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse, tiles)


def _backward(ctx, grad, _grad_lse, _grad_tiles):
    q, k, v, out, lse, mask, tiles, lengths, query_lengths, cu_q, cu_k = ctx.saved_tensors
    mask_grad = mask is not None and mask.dtype != torch.bool and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = torch.ops.maskkern.attention_backward(
        grad, q, k, v, out, lse, mask, tiles, lengths, query_lengths, cu_q, cu_k, *ctx.config, mask_grad,
        ctx.backend,
    )  # fmt: skip
    dmask = dmask.sum_to_size(mask.shape) if mask_grad else None
    return dq, dk, dv, dmask, *([None] * 12)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    """The C++ kernel ops are called inside the opaque ops above, but get fakes too so that
    opcheck and tracing can see them on their own."""

    @torch.library.register_fake("maskkern::attention_fwd")
    def _(q, k, v, mask, tiles, lengths, query_lengths, cu_q, cu_k, max_q, max_k, causal, left, right,
          scale, block_q, block_k):  # fmt: skip
        return _out_like(q, v, "cpu")

    @torch.library.register_fake("maskkern::attention_bwd")
    def _(grad, q, k, v, out, lse, mask, tiles, lengths, query_lengths, cu_q, cu_k, max_q, max_k, causal,
          left, right, scale, block_q, block_k):  # fmt: skip
        return tuple(_blhd(torch.empty_like(x), x.dtype) for x in (q, k, v))


if native_extension_loaded():
    _register_native_fakes()
