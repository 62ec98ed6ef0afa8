"""maskkern past one device, on torch.distributed: vocab-parallel cross-entropy (plain and fused with
the LM head) and DTensor sharding rules for every maskkern custom op.

``import maskkern.distributed`` registers the sharding rules; the module imports (and does nothing)
where torch.distributed is not available. docs/distributed.md has the usage and the examples.

Vocab-parallel layout (Megatron's): the vocabulary is split into contiguous slices in group-rank
order, rank r holding classes [o_r, o_r + V_r) (sizes may differ, 0 included); the logits (or the
head's weight rows) of a rank are its slice; targets are global class ids, the same on every rank.

Algorithm of ``vocab_parallel_cross_entropy`` (per row i, ε = label_smoothing, w the class weights,
1 without, W = Σ w, V = Σ V_r):

1. One all-gather of each rank's shapes, device type, options, two polynomial hashes of the
   targets (and of the mask) and the range of its counted targets, so that a bad input (ranks
   disagreeing on N, the targets or an option, a target outside [0, V), class weights that are
   neither the slice nor the whole vocabulary) raises the same clear error on every rank instead of
   hanging a collective: every check that can raise is decided from the gathered table alone. A
   rank whose own argument checks fail reports it through the same gather (its message then goes
   to every rank). The gather runs on the group's device (CPU for gloo, the current GPU for NCCL),
   whatever a rank's inputs are.
2. maskkern's fused row kernel on the local slice, in one pass: the local logsumexp lse_r and,
   when the logits need a gradient, the local softmax minus a one-hot, p_r - e_k (k = the local
   target column on its owner, column 0 elsewhere), into the one logits-sized buffer.
3. One all-gather of (lse_r, b_r) per row, b_r = (1-ε)·w_y·x_iy (on the owner of y, else 0)
   + ε/V·Σ_{c local} w_c·x_ic; then lse = logsumexp_r lse_r and ce_i = ((1-ε)·w_y + ε·W/V)·lse_i
   - Σ_r b_r, the reduction as in ``masked_cross_entropy``. (Class weights given as slices cost one
   all-reduce of (N + 1) values first, for w_y and W.)
4. The gradient, locally: d loss/dx_ic = A_i·p_ic - B_i·[c = y_i] - C·w_c with p = exp(x - lse),
   A_i = s_ce((1-ε)w_y + εW/V) + s_z·2z·lse_i, B_i = s_ce(1-ε)w_y, C = s_ce·ε/V ((s_ce, s_z) =
   (1/Σw_y, 1/count) under "mean", else 1): the buffer's rows are scaled in place by
   A_i·exp(lse_r - lse) (the kernel's scale_), the smoothing term is one rank-1 update, and the
   element at column k is rewritten exactly. The backward only scales that buffer (no
   communication), as the single-device op does.

``vocab_parallel_linear_cross_entropy`` runs the same per chunk of tokens, with the chunk's logits
computed from the head slice and never all kept: chunk j's statistics are all-gathered
asynchronously while chunk j+1's logits and kernel run, and chunk j's part of grad_hidden (summed
over the vocabulary, hence over ranks) is all-reduced asynchronously while the later chunks run.
Rows that do not count are left out of the matmuls.
"""

from __future__ import annotations

import math
import struct
import zlib

import torch
from torch import Tensor

from ._backend import resolve_backend
from .ops._common import (
    FLOAT_DTYPES,
    check_dtype,
    check_index_dtype,
    check_int,
    check_label_smoothing,
    check_linear_cross_entropy_args,
    check_reduction,
    check_same_device,
    check_target_mask,
    check_tensor,
    check_z_loss,
    compute_dtype,
    empty_output,
    graph_is_kept,
    is_traced,
)
from .ops.linear_cross_entropy import auto_chunk_size
from .ops.masked_cross_entropy import reduce_rows, row_kernel, scale_kernel, valid_rows

try:
    import torch.distributed as dist

    AVAILABLE = dist.is_available()
except ImportError:  # pragma: no cover - a torch built without distributed
    dist = None
    AVAILABLE = False

__all__ = [
    "AVAILABLE",
    "SHARDED_OPS",
    "attach_linear_cross_entropy",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
]

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _all_gather(out: Tensor, x: Tensor, group=None, async_op: bool = False):
    """all_gather_single (torch >= 2.13) or all_gather_into_tensor (its older name)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group, async_op=async_op)


# --- step 1: the agreement check -----------------------------------------------------------------
#
# The invariant: every check that can raise on one rank is decided from data that all ranks have
# exchanged, so that all of them raise together and none is left waiting in a collective. A rank's
# own argument checks go through the gather as an error flag; everything after it (the layout, the
# target range) is decided from the gathered table alone.

# Fields of the metadata every rank all-gathers first (int64 each).
_FIELDS = (
    "error",
    "position",  # the DTensor mesh coordinate of the rank, else its group rank
    "device",
    "rows",
    "vocab",
    "dtype",
    "weight_len",
    "has_mask",
    "reduction",
    "ignore_index",
    "smoothing",
    "z_loss",
    "target_hash",
    "target_hash2",
    "target_low",
    "target_high",
    "mask_hash",
    "vocab_size",
    "hidden",
    "hidden_sum",
    "hidden_abs",
    "needs",
    "chunk",
)
_DTYPE_CODES = {dt: i for i, dt in enumerate(FLOAT_DTYPES)}
# Two polynomial hashes modulo primes below 2^31 (so that products fit in int64): ranks holding
# different targets or masks get equal hashes by accident with odds of about N / 2^31 each.
_HASHES = ((2_147_483_647, 1_000_003), (2_147_483_629, 48_271))
_NO_TARGET = (2**63 - 1, -1)  # (low, high) of a rank with no counted target: nothing out of range


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


def _hash(x: Tensor, prime: int, base: int) -> Tensor:
    """Σ_i (x_i mod prime)·base^i over the flattened integer tensor, each term mod prime: a 0-d
    int64 tensor on x's device (no host synchronisation)."""
    v = x.reshape(-1).long().remainder(prime)
    i = torch.arange(v.numel(), device=v.device)
    power = torch.ones_like(i)
    b = base
    for bit in range(max(v.numel() - 1, 0).bit_length()):  # base^i by squaring, vectorised over i
        power = torch.where((i >> bit) & 1 == 1, power * b % prime, power)
        b = b * b % prime
    return (v * power % prime).sum()


