"""Argument checks shared by the ops, and the few helpers every op module needs.

The rule (docs/design.md, Errors): every user-facing check lives in the public Python function
(or, when it reads tensor values, in its custom op, through a checker here), raising
ValueError/TypeError/IndexError that names the argument, the expected and the actual before any
kernel runs. The kernels (C++, CUDA, Triton) only assert their internal contract (csrc/checks.h),
and read nothing out of bounds when an opt-out flag (check_lengths, check_ids) skipped a check: so
the flags do the same on every backend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._dtypes import FLOAT_DTYPES, INDEX_DTYPES, compute_dtype

__all__ = ["FLOAT_DTYPES", "INDEX_DTYPES", "compute_dtype"]  # re-exported for the op modules

REDUCTIONS = ("none", "mean", "sum")


def check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_dtype(x: Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {x.dtype}")


def check_index_dtype(x: Tensor, name: str) -> None:
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor (int32 or int64), got dtype {x.dtype}")


def check_same_device(x: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {x.device}")


def check_broadcastable(x: Tensor, name: str, shape: torch.Size, target: str) -> None:
    """``x`` must broadcast to ``shape`` without growing it."""
    try:
        ok = torch.broadcast_shapes(x.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to {target} {tuple(shape)}")


def check_lengths_tensor(lengths: object, name: str, scores: Tensor) -> Tensor | None:
    """``lengths`` / ``query_lengths`` of an op over ``scores`` (..., Lq, Lk) (or a stand-in of
    that shape): None, or an integer (B,) tensor with B = scores.shape[0] (0-d or (1,) for 2-D
    scores) on scores' device; returned as int64 (B,)."""
    if lengths is None:
        return None
    check_tensor(lengths, name)
    check_index_dtype(lengths, name)
    check_same_device(lengths, name, scores, "scores")
    if scores.dim() == 2:
        if lengths.dim() > 1 or lengths.numel() != 1:
            raise ValueError(f"{name} must be 0-d or (1,) for 2-D scores, got shape {tuple(lengths.shape)}")
    elif tuple(lengths.shape) != (scores.shape[0],):
        raise ValueError(
            f"{name} must have shape ({scores.shape[0]},) = (scores.shape[0],), got {tuple(lengths.shape)}"
        )
    if lengths.dim() == 1 and lengths.dtype == torch.int64:
        return lengths  # each op call costs tens of microseconds on a cold cache: skip the no-ops
    return lengths.reshape(-1).to(torch.int64)


def check_cu_seqlens(cu: object, name: str, ref: Tensor, ref_name: str) -> Tensor:
    """Packed sequences' offsets ``cu`` (n + 1,): an int32/int64 1-D tensor of at least one entry
    on ``ref``'s device; returned as int64. Its values are checked by check_cu_seqlens_values."""
    check_tensor(cu, name)
    if cu.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype int32 or int64, got {cu.dtype}")
    check_same_device(cu, name, ref, ref_name)
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D (n + 1,) with n >= 0, got shape {tuple(cu.shape)}")
    return cu.to(torch.int64)


