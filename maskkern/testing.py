"""What maskkern's tests and benchmarks hold every op to, in one place: the per-dtype tolerances
against the reference and the profiler's count of the bytes a call allocates."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

# (rtol, atol) of an op's output against the reference computed in fp32/fp64 and rounded once.
# bf16 allows 2 ulp: the Triton interpreter truncates fp32 -> bf16 instead of rounding.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}

# (rtol, atol) of attention's output and q/k/v gradients against the float64 reference, looser than
# TOL: the matmuls accumulate L products per value and round the scores to the inputs' dtype before
# the softmax. fp32: maskkern, eager and SDPA all measured 1-3e-6 max abs error at the CPU headline
# (values up to 5). fp16/bf16: every score carries its 2^-11 / 2^-8 relative rounding, so the bounds
# are a few of those over O(1) values.
ATTENTION_TOL = {torch.float32: (1e-4, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}

# (rtol, atol) of the fused linear + cross-entropy (single-device and vocab-parallel) in fp32: the
# (N, H) x (H, V) matmul accumulates over H in a different order on each side. Other dtypes: TOL.
LINEAR_CROSS_ENTROPY_TOL = {torch.float32: (1e-4, 1e-5)}


def profiled_peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes torch's allocators held at once during ``fn()``, above what was live before
    (outputs, saved activations, temporaries, gradients): the allocation and free events that
    ``torch.profiler.profile(profile_memory=True)`` records during the call, summed in time order.

    Replaces reading the process's resident size around the call, which cannot see memory freed
    before the call ends nor tell torch's allocations from the interpreter's."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    gc.collect()  # a collection inside the call would show as frees the call did not make
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(allocations):
        live += size
        peak = max(peak, live)
    return peak
