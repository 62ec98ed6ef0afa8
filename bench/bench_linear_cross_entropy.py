"""linear_cross_entropy vs the eager expression ``F.cross_entropy(F.linear(hidden, weight), target)``
(which holds the (N, V) logits, their log-softmax and their gradient) vs torch.compile of it (and on
GPU Liger-Kernel's fused linear cross-entropy when importable): time and peak memory.

Sweep: the number of tokens N at H=1024, V=32000, 25% of the targets ignored; fp32 on CPU, bf16 on
GPU. The headline is N=8192 (CPU; the CPU targets are set there) and N=32768 (GPU). The time is
matmul-bound (3 N·H·V matmuls on every side); the memory is the point: maskkern holds one logits
chunk instead of the logits. Plus, at the headline N, a case with 50% ignored (spread across the
batch) timed against maskkern at 0% ignored in the same rounds: maskkern computes only the counted
rows, so ignoring pays. A CPU --quick run measures N=1024, H=256, V=8000, fwd+bwd, maskkern and eager
(a second a round instead of 15): its targets are indicative.

Bytes model (GB/s): hidden, weight and target read, the logits never materialised; fwd+bwd also
writes grad_hidden and grad_weight.

    python bench/bench_linear_cross_entropy.py [--quick]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from _harness import AT_ZERO, Case, CaseResult, Context, Target, at_zero, main, pays
from torch import Tensor

import maskkern as mk
from maskkern import reference
from maskkern.testing import LINEAR_CROSS_ENTROPY_TOL

KERNEL = "linear_cross_entropy"
H, V = 1024, 32000
HEADLINE_N = 8192
GPU_HEADLINE_N = 32768
QUICK_SHAPE = (1024, 256, 8000)  # (N, H, V) of a CPU --quick run


def _eager(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight), target)


def _maskkern(backend: str):
    def fn(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
        return mk.linear_cross_entropy(hidden, weight, target, backend=backend)

    return fn


def _liger(ctx: Context):
    if not ctx.on_gpu:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return lambda hidden, weight, target: liger_fused_linear_cross_entropy(hidden, weight, target)


def name(n: int, dtype: torch.dtype, h: int = H, v: int = V) -> str:
    return f"N={n} H={h} V={v} {str(dtype).removeprefix('torch.')}"


def pays_name(n: int, dtype: torch.dtype) -> str:
    return f"{name(n, dtype)} ignored=50%"


def _inputs(ctx: Context, n: int, h: int, v: int, dtype: torch.dtype, ignored: float):
    def inputs() -> dict:
        hidden = torch.randn(n, h, dtype=dtype, device=ctx.device)
        weight = (torch.randn(v, h, device=ctx.device) / h**0.5).to(dtype)
        target = torch.randint(0, v, (n,), device=ctx.device)
        target[torch.randperm(n, device=ctx.device)[: round(n * ignored)]] = -100
        return {"hidden": hidden, "weight": weight, "target": target}

    return inputs


def _bytes(n: int, h: int, v: int, dtype: torch.dtype) -> dict[str, int]:
    fwd = (n * h + v * h) * dtype.itemsize + 8 * n
    return {"fwd": fwd, "fwd+bwd": 2 * fwd}


def _reference(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return reference.linear_cross_entropy(hidden, weight, target)


def case(ctx: Context, shape: tuple[int, int, int], dtype: torch.dtype) -> Case:
    n, h, v = shape
    # The large buffers here are matmul outputs, not maskkern's: no maskkern-nocache column.
    if ctx.on_gpu or n <= 2048:
        providers = ctx.providers(_maskkern, _eager, nocache=False, liger=_liger(ctx))
    else:  # a CPU eager call takes seconds here: maskkern and eager only
        ours = {name: _maskkern(b) for name, b in ctx.maskkern_backends(nocache=False)}
        providers = ours | {"eager": _eager}
    # On CPU the fwd rows are left out where a call takes seconds, and in a quick run (the targets'
    # mode is fwd+bwd).
    fwd_too = ctx.on_gpu or (n <= 2048 and not ctx.quick)
    return Case(
        name=name(n, dtype, h, v),
        x_name="N",
        x=n,
        config=dict(N=n, H=h, V=v, dtype=str(dtype).removeprefix("torch."), ignored=0.25),
        inputs=_inputs(ctx, n, h, v, dtype, 0.25),
        providers=providers,
        reference=_reference,
        grad_inputs=("hidden", "weight"),
        modes=("fwd", "fwd+bwd") if fwd_too else ("fwd+bwd",),
        bytes=_bytes(n, h, v, dtype),
        plot=f"tokens {str(dtype).removeprefix('torch.')}",
        tol=LINEAR_CROSS_ENTROPY_TOL.get(dtype),
    )


def pays_case(ctx: Context, n: int, dtype: torch.dtype) -> Case:
    """50% of the targets ignored (a random half), with maskkern at 0% ignored (every target
    counted) as a baseline timed in the same rounds: the work shrinks with the ignored rows."""
    full = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    ours = _maskkern(ctx.maskkern_backends(nocache=False)[0][1])
    providers = {"maskkern": ours, "eager": _eager, AT_ZERO: at_zero(ctx, _maskkern, target=full)}
    return Case(
        name=pays_name(n, dtype),
        x_name="ignored",
        x=0.5,
        config=dict(N=n, H=H, V=V, dtype=str(dtype).removeprefix("torch."), ignored=0.5),
        inputs=_inputs(ctx, n, H, V, dtype, 0.5),
        providers=providers,
        reference=_reference,
        grad_inputs=("hidden", "weight"),
        modes=("fwd+bwd",),
        bytes=_bytes(n, H, V, dtype),
        plot=f"ignored {str(dtype).removeprefix('torch.')}",
        tol=LINEAR_CROSS_ENTROPY_TOL.get(dtype),
        baselines=(AT_ZERO,),
    )


def _dtypes(ctx: Context) -> list[torch.dtype]:
    return [torch.bfloat16] if ctx.on_gpu else [torch.float32]


def _shapes(ctx: Context) -> list[tuple[int, int, int]]:
    """(N, H, V) of the sweep's cases; the last is the one the memory and time targets read."""
    if ctx.quick:  # on GPU a second; on CPU the full shape at N=1024 takes 15 s a round
        return [(1024, H, V)] if ctx.on_gpu else [QUICK_SHAPE]
    # On CPU each call takes seconds (matmul-bound): the small case and the headline keep the full
    # suite well under 30 minutes.
    tokens = [4096, 8192, 16384, GPU_HEADLINE_N] if ctx.on_gpu else [1024, HEADLINE_N]
    return [(n, H, V) for n in tokens]


