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
