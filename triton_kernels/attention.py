"""Triton kernels of maskkern.attention: a FlashAttention-2 forward and backward with masks.

The caller (maskkern/ops/attention.py) has validated the arguments (csrc/maskkern.cpp documents
them): q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), grad_out (B, Hq, Lq, Dv), each with
unit last stride and any other strides (read through them, never copied); query head h reads kv
head h // (Hq // Hkv). Packed mode (cu_seqlens given): B = 1, q / k / v hold every sequence's rows
and sequence s owns q rows [cu_q[s], cu_q[s + 1]) and k / v rows [cu_k[s], cu_k[s + 1]).

Visibility of key j to query i (both local to the batch item or sequence), with n_q / n_k the
item's query / key counts and o the diagonal's offset (Lk - Lq padded, n_k - n_q packed, when
causal is 2 = bottom-right; 0 otherwise):

    i < n_q and j < n_k and (causal == 0 or j <= i + o)
    and (window_left < 0 or j >= i + o - window_left) and (window_right < 0 or j <= i + o + window_right)
    and the bool mask at [b, h, i, j] (a float mask is added to the scaled scores instead)

A query tile's key-tile range follows from those bounds arithmetically (tutorial 06 generalised to
lengths and windows); inside it the tiles where every (i, j) pair passes the bounds run without any
element mask (``MASKED=False``) and only the ragged ones around them build one. A bool mask comes
with ``mask_tiles`` (0 = the tile keeps nothing: skipped, k / v not loaded; 2 = all kept: the mask
is not loaded; 1 = its elements are loaded). A row that sees nothing gives zeros and lse = +inf, so
that the backward's P = exp(s - lse) is 0 there and its gradients are zeros.

Forward (``_fwd_kernel``): one program per (query tile, b * Hq + h), an online softmax in the log2
domain (exp2 of scores pre-multiplied by scale * log2(e)); lse is stored in natural log.
Backward: ``_bwd_preprocess_kernel`` computes delta = rowsum(dO * O); ``_bwd_dkdv_kernel`` owns a key
tile of one kv head and loops over the query heads of its group and the query tiles that can see
it, so dk / dv are summed in registers and stored once (no atomics); ``_bwd_dq_kernel`` owns a
query tile. The math runs in fp32 (fp64 for fp64); fp16 / bf16 dots take fp16 / bf16 operands with
fp32 accumulation, fp32 dots are IEEE (no TF32).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import triton_interpreting
from .._dtypes import compute_dtype as torch_compute_dtype
from ._utils import cast_out, compute_dtype

_LOG2E = 1.4426950408889634  # log2(e): the kernels work in the log2 domain (exp2 is native)
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): lse back in natural log

# The interpreter's fp16 / bf16 arithmetic is unreliable (bf16 is garbage): its dots take fp32
# copies of the operands. The products of fp16 / bf16 values are exact in fp32, as on a GPU.
_UPCAST_DOTS = tl.constexpr(triton_interpreting())


# --- shared pieces of the kernels ---------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DTYPE: tl.constexpr):
    """acc + a @ b with operands in DTYPE (the data's dtype), accumulated in acc's dtype."""
    if _UPCAST_DOTS:
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision="ieee")
    return tl.dot(a.to(DTYPE), b.to(DTYPE), acc, input_precision="ieee")


@triton.jit
def _operand(x, DTYPE: tl.constexpr):
    """A compute-dtype tile (P or dS) rounded to the data's dtype for a dot, rounded to nearest
    also under the interpreter (cast_out)."""
    return cast_out(x, DTYPE)


@triton.jit
def _bounds(
    b,
    lengths_ptr,
    qlens_ptr,
    cu_q_ptr,
    cu_k_ptr,
    Lq,
    Lk,
    CAUSAL: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_QLENS: tl.constexpr,
    PACKED: tl.constexpr,
):
    """(q0, k0, n_q, n_k, o) of batch item / sequence b, all int64: its first q and k rows in the
    tensors, its query and key counts and the diagonal's offset."""
    if PACKED:
        q0 = tl.load(cu_q_ptr + b)
        k0 = tl.load(cu_k_ptr + b)
        n_q = tl.maximum(tl.load(cu_q_ptr + b + 1) - q0, 0)
        n_k = tl.maximum(tl.load(cu_k_ptr + b + 1) - k0, 0)
        if CAUSAL == 2:  # noqa: SIM108 (if blocks on constexprs: one branch is compiled)
            o = n_k - n_q
        else:
            o = tl.zeros([], tl.int64)
    else:
        q0 = tl.zeros([], tl.int64)
        k0 = tl.zeros([], tl.int64)
        n_q = tl.full([], Lq, tl.int64)
        n_k = tl.full([], Lk, tl.int64)
        if HAS_QLENS:
            n_q = tl.minimum(tl.maximum(tl.load(qlens_ptr + b), 0), n_q)
        if HAS_LENGTHS:
            n_k = tl.minimum(tl.maximum(tl.load(lengths_ptr + b), 0), n_k)
        if CAUSAL == 2:  # noqa: SIM108 (if blocks on constexprs: one branch is compiled)
            o = tl.full([], Lk - Lq, tl.int64)
        else:
            o = tl.zeros([], tl.int64)
    return q0, k0, n_q, n_k, o


@triton.jit
def _split(t0, hi, f0, f1, BLOCK: tl.constexpr):
    """The loop over tiles [t0, hi) (t0 a multiple of BLOCK) split as [t0, e0) masked, [e0, e1)
    full, [e1, hi) masked, given the full tiles' aligned range [f0, f1): returns (e0, e1)."""
    f0 = tl.maximum(f0, t0)
    has_full = f1 > f0
    e0 = tl.where(has_full, f0, hi)
    e1 = tl.where(has_full, f1, hi)
    return e0, e1


@triton.jit
def _key_range(
    r0,
    n_q,
    n_k,
    o,
    window_left,
    window_right,
    CAUSAL: tl.constexpr,
    HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the query tile of rows [r0, r0 + BLOCK_M): the key tiles to visit [t0, hi) split into
    masked [t0, e0), full [e0, e1), masked [e1, hi). A full tile has every key < n_k and every
    (i, j) pair of the tile inside causal / window (rows >= n_q do not matter: they are not kept)."""
    r1 = tl.minimum(r0 + BLOCK_M, n_q)  # the tile's valid rows are [r0, r1)
    lo = tl.zeros([], tl.int64)
    hi = n_k
    full_lo = tl.zeros([], tl.int64)  # a full tile starts at or after this key
    full_hi = n_k  # ... and ends at or before this one (exclusive)
    if CAUSAL != 0:
        hi = tl.minimum(hi, r1 + o)
        full_hi = tl.minimum(full_hi, r0 + o + 1)
    if HAS_WR:
        hi = tl.minimum(hi, r1 + o + window_right)
        full_hi = tl.minimum(full_hi, r0 + o + window_right + 1)
    if HAS_WL:
        lo = tl.maximum(lo, r0 + o - window_left)
        full_lo = tl.maximum(full_lo, r0 + BLOCK_M - 1 + o - window_left)
    hi = tl.where(r1 > r0, hi, 0)
    hi = tl.maximum(hi, 0)
    t0 = tl.minimum(lo, hi) // BLOCK_N * BLOCK_N
    f0 = (full_lo + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    f1 = tl.maximum(full_hi, 0) // BLOCK_N * BLOCK_N
    f1 = tl.where(r1 > r0, f1, 0)  # no valid row: nothing to visit
    e0, e1 = _split(t0, hi, f0, f1, BLOCK_N)
    return t0, e0, e1, hi


@triton.jit
def _query_range(
    c0,
    n_q,
    n_k,
    o,
    window_left,
    window_right,
    CAUSAL: tl.constexpr,
    HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the key tile of keys [c0, c0 + BLOCK_N): the query tiles (of BLOCK_M rows) to visit
    [t0, hi) split into masked [t0, e0), full [e0, e1), masked [e1, hi). A full tile needs every key
    of the key tile < n_k and every (i, j) pair inside causal / window; its rows >= n_q do not
    matter (their q / dO load as 0 and lse as +inf, so P = 0 there)."""
    c1 = tl.minimum(c0 + BLOCK_N, n_k)  # the tile's valid keys are [c0, c1)
    lo = tl.zeros([], tl.int64)
    hi = n_q
    full_lo = tl.zeros([], tl.int64)
    full_hi = (n_q + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if CAUSAL != 0:  # j <= i + o: i >= j - o
        lo = tl.maximum(lo, c0 - o)
        full_lo = tl.maximum(full_lo, c0 + BLOCK_N - 1 - o)
    if HAS_WR:  # j <= i + o + wr: i >= j - o - wr
        lo = tl.maximum(lo, c0 - o - window_right)
        full_lo = tl.maximum(full_lo, c0 + BLOCK_N - 1 - o - window_right)
    if HAS_WL:  # j >= i + o - wl: i <= j - o + wl
        hi = tl.minimum(hi, c1 - o + window_left)
        full_hi = tl.minimum(full_hi, c0 - o + window_left + 1)
    hi = tl.where(c1 > c0, hi, 0)
    hi = tl.maximum(hi, 0)
    t0 = tl.minimum(lo, hi) // BLOCK_M * BLOCK_M
    f0 = (full_lo + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    f1 = tl.maximum(full_hi, 0) // BLOCK_M * BLOCK_M
    f1 = tl.where(c0 + BLOCK_N <= n_k, f1, 0)  # a ragged key tile: no query tile is full
    e0, e1 = _split(t0, hi, f0, f1, BLOCK_M)
    return t0, e0, e1, hi


@triton.jit
def _bound32(x):
    """A scalar int64 bound on a difference of in-tile offsets, as int32 (tiles are < 2**10)."""
    return tl.minimum(tl.maximum(x, -(2**30)), 2**30).to(tl.int32)


@triton.jit
def _scores(
    s, di, dj, i0, j0, row_ok, col_ok, mask_base, smq, smk, need, o, window_left, window_right,
    qk_scale, COMPUTE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """q.k (``s``, either orientation) to log2-domain logits: s * scale * log2(e) (+ mask * log2(e)),
    -inf where not visible. The query of element (di, dj) is i0 + di, its key j0 + dj (di, dj:
    int32 in-tile offsets, broadcast to s's shape). ``row_ok`` / ``col_ok`` (broadcast like di / dj):
    query < n_q / key < n_k, where the mask may be read. ``need``: whether a bool mask's elements
    are read at all (False on a tile mask_tiles says is all kept). In a tile that is not MASKED
    every key is < n_k and inside causal / window for every query; rows >= n_q are the caller's."""
    s = s * qk_scale
    if MASK_KIND != 0:
        ok = row_ok & col_ok
        mask_ptrs = mask_base + (i0 * smq + j0 * smk) + (di * smq + dj * smk)
    if MASK_KIND == 2:
        s = s + tl.load(mask_ptrs, mask=ok, other=0.0).to(COMPUTE) * LOG2E
    if MASKED:
        # key - query = (j0 - i0) + (dj - di): causal / window bound dj - di, in int32
        rel = dj - di
        keep = col_ok
        if CAUSAL != 0:
            keep = keep & (rel <= _bound32(i0 + o - j0))
        if HAS_WL:
            keep = keep & (rel >= _bound32(i0 + o - window_left - j0))
        if HAS_WR:
            keep = keep & (rel <= _bound32(i0 + o + window_right - j0))
    if MASK_KIND == 1:
        # a select, not ok & need: the interpreter's & with a scalar compare gives a non-bool mask
        kept = tl.load(mask_ptrs, mask=tl.where(need, ok, False), other=1) != 0
        if MASKED:  # noqa: SIM108 (if blocks on constexprs: one branch is compiled)
            keep = keep & kept
        else:
            keep = kept
    if MASKED or MASK_KIND == 1:
        s = tl.where(keep, s, float("-inf"))
    return s


# --- forward ------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, r0, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk, j0, need,
    n_k, o, window_left, window_right, qk_scale, offs_n, offs_d, offs_dv, D, Dv,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The online softmax's step over the key tile [j0, j0 + BLOCK_N)."""
    offs_m = tl.arange(0, BLOCK_M)
    j = j0 + offs_n
    col_ok = j < n_k
    kT = tl.load(
        k_base + j[None, :] * skn + offs_d[:, None], mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0
    )
    s = _dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], COMPUTE), DTYPE)
    s = _scores(
        s, offs_m[:, None], offs_n[None, :], r0, j0, row_ok[:, None], col_ok[None, :], mask_base, smq, smk,
        need, o, window_left, window_right, qk_scale, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED,
    )  # fmt: skip
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # 0 for a row that has seen nothing yet: exp2(-inf - 0) = 0 rather than NaN.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - shift)
    p = tl.exp2(s - shift[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(
        v_base + j[:, None] * svn + offs_dv[None, :],
        mask=col_ok[:, None] & (offs_dv < Dv)[None, :],
        other=0.0,
    )
    acc = _dot(_operand(p, DTYPE), v, acc * alpha[:, None], DTYPE)
    return acc, l_i, m_new


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk,
    tiles_base, stq, stk, MT_Q, MT_K, r0, start, end,
    n_k, o, window_left, window_right, qk_scale, offs_n, offs_d, offs_dv, D, Dv,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, HAS_TILES: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """_fwd_step over the key tiles [start, end), skipping those mask_tiles says keep nothing."""
    for j0 in range(start, end, BLOCK_N):
        if HAS_TILES:
            code = tl.load(tiles_base + (r0 // MT_Q) * stq + (j0 // MT_K) * stk)
            if code != 0:
                acc, l_i, m_i = _fwd_step(
                    acc, l_i, m_i, q, r0, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk, j0,
                    code == 1, n_k, o, window_left, window_right, qk_scale, offs_n, offs_d, offs_dv,
                    D, Dv, DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED, BLOCK_M, BLOCK_N,
                )  # fmt: skip
        else:
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, r0, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk, j0,
                True, n_k, o, window_left, window_right, qk_scale, offs_n, offs_d, offs_dv,
                D, Dv, DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    out_ptr,  # (B, Lq, Hq, Dv) contiguous memory, q's dtype, through its strides below
    lse_ptr,  # (B, Hq, Lq) contiguous, COMPUTE: logsumexp of the scaled scores, +inf = sees nothing
    q_ptr,  # (B, Hq, Lq, D) strided, unit last stride
    k_ptr,  # (B, Hkv, Lk, D) strided, unit last stride
    v_ptr,  # (B, Hkv, Lk, Dv) strided, unit last stride
    mask_ptr,  # bool keep-mask or additive mask of q's dtype, (B, Hq, Lq, Lk) via strides; or None
    tiles_ptr,  # int8 (B, Hq, cdiv(Lq, MT_Q), cdiv(Lk, MT_K)) via strides (bool mask only); or None
    lengths_ptr,  # int64 (B,) key counts, or None
    qlens_ptr,  # int64 (B,) query counts, or None
    cu_q_ptr,  # int64 (n + 1,) packed sequences' q row bounds, or None
    cu_k_ptr,  # int64 (n + 1,) packed sequences' k row bounds, or None
    sqb,
    sqh,
    sqm,  # q strides of batch, head, row (elements)
    skb,
    skh,
    skn,  # k strides
    svb,
    svh,
    svn,  # v strides
    sob,
    soh,
    som,  # out strides
    smb,
    smh,
    smq,
    smk,  # mask strides (0 where broadcast)
    stb,
    sth,
    stq,
    stk,  # mask_tiles strides
    Hq,  # query heads
    GROUP,  # Hq // Hkv
    Lq,  # q rows per batch item (total_q packed): also lse's row count
    Lk,  # k rows per batch item (total_k packed)
    D,  # q / k head dim
    Dv,  # v head dim
    window_left,  # keys before the diagonal a query sees (used when HAS_WL)
    window_right,  # keys after the diagonal a query sees (used when HAS_WR)
    qk_scale: tl.float64,  # scale * log2(e)
    N_TILES,  # programs per (b, h): grid axis 0 = (b * heads + h) * N_TILES + tile
    MT_Q,  # mask_tiles' tile rows (a multiple of BLOCK_M)
    MT_K,  # mask_tiles' tile columns (a multiple of BLOCK_N)
    DTYPE: tl.constexpr,  # the data's dtype (dot operands)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    CAUSAL: tl.constexpr,  # 0 none, 1 top-left, 2 bottom-right
    HAS_WL: tl.constexpr,  # window_left >= 0
    HAS_WR: tl.constexpr,  # window_right >= 0
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool keep-mask, 2 additive
    HAS_TILES: tl.constexpr,  # tiles_ptr is a tensor
    HAS_LENGTHS: tl.constexpr,  # lengths_ptr is a tensor
    HAS_QLENS: tl.constexpr,  # qlens_ptr is a tensor
    PACKED: tl.constexpr,  # cu_q_ptr / cu_k_ptr are tensors (grid axis 1 = sequence * Hq + h)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # next power of two >= D (>= 16)
    BLOCK_DV: tl.constexpr,  # next power of two >= Dv (>= 16)
):
    pid = tl.program_id(0)
    pid_m = pid % N_TILES
    pid_bh = pid // N_TILES
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    q0, k0, n_q, n_k, o = _bounds(
        b, lengths_ptr, qlens_ptr, cu_q_ptr, cu_k_ptr, Lq, Lk, CAUSAL, HAS_LENGTHS, HAS_QLENS, PACKED
    )
    tb = b  # the tensors' batch index: 0 when packed
    if PACKED:
        tb = 0
    r0 = pid_m.to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    i = r0 + offs_m  # local query index (int64)
    row_ok = i < n_q

    q = tl.load(
        q_ptr + tb * sqb + h * sqh + (q0 + i)[:, None] * sqm + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    k_base = k_ptr + tb * skb + hk * skh + k0 * skn
    v_base = v_ptr + tb * svb + hk * svh + k0 * svn
    mask_base = mask_ptr
    if MASK_KIND != 0:
        mask_base = mask_ptr + b * smb + h * smh
    tiles_base = tiles_ptr
    if HAS_TILES:
        tiles_base = tiles_ptr + b * stb + h * sth
    qk_scale = tl.full([], qk_scale, COMPUTE)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], COMPUTE)
    l_i = tl.zeros([BLOCK_M], COMPUTE)
    m_i = tl.full([BLOCK_M], float("-inf"), COMPUTE)
    t0, e0, e1, hi = _key_range(
        r0, n_q, n_k, o, window_left, window_right, CAUSAL, HAS_WL, HAS_WR, BLOCK_M, BLOCK_N
    )
    # masked tiles before the full ones (window_left), the full ones, the masked ones after (the
    # diagonal, window_right, the ragged end of n_k)
    for part in tl.static_range(3):
        if part == 1:
            start, end = e0, e1
        elif part == 0:
            start, end = t0, e0
        else:
            start, end = e1, hi
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk,
            tiles_base, stq, stk, MT_Q, MT_K, r0, start, end, n_k, o, window_left, window_right,
            qk_scale, offs_n, offs_d, offs_dv, D, Dv,
            DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, HAS_TILES, part != 1, BLOCK_M, BLOCK_N,
        )  # fmt: skip

    # l == 0: the row saw nothing (acc is 0 too); a NaN l (a NaN score) propagates.
    seen = (l_i != 0) & row_ok
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = tl.where(seen[:, None], out, 0.0)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    # padded: every row of the item is written (those past n_q as zeros / +inf); packed: only the
    # sequence's own rows
    n_rows = Lq
    if PACKED:
        n_rows = n_q
    store_ok = i < n_rows
    tl.store(
        out_ptr + tb * sob + h * soh + (q0 + i)[:, None] * som + offs_dv[None, :],
        cast_out(out, out_ptr.dtype.element_ty),
        mask=store_ok[:, None] & (offs_dv < Dv)[None, :],
    )
    tl.store(lse_ptr + (tb * Hq + h) * Lq + q0 + i, lse, mask=store_ok)


# --- backward -----------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(
    delta_ptr,  # (B, Hq, Lq) contiguous, COMPUTE: rowsum(dO * O)
    do_ptr,  # grad_out (B, Hq, Lq, Dv) strided, unit last stride
    out_ptr,  # out (B, Hq, Lq, Dv) strided, unit last stride
    sdb,
    sdh,
    sdm,  # grad_out strides of batch, head, row
    sob,
    soh,
    som,  # out strides
    Hq,  # query heads
    Lq,  # rows per (b, h) (total_q packed)
    Dv,  # v head dim
    N_TILES,  # programs per (b, h): grid axis 0 = (b * Hq + h) * N_TILES + tile
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_DV: tl.constexpr,  # next power of two >= Dv
):
    pid = tl.program_id(0)
    pid_bh = pid // N_TILES
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    i = (pid % N_TILES).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (i < Lq)[:, None] & (offs_dv < Dv)[None, :]
    do = tl.load(do_ptr + b * sdb + h * sdh + i[:, None] * sdm + offs_dv[None, :], mask=ok, other=0.0)
    o = tl.load(out_ptr + b * sob + h * soh + i[:, None] * som + offs_dv[None, :], mask=ok, other=0.0)
    delta = tl.sum(do.to(COMPUTE) * o.to(COMPUTE), axis=1)
    tl.store(delta_ptr + (b * Hq + h) * Lq + i, delta, mask=i < Lq)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, c0, col_ok, q_base, do_base, sqm, sdm, lse_base, delta_base, mask_base, smq, smk,
    i0, need, n_q, n_k, o, window_left, window_right, qk_scale, offs_m, offs_d, offs_dv, D, Dv,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dk, dv's step over the query tile [i0, i0 + BLOCK_M), transposed (keys x queries)."""
    offs_n = tl.arange(0, BLOCK_N)
    i = i0 + offs_m
    row_ok = i < n_q
    qT = tl.load(
        q_base + i[None, :] * sqm + offs_d[:, None], mask=row_ok[None, :] & (offs_d < D)[:, None], other=0.0
    )
    # lse = +inf past n_q: P = 0 there without an element mask
    lse = tl.load(lse_base + i, mask=row_ok, other=float("inf")) * LOG2E
    sT = _dot(k, qT, tl.zeros([BLOCK_N, BLOCK_M], COMPUTE), DTYPE)
    sT = _scores(
        sT, offs_m[None, :], offs_n[:, None], i0, c0, row_ok[None, :], col_ok[:, None], mask_base, smq, smk,
        need, o, window_left, window_right, qk_scale, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED,
    )  # fmt: skip
    pT = tl.exp2(sT - lse[None, :])
    do = tl.load(
        do_base + i[:, None] * sdm + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv < Dv)[None, :],
        other=0.0,
    )
    dv = _dot(_operand(pT, DTYPE), do, dv, DTYPE)
    delta = tl.load(delta_base + i, mask=row_ok, other=0.0)
    dpT = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], COMPUTE), DTYPE)
    dsT = pT * (dpT - delta[None, :])
    dk = _dot(_operand(dsT, DTYPE), tl.trans(qT), dk, DTYPE)
    return dk, dv


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, col_ok, q_base, do_base, sqm, sdm, lse_base, delta_base, mask_base, smq, smk,
    tiles_base, stq, stk, MT_Q, MT_K, c0, start, end,
    n_q, n_k, o, window_left, window_right, qk_scale, offs_m, offs_d, offs_dv, D, Dv,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, HAS_TILES: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """_dkdv_step over the query tiles [start, end), skipping those mask_tiles says keep nothing."""
    for i0 in range(start, end, BLOCK_M):
        if HAS_TILES:
            code = tl.load(tiles_base + (i0 // MT_Q) * stq + (c0 // MT_K) * stk)
            if code != 0:
                dk, dv = _dkdv_step(
                    dk, dv, k, v, c0, col_ok, q_base, do_base, sqm, sdm, lse_base, delta_base, mask_base,
                    smq, smk, i0, code == 1, n_q, n_k, o, window_left, window_right, qk_scale, offs_m,
                    offs_d, offs_dv, D, Dv, DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED,
                    BLOCK_M, BLOCK_N,
                )  # fmt: skip
        else:
            dk, dv = _dkdv_step(
                dk, dv, k, v, c0, col_ok, q_base, do_base, sqm, sdm, lse_base, delta_base, mask_base,
                smq, smk, i0, True, n_q, n_k, o, window_left, window_right, qk_scale, offs_m,
                offs_d, offs_dv, D, Dv, DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED,
                BLOCK_M, BLOCK_N,
            )  # fmt: skip
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    dk_ptr,  # (B, Lk, Hkv, D) contiguous memory, q's dtype, through its strides below
    dv_ptr,  # (B, Lk, Hkv, Dv) contiguous memory, q's dtype, through its strides below
    q_ptr,  # (B, Hq, Lq, D) strided, unit last stride
    k_ptr,  # (B, Hkv, Lk, D) strided, unit last stride
    v_ptr,  # (B, Hkv, Lk, Dv) strided, unit last stride
    do_ptr,  # grad_out (B, Hq, Lq, Dv) strided, unit last stride
    lse_ptr,  # (B, Hq, Lq) contiguous, COMPUTE: the forward's
    delta_ptr,  # (B, Hq, Lq) contiguous, COMPUTE: rowsum(dO * O)
    mask_ptr,  # bool keep-mask or additive mask of q's dtype, (B, Hq, Lq, Lk) via strides; or None
    tiles_ptr,  # int8 (B, Hq, cdiv(Lq, MT_Q), cdiv(Lk, MT_K)) via strides (bool mask only); or None
    lengths_ptr,  # int64 (B,) key counts, or None
    qlens_ptr,  # int64 (B,) query counts, or None
    cu_q_ptr,  # int64 (n + 1,) packed sequences' q row bounds, or None
    cu_k_ptr,  # int64 (n + 1,) packed sequences' k row bounds, or None
    sqb,
    sqh,
    sqm,  # q strides of batch, head, row (elements)
    skb,
    skh,
    skn,  # k strides
    svb,
    svh,
    svn,  # v strides
    sdb,
    sdh,
    sdm,  # grad_out strides
    sdkb,
    sdkh,
    sdkn,  # dk strides
    sdvb,
    sdvh,
    sdvn,  # dv strides
    smb,
    smh,
    smq,
    smk,  # mask strides (0 where broadcast)
    stb,
    sth,
    stq,
    stk,  # mask_tiles strides
    Hq,  # query heads
    Hkv,  # kv heads
    GROUP,  # Hq // Hkv: the query heads h = hk * GROUP + g this program sums over
    Lq,  # q rows per batch item (total_q packed)
    Lk,  # k rows per batch item (total_k packed)
    D,  # q / k head dim
    Dv,  # v head dim
    window_left,  # keys before the diagonal a query sees (used when HAS_WL)
    window_right,  # keys after the diagonal a query sees (used when HAS_WR)
    qk_scale: tl.float64,  # scale * log2(e)
    scale: tl.float64,  # the softmax scale (dk's factor)
    N_TILES,  # programs per (b, h): grid axis 0 = (b * heads + h) * N_TILES + tile
    MT_Q,  # mask_tiles' tile rows (a multiple of BLOCK_M)
    MT_K,  # mask_tiles' tile columns (a multiple of BLOCK_N)
    DTYPE: tl.constexpr,  # the data's dtype (dot operands)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    CAUSAL: tl.constexpr,  # 0 none, 1 top-left, 2 bottom-right
    HAS_WL: tl.constexpr,  # window_left >= 0
    HAS_WR: tl.constexpr,  # window_right >= 0
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool keep-mask, 2 additive
    HAS_TILES: tl.constexpr,  # tiles_ptr is a tensor
    HAS_LENGTHS: tl.constexpr,  # lengths_ptr is a tensor
    HAS_QLENS: tl.constexpr,  # qlens_ptr is a tensor
    PACKED: tl.constexpr,  # cu_q_ptr / cu_k_ptr are tensors (grid axis 1 = sequence * Hkv + hk)
    BLOCK_M: tl.constexpr,  # query rows per inner step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,  # next power of two >= D (>= 16)
    BLOCK_DV: tl.constexpr,  # next power of two >= Dv (>= 16)
):
    pid = tl.program_id(0)
    pid_n = pid % N_TILES
    pid_bh = pid // N_TILES
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    q0, k0, n_q, n_k, o = _bounds(
        b, lengths_ptr, qlens_ptr, cu_q_ptr, cu_k_ptr, Lq, Lk, CAUSAL, HAS_LENGTHS, HAS_QLENS, PACKED
    )
    tb = b  # the tensors' batch index: 0 when packed
    if PACKED:
        tb = 0
    c0 = pid_n.to(tl.int64) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    j = c0 + offs_n  # local key index (int64)
    col_ok = j < n_k
    k = tl.load(
        k_ptr + tb * skb + hk * skh + (k0 + j)[:, None] * skn + offs_d[None, :],
        mask=col_ok[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    v = tl.load(
        v_ptr + tb * svb + hk * svh + (k0 + j)[:, None] * svn + offs_dv[None, :],
        mask=col_ok[:, None] & (offs_dv < Dv)[None, :],
        other=0.0,
    )
    qk_scale = tl.full([], qk_scale, COMPUTE)
    dk = tl.zeros([BLOCK_N, BLOCK_D], COMPUTE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], COMPUTE)
    t0, e0, e1, hi = _query_range(
        c0, n_q, n_k, o, window_left, window_right, CAUSAL, HAS_WL, HAS_WR, BLOCK_M, BLOCK_N
    )
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + tb * sqb + h * sqh + q0 * sqm
        do_base = do_ptr + tb * sdb + h * sdh + q0 * sdm
        lse_base = lse_ptr + (tb * Hq + h) * Lq + q0
        delta_base = delta_ptr + (tb * Hq + h) * Lq + q0
        mask_base = mask_ptr
        if MASK_KIND != 0:
            mask_base = mask_ptr + b * smb + h * smh
        tiles_base = tiles_ptr
        if HAS_TILES:
            tiles_base = tiles_ptr + b * stb + h * sth
        for part in tl.static_range(3):
            if part == 1:
                start, end = e0, e1
            elif part == 0:
                start, end = t0, e0
            else:
                start, end = e1, hi
            dk, dv = _dkdv_tiles(
                dk, dv, k, v, col_ok, q_base, do_base, sqm, sdm, lse_base, delta_base,
                mask_base, smq, smk, tiles_base, stq, stk, MT_Q, MT_K, c0, start, end,
                n_q, n_k, o, window_left, window_right, qk_scale, offs_m, offs_d, offs_dv, D, Dv,
                DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, HAS_TILES, part != 1, BLOCK_M, BLOCK_N,
            )  # fmt: skip

    dk = dk * tl.full([], scale, COMPUTE)
    # padded: every key row of the item is written (those past n_k as zeros); packed: the sequence's
    n_rows = Lk
    if PACKED:
        n_rows = n_k
    store_ok = j < n_rows
    tl.store(
        dk_ptr + tb * sdkb + hk * sdkh + (k0 + j)[:, None] * sdkn + offs_d[None, :],
        cast_out(dk, dk_ptr.dtype.element_ty),
        mask=store_ok[:, None] & (offs_d < D)[None, :],
    )
    tl.store(
        dv_ptr + tb * sdvb + hk * sdvh + (k0 + j)[:, None] * sdvn + offs_dv[None, :],
        cast_out(dv, dv_ptr.dtype.element_ty),
        mask=store_ok[:, None] & (offs_dv < Dv)[None, :],
    )


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, r0, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk, j0, need,
    n_k, o, window_left, window_right, qk_scale, offs_n, offs_d, offs_dv, D, Dv,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq's (unscaled) step over the key tile [j0, j0 + BLOCK_N)."""
    offs_m = tl.arange(0, BLOCK_M)
    j = j0 + offs_n
    col_ok = j < n_k
    kT = tl.load(
        k_base + j[None, :] * skn + offs_d[:, None], mask=col_ok[None, :] & (offs_d < D)[:, None], other=0.0
    )
    s = _dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], COMPUTE), DTYPE)
    s = _scores(
        s, offs_m[:, None], offs_n[None, :], r0, j0, row_ok[:, None], col_ok[None, :], mask_base, smq, smk,
        need, o, window_left, window_right, qk_scale, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED,
    )  # fmt: skip
    p = tl.exp2(s - lse[:, None])
    vT = tl.load(
        v_base + j[None, :] * svn + offs_dv[:, None],
        mask=col_ok[None, :] & (offs_dv < Dv)[:, None],
        other=0.0,
    )
    dp = _dot(do, vT, tl.zeros([BLOCK_M, BLOCK_N], COMPUTE), DTYPE)
    ds = p * (dp - delta[:, None])
    return _dot(_operand(ds, DTYPE), tl.trans(kT), dq, DTYPE)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk,
    tiles_base, stq, stk, MT_Q, MT_K, r0, start, end,
    n_k, o, window_left, window_right, qk_scale, offs_n, offs_d, offs_dv, D, Dv,
    DTYPE: tl.constexpr, COMPUTE: tl.constexpr, CAUSAL: tl.constexpr, HAS_WL: tl.constexpr,
    HAS_WR: tl.constexpr, MASK_KIND: tl.constexpr, HAS_TILES: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """_dq_step over the key tiles [start, end), skipping those mask_tiles says keep nothing."""
    for j0 in range(start, end, BLOCK_N):
        if HAS_TILES:
            code = tl.load(tiles_base + (r0 // MT_Q) * stq + (j0 // MT_K) * stk)
            if code != 0:
                dq = _dq_step(
                    dq, q, do, lse, delta, r0, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk, j0,
                    code == 1, n_k, o, window_left, window_right, qk_scale, offs_n, offs_d, offs_dv,
                    D, Dv, DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED, BLOCK_M, BLOCK_N,
                )  # fmt: skip
        else:
            dq = _dq_step(
                dq, q, do, lse, delta, r0, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk, j0,
                True, n_k, o, window_left, window_right, qk_scale, offs_n, offs_d, offs_dv,
                D, Dv, DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, MASKED, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    return dq


@triton.jit
def _bwd_dq_kernel(
    dq_ptr,  # (B, Lq, Hq, D) contiguous memory, q's dtype, through its strides below
    q_ptr,  # (B, Hq, Lq, D) strided, unit last stride
    k_ptr,  # (B, Hkv, Lk, D) strided, unit last stride
    v_ptr,  # (B, Hkv, Lk, Dv) strided, unit last stride
    do_ptr,  # grad_out (B, Hq, Lq, Dv) strided, unit last stride
    lse_ptr,  # (B, Hq, Lq) contiguous, COMPUTE: the forward's
    delta_ptr,  # (B, Hq, Lq) contiguous, COMPUTE: rowsum(dO * O)
    mask_ptr,  # bool keep-mask or additive mask of q's dtype, (B, Hq, Lq, Lk) via strides; or None
    tiles_ptr,  # int8 (B, Hq, cdiv(Lq, MT_Q), cdiv(Lk, MT_K)) via strides (bool mask only); or None
    lengths_ptr,  # int64 (B,) key counts, or None
    qlens_ptr,  # int64 (B,) query counts, or None
    cu_q_ptr,  # int64 (n + 1,) packed sequences' q row bounds, or None
    cu_k_ptr,  # int64 (n + 1,) packed sequences' k row bounds, or None
    sqb,
    sqh,
    sqm,  # q strides of batch, head, row (elements)
    skb,
    skh,
    skn,  # k strides
    svb,
    svh,
    svn,  # v strides
    sdb,
    sdh,
    sdm,  # grad_out strides
    sdqb,
    sdqh,
    sdqm,  # dq strides
    smb,
    smh,
    smq,
    smk,  # mask strides (0 where broadcast)
    stb,
    sth,
    stq,
    stk,  # mask_tiles strides
    Hq,  # query heads
    GROUP,  # Hq // Hkv
    Lq,  # q rows per batch item (total_q packed)
    Lk,  # k rows per batch item (total_k packed)
    D,  # q / k head dim
    Dv,  # v head dim
    window_left,  # keys before the diagonal a query sees (used when HAS_WL)
    window_right,  # keys after the diagonal a query sees (used when HAS_WR)
    qk_scale: tl.float64,  # scale * log2(e)
    scale: tl.float64,  # the softmax scale (dq's factor)
    N_TILES,  # programs per (b, h): grid axis 0 = (b * heads + h) * N_TILES + tile
    MT_Q,  # mask_tiles' tile rows (a multiple of BLOCK_M)
    MT_K,  # mask_tiles' tile columns (a multiple of BLOCK_N)
    DTYPE: tl.constexpr,  # the data's dtype (dot operands)
    COMPUTE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 data
    CAUSAL: tl.constexpr,  # 0 none, 1 top-left, 2 bottom-right
    HAS_WL: tl.constexpr,  # window_left >= 0
    HAS_WR: tl.constexpr,  # window_right >= 0
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool keep-mask, 2 additive
    HAS_TILES: tl.constexpr,  # tiles_ptr is a tensor
    HAS_LENGTHS: tl.constexpr,  # lengths_ptr is a tensor
    HAS_QLENS: tl.constexpr,  # qlens_ptr is a tensor
    PACKED: tl.constexpr,  # cu_q_ptr / cu_k_ptr are tensors (grid axis 1 = sequence * Hq + h)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,  # next power of two >= D (>= 16)
    BLOCK_DV: tl.constexpr,  # next power of two >= Dv (>= 16)
):
    pid = tl.program_id(0)
    pid_m = pid % N_TILES
    pid_bh = pid // N_TILES
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    q0, k0, n_q, n_k, o = _bounds(
        b, lengths_ptr, qlens_ptr, cu_q_ptr, cu_k_ptr, Lq, Lk, CAUSAL, HAS_LENGTHS, HAS_QLENS, PACKED
    )
    tb = b  # the tensors' batch index: 0 when packed
    if PACKED:
        tb = 0
    r0 = pid_m.to(tl.int64) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    i = r0 + offs_m
    row_ok = i < n_q
    q = tl.load(
        q_ptr + tb * sqb + h * sqh + (q0 + i)[:, None] * sqm + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    do = tl.load(
        do_ptr + tb * sdb + h * sdh + (q0 + i)[:, None] * sdm + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv < Dv)[None, :],
        other=0.0,
    )
    lse = tl.load(lse_ptr + (tb * Hq + h) * Lq + q0 + i, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + (tb * Hq + h) * Lq + q0 + i, mask=row_ok, other=0.0)
    k_base = k_ptr + tb * skb + hk * skh + k0 * skn
    v_base = v_ptr + tb * svb + hk * svh + k0 * svn
    mask_base = mask_ptr
    if MASK_KIND != 0:
        mask_base = mask_ptr + b * smb + h * smh
    tiles_base = tiles_ptr
    if HAS_TILES:
        tiles_base = tiles_ptr + b * stb + h * sth
    qk_scale = tl.full([], qk_scale, COMPUTE)

    dq = tl.zeros([BLOCK_M, BLOCK_D], COMPUTE)
    t0, e0, e1, hi = _key_range(
        r0, n_q, n_k, o, window_left, window_right, CAUSAL, HAS_WL, HAS_WR, BLOCK_M, BLOCK_N
    )
    for part in tl.static_range(3):
        if part == 1:
            start, end = e0, e1
        elif part == 0:
            start, end = t0, e0
        else:
            start, end = e1, hi
        dq = _dq_tiles(
            dq, q, do, lse, delta, row_ok, k_base, v_base, skn, svn, mask_base, smq, smk,
            tiles_base, stq, stk, MT_Q, MT_K, r0, start, end, n_k, o, window_left, window_right,
            qk_scale, offs_n, offs_d, offs_dv, D, Dv,
            DTYPE, COMPUTE, CAUSAL, HAS_WL, HAS_WR, MASK_KIND, HAS_TILES, part != 1, BLOCK_M, BLOCK_N,
        )  # fmt: skip

    dq = dq * tl.full([], scale, COMPUTE)
    n_rows = Lq
    if PACKED:
        n_rows = n_q
    store_ok = i < n_rows
    tl.store(
        dq_ptr + tb * sdqb + h * sdqh + (q0 + i)[:, None] * sdqm + offs_d[None, :],
        cast_out(dq, dq_ptr.dtype.element_ty),
        mask=store_ok[:, None] & (offs_d < D)[None, :],
    )


# --- launchers ----------------------------------------------------------------------------------


class _Kernel(NamedTuple):
    """One kernel's launch shape: its tile (block_m query rows x block_n keys), warps, stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int


class _Config(NamedTuple):
    """The mask_tiles grid (block_q x block_k) and the kernels' shapes, without a mask (plain) and
    with one (masked: a bool / additive mask tile is loaded per step, which costs registers: the
    load's layout is not the dot's, so the scores are converted). Each kernel's tile lies inside
    one mask tile: block_m divides block_q and block_n divides block_k."""

    block_q: int
    block_k: int
    fwd: _Kernel
    dkdv: _Kernel
    dq: _Kernel
    fwd_masked: _Kernel
    dkdv_masked: _Kernel
    dq_masked: _Kernel


K = _Kernel
# (head-dim block, dtype kind) -> config, sized for sm_90's registers: fp16 / bf16 (tensor-core
# dots, the GPU dtypes) compile without a spill in every scripts/triton_compile.py case. fp32 (IEEE)
# and fp64 run FMA / DMMA dots and hold twice the bytes per value: their backward kernels spill a
# little to the stack from the 128 head-dim block on (D > 64), and so does fp64's masked forward at
# that block.
_CONFIGS = {
    (64, "half"): _Config(128, 64, K(128, 64, 8, 2), K(16, 64, 4, 2), K(64, 32, 4, 2),
                          K(32, 32, 4, 2), K(16, 64, 4, 2), K(64, 16, 4, 2)),
    (128, "half"): _Config(128, 64, K(128, 32, 8, 2), K(16, 32, 8, 2), K(32, 32, 8, 2),
                           K(32, 32, 4, 2), K(16, 32, 8, 2), K(32, 16, 8, 2)),
    (256, "half"): _Config(32, 32, K(32, 32, 4, 2), K(16, 32, 8, 1), K(32, 16, 8, 1),
                           K(16, 32, 4, 1), K(16, 16, 8, 1), K(16, 16, 8, 1)),
    # FMA (fp32) / DMMA (fp64) dots hold their operands in registers: small tiles throughout.
    (64, "single"): _Config(32, 32, K(32, 32, 4, 2), K(16, 16, 4, 2), K(32, 16, 4, 2),
                            K(32, 32, 4, 2), K(16, 16, 4, 2), K(32, 16, 4, 2)),
    (128, "single"): _Config(16, 16, K(16, 16, 4, 1), K(16, 16, 8, 1), K(16, 16, 8, 1),
                             K(16, 16, 4, 1), K(16, 16, 8, 1), K(16, 16, 8, 1)),
    (256, "single"): _Config(16, 16, K(16, 16, 4, 1), K(16, 16, 8, 1), K(16, 16, 8, 1),
                             K(16, 16, 4, 1), K(16, 16, 8, 1), K(16, 16, 8, 1)),
    (64, "double"): _Config(16, 16, K(16, 16, 4, 1), K(16, 16, 4, 1), K(16, 16, 4, 1),
                            K(16, 16, 4, 1), K(16, 16, 8, 1), K(16, 16, 8, 1)),
    (128, "double"): _Config(16, 16, *[K(16, 16, 8, 1)] * 6),
    (256, "double"): _Config(16, 16, *[K(16, 16, 8, 1)] * 6),
}  # fmt: skip
del K


def _config(head_dim: int, dtype: torch.dtype) -> _Config:
    """The launch shapes for head dims up to ``head_dim`` (the larger of D and Dv) and ``dtype``."""
    d = min(256, max(64, triton.next_power_of_2(max(head_dim, 1))))
    kind = {torch.float64: "double", torch.float32: "single"}.get(dtype, "half")
    return _CONFIGS[d, kind]


def attention_blocks(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """The (block_q, block_k) grid the caller builds mask_tiles on and passes to attention_fwd /
    attention_bwd for q / k head dim ``head_dim`` and ``dtype``."""
    config = _config(head_dim, dtype)
    return config.block_q, config.block_k


# The smallest tile a dot takes in compiled code (M, N and K >= 16).
_MIN_BLOCK = 16


def _fit(kernel: _Kernel, block_q: int, block_k: int, has_tiles: bool) -> tuple[_Kernel, bool]:
    """``kernel`` with its tile shrunk to lie inside one block_q x block_k mask tile (a power of two
    dividing each) when mask_tiles is given; (kernel, False) when that would be under 16: the tiles
    are then not used (the mask's elements are read, which is as correct)."""
    if not has_tiles:
        return kernel, False
    m = min(kernel.block_m, block_q & -block_q)
    n = min(kernel.block_n, block_k & -block_k)
    if m < _MIN_BLOCK or n < _MIN_BLOCK:
        return kernel, False
    return kernel._replace(block_m=m, block_n=n), True


def _head_block(d: int) -> int:
    return max(_MIN_BLOCK, triton.next_power_of_2(d))


def _common(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    mask_tiles: Tensor | None,
    lengths: Tensor | None,
    query_lengths: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    causal: int,
    window_left: int,
    window_right: int,
    block_q: int,
    block_k: int,
) -> tuple[tuple, tuple, dict, bool]:
    """The arguments every attention kernel shares after its own tensors and strides: (pointer
    args, mask / tile strides, constexprs, whether mask_tiles is used)."""
    packed = cu_seqlens_q is not None
    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    has_tiles = mask_tiles is not None and kind == 1
    # lengths[b] and cu_seqlens[s] are read as contiguous (a strided view is copied: (B,) int64)
    contig = [
        None if t is None else t.contiguous() for t in (lengths, query_lengths, cu_seqlens_q, cu_seqlens_k)
    ]
    if packed and contig[3] is None:
        contig[3] = contig[2]
    ptrs = (mask, mask_tiles if has_tiles else None, *contig)
    strides = (
        *(mask.stride() if mask is not None else (0, 0, 0, 0)),
        *(mask_tiles.stride() if has_tiles else (0, 0, 0, 0)),
    )
    meta = {
        "DTYPE": _TL_DTYPES[q.dtype],
        "COMPUTE": compute_dtype(q.dtype),
        "CAUSAL": int(causal),
        "HAS_WL": window_left >= 0,
        "HAS_WR": window_right >= 0,
        "MASK_KIND": kind,
        "HAS_LENGTHS": lengths is not None and not packed,
        "HAS_QLENS": query_lengths is not None and not packed,
        "PACKED": packed,
        "BLOCK_D": _head_block(q.shape[-1]),
        "BLOCK_DV": _head_block(v.shape[-1]),
    }
    return ptrs, strides, meta, has_tiles


_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


def _items(q: Tensor, cu_seqlens_q: Tensor | None) -> int:
    """Batch items (padded) or sequences (packed)."""
    return q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1


def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
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
    block_q: int,
    block_k: int,
) -> tuple[Tensor, Tensor]:
    """maskkern::attention_fwd (csrc/maskkern.cpp): (out (B, Hq, Lq, Dv), a view of contiguous
    (B, Lq, Hq, Dv) memory in q's dtype; lse (B, Hq, Lq) contiguous fp32 / fp64, +inf on a row that
    sees no key)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    cdt = torch_compute_dtype(q.dtype)
    out = torch.empty(B, Lq, Hq, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, Hq, Lq, dtype=cdt, device=q.device)
    n_items = _items(q, cu_seqlens_q)
    if out.numel() == 0 or n_items == 0:
        return out, lse
    if Lk == 0:  # no key anywhere
        return out.zero_(), lse.fill_(float("inf"))
    config = _config(max(D, Dv), q.dtype)
    ptrs, strides, meta, has_tiles = _common(
        q, k, v, mask, mask_tiles, lengths, query_lengths, cu_seqlens_q, cu_seqlens_k,
        causal, window_left, window_right, block_q, block_k,
    )  # fmt: skip
    kernel = config.fwd if mask is None else config.fwd_masked
    kernel, has_tiles = _fit(kernel, block_q, block_k, has_tiles)
    if not has_tiles:
        ptrs = (ptrs[0], None, *ptrs[2:])
        meta["HAS_TILES"] = False
    else:
        meta["HAS_TILES"] = True
    rows = Lq if cu_seqlens_q is None else max_seqlen_q
    n_tiles = triton.cdiv(max(rows, 1), kernel.block_m)
    grid = (n_tiles * n_items * Hq,)
    _fwd_kernel[grid](
        out, lse, q, k, v, *ptrs,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *strides,
        Hq, Hq // Hkv, Lq, Lk, D, Dv, window_left, window_right, scale * _LOG2E,
        n_tiles, block_q, block_k,
        BLOCK_M=kernel.block_m, BLOCK_N=kernel.block_n,
        num_warps=kernel.warps, num_stages=kernel.stages, **meta,
    )  # fmt: skip
    return out, lse


def attention_bwd(
    grad_out: Tensor,
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
    block_q: int,
    block_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """maskkern::attention_bwd (csrc/maskkern.cpp): (dq, dk, dv), each a view of contiguous
    (B, L, H, D) memory in q's dtype; dk / dv sum over the query heads sharing a kv head. The
    float mask's own gradient is not computed."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    dq = torch.empty(B, Lq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    dk = torch.empty(B, Lk, Hkv, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    dv = torch.empty(B, Lk, Hkv, Dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    n_items = _items(q, cu_seqlens_q)
    if n_items == 0 or Hq == 0 or Lq == 0 or Lk == 0:  # nothing attends: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    config = _config(max(D, Dv), q.dtype)
    ptrs, strides, meta, has_tiles = _common(
        q, k, v, mask, mask_tiles, lengths, query_lengths, cu_seqlens_q, cu_seqlens_k,
        causal, window_left, window_right, block_q, block_k,
    )  # fmt: skip

    delta = torch.empty_like(lse)
    pre_m = max(16, 4096 // meta["BLOCK_DV"])  # 4096 values of dO and of O per program
    n_pre = triton.cdiv(Lq, pre_m)
    _bwd_preprocess_kernel[(n_pre * B * Hq,)](
        delta, grad_out, out, *grad_out.stride()[:3], *out.stride()[:3], Hq, Lq, Dv, n_pre,
        COMPUTE=meta["COMPUTE"], BLOCK_M=pre_m, BLOCK_DV=meta["BLOCK_DV"],
        num_warps=4,
    )  # fmt: skip

    rows_q = Lq if cu_seqlens_q is None else max_seqlen_q
    rows_k = Lk if cu_seqlens_q is None else max_seqlen_k
    scale_args = (window_left, window_right, scale * _LOG2E, scale)
    kernels = (config.dkdv, config.dq) if mask is None else (config.dkdv_masked, config.dq_masked)
    for kernel, launch in zip(kernels, ("dkdv", "dq"), strict=True):
        kernel, tiles = _fit(kernel, block_q, block_k, has_tiles)
        kptrs = ptrs if tiles else (ptrs[0], None, *ptrs[2:])
        kmeta = meta | {"HAS_TILES": tiles, "BLOCK_M": kernel.block_m, "BLOCK_N": kernel.block_n}
        common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
        if launch == "dkdv":
            n_tiles = triton.cdiv(max(rows_k, 1), kernel.block_n)
            _bwd_dkdv_kernel[(n_tiles * n_items * Hkv,)](
                dk, dv, q, k, v, grad_out, lse, delta, *kptrs,
                *common, *dk.stride()[:3], *dv.stride()[:3], *strides,
                Hq, Hkv, Hq // Hkv, Lq, Lk, D, Dv, *scale_args, n_tiles, block_q, block_k,
                num_warps=kernel.warps, num_stages=kernel.stages, **kmeta,
            )  # fmt: skip
        else:
            n_tiles = triton.cdiv(max(rows_q, 1), kernel.block_m)
            _bwd_dq_kernel[(n_tiles * n_items * Hq,)](
                dq, q, k, v, grad_out, lse, delta, *kptrs,
                *common, *dq.stride()[:3], *strides,
                Hq, Hq // Hkv, Lq, Lk, D, Dv, *scale_args, n_tiles, block_q, block_k,
                num_warps=kernel.warps, num_stages=kernel.stages, **kmeta,
            )  # fmt: skip
    return dq, dk, dv
