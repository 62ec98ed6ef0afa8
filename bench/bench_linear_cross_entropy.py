"""linear_cross_entropy vs the eager expression ``F.cross_entropy(F.linear(hidden, weight), target)``
(which holds the (N, V) logits, their log-softmax and their gradient) vs torch.compile of it (and on
GPU Liger-Kernel's fused linear cross-entropy when importable): time and peak memory.

Sweep: the number of tokens N at H=1024, V=32000, 25% of the targets ignored; fp32 on CPU, bf16 on
GPU. The headline is N=8192. The time is matmul-bound (3 N·H·V matmuls on every side); the memory
is the point: maskkern holds one logits chunk instead of the logits. Plus, at the headline N, a case
with 50% ignored (spread across the batch) timed against maskkern at 0% ignored in the same rounds:
maskkern computes only the counted rows, so ignoring pays.

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


def pays_name(n: int, dtype: torch.dtype) -> str:
    return f"{name(n, dtype)} ignored=50%"


def _inputs(ctx: Context, n: int, dtype: torch.dtype, ignored: float):
    def inputs() -> dict:
        hidden = torch.randn(n, H, dtype=dtype, device=ctx.device)
        weight = (torch.randn(V, H, device=ctx.device) / H**0.5).to(dtype)
        target = torch.randint(0, V, (n,), device=ctx.device)
        target[torch.randperm(n, device=ctx.device)[: round(n * ignored)]] = -100
        return {"hidden": hidden, "weight": weight, "target": target}

    return inputs


def _bytes(n: int, dtype: torch.dtype) -> dict[str, int]:
    fwd = (n * H + V * H) * dtype.itemsize + 8 * n
    return {"fwd": fwd, "fwd+bwd": 2 * fwd}


def _reference(hidden: Tensor, weight: Tensor, target: Tensor) -> Tensor:
    return reference.linear_cross_entropy(hidden, weight, target)


def case(ctx: Context, n: int, dtype: torch.dtype) -> Case:
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
        inputs=_inputs(ctx, n, dtype, 0.25),
        providers=providers,
        reference=_reference,
        grad_inputs=("hidden", "weight"),
        modes=("fwd+bwd",) if n > 2048 and not ctx.on_gpu else ("fwd", "fwd+bwd"),
        bytes=_bytes(n, dtype),
        plot=f"tokens {str(dtype).removeprefix('torch.')}",
        # The matmul accumulates over H = 1024 in a different order on each side.
        tol=(1e-4, 1e-5) if dtype == torch.float32 else None,
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
        inputs=_inputs(ctx, n, dtype, 0.5),
        providers=providers,
        reference=_reference,
        grad_inputs=("hidden", "weight"),
        modes=("fwd+bwd",),
        bytes=_bytes(n, dtype),
        plot=f"ignored {str(dtype).removeprefix('torch.')}",
        tol=(1e-4, 1e-5) if dtype == torch.float32 else None,
        baselines=(AT_ZERO,),
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
    out = [case(ctx, n, dtype) for dtype in _dtypes(ctx) for n in _tokens(ctx)]
    if not ctx.quick:  # the headline N: seconds per call on CPU
        out += [pays_case(ctx, HEADLINE_N, dtype) for dtype in _dtypes(ctx)]
    return out


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """At the largest N run: peak memory <= 0.25 × eager's and time <= 1.2 × eager's (CPU), or no
    more memory than Liger and at least its speed (GPU); and ignoring pays: fwd+bwd at the headline
    N with 50% ignored <= 0.6 × maskkern's time at 0% ignored."""
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
        out.append(
            Target(
                f"linear_cross_entropy ignoring pays: fwd+bwd time at 50% / 0% ignored "
                f"{name(HEADLINE_N, dtype)}",
                pays(results.get(pays_name(HEADLINE_N, dtype))),
                0.6,
                "<=",
                "",
            )
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