def _group_info(group) -> tuple[int, int]:
    if not AVAILABLE or not dist.is_initialized():
        raise RuntimeError(
            "maskkern.distributed needs an initialised process group (torch.distributed.init_process_group)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _agreement_device(backend: str) -> torch.device:
    """The device of the agreement gather for a group of ``backend`` (dist.get_backend's string):
    CPU when the group takes CPU tensors (gloo, a "cpu:gloo,cuda:nccl" group), else the backend's
    accelerator (nccl: the current CUDA device). It never depends on a rank's inputs: a rank whose
    logits are not even a tensor must meet the others on the same backend."""
    backend = backend.lower()
    if ":" in backend:
        kinds = [pair.split(":")[0] for pair in backend.split(",")]
    else:
        kinds = dist.Backend.backend_capability.get(backend, ["cpu"])
    return torch.device("cpu" if "cpu" in kinds else kinds[0])


def _agree(name: str, meta: dict, error: BaseException | None, group) -> list[dict]:
    """All-gathers ``meta`` (ints, or 0-d int64 tensors on the inputs' device; one collective);
    raises the same error on every rank when a rank's own checks failed (``error``) or the ranks
    disagree. Returns every rank's metadata, in group-rank order."""
    _rank, world = _group_info(group)
    device = _agreement_device(str(dist.get_backend(group)))
    values = [meta.get(f, -1) for f in _FIELDS]
    values[0] = int(error is not None)
    row = torch.tensor([v if isinstance(v, int) else 0 for v in values], dtype=torch.int64).to(device)
    computed = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
    if computed:
        row[computed] = torch.stack([values[i].to(device) for i in computed])
    out = torch.empty(world * len(_FIELDS), dtype=torch.int64, device=device)
    _all_gather(out, row, group=group)
    table = out.view(world, len(_FIELDS)).tolist()
    metas = [dict(zip(_FIELDS, r, strict=True)) for r in table]
    failed = [r for r, m in enumerate(metas) if m["error"]]
    if failed:
        # Every rank knows that some failed: all of them take part in this second gather.
        text = None if error is None else f"{type(error).__name__}: {error}"
        texts: list = [None] * world
        dist.all_gather_object(texts, text, group=group)
        if error is not None:
            raise error
        first = failed[0]
        kind = {"TypeError": TypeError, "IndexError": IndexError}.get(texts[first].split(":")[0], ValueError)
        raise kind(f"{name}: rank {first} of the group rejected its input: {texts[first]}")

    def same(field: str, what: str) -> None:
        values = [m[field] for m in metas]
        if len(set(values)) > 1:
            shown = values if field not in ("smoothing", "z_loss") else [_bits_float(v) for v in values]
            raise ValueError(
                f"{name}: every rank must pass the same {what}, got {shown} on ranks 0..{world - 1}"
            )

    same("device", "device type (of logits / hidden)")
    same("rows", "number of rows N (target.numel())")
    same("dtype", "logits dtype")
    same("reduction", "reduction")
    same("ignore_index", "ignore_index")
    same("smoothing", "label_smoothing")
    same("z_loss", "z_loss")
    same("has_mask", "mask (given or not)")
    same("target_hash", "target (global class ids, identical on every rank)")
    same("target_hash2", "target (global class ids, identical on every rank)")
    same("mask_hash", "mask (identical on every rank)")
    same("vocab_size", "vocab_size")
    same("hidden", "hidden size H")
    sums = [(_bits_float(m["hidden_sum"]), _bits_float(m["hidden_abs"])) for m in metas]
    if any(abs(s - sums[0][0]) > 1e-9 * max(a, sums[0][1]) + 1e-300 for s, a in sums):
        raise ValueError(
            f"{name}: hidden must be replicated (identical on every rank); its sums over a sample "
            f"differ: {[s for s, _ in sums]}"
        )
    same("needs", "requires_grad flags of hidden / weight / bias")
    same("chunk", "chunk_size")
    if len({m["weight_len"] >= 0 for m in metas}) > 1:
        raise ValueError(f"{name}: weight must be given on every rank or on none")
    coordinates = [m["position"] for m in metas]
    if coordinates != list(range(world)):
        # DTensor (torch 2.13) scatters and gathers a mesh dim's shards in the group's rank order
        # but computes their offsets from the mesh coordinates: the order of the vocabulary is
        # ambiguous (and an uneven split's data is not even where its offsets say).
        raise ValueError(
            f"{name}: the DTensor's 1-D mesh lists its ranks out of order (mesh coordinates "
            f"{coordinates} on group ranks 0..{world - 1}); build the mesh with its ranks in ascending "
            "order, or pass the local slices and group="
        )
    return metas


def _layout(
    name: str, metas: list[dict], rank: int, vocab_size: int | None, ignore_index: int
) -> tuple[int, int, int, str]:
    """(V, offset of this rank's slice, V_r, weight kind "none" / "full" / "local") from the
    gathered metadata, with the checks that need the whole group: decided from the table alone,
    the same on every rank."""
    sizes = [m["vocab"] for m in metas]
    total = sum(sizes)
    if vocab_size is not None and total != vocab_size:
        raise ValueError(
            f"{name}: the vocabulary slices {sizes} (ranks 0..{len(sizes) - 1}) add up to {total}, "
            f"not vocab_size={vocab_size}"
        )
    low, high = min(m["target_low"] for m in metas), max(m["target_high"] for m in metas)
    if low < 0 or high >= total:
        raise IndexError(
            f"{name}: target must be in [0, {total}) (the whole vocabulary, summed over the group) "
            f"or ignore_index ({ignore_index}), got {low if low < 0 else high}"
        )
    offset = sum(sizes[:rank])
    lengths = [m["weight_len"] for m in metas]
    if lengths[0] < 0:
        kind = "none"
    elif all(n == total for n in lengths):
        kind = "full"
    elif all(n == s for n, s in zip(lengths, sizes, strict=True)):
        kind = "local"
    else:
        raise ValueError(
            f"{name}: weight must be the whole vocabulary's ({total},) on every rank or each rank's "
            f"slice (V_r,) = {sizes}; got lengths {lengths}"
        )
    return total, offset, sizes[rank], kind


def _target_meta(target: Tensor, valid: Tensor, mask: Tensor | None) -> dict:
    """The targets' hashes and the range of the counted ones (0-d tensors: read after the gather)."""
    t = target.reshape(-1)
    if t.numel():
        low = torch.where(valid, t, _NO_TARGET[0]).min()
        high = torch.where(valid, t, _NO_TARGET[1]).max()
    else:
        low, high = _NO_TARGET
    return dict(
        target_hash=_hash(t, *_HASHES[0]),
        target_hash2=_hash(t, *_HASHES[1]),
        target_low=low,
        target_high=high,
        mask_hash=-1 if mask is None else _hash(mask, *_HASHES[0]),
    )


def _device_code(device: torch.device) -> int:
    return zlib.crc32(device.type.encode())


# --- steps 2-4: per-row statistics and the gradient ----------------------------------------------


class _Rows:
    """What every rank knows of the rows (the targets are replicated) and its slice's view of them:
    valid (counts), owned (its target is in this slice), k (the kernel's column: the local target,
    else 0), w_y (the target's class weight, 0 on rows that do not count), W (Σ of the weights)."""

    def __init__(self, t, valid, offset, vr, total, weight, kind, cdt, smoothing, z_loss, group):
        self.t, self.valid, self.vr, self.total, self.cdt = t, valid, vr, total, cdt
        self.smoothing, self.z_loss = smoothing, z_loss
        self.owned = valid & (t >= offset) & (t < offset + vr)
        self.k = torch.where(self.owned, t - offset, 0)
        self.w_loc = None
        safe = t.masked_fill(~valid, 0)
        if kind == "none":
            self.w_y, self.weight_sum = valid.to(cdt), float(total)
        elif kind == "full":
            w = weight.to(cdt)
            self.w_loc = w[offset : offset + vr]
            self.w_y, self.weight_sum = torch.where(valid, w[safe], 0), w.sum()
        else:  # this rank's slice: the owners' w_y and the slices' sums, summed over the group
            self.w_loc = weight.to(cdt)
            parts = torch.zeros(t.numel() + 1, dtype=cdt, device=t.device)
            if vr:
                parts[:-1] = torch.where(self.owned, self.w_loc[self.k], 0)
            parts[-1] = self.w_loc.sum()
            dist.all_reduce(parts, group=group)
            self.w_y, self.weight_sum = parts[:-1], parts[-1]

    def select(self, idx: Tensor) -> _Rows:
        """These rows only (the rows that count, for the linear loss's matmuls)."""
        out = object.__new__(_Rows)
        out.__dict__.update(self.__dict__)
        out.t, out.valid, out.owned, out.k, out.w_y = (
            x[idx] for x in (self.t, self.valid, self.owned, self.k, self.w_y)
        )
        return out

    def local_pass(self, kernel, x: Tensor, rows: slice, grad: Tensor | None, logits_of=None):
        """Step 2 on the logits x (n, V_r) of rows ``rows``: (lse_r, stats) and, into ``grad`` (x
        itself allowed, then ``logits_of(row_mask)`` must give those rows' logits again), p_r - e_k
        on the rows that count. stats (2, n) = (lse_r, b_r) to gather; also returns x_k, the logit
        at column k (read before the kernel may overwrite x)."""
        valid, owned, k = self.valid[rows], self.owned[rows], self.k[rows]
        n, vr = x.shape
        cdt = self.cdt
        stats = torch.zeros(2, n, dtype=cdt, device=x.device)
        if vr == 0 or n == 0:
            stats[0] = -math.inf
            return stats, torch.zeros(n, dtype=cdt, device=x.device)
        x_k = x.gather(1, k[:, None])[:, 0].to(cdt)
        eps = self.smoothing
        if eps:
            stats[1] = eps / self.total * torch.where(valid, _smooth_sum(x, self.w_loc, cdt), 0)
        if eps < 1:
            w_k = 1 if self.w_loc is None else self.w_loc[k]
            stats[1] += torch.where(owned, (1 - eps) * w_k * x_k, 0)
        _, lse_r = kernel(x, k, valid, None, 0.0, 0.0, None, grad)
        # The kernel gives NaN for a row whose slice is all -inf; the vocabulary as a whole may not
        # be (a -inf bias on padded vocabulary rows). Such rows get torch's -inf and a zero gradient
        # row, from their logits recomputed when the kernel overwrote them. One host read per call
        # (per chunk for the fused head), as the single-device op's target check.
        bad = valid & torch.isnan(lse_r)
        if bool(bad.any()):
            overwritten = grad is not None and grad.data_ptr() == x.data_ptr()
            lse_r = lse_r.clone()
            lse_r[bad] = torch.logsumexp((logits_of(bad) if overwritten else x[bad]).to(cdt), -1)
            if grad is not None:
                grad[bad & (lse_r == -math.inf)] = 0
        stats[0] = torch.where(valid, lse_r, -math.inf)
        return stats, x_k

    def combine(self, gathered: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        """Step 3: (lse, ce) of the rows from the gathered (R, 2, n) statistics."""
        valid, w_y = self.valid[rows], self.w_y[rows]
        lse = torch.logsumexp(gathered[:, 0], 0)
        b = gathered[:, 1].sum(0)
        eps = self.smoothing
        coef = (1 - eps) * w_y + eps * self.weight_sum / self.total if eps else w_y
        zero = torch.zeros((), dtype=self.cdt, device=lse.device)
        return torch.where(valid, lse, zero), torch.where(valid, coef * lse - b, zero)

    def finish_grad(self, grad, backend, rows, lse, lse_r, x_k, scales, row_scale=None) -> None:
        """Step 4, in place on ``grad`` (n, V_r) holding p_r - e_k: the exact gradient of the rows,
        times ``row_scale`` (n,) when given (the backward of reduction="none")."""
        n, vr = grad.shape
        if n == 0 or vr == 0:
            return
        cdt, eps, z, total = self.cdt, self.smoothing, self.z_loss, self.total
        valid, owned, k, w_y = self.valid[rows], self.owned[rows], self.k[rows], self.w_y[rows]
        s_ce, s_z = scales
        a = s_ce * ((1 - eps) * w_y + eps * self.weight_sum / total) if eps else s_ce * w_y
        if z:
            a = a + s_z * 2 * z * lse
        b = s_ce * (1 - eps) * w_y
        c = torch.as_tensor(s_ce * eps / total, dtype=cdt, device=grad.device)
        if row_scale is not None:
            a, b, c = a * row_scale, b * row_scale, c * row_scale
        # Rows that do not count keep their zero gradient: their factors may be inf or NaN (a
        # "mean" over no counted row scales by 1/0), and 0 · inf would be NaN.
        zero = torch.zeros((), dtype=cdt, device=grad.device)
        c = torch.where(valid, c, zero)
        rho = torch.exp(lse_r - lse).nan_to_num_(nan=0.0)  # 0 where lse_r = lse = -inf
        scale_kernel(backend)(grad, valid, torch.where(valid, a * rho, 1).to(cdt))
        w_k = 1
        if eps:
            w = torch.ones(vr, dtype=cdt, device=grad.device) if self.w_loc is None else self.w_loc
            grad.addr_(c.to(grad.dtype), w.to(grad.dtype), alpha=-1)
            w_k = 1 if self.w_loc is None else self.w_loc[k]
        value = a * torch.exp(x_k - lse) - torch.where(owned, b, 0) - c * w_k
        grad[torch.arange(n, device=grad.device), k] = torch.where(valid, value, zero).to(grad.dtype)

    def scales(self, reduction: str):
        """((s_ce, s_z), denominators of "mean")."""
        if reduction != "mean":
            return (1.0, 1.0), None
        den = torch.stack([self.w_y.sum(), self.valid.sum().to(self.cdt)])
        return (1.0 / den[0], 1.0 / den[1]), den


def _smooth_sum(x: Tensor, w: Tensor | None, cdt: torch.dtype) -> Tensor:
    """Σ_c w_c·x_ic over the slice (Σ_c x_ic without weights), in the compute dtype."""
    if w is None:
        return x.sum(-1, dtype=cdt)
    if x.dtype == cdt:
        return torch.mv(x, w)
    step = max(1, (16 << 20) // max(1, x.shape[1]))  # half logits: converted a few MB at a time
    return torch.cat([torch.mv(x[i : i + step].to(cdt), w) for i in range(0, x.shape[0], step)])


def _gather_stats(stats: Tensor, group, async_op: bool = False):
    world = dist.get_world_size(group)
    out = stats.new_empty((world * stats.shape[0], *stats.shape[1:]))  # gloo wants dim 0 stacked
    work = _all_gather(out, stats.contiguous(), group=group, async_op=async_op)
    return out.view(world, *stats.shape), work


# --- vocab_parallel_cross_entropy ------------------------------------------------------------------


def vocab_parallel_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    group=None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    vocab_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """``masked_cross_entropy`` of logits split over the vocabulary, each rank holding a slice.

    Equals ``mk.masked_cross_entropy(torch.cat(slices, -1).flatten(0, -2), target.flatten(), weight,
    ...)`` with every option — the loss (the same on every rank) and the gradient of each rank's
    slice.

    Args:
        logits: (..., V_r), this rank's contiguous slice of the classes (slices in group-rank order,
            sizes may differ, 0 included); float16/bfloat16/float32/float64. The class dim is the
            last one (Megatron's layout; for 2-D logits F.cross_entropy's). Or a DTensor on a 1-D
            mesh placed Shard(-1), the mesh listing its ranks in ascending order: its mesh's group
            is used, the loss is a replicated DTensor.
        target: int64/int32 global class ids of shape logits.shape[:-1], identical on every rank.
        weight: optional class weights: the whole vocabulary's (V,) or this rank's slice (V_r,).
        group: the process group over which the vocabulary is split (default: the world).
        ignore_index, mask, reduction, label_smoothing, z_loss: as in ``masked_cross_entropy``.
        vocab_size: optional V, checked against the sum of the slices.
        backend: the row kernel's backend (default: the device's).

    Collectives per call, all in the forward: an all-gather of 23 int64 per rank (shapes, options,
    target hashes and range), an all-gather of 2 values per row per rank (lse_r, b_r), and with
    class weights given as slices one all-reduce of N + 1 values. None in backward.
    """
    dt = _dtensor_module()
    if dt is not None and isinstance(logits, dt.DTensor):
        return _dtensor_cross_entropy(
            logits, target, weight, group, ignore_index, mask, reduction, label_smoothing, z_loss, backend
        )
    return _cross_entropy(
        logits, target, weight, group, None, ignore_index, mask, reduction, label_smoothing, z_loss,
        vocab_size, backend,
    )  # fmt: skip


def _cross_entropy(
    logits, target, weight, group, position, ignore_index, mask, reduction, label_smoothing, z_loss,
    vocab_size, backend,
):  # fmt: skip
    """vocab_parallel_cross_entropy on a plain tensor; ``position`` is the mesh coordinate of a
    DTensor's shard (None: not a DTensor), checked against the group rank by every rank."""
    name = "vocab_parallel_cross_entropy"
    rank, _ = _group_info(group)
    error, meta = None, {}
    try:
        backend, label_smoothing, z_loss = _check_ce(
            logits,
            target,
            weight,
            ignore_index,
            mask,
            reduction,
            label_smoothing,
            z_loss,
            vocab_size,
            backend,
        )
        t = target.reshape(-1).long()
        valid = valid_rows(t, ignore_index, mask)
        meta = _options_meta(t, valid, mask, ignore_index, reduction, label_smoothing, z_loss, vocab_size)
        meta.update(
            position=rank if position is None else position,
            device=_device_code(logits.device),
            rows=t.numel(),
            vocab=logits.shape[-1],
            dtype=_DTYPE_CODES[logits.dtype],
            weight_len=-1 if weight is None else weight.shape[0],
        )
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        error = exc
    metas = _agree(name, meta, error, group)
    total, offset, vr, kind = _layout(name, metas, rank, vocab_size, ignore_index)
    compute_grad = logits.requires_grad and torch.is_grad_enabled()
    x = logits.reshape(t.numel(), vr)
    loss = _VocabParallelCE.apply(
        x,
        t,
        valid,
        weight,
        kind,
        offset,
        total,
        group,
        reduction,
        label_smoothing,
        z_loss,
        backend,
        compute_grad,
    )
    return loss.view(target.shape) if reduction == "none" else loss


def _check_ce(
    logits, target, weight, ignore_index, mask, reduction, label_smoothing, z_loss, vocab_size, backend
):
    check_tensor(logits, "logits")
    check_dtype(logits, "logits", FLOAT_DTYPES)
    if logits.dim() < 1:
        raise ValueError("logits must be (..., V_r), got a 0-d tensor")
    check_tensor(target, "target")
    check_index_dtype(target, "target")
    check_same_device(target, "target", logits, "logits")
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"target must have shape {tuple(logits.shape[:-1])} = logits.shape[:-1], "
            f"got {tuple(target.shape)}"
        )
    _check_class_weight(weight, "weight", logits, "logits")
    check_target_mask(mask, target)
    check_int(ignore_index, "ignore_index")
    check_reduction(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    z_loss = check_z_loss(z_loss)
    if vocab_size is not None:
        check_int(vocab_size, "vocab_size")
    return resolve_backend(backend, logits.device, "logits"), label_smoothing, z_loss


def _check_class_weight(weight, name, ref, ref_name) -> None:
    if weight is None:
        return
    check_tensor(weight, name)
    check_dtype(weight, name, FLOAT_DTYPES)
    check_same_device(weight, name, ref, ref_name)
    if weight.dim() != 1:
        raise ValueError(f"{name} must be (V,) or this rank's slice (V_r,), got shape {tuple(weight.shape)}")
    if weight.requires_grad and torch.is_grad_enabled():  # as masked_cross_entropy and eager
        raise RuntimeError(f"the loss is not differentiable with respect to {name}: pass {name}.detach()")


def _options_meta(t, valid, mask, ignore_index, reduction, label_smoothing, z_loss, vocab_size) -> dict:
    return dict(
        _target_meta(t, valid, mask),
        has_mask=mask is not None,
        reduction=_REDUCTIONS[reduction],
        ignore_index=ignore_index,
        smoothing=_float_bits(label_smoothing),
        z_loss=_float_bits(z_loss),
        vocab_size=-1 if vocab_size is None else vocab_size,
    )


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, t, valid, weight, kind, offset, total, group, reduction, eps, z, backend, compute_grad
    ):
        n, vr = x.shape
        info = _Rows(t, valid, offset, vr, total, weight, kind, compute_dtype(x.dtype), eps, z, group)
        rows = slice(0, n)
        xr = x if x.stride(-1) == 1 or vr <= 1 else x.contiguous()
        grad = None
        if compute_grad:
            grad = empty_output((n, vr), x.dtype, x.device, backend) if n * vr else x.new_zeros((n, vr))
        stats, x_k = info.local_pass(row_kernel(backend), xr, rows, grad)
        gathered, _ = _gather_stats(stats, group)
        lse, ce = info.combine(gathered, rows)
        scales, den = info.scales(reduction)
        loss = reduce_rows(ce, lse, reduction, z, den)
        if grad is not None:
            info.finish_grad(grad, backend, rows, lse, stats[0], x_k, scales)
        ctx.grad, ctx.backend = grad, backend
        ctx.save_for_backward(valid)
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grad is None:
            raise RuntimeError("vocab_parallel_cross_entropy ran with grad disabled for logits")
        (valid,) = ctx.saved_tensors
        grad = ctx.grad
        if is_traced(grad_loss) or graph_is_kept():  # the buffer stays as it is for another backward
            dx = torch.ops.maskkern.masked_cross_entropy_backward(grad, grad_loss, valid)
        else:  # the graph is freed after this: the buffer is ours to scale in place and hand on
            ctx.grad = None
            torch.ops.maskkern.masked_cross_entropy_backward_(grad, grad_loss, valid, ctx.backend)
            dx = grad
        return dx, *(None,) * 12


# --- vocab_parallel_linear_cross_entropy -----------------------------------------------------------


def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    group=None,
    ignore_index: int = -100,
    mask: Tensor | None = None,
    class_weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """``linear_cross_entropy`` with the head split over the vocabulary. Equals
    ``mk.masked_cross_entropy(F.linear(hidden, cat(weights), cat(biases)).flatten(0, -2),
    target.flatten(), class_weight, ...)`` — loss and gradients — without any (N, V) or (N, V_r)
    logits: tokens go in chunks, as in ``linear_cross_entropy``.

    Args:
        hidden: (..., H), replicated: identical on every rank of the group.
        weight: (V_r, H), this rank's contiguous slice of the head (slices in group-rank order), or
            a DTensor on a 1-D mesh (ranks in ascending order) placed Shard(0) (hidden then a
            replicated DTensor or a tensor; the loss is a replicated DTensor).
        target: global class ids of shape hidden.shape[:-1], identical on every rank.
        bias: optional (V_r,), this rank's slice of the head's bias.
        mask, class_weight, ignore_index, reduction, label_smoothing, z_loss, vocab_size: as in
            ``vocab_parallel_cross_entropy`` (class_weight is its ``weight``: (V,) or (V_r,)).
        chunk_size: tokens per chunk (the same on every rank); None: about 16 MiB of the widest
            slice's logits on CPU (two chunks are in flight at a time).

    Gradients: weight's and bias's are this rank's slice (local); hidden's is summed over the
    group, so every rank gets the gradient of the replicated hidden.

    Collectives per call: the metadata all-gather (and, with class weights as slices, one
    all-reduce of N + 1 values); per chunk one all-gather of 2 values per row (async, in flight
    while the next chunk's matmul and kernel run) and, when hidden requires grad, one all-reduce of
    the chunk's (rows, H) part of grad_hidden (async, waited for after the last chunk). Under
    reduction="none" the gradients, and those all-reduces, come in backward, which recomputes the
    chunks (no statistics gathered again).
    """
    dt = _dtensor_module()
    if dt is not None and isinstance(weight, dt.DTensor):
        return _dtensor_linear_cross_entropy(
            hidden, weight, target, bias, group, ignore_index, mask, class_weight, reduction, label_smoothing,
            z_loss, chunk_size, backend,
        )  # fmt: skip
    return _linear_cross_entropy(
        hidden, weight, target, bias, group, None, ignore_index, mask, class_weight, reduction,
        label_smoothing, z_loss, chunk_size, vocab_size, backend,
    )  # fmt: skip


def _linear_cross_entropy(
    hidden, weight, target, bias, group, position, ignore_index, mask, class_weight, reduction,
    label_smoothing, z_loss, chunk_size, vocab_size, backend,
):  # fmt: skip
    """vocab_parallel_linear_cross_entropy on plain tensors; ``position`` as in _cross_entropy."""
    name = "vocab_parallel_linear_cross_entropy"
    rank, _ = _group_info(group)
    error, meta = None, {}
    try:
        label_smoothing, z_loss = check_linear_cross_entropy_args(
            hidden, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, chunk_size, "V_r"
        )
        check_target_mask(mask, target)
        _check_class_weight(class_weight, "class_weight", hidden, "hidden")
        if vocab_size is not None:
            check_int(vocab_size, "vocab_size")
        backend = resolve_backend(backend, hidden.device, "hidden")
        t = target.reshape(-1).long()
        valid = valid_rows(t, ignore_index, mask)
        n, hs = t.numel(), hidden.shape[-1]
        h2 = hidden.reshape(n, hs)
        meta = _options_meta(t, valid, mask, ignore_index, reduction, label_smoothing, z_loss, vocab_size)
        h_sum, h_abs = _hidden_checksum(h2)
        meta.update(
            position=rank if position is None else position,
            device=_device_code(hidden.device),
            rows=n,
            vocab=weight.shape[0],
            dtype=_DTYPE_CODES[hidden.dtype],
            weight_len=-1 if class_weight is None else class_weight.shape[0],
            hidden=hs,
            hidden_sum=h_sum,
            hidden_abs=h_abs,
            needs=int(torch.is_grad_enabled() and hidden.requires_grad) + 2 * (bias is not None),
            chunk=chunk_size or 0,
        )
    except (TypeError, ValueError, IndexError, RuntimeError) as exc:
        error = exc
    metas = _agree(name, meta, error, group)
    total, offset, _vr, kind = _layout(name, metas, rank, vocab_size, ignore_index)
    # The same chunks on every rank; two chunks are in flight (one's statistics being gathered while
    # the next is computed): each gets half of the single-device op's logits budget.
    widest = max(m["vocab"] for m in metas)
    chunk = chunk_size or max(1, auto_chunk_size(n, widest, hs, hidden.dtype, hidden.device) // 2)
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and x is not None and x.requires_grad for x in (hidden, weight, bias))
    loss = _VocabParallelLinearCE.apply(
        h2, weight, bias, t, valid, class_weight, kind, offset, total, group, reduction, label_smoothing,
        z_loss, chunk, backend, needs,
    )  # fmt: skip
    return loss.view(target.shape) if reduction == "none" else loss


def _hidden_checksum(h2: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ, Σ|·|) in fp64 of at most 64 × 64 elements of (N, H) hidden, spread over its rows and
    columns, as int64 bit patterns (NaN when not finite: NaN / inf flow through unchecked). A few
    thousand reads, not a copy of hidden: enough to catch a hidden that is not replicated (each rank
    its own batch, a sequence-parallel hidden not gathered), not a proof that it is."""
    n, hs = h2.shape
    sample = h2.detach()[:: max(1, -(-n // 64)), :: max(1, -(-hs // 64))].to(torch.float64)
    sums = torch.stack([sample.sum(), sample.abs().sum()])
    sums = torch.where(torch.isfinite(sums).all(), sums, math.nan)
    return sums.view(torch.int64).unbind()


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, h2, weight, bias, t, valid, class_weight, kind, offset, total, group, reduction, eps, z, chunk,
        backend, needs,
    ):  # fmt: skip
        n = t.numel()
        info = _Rows(
            t,
            valid,
            offset,
            weight.shape[0],
            total,
            class_weight,
            kind,
            compute_dtype(h2.dtype),
            eps,
            z,
            group,
        )
        # The rows that do not count are left out of the matmuls (one host sync, as the range check).
        idx = valid.nonzero()[:, 0] if n else None
        if idx is not None and idx.numel() == n:
            idx = None
        sel = info if idx is None else info.select(idx)
        scales, den = sel.scales(reduction)
        grads = needs if reduction != "none" else (False, False, False)
        lse, lse_r, ce, gh, gw, gb = _chunks(h2, weight, bias, sel, idx, group, chunk, backend, grads, scales)
        loss = reduce_rows(ce, lse, reduction, z, den)
        if reduction == "none" and idx is not None:
            loss = loss.new_zeros(n).index_copy_(0, idx, loss)
        ctx.reduction, ctx.needs, ctx.config = reduction, needs, (group, chunk, backend)
        if reduction != "none":  # absent gradients as empty tensors, for the scale ops
            ctx.grads = tuple(h2.new_empty(0) if g is None else g for g in (gh, gw, gb))
        else:  # recomputed in backward from the inputs and the per-row statistics
            ctx.sel, ctx.idx = sel, idx
            ctx.save_for_backward(h2, weight, bias, lse, lse_r)
        return loss.to(h2.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        needs = ctx.needs
        if ctx.reduction != "none":  # linear_cross_entropy's backward ops, as its own backward
            gh, gw, gb = ctx.grads
            if is_traced(grad_loss) or graph_is_kept():
                gh, gw, gb = torch.ops.maskkern.linear_cross_entropy_scale(gh, gw, gb, grad_loss)
            else:  # the graph is freed after this: the saved gradients are ours to scale in place
                ctx.grads = None
                torch.ops.maskkern.linear_cross_entropy_scale_(gh, gw, gb, grad_loss)
        else:
            h2, weight, bias, lse, lse_r = ctx.saved_tensors
            group, chunk, backend = ctx.config
            sel, idx = ctx.sel, ctx.idx
            g = grad_loss.reshape(-1).to(sel.cdt)
            row_scale = g if idx is None else g[idx]
            _, _, _, gh, gw, gb = _chunks(
                h2, weight, bias, sel, idx, group, chunk, backend, needs, (1.0, 1.0), (lse, lse_r, row_scale)
            )
        return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None, *(None,) * 13)


def _chunks(h2, weight, bias, info: _Rows, idx, group, chunk, backend, needs, scales, recompute=None):
    """The chunk loop over the rows of ``info`` (h2's rows ``idx``, all when None). Forward
    (``recompute`` None): statistics gathered per chunk, async. Backward of "none" (``recompute`` =
    (lse, lse_r, row_scale) of the forward): the gradients only. Returns (lse, lse_r, ce, grad_hidden,
    grad_weight, grad_bias), the gradients None where not in ``needs``."""
    n = info.t.numel()
    vr, hs = weight.shape
    cdt, dev = info.cdt, h2.device
    need_h, need_w, need_b = needs
    kernel = row_kernel(backend)
    if recompute is None:
        lse, lse_r, ce = (torch.zeros(n, dtype=cdt, device=dev) for _ in range(3))
        row_scale = None
    else:
        (lse, lse_r, row_scale), ce = recompute, None
    gh_rows = torch.empty(n, hs, dtype=h2.dtype, device=dev) if need_h else None
    gw = torch.zeros(weight.shape, dtype=cdt, device=dev) if need_w and vr else None
    gb = torch.zeros(vr, dtype=cdt, device=dev) if need_b and vr else None
    reduces = []

    def finish(start, end, h, grad, x_k, gathered, work):
        rows = slice(start, end)
        if work is not None:
            work.wait()
            lse[rows], ce[rows] = info.combine(gathered, rows)
        if grad is None:
            return
        rs = None if row_scale is None else row_scale[rows]
        if vr:
            info.finish_grad(grad, backend, rows, lse[rows], lse_r[rows], x_k, scales, rs)
        if need_h:
            if vr:
                torch.mm(grad, weight, out=gh_rows[rows])
            else:
                gh_rows[rows] = 0
            reduces.append(dist.all_reduce(gh_rows[rows], group=group, async_op=True))
        if gw is not None:
            if gw.dtype == grad.dtype:
                gw.addmm_(grad.T, h)
            else:
                gw.add_(grad.T @ h)
        if gb is not None:
            gb.add_(grad.sum(0, dtype=cdt))

    pending = None
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        rows = slice(start, end)
        h = h2[start:end] if idx is None else h2.index_select(0, idx[start:end])
        logits = _chunk_logits(h, weight, bias) if vr else h.new_zeros((end - start, 0))
        grad = logits if any(needs) else None  # overwritten by its own gradient
        stats, x_k = info.local_pass(
            kernel, logits, rows, grad, lambda m, h=h: _chunk_logits(h[m], weight, bias)
        )
        gathered = work = None
        if recompute is None:
            lse_r[rows] = stats[0]
            gathered, work = _gather_stats(stats, group, async_op=True)
        if pending is not None:
            finish(*pending)  # the previous chunk's statistics were in flight meanwhile
        pending = (start, end, h, grad, x_k, gathered, work)
    if pending is not None:
        finish(*pending)
    for work in reduces:
        work.wait()
    gh = None
    if need_h:
        gh = gh_rows if idx is None else h2.new_zeros(h2.shape).index_copy_(0, idx, gh_rows)
    if need_w:
        gw = weight.new_zeros(weight.shape) if gw is None else gw.to(weight.dtype)
    if need_b:
        gb = bias.new_zeros(bias.shape) if gb is None else gb.to(bias.dtype)
    return lse, lse_r, ce, gh, gw, gb


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)


# --- DTensor inputs --------------------------------------------------------------------------------


def _dtensor_module():
    """torch.distributed.tensor, or None where it is not available."""
    if not AVAILABLE:
        return None
    try:
        import torch.distributed.tensor as dt
    except ImportError:  # pragma: no cover
        return None
    return dt


def _vocab_mesh(x, name: str, dim: int):
    """The 1-D mesh of a DTensor placed Shard(dim) (dim normalised), else a ValueError."""
    dt = _dtensor_module()
    mesh, placements = x.device_mesh, x.placements
    want = dim % x.ndim
    if mesh.ndim != 1 or not isinstance(placements[0], dt.Shard) or placements[0].dim % x.ndim != want:
        raise ValueError(
            f"{name} as a DTensor must live on a 1-D mesh with placement Shard({dim}) (the vocabulary "
            f"split over the mesh), got mesh of {mesh.ndim} dims and placements {placements}; pass the "
            "local slice and group= for other layouts"
        )
    return mesh


def _local(x, name: str, sliced_ok: bool = False):
    """A replicated DTensor's (or, with ``sliced_ok``, a Shard(0) one's) local tensor; tensors and
    None as they are."""
    dt = _dtensor_module()
    if not isinstance(x, dt.DTensor):
        return x
    ok = all(isinstance(p, dt.Replicate) for p in x.placements)
    ok |= sliced_ok and x.device_mesh.ndim == 1 and isinstance(x.placements[0], dt.Shard)
    if not ok:
        want = "Replicate()" + (" or Shard(0)" if sliced_ok else "")
        raise ValueError(f"{name} as a DTensor must be placed {want}, got {x.placements}")
    return x.to_local()


def _dtensor_cross_entropy(
    logits, target, weight, group, ignore_index, mask, reduction, smoothing, z, backend
):
    dt = _dtensor_module()
    mesh = _vocab_mesh(logits, "logits", -1)
    loss = _cross_entropy(
        logits.to_local(),
        _local(target, "target"),
        _local(weight, "weight", sliced_ok=True),
        mesh.get_group(0),
        mesh.get_coordinate()[0],
        ignore_index,
        _local(mask, "mask"),
        reduction,
        smoothing,
        z,
        logits.shape[-1],
        backend,
    )
    return dt.DTensor.from_local(loss, mesh, [dt.Replicate()], run_check=False)


def _dtensor_linear_cross_entropy(
    hidden,
    weight,
    target,
    bias,
    group,
    ignore_index,
    mask,
    class_weight,
    reduction,
    smoothing,
    z,
    chunk,
    backend,
):
    dt = _dtensor_module()
    mesh = _vocab_mesh(weight, "weight", 0)
    if bias is not None and isinstance(bias, dt.DTensor):
        _vocab_mesh(bias, "bias", 0)
        bias = bias.to_local()
    loss = _linear_cross_entropy(
        _local(hidden, "hidden"),
        weight.to_local(),
        _local(target, "target"),
        bias,
        mesh.get_group(0),
        mesh.get_coordinate()[0],
        ignore_index,
        _local(mask, "mask"),
        _local(class_weight, "class_weight", sliced_ok=True),
        reduction,
        smoothing,
        z,
        chunk,
        weight.shape[0],
        backend,
    )
    return dt.DTensor.from_local(loss, mesh, [dt.Replicate()], run_check=False)


# --- FSDP2: the fused head loss with the head's weight unsharded -----------------------------------


def attach_linear_cross_entropy(head, loss=None, name: str = "linear_cross_entropy"):
    """Gives ``head`` (an ``nn.Linear``, or any module with ``weight`` and ``bias``) a method
    ``head.<name>(hidden, target)`` = ``loss(hidden, head.weight, target, head.bias)`` and, when
    ``head`` is an FSDP2 module (``fully_shard(head)`` already applied), registers it with
    ``register_fsdp_forward_method``, so that FSDP2 unshards the weight around it as around
    ``head.forward`` and reduce-scatters its gradient. ``loss`` defaults to
    ``mk.nn.LinearCrossEntropyLoss()``. Returns the bound method.

    Call it after ``fully_shard(head)``: FSDP2 only wraps methods that exist when it is applied,
    so a method attached before would read the sharded weight; calling it then raises a
    RuntimeError that says so."""
    import types

    from .ops.linear_cross_entropy import LinearCrossEntropyLoss

    loss = LinearCrossEntropyLoss() if loss is None else loss
    fsdp_module = _fsdp_module_class()
    registered = fsdp_module is not None and isinstance(head, fsdp_module)

    def method(self, hidden: Tensor, target: Tensor) -> Tensor:
        if not registered and fsdp_module is not None and isinstance(self, fsdp_module):
            raise RuntimeError(
                f"{type(self).__name__}.{name}: attach_linear_cross_entropy ran before fully_shard on "
                f"this module, so FSDP2 does not unshard its weight around {name}; call "
                "attach_linear_cross_entropy(head, ...) after fully_shard(head)"
            )
        return loss(hidden, self.weight, target, getattr(self, "bias", None))

    setattr(head, name, types.MethodType(method, head))
    if registered:
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(head, name)
    return getattr(head, name)


def _fsdp_module_class():
    """FSDP2's FSDPModule, or None where torch has none."""
    if not AVAILABLE:
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return None
    return FSDPModule


# --- DTensor sharding rules for the custom ops -----------------------------------------------------

# Which ops get rules: every Python-level custom op of the maskkern namespace (the public ops and
# their backward ops). The native kernel ops they call (``*_fwd``, ``*_bwd``, ``*_scale_``,
# the cache ops) only ever see local tensors.
SHARDED_OPS: dict[str, object] = {}
MISSING_OPS: list[str] = []  # rules written for ops that are not registered (renamed?): a test fails


def _rules():
    from torch.distributed.tensor import Partial, Replicate, Shard

    R = Replicate()

    def opt(x, placement):
        return None if x is None else placement

    def like(x, ref_ndim: int, dim: int):
        """The placement of a tensor broadcast against a ref of ``ref_ndim`` dims sharded at ``dim``:
        Shard of its aligned dim, Replicate where it broadcasts (size 1 or missing)."""
        if x is None:
            return None
        aligned = dim - (ref_ndim - x.ndim)
        return R if aligned < 0 or x.shape[aligned] == 1 else Shard(aligned)

    def softmax_dims(scores, causal, query_lengths):
        nd = scores.ndim
        dims = list(range(nd - 2))  # batch (dim 0: lengths sharded with it) and head dims
        if not causal and query_lengths is None:  # rows do not depend on their position
            dims.append(nd - 2)
        return dims

    def masked_softmax(scores, mask, lengths, query_lengths, causal, *rest):
        out = [([R], [R, opt(mask, R), opt(lengths, R), opt(query_lengths, R), *[None] * len(rest)])]
        for d in softmax_dims(scores, causal, query_lengths):
            lens = Shard(0) if d == 0 and scores.ndim > 2 else R
            ins = [Shard(d), like(mask, scores.ndim, d), opt(lengths, lens), opt(query_lengths, lens)]
            out.append(([Shard(d)], ins + [None] * len(rest)))
        return out

    def masked_softmax_backward(grad, out_, mask, lengths, query_lengths, causal, *rest):
        out = [([R], [R, R, opt(mask, R), opt(lengths, R), opt(query_lengths, R), *[None] * len(rest)])]
        for d in softmax_dims(out_, causal, query_lengths):
            lens = Shard(0) if d == 0 and out_.ndim > 2 else R
            ins = [Shard(d), Shard(d), like(mask, out_.ndim, d), opt(lengths, lens), opt(query_lengths, lens)]
            out.append(([Shard(d)], ins + [None] * len(rest)))
        return out

    def heads_ok(q, k):
        hq, hkv, world = q.shape[1], k.shape[1], q.mesh.size()
        return hq == hkv or (hq % world == 0 and hkv % world == 0)  # q head h reads kv head h // g

    def rows_ok(causal, left, right, query_lengths, cu_q):
        return not causal and left < 0 and right < 0 and query_lengths is None and cu_q is None

    def tiles_like(mask, backend: str, dim: int):
        """The placement of the forward's bool-mask tile summary (its dims are the mask's stored
        ones, a broadcast dim of size 1) when the scores are sharded at ``dim``; R when empty."""
        if mask is None or mask.tensor_meta.dtype != torch.bool or backend not in ("cpu", "triton"):
            return R
        aligned = dim - (4 - mask.ndim)
        broadcast = aligned < 0 or mask.shape[aligned] == 1 or mask.tensor_meta.stride[aligned] == 0
        return R if broadcast else Shard(aligned)

    def attention(
        q, k, v, mask, lengths, query_lengths, cu_q, cu_k, max_q, max_k, causal, left, right, *rest
    ):
        backend = rest[-1]
        tail = [None] * (5 + len(rest))
        opts = [opt(lengths, R), opt(query_lengths, R), opt(cu_q, R), opt(cu_k, R)]
        out = [([R, R, R], [R, R, R, opt(mask, R), *opts, *tail])]
        S0, S1, S2 = Shard(0), Shard(1), Shard(2)
        if cu_q is None:
            ins = [S0, S0, S0, like(mask, 4, 0), opt(lengths, S0), opt(query_lengths, S0), None, None]
            out.append(([S0, S0, tiles_like(mask, backend, 0)], ins + tail))
        if heads_ok(q, k):
            ins = [S1, S1, S1, like(mask, 4, 1), *opts]
            out.append(([S1, S1, tiles_like(mask, backend, 1)], ins + tail))
        # Row-sharded, each rank summarises its own rows' tiles, which do not tile the global rows:
        # the summary is declared replicated so that it is never moved, and is only ever handed to
        # attention_backward under this same strategy (R to R: each rank keeps its own).
        if rows_ok(causal, left, right, query_lengths, cu_q):
            ins = [S2, R, R, like(mask, 4, 2), opt(lengths, R), None, None, None]
            out.append(([S2, S2, R], ins + tail))
        return out

    def attention_backward(
        grad, q, k, v, o, lse, mask, tiles, lengths, query_lengths, cu_q, cu_k, max_q, max_k, causal, left,
        right, scale, mask_grad, backend,
    ):  # fmt: skip
        tail = [None] * 8
        opts = [opt(lengths, R), opt(query_lengths, R), opt(cu_q, R), opt(cu_k, R)]
        out = [([R] * 4, [R] * 6 + [opt(mask, R), opt(tiles, R)] + opts + tail)]
        S0, S1, S2 = Shard(0), Shard(1), Shard(2)
        if cu_q is None:
            ins = [S0] * 6 + [like(mask, 4, 0), opt(tiles, tiles_like(mask, backend, 0))]
            ins += [opt(lengths, S0), opt(query_lengths, S0), None, None]
            out.append(([S0, S0, S0, S0 if mask_grad else R], ins + tail))
        if heads_ok(q, k):
            ins = [S1] * 6 + [like(mask, 4, 1), opt(tiles, tiles_like(mask, backend, 1))] + opts
            out.append(([S1, S1, S1, S1 if mask_grad else R], ins + tail))
        if rows_ok(causal, left, right, query_lengths, cu_q):
            ins = [S2, S2, R, R, S2, S2, like(mask, 4, 2), opt(tiles, R)]  # tiles: see attention
            ins += [opt(lengths, R), None, None, None]
            out.append(([S2, Partial(), Partial(), S2 if mask_grad else R], ins + tail))
        return out

    def pad_embedding(ids, weight, *rest):
        tail = [None] * len(rest)
        out = [([R], [R, R, *tail])]
        out += [([Shard(d)], [Shard(d), R, *tail]) for d in range(ids.ndim)]  # token dims
        out.append(([Shard(ids.ndim)], [R, Shard(1), *tail]))  # the embedding dim
        return out

    def pad_embedding_backward(grad, ids, num_weights, padding_idx, scale, scale_grad_by_freq, *rest):
        tail = [None] * (4 + len(rest))
        out = [([R], [R, R, *tail])]
        if not scale_grad_by_freq:  # frequencies are over the whole batch: not a sum of shards
            out += [([Partial()], [Shard(d), Shard(d), *tail]) for d in range(ids.ndim)]
        out.append(([Shard(1)], [Shard(ids.ndim), R, *tail]))
        return out

    def masked_cross_entropy(input, target, weight, mask, ignore_index, reduction, *rest):
        tail = [None] * (2 + len(rest))
        out = [([R, R], [R, R, opt(weight, R), opt(mask, R), *tail])]
        compute_grad = rest[-2]
        if input.ndim >= 2 and reduction != "mean":  # a mean's denominators are not a sum of shards
            loss = Shard(0) if reduction == "none" else Partial()
            ins = [Shard(0), Shard(0), opt(weight, R), opt(mask, Shard(0))]
            out.append(([loss, Shard(0) if compute_grad else R], ins + tail))
        return out

    def masked_cross_entropy_backward(grad_rows, grad_loss, valid):
        per_row = Shard(0) if grad_loss.ndim else R
        return [([R], [R, R, R]), ([Shard(0)], [Shard(0), per_row, Shard(0)])]

    def masked_cross_entropy_backward_(grad_rows, grad_loss, valid, backend):
        per_row = Shard(0) if grad_loss.ndim else R
        return [([], [R, R, R, None]), ([], [Shard(0), per_row, Shard(0), None])]

    def linear_cross_entropy(hidden, weight, target, bias, ignore_index, reduction, *rest):
        tail = [None] * (2 + len(rest))
        need_h, need_w, need_b = rest[-4:-1]
        out = [([R] * 4, [R, R, R, opt(bias, R), *tail])]
        if reduction != "mean":
            in_fwd = reduction != "none"
            for d in range(hidden.ndim - 1):
                outs = [
                    Shard(d) if reduction == "none" else Partial(),
                    Shard(d) if need_h and in_fwd else R,
                    Partial() if need_w and in_fwd else R,
                    Partial() if need_b and in_fwd else R,
                ]
                out.append((outs, [Shard(d), R, Shard(d), opt(bias, R), *tail]))
        return out

    def linear_cross_entropy_scale(grad_hidden, grad_weight, grad_bias, grad_loss):
        # Each gradient times a replicated scalar keeps its placement: the linear op's outputs
        # (grad_hidden sharded with the tokens, the head's gradients Partial) or replicated.
        out = []
        for ph in [R] + [Shard(d) for d in range(grad_hidden.ndim)]:
            for pw in (R, Partial()):
                for pb in (R, Partial()):
                    out.append(([ph, pw, pb], [ph, pw, pb, R]))
        return out

    def linear_cross_entropy_scale_(grad_hidden, grad_weight, grad_bias, grad_loss):
        return [
            ([], ins) for _, ins in linear_cross_entropy_scale(grad_hidden, grad_weight, grad_bias, grad_loss)
        ]

    def linear_cross_entropy_backward(grad_loss, hidden, weight, target, bias, *rest):
        tail = [None] * len(rest)
        need_h, need_w, need_b = rest[-4:-1]
        out = [([R] * 3, [R, R, R, R, opt(bias, R), *tail])]
        for d in range(hidden.ndim - 1):
            outs = [Shard(d) if need_h else R, Partial() if need_w else R, Partial() if need_b else R]
            out.append((outs, [Shard(d), Shard(d), R, Shard(d), opt(bias, R), *tail]))
        return out

    return {
        "masked_softmax": masked_softmax,
        "masked_softmax_backward": masked_softmax_backward,
        "attention": attention,
        "attention_backward": attention_backward,
        "pad_embedding": pad_embedding,
        "pad_embedding_backward": pad_embedding_backward,
        "masked_cross_entropy": masked_cross_entropy,
        "masked_cross_entropy_backward": masked_cross_entropy_backward,
        "masked_cross_entropy_backward_": masked_cross_entropy_backward_,
        "linear_cross_entropy": linear_cross_entropy,
        "linear_cross_entropy_backward": linear_cross_entropy_backward,
        "linear_cross_entropy_scale": linear_cross_entropy_scale,
        "linear_cross_entropy_scale_": linear_cross_entropy_scale_,
    }


def custom_ops() -> list[str]:
    """The names of maskkern's Python-level custom ops (public ops and their backward ops)."""
    from torch._library.custom_ops import OPDEFS

    return sorted(name.split("::", 1)[1] for name in OPDEFS if name.startswith("maskkern::"))


def _register_rules() -> None:
    try:
        from torch.distributed.tensor.experimental import register_sharding
    except ImportError:  # pragma: no cover - no DTensor in this torch
        return
    for name, rule in _rules().items():
        packet = getattr(torch.ops.maskkern, name, None)
        if packet is None:
            MISSING_OPS.append(name)
            continue
        register_sharding(packet.default)(rule)
        SHARDED_OPS[name] = rule


if AVAILABLE:
    _register_rules()