def check_finite_number(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return float(x)


def check_int(x: object, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return x


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_label_smoothing(value: object) -> float:
    value = check_finite_number(value, "label_smoothing")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {value}")
    return value


def check_z_loss(value: object) -> float:
    value = check_finite_number(value, "z_loss")
    if value < 0:
        raise ValueError(f"z_loss must be >= 0, got {value}")
    return value


def check_target_mask(mask: object, target: Tensor) -> None:
    """A cross-entropy ``mask``: None, or bool of target's shape on its device (True = counts)."""
    if mask is None:
        return
    check_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool (True = the target counts), got dtype {mask.dtype}")
    check_same_device(mask, "mask", target, "target")
    if mask.shape != target.shape:
        raise ValueError(f"mask must have target's shape {tuple(target.shape)}, got {tuple(mask.shape)}")


def check_linear_cross_entropy_args(
    hidden: object,
    weight: object,
    target: object,
    bias: object,
    ignore_index: object,
    reduction: object,
    label_smoothing: object,
    z_loss: object,
    chunk_size: object,
    vocab: str = "V",
) -> tuple[float, float]:
    """The argument checks of ``linear_cross_entropy`` and of its vocab-parallel form, whose weight
    is a rank's slice (``vocab`` names weight's rows in the messages: "V" or "V_r"). Returns
    (label_smoothing, z_loss) as floats."""
    check_tensor(hidden, "hidden")
    check_dtype(hidden, "hidden", FLOAT_DTYPES)
    if hidden.dim() < 1:
        raise ValueError("hidden must be (..., H), got a 0-d tensor")
    check_tensor(weight, "weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be ({vocab}, {hidden.shape[-1]}) = ({vocab}, H), got {tuple(weight.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(t, name)
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
        check_same_device(t, name, hidden, "hidden")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) = ({vocab},), got {tuple(bias.shape)}")
    check_tensor(target, "target")
    check_index_dtype(target, "target")
    check_same_device(target, "target", hidden, "hidden")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target must have shape {tuple(hidden.shape[:-1])} = hidden.shape[:-1], "
            f"got {tuple(target.shape)}"
        )
    check_int(ignore_index, "ignore_index")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    check_reduction(reduction)
    return check_label_smoothing(label_smoothing), check_z_loss(z_loss)


# --- checks that read tensor values: called inside the custom ops, where a data-dependent check
# does not break a torch.compile graph (on CUDA each synchronises with the host) ----------------


def check_nonnegative_values(x: Tensor | None, name: str) -> None:
    if x is None or not x.numel():
        return
    low = int(x.min())  # one reduction and one read: on a CPU tensor a few microseconds
    if low < 0:
        raise ValueError(f"{name} must be >= 0, got min {low}")


def check_cu_seqlens_values(
    cu: Tensor, name: str, total: int, rows_of: str, max_seqlen: int, max_name: str
) -> None:
    """0 = cu[0] <= cu[1] <= ... <= cu[n] = total (the rows of ``rows_of``), and no sequence
    longer than ``max_seqlen`` (the argument ``max_name``)."""
    host = cu.cpu()
    if int(host[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    steps = host.diff()
    if steps.numel() and int(steps.min()) < 0:
        raise ValueError(f"{name} must be non-decreasing, got a step of {int(steps.min())}")
    if int(host[-1]) != total:
        where = "past" if int(host[-1]) > total else "before the end of"
        raise ValueError(f"{name} must end at {rows_of}'s {total} rows, got {int(host[-1])} ({where} it)")
    if steps.numel() and int(steps.max()) > max_seqlen:
        raise ValueError(
            f"{max_name} = {max_seqlen} is less than {name}'s longest sequence, {int(steps.max())}"
        )


def check_class_targets(target: Tensor, counted: Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError for a counted target (``counted`` (N,) bool) outside [0, n_classes)."""
    bad = counted & ((target < 0) | (target >= n_classes))
    if target.numel() and bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(f"target must be in [0, {n_classes}) or ignore_index ({ignore_index}), got {value}")


def check_ids_in_range(ids: Tensor, num_embeddings: int) -> None:
    """IndexError naming the first id outside [0, num_embeddings)."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= num_embeddings)
    if bool(bad.any()):
        first = int(ids.reshape(-1)[bad.reshape(-1).nonzero()[0, 0]])
        raise IndexError(
            f"input contains id {first}, out of range for weight with {num_embeddings} rows "
            f"(ids must be in [0, {num_embeddings}))"
        )


# --- shared by the ops' kernels and autograd ---------------------------------------------------


def empty_output(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device, backend: str
) -> Tensor:
    """An uninitialised contiguous tensor for a kernel to fill: on the ``cpu`` backend from the C++
    output cache (csrc/cpu/output_memory.h), whose blocks are already faulted in."""
    if backend == "cpu":
        return torch.ops.maskkern.empty_for_writing(list(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph / create_graph, gradcheck): then
    a buffer saved for backward must stay as it is, and may not be scaled in place. torch has no
    public query for this; where the private probe is missing, the graph counts as kept (out of
    place, always correct)."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return probe is None or probe()


def is_traced(grad: Tensor) -> bool:
    """Whether backward runs under torch.compile (or another tracer): then nothing saved may be
    mutated, and the out-of-place backward op is the one to record."""
    return torch.compiler.is_compiling() or type(grad) is not Tensor
