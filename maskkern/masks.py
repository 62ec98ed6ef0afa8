"""Mask factories. Bool masks use True = keep / visible (the SDPA convention).

Each factory is the eager expression it documents; the kernels in maskkern compute the same masks
in-kernel (``lengths=``, ``causal=``) instead of materialising them. The region-of-interest fill
needs no factory: it is ``x.masked_fill(~mask, 0)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

ALIGNMENTS = ("top_left", "bottom_right")
CAUSAL_CHOICES = (False, True, "top_left", "bottom_right")


def causal_code(causal: bool | str) -> int:
    """The kernels' encoding of ``causal``: 0 = none, 1 = top-left (``True``), 2 = bottom-right."""
    if causal is False or causal is True:
        return int(causal)
    if isinstance(causal, str) and causal in ALIGNMENTS:
        return 1 + ALIGNMENTS.index(causal)
    raise ValueError(f"causal must be one of {CAUSAL_CHOICES}, got {causal!r}")


def padding_mask(ids: Tensor, pad_idx: int = 0) -> Tensor:
    """True where ``ids`` is not padding: ``ids != pad_idx`` (bool, shape of ``ids``)."""
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
    return ids != pad_idx


def lengths_to_mask(lengths: Tensor, max_len: int | None = None) -> Tensor:
    """(B, max_len) bool, True for the first ``lengths[b]`` positions of row b.

    Replaces ``torch.arange(max_len)[None, :] < lengths[:, None]``; ``max_len`` defaults to
    ``lengths.max()`` (which reads the tensor: pass it explicitly on CUDA to avoid a sync).
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def causal_mask(
    Lq: int, Lk: int | None = None, *, align: str = "top_left", device: torch.device | str | None = None
) -> Tensor:
    """(Lq, Lk) bool: query i sees key j when j <= i (``top_left``, ``tril(k=0)``, SDPA
    ``is_causal``) or j <= i + Lk - Lq (``bottom_right``: the last query sees every key, as in
    KV-cache decoding).

    Replaces ``torch.ones(Lq, Lk, dtype=torch.bool).tril(diagonal=0 or Lk - Lq)``.
    """
    Lk = Lq if Lk is None else Lk
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    if Lq < 0 or Lk < 0:
        raise ValueError(f"Lq and Lk must be >= 0, got Lq={Lq}, Lk={Lk}")
    offset = 0 if align == "top_left" else Lk - Lq
    return torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril(diagonal=offset)


def window_mask(
    Lq: int,
    Lk: int | None = None,
    window: tuple[int, int] = (-1, -1),
    *,
    align: str = "top_left",
    device: torch.device | str | None = None,
) -> Tensor:
    """(Lq, Lk) bool sliding window: query i sees key j when i + o - left <= j <= i + o + right,
    o = 0 (``top_left``) or Lk - Lq (``bottom_right``); -1 = unbounded on that side (flash-attn's
    ``window_size``; Mistral's sliding window is ``(w - 1, 0)`` with causal).

    Replaces ``ones(Lq, Lk).tril(o + right).triu(o - left).bool()``.
    """
    Lk = Lq if Lk is None else Lk
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    offset = 0 if align == "top_left" else Lk - Lq
    queries = torch.arange(Lq, device=device)[:, None]
    return window_keep(queries, torch.arange(Lk, device=device)[None, :], window, offset)


def window_keep(query: Tensor, key: Tensor, window: tuple[int, int], offset: int | Tensor = 0) -> Tensor:
    """Bool, the broadcast of the query positions ``query``, the key positions ``key`` and
    ``offset``: True where query + offset - left <= key <= query + offset + right (-1 = unbounded
    on that side). The one definition of the window in Python (``window_mask``, the attention
    composites); causal is the window's right bound at 0.

    Replaces ``(key >= query + offset - left) & (key <= query + offset + right)``.
    """
    left, right = check_window(window)
    diagonal = query + offset
    keep = torch.ones(torch.broadcast_shapes(diagonal.shape, key.shape), dtype=torch.bool, device=key.device)
    if left >= 0:
        keep = keep & (key >= diagonal - left)
    if right >= 0:
        keep = keep & (key <= diagonal + right)
    return keep


def check_window(window: object) -> tuple[int, int]:
    """``window`` as (left, right) ints, each -1 (unbounded) or >= 0; None = (-1, -1)."""
    if window is None:
        return -1, -1
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or any(isinstance(w, bool) or not isinstance(w, int) for w in window)
    ):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}")
    left, right = window
    if left < -1 or right < -1:
        raise ValueError(f"window entries must be >= 0 or -1 (unbounded), got {tuple(window)}")
    return int(left), int(right)


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Broadcast AND of bool masks (``None`` entries are ignored): ``m1 & m2 & ...``."""
    present = [m for m in masks if m is not None]
    for i, m in enumerate(present):
        if m.dtype != torch.bool:
            raise TypeError(f"masks[{i}] must be bool, got dtype {m.dtype}")
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out


def attention_mask(
    ids: Tensor | None = None,
    *,
    pad_idx: int = 0,
    lengths: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """(B, 1, L, L) bool pad-and-causal self-attention mask.

    Keys that are padding (``ids == pad_idx``, or positions >= ``lengths[b]``) are hidden from
    every query; with ``causal`` query i also sees only keys j <= i. Replaces
    ``(ids != pad)[:, None, None, :] & torch.ones(L, L).bool().tril()``.
    """
    if (ids is None) == (lengths is None):
        raise ValueError("attention_mask needs exactly one of ids or lengths")
    if ids is not None:
        if ids.dim() != 2:
            raise ValueError(f"ids must be (B, L), got shape {tuple(ids.shape)}")
        keys = padding_mask(ids, pad_idx)
    else:
        keys = lengths_to_mask(lengths)
    L = keys.shape[1]
    mask = keys[:, None, None, :].expand(keys.shape[0], 1, L, L)
    if causal:
        mask = mask & causal_mask(L, device=keys.device)
    return mask.contiguous()


def to_additive(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Bool keep-mask to an additive float mask: 0 where kept, -inf where masked.

    Replaces ``torch.zeros_like(mask, dtype=dtype).masked_fill(~mask, float('-inf'))``.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got dtype {mask.dtype}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def unpad(x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, int]:
    """Padded (B, L, ...) rows to the packed layout: ``(packed (total, ...), cu_seqlens int32
    (B + 1,), max_seqlen)``, keeping rows i < lengths[b] of each batch item in order.

    Replaces flash-attn's ``unpad_input`` and ``x[lengths_to_mask(lengths, L)]`` plus the
    cumulative sum; ``varlen_attention`` takes its output.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be (B, L, ...), got shape {tuple(x.shape)}")
    if lengths.dim() != 1 or lengths.shape[0] != x.shape[0]:
        raise ValueError(f"lengths must be ({x.shape[0]},) = (x.shape[0],), got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
    if lengths.device != x.device:
        raise ValueError(f"lengths must be on x's device ({x.device}), got {lengths.device}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > x.shape[1]):
        raise ValueError(f"lengths must be in [0, {x.shape[1]}] (x.shape[1]), got {lengths.tolist()}")
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=x.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return x[lengths_to_mask(lengths, x.shape[1])], cu_seqlens, max_seqlen


def pad(packed: Tensor, cu_seqlens: Tensor, max_len: int) -> Tensor:
    """Packed (total, ...) rows back to (B, max_len, ...) with zeros after each sequence: the
    inverse of ``unpad`` (flash-attn's ``pad_input``). Differentiable in ``packed``.

    ``cu_seqlens``: int32/int64 (B + 1,), 0 = cu[0] <= ... <= cu[B] = total, as ``unpad`` returns
    it and ``varlen_attention`` takes it (checked by the same functions).
    """
    # The ops import this module: their shared checks are imported when called.
    from .ops._common import check_cu_seqlens, check_cu_seqlens_values, check_int, check_tensor

    check_tensor(packed, "packed")
    cu = check_cu_seqlens(cu_seqlens, "cu_seqlens", packed, "packed")
    if check_int(max_len, "max_len") < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    check_cu_seqlens_values(cu, "cu_seqlens", packed.shape[0], "packed", max_len, "max_len")
    lengths = cu.diff()
    keep = lengths_to_mask(lengths, max_len)
    out = packed.new_zeros((lengths.numel(), max_len, *packed.shape[1:]))
    return out.index_put((keep,), packed)
