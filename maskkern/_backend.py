"""Which backends exist on this machine, and the choice of one for a given tensor.

Backends (docs/design.md): ``triton`` (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1),
``cuda`` (C++/CUDA kernels in maskkern._C), ``cpu`` (C++ CPU kernels in maskkern._C) and
``torch`` (the eager reference, everywhere).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import NamedTuple

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")


class BackendStatus(NamedTuple):
    """Whether a backend can run here, and why not when it cannot."""

    available: bool
    reason: str


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _load_extension() -> tuple[object | None, str]:
    try:
        return importlib.import_module("maskkern._C"), ""
    except ImportError as exc:  # the package still works through the torch backend
        return None, f"maskkern._C failed to import ({exc}); rebuild with `pip install -e .`"


def native_extension_loaded() -> bool:
    """True when maskkern._C (the C++ CPU, and maybe CUDA, kernels) is loaded."""
    return _load_extension()[0] is not None


@functools.cache
def _triton_version() -> tuple[str | None, str]:
    try:
        import triton
    except ImportError as exc:
        return None, f"triton is not installed ({exc})"
    return triton.__version__, ""


def _has_native_kernel(device_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("maskkern::masked_softmax_fwd", device_key)


# Constant for the life of the process; torch.compile must not trace the import machinery inside.
@torch.compiler.assume_constant_result
def backend_status(name: str) -> BackendStatus:
    """Availability of one backend on this machine (for any device it can serve)."""
    if name == "torch":
        return BackendStatus(True, "eager PyTorch reference")
    if name in ("cpu", "cuda"):
        ext, why = _load_extension()
        if ext is None:
            return BackendStatus(False, why)
        if name == "cpu":
            return BackendStatus(True, "C++ CPU kernels in maskkern._C")
        if not _has_native_kernel("CUDA"):
            return BackendStatus(False, "maskkern._C was built without CUDA sources")
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device")
        return BackendStatus(True, "C++/CUDA kernels in maskkern._C")
    if name == "triton":
        version, why = _triton_version()
        if version is None:
            return BackendStatus(False, why)
        if torch.cuda.is_available():
            return BackendStatus(True, f"triton {version} on CUDA")
        if triton_interpreting():
            return BackendStatus(True, f"triton {version} interpreter (TRITON_INTERPRET=1)")
        return BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)")
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def backends() -> dict[str, BackendStatus]:
    """What is available here and why not: ``{name: BackendStatus(available, reason)}``."""
    return {name: backend_status(name) for name in BACKENDS}


def resolve_backend(backend: str | None, device: torch.device, arg: str = "input") -> str:
    """The backend to run on ``device``: the one asked for, checked, or the default choice.

    Default: a CUDA tensor gets ``triton``, else ``cuda``, else ``torch``; a CPU tensor gets
    ``cpu``, else ``torch``.
    """
    if backend is None:
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        return next(name for name in order if backend_status(name).available)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    status = backend_status(backend)
    if not status.available:
        raise RuntimeError(f"backend {backend!r} is not available: {status.reason}")
    runs_on = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu"), "torch": None}[backend]
    if backend == "triton" and device.type == "cpu" and not triton_interpreting():
        runs_on = ("cuda",)
    if runs_on is not None and device.type not in runs_on:
        raise ValueError(f"backend {backend!r} runs on {'/'.join(runs_on)} tensors, but {arg} is on {device}")
    return backend
