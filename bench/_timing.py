"""Timing and memory, for bench/_harness.py: how long a call takes (``time_interleaved``: providers
interleaved in rounds, caches flushed before each sample), how much it allocates (``peak_memory``),
and the machine's reference rates that GB/s and GFLOP/s are read against (``copy_bandwidth``,
``matmul_rate``). The method is described in bench/_harness.py's docstring and bench/README.md."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from maskkern.testing import profiled_peak_bytes


@dataclass
class Budget:
    """How long to measure: warm-up calls, rounds of the A B A B interleaving (adapted between
    min_reps and max_reps to fit budget_s per case and mode), and the CPU sample length."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float
    min_sample_s: float


# QUICK warms each provider up once: its checked call before the timing was the first.
QUICK = Budget(warmup=1, min_reps=3, max_reps=10, budget_s=0.5, min_sample_s=0.005)
FULL = Budget(warmup=3, min_reps=7, max_reps=40, budget_s=2.0, min_sample_s=0.02)
# For a case whose calls take seconds (Case.budget): no warm-up past the checked call and the
# estimating one, three rounds.
SLOW = Budget(warmup=0, min_reps=3, max_reps=3, budget_s=0.0, min_sample_s=0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of the samples."""
    q = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    return tuple(float(v) for v in torch.tensor(samples, dtype=torch.float64).quantile(q))


class GradSlots:
    """fwd+bwd: the leaves' ``.grad`` of each provider, kept aside while the others run.

    ``switch(name)``, untimed before a provider's calls, puts the grads of the provider that ran
    last aside and gives the leaves back this provider's own, which its next call frees. Without it
    each provider freed the gradient the provider before it left: in the interleaved order,
    maskkern's cached 32 MiB gradient was freed by a provider of the OS allocator for free, and
    maskkern paid the munmap of that provider's (5-6 ms of an 11 ms fwd+bwd at the softmax headline).
    """

    def __init__(self, leaves: list[Tensor]) -> None:
        self.leaves = leaves
        self.slots: dict[str, list[Tensor | None]] = {}
        self.current: str | None = None

    def switch(self, name: str) -> None:
        if self.current is not None:
            self.slots[self.current] = [t.grad for t in self.leaves]
        for t, g in zip(self.leaves, self.slots.pop(name, [None] * len(self.leaves)), strict=True):
            t.grad = g
        self.current = name

    def clear(self) -> None:
        self.slots.clear()
        self.current = None
        for t in self.leaves:
            t.grad = None


# Each sample starts after a read of this many bytes, a few times the last-level cache (CPU) or
# the L2 (GPU; 50-60 MB on an H100/H200): whatever the provider before left dirty in the caches is
# written back then, untimed, and every provider starts from the same clean, cold caches. Without
# it, a provider paid for the writeback of its predecessor's outputs: up to 1.6 ms on the first
# call of a softmax sample after eager's ~100 MB (maskkern's own streamed outputs leave no dirty
# lines behind). A read, not do_bench's zero_(): a write would leave the L2 full of dirty lines
# for the timed call to write back.
CPU_FLUSH_BYTES = 64 << 20
GPU_FLUSH_BYTES = 256 << 20


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    budget: Budget,
    switch: Callable[[str], None] = lambda name: None,
) -> dict[str, tuple[float, float, float]]:
    """p50/p20/p80 ms per call of each fn, measured in interleaved rounds (A B A B ...) so that
    drifts of clock, cache and neighbours hit every provider alike; switch(name) runs untimed
    before each provider's calls."""
    est: dict[str, float] = {}
    for name, fn in fns.items():
        switch(name)
        for _ in range(budget.warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        est[name] = max(time.perf_counter() - t0, 1e-7)
    on_gpu = device.type == "cuda"
    inner = {n: 1 if on_gpu else max(1, math.ceil(budget.min_sample_s / t)) for n, t in est.items()}
    round_s = sum(inner[n] * est[n] for n in fns)
    # A GPU sample is one call, often microseconds: take more of them, as do_bench does.
    lo, hi = (10, 5 * budget.max_reps) if on_gpu else (budget.min_reps, budget.max_reps)
    reps = int(min(hi, max(lo, budget.budget_s / round_s)))
    flush = torch.ones((GPU_FLUSH_BYTES if on_gpu else CPU_FLUSH_BYTES) // 4, device=device)
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            switch(name)
            flush.sum()
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn()
                samples[name].append((time.perf_counter() - t0) * 1e3 / inner[name])
    return {n: _quantiles(s) for n, s in samples.items()}


@contextlib.contextmanager
def _stderr_silenced():
    """Kineto logs two lines to fd 2 per profiler session; the progress bar shares that stream."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated above the live ones during one call of ``fn``: GPU,
    ``torch.cuda.max_memory_allocated``; CPU, the profiler's allocation events
    (``maskkern.testing.profiled_peak_bytes``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _stderr_silenced():
        return profiled_peak_bytes(fn)


def copy_bandwidth(device: torch.device, budget: Budget) -> float:
    """GB/s of ``dst.copy_(src)`` on buffers far larger than the caches (bytes read + written)."""
    n = (1 << 30 if device.type == "cuda" else 256 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    p50 = time_interleaved({"copy": lambda: dst.copy_(src)}, device, budget)["copy"][0]
    return 2 * src.nbytes / (p50 * 1e-3) / 1e9


def matmul_shape(device: torch.device) -> tuple[int, torch.dtype]:
    """(n, dtype) of the square ``torch.mm`` whose rate is the machine's dense matmul rate: 2048 in
    fp32 on CPU (the dtype of the CPU benchmarks), 8192 in bf16 on GPU (theirs); both large enough
    for the BLAS to reach its peak, small enough to take well under a second."""
    return (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)


def matmul_rate(device: torch.device, budget: Budget) -> float:
    """GFLOP/s (2 n^3 per call) of ``torch.mm`` on two (n, n) matrices of ``matmul_shape``, at the
    run's thread count: what a kernel's useful GFLOP/s is compared with."""
    n, dtype = matmul_shape(device)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    p50 = time_interleaved({"mm": lambda: torch.mm(a, b)}, device, budget)["mm"][0]
    return 2 * n**3 / (p50 * 1e-3) / 1e9
