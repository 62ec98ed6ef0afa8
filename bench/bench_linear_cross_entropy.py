"""linear_cross_entropy vs the eager expression ``F.cross_entropy(F.linear(hidden, weight), target)``
(which holds the (N, V) logits, their log-softmax and their gradient) vs torch.compile of it (and on
GPU Liger-Kernel's fused linear cross-entropy when importable): time and peak memory.

Sweep: the number of tokens N at H=1024, V=32000, 25% of the targets ignored; fp32 on CPU, bf16 on
GPU. The headline is N=8192. The time is matmul-bound (3 N·H·V matmuls on every side); the memory
is the point: maskkern holds one logits chunk instead of the logits.

Bytes model (GB/s): hidden, weight and target read, the logits never materialised; fwd+bwd also
writes grad_hidden and grad_weight.

    python bench/bench_linear_cross_entropy.py [--quick]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from _harness import Case, CaseResult, Context, Target, main
from torch import Tensor

import maskkern as mk
from maskkern import reference

KERNEL = "linear_cross_entropy"
H, V = 1024, 32000
HEADLINE_N = 8192


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


def name(n: int, dtype: torch.dtype) -> str:
    return f"N={n} H={H} V={V} {str(dtype).removeprefix('torch.')}"


def case(ctx: Context, n: int, dtype: torch.dtype) -> Case:
    def inputs() -> dict:
        hidden = torch.randn(n, H, dtype=dtype, device=ctx.device)
        weight = (torch.randn(V, H, device=ctx.device) / H**0.5).to(dtype)
        target = torch.randint(0, V, (n,), device=ctx.device)
        target[torch.randperm(n, device=ctx.device)[: n // 4]] = -100
        return {"hidden": hidden, "weight": weight, "target": target}

    es = dtype.itemsize
    fwd = (n * H + V * H) * es + 8 * n
    # The large buffers here are matmul outputs, not maskkern's: no maskkern-nocache column.
    if ctx.on_gpu or n <= 2048:
        providers = ctx.providers(_maskkern, _eager, nocache=False, liger=_liger(ctx))
    else:  # a CPU eager call takes seconds here: maskkern and eager only
        ours = {name: _maskkern(b) for name, b in ctx.maskkern_backends(nocache=False)}
        providers = ours | {"eager": _eager}
    return Case(
        name=name(n, dtype),
        x_name="N",
        x=n,
        config=dict(N=n, H=H, V=V, dtype=str(dtype).removeprefix("torch."), ignored=0.25),
        inputs=inputs,
        providers=providers,
        reference=lambda hidden, weight, target: reference.linear_cross_entropy(hidden, weight, target),
        grad_inputs=("hidden", "weight"),
        modes=("fwd+bwd",) if n > 2048 and not ctx.on_gpu else ("fwd", "fwd+bwd"),
        bytes={"fwd": fwd, "fwd+bwd": 2 * fwd},
        plot=f"tokens {str(dtype).removeprefix('torch.')}",
        # The matmul accumulates over H = 1024 in a different order on each side.
        tol=(1e-4, 1e-5) if dtype == torch.float32 else None,
    )


def _dtypes(ctx: Context) -> list[torch.dtype]:
    return [torch.bfloat16] if ctx.on_gpu else [torch.float32]


def _tokens(ctx: Context) -> list[int]:
    if ctx.quick:
        return [1024]
    # On CPU each call takes seconds (matmul-bound): the small case and the headline keep the full
    # suite well under 30 minutes.
    return [4096, 8192, 16384, 32768] if ctx.on_gpu else [1024, HEADLINE_N]


def cases(ctx: Context) -> list[Case]:
    return [case(ctx, n, dtype) for dtype in _dtypes(ctx) for n in _tokens(ctx)]


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """At the largest N run: peak memory <= 0.25 × eager's and time <= 1.2 × eager's (CPU), or no
    more memory than Liger and at least its speed (GPU)."""
    out = []
    n = _tokens(ctx)[-1]
    for dtype in _dtypes(ctx):
        r = results.get(name(n, dtype))
        ours = r and r.times.get(("maskkern", "fwd+bwd"))
        peer = "liger" if ctx.on_gpu else "eager"
        theirs = r and r.times.get((peer, "fwd+bwd"))
        mem = (
            ours and theirs and ours.peak_bytes and theirs.peak_bytes and ours.peak_bytes / theirs.peak_bytes
        )
        time = r and r.ratio("maskkern", "fwd+bwd", provider=peer)
        label = f"linear_cross_entropy fwd+bwd {name(n, dtype)}"
        out.append(
            Target(f"{label}: peak memory / {peer}'s", mem or None, 1.0 if ctx.on_gpu else 0.25, "<=", "")
        )
        out.append(Target(f"{label}: time / {peer}'s", time, 1.0 if ctx.on_gpu else 1.2, "<=", ""))
    return out


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
