"""Argument checks shared by the ops: each raises before any kernel runs, naming the argument,
what was expected and what was given (DESIGN.md, Errors)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


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


def check_finite_number(x: object, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(x).__name__}")
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return float(x)


def check_nonnegative_values(x: Tensor | None, name: str) -> None:
    """Reads the values: call inside the custom op, where a data-dependent check does not break
    a torch.compile graph (on CUDA it synchronises)."""
    if x is not None and x.numel() and bool((x < 0).any()):
        raise ValueError(f"{name} must be >= 0, got min {int(x.min())}")


def empty_output(
    shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device, backend: str
) -> Tensor:
    """An uninitialised contiguous tensor for a kernel to fill: on the ``cpu`` backend from the C++
    output cache (csrc/cpu/output_memory.h), whose blocks are already faulted in."""
    if backend == "cpu":
        return torch.ops.maskkern.empty_for_writing(list(shape), dtype)
    return torch.empty(shape, dtype=dtype, device=device)
