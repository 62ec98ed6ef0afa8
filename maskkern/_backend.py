"""Which backends exist on this machine, and the choice of one for a given tensor.

Backends (docs/design.md): ``triton`` (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1),
``cuda`` (C++/CUDA kernels in maskkern._C), ``cpu`` (C++ CPU kernels in maskkern._cpu_<level>)
and ``torch`` (the eager reference, everywhere).

The CPU kernels are built once per instruction-set level (setup.py): ``default`` (baseline), ``avx2``
and ``avx512``. The widest level the running CPU supports — as torch sees it,
``torch.backends.cpu.get_cpu_capability()`` — is loaded on first use; ``MASKKERN_CPU_CAPABILITY=
default|avx2|avx512`` picks a lower one. One built on a machine with AVX-512 so runs on one without.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
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
    """True when maskkern._C (the op schemas, and maybe the CUDA kernels) is loaded."""
    return _load_extension()[0] is not None


CPU_CAPABILITIES = ("default", "avx2", "avx512")


def _cpu_supports() -> str:
    """The widest of CPU_CAPABILITIES that this CPU runs, by torch's own detection."""
    found = torch.backends.cpu.get_cpu_capability().lower()
    return found if found in CPU_CAPABILITIES else "default"


@functools.cache
def _load_cpu_kernels() -> tuple[str | None, str]:
    """(the level of the CPU kernels loaded, or None, and why not): maskkern._cpu_<level>, the
    widest the CPU supports, at most MASKKERN_CPU_CAPABILITY; a level that was not built falls
    back to the next lower one."""
    if not native_extension_loaded():
        return None, _load_extension()[1]
    top = _cpu_supports()
    asked = os.environ.get("MASKKERN_CPU_CAPABILITY", "").strip().lower()
    if asked:
        if asked not in CPU_CAPABILITIES:
            why = f"MASKKERN_CPU_CAPABILITY must be one of {CPU_CAPABILITIES}, got {asked!r}"
            warnings.warn(why + "; the cpu backend is off", stacklevel=2)
            return None, why
        if CPU_CAPABILITIES.index(asked) > CPU_CAPABILITIES.index(top):
            warnings.warn(f"MASKKERN_CPU_CAPABILITY={asked}: this CPU supports up to {top}", stacklevel=2)
        else:
            top = asked
    errors = []
    for level in reversed(CPU_CAPABILITIES[: CPU_CAPABILITIES.index(top) + 1]):
        try:
            importlib.import_module(f"maskkern._cpu_{level}")
            return level, ""
        except ImportError as exc:
            errors.append(f"{level}: {exc}")
    return None, f"no CPU kernels could be loaded ({'; '.join(errors)}); rebuild with `pip install -e .`"


def cpu_kernels_loaded() -> bool:
    """True when a maskkern._cpu_<level> library (the C++ CPU kernels) is loaded."""
    return _load_cpu_kernels()[0] is not None


def cpu_capability() -> str | None:
    """The instruction-set level of the loaded CPU kernels ("default", "avx2", "avx512"), or None."""
    return _load_cpu_kernels()[0]


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
            level, why = _load_cpu_kernels()
            if level is None:
                return BackendStatus(False, why)
            return BackendStatus(True, f"C++ CPU kernels in maskkern._cpu_{level}")
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
