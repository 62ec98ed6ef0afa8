"""The CPU output cache of maskkern's C++ kernels (csrc/cpu/output_memory.h).

Large CPU outputs (1 MiB and up) of the ``cpu`` backend come from a cache of blocks that earlier
outputs gave back, so that a training loop, which asks for the same sizes every step, does not pay
the OS to fault in and zero fresh pages on every call (that cost more than the kernels themselves).
It is the CPU counterpart of PyTorch's CUDA caching allocator: freed blocks are kept, up to
``MASKKERN_CPU_CACHE_MB`` MiB (read when the first output is made; default 1024, 0 turns the
cache off), the least recently freed unmapped first. Blocks in use are reported to the PyTorch
profiler as allocations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ._backend import cpu_kernels_loaded


def empty_cache() -> int:
    """Unmaps every cached block (blocks in use are not affected); returns the bytes released.

    The CPU counterpart of ``torch.cuda.empty_cache()``; 0 when the CPU kernels are not loaded.
    """
    if not cpu_kernels_loaded():
        return 0
    return int(torch.ops.maskkern.empty_cache())


@contextlib.contextmanager
def cache_bypassed() -> Iterator[None]:
    """Within the block, outputs come from the OS and freed blocks go back to it, as without the
    cache; the blocks already cached stay cached. The benchmark's measure of what the cache is
    worth (its ``maskkern-nocache`` provider). Not thread-local: it affects every thread."""
    if not cpu_kernels_loaded():
        yield
        return
    previous = torch.ops.maskkern.set_cache_bypassed(True)
    try:
        yield
    finally:
        torch.ops.maskkern.set_cache_bypassed(previous)