def cases(ctx: Context) -> list[Case]:
    out = [case(ctx, shape, dtype) for dtype in _dtypes(ctx) for shape in _shapes(ctx)]
    if not ctx.quick:  # the headline N: seconds per call on CPU
        out += [pays_case(ctx, HEADLINE_N, dtype) for dtype in _dtypes(ctx)]
    return out


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """Set at the headline N, read at the largest case run (indicative when that is another): peak
    memory <= 0.25 × eager's and time <= 1.2 × eager's (CPU), or no more memory than Liger and at
    least its speed (GPU); and, in a full run, ignoring pays: fwd+bwd at the headline N with 50%
    ignored <= 0.6 × maskkern's time at 0% ignored."""
    out = []
    for dtype in _dtypes(ctx):
        at = name(GPU_HEADLINE_N if ctx.on_gpu else HEADLINE_N, dtype)
        n, h, v = _shapes(ctx)[-1]
        measured_at = name(n, dtype, h, v)
        r = results.get(measured_at)
        ours = r and r.times.get(("maskkern", "fwd+bwd"))
        peer = "liger" if ctx.on_gpu else "eager"
        theirs = r and r.times.get((peer, "fwd+bwd"))
        mem = (
            ours and theirs and ours.peak_bytes and theirs.peak_bytes and ours.peak_bytes / theirs.peak_bytes
        )
        time = r and r.ratio("maskkern", "fwd+bwd", provider=peer)
        label = f"linear_cross_entropy fwd+bwd {measured_at}"
        where = {"set_at": at, "measured_at": measured_at}
        need_mem, need_time = (1.0, 1.0) if ctx.on_gpu else (0.25, 1.2)
        out.append(Target(f"{label}: peak memory / {peer}'s", mem or None, need_mem, "<=", "", **where))
        out.append(Target(f"{label}: time / {peer}'s", time, need_time, "<=", "", **where))
        if not ctx.quick:
            at = pays_name(HEADLINE_N, dtype)
            label = f"linear_cross_entropy ignoring pays {at}: fwd+bwd time at 50% / 0% ignored"
            out.append(Target(label, pays(results.get(at)), 0.6, "<=", "", set_at=at))
    return out


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
