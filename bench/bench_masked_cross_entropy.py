"""masked_cross_entropy vs eager ``F.cross_entropy(logits, target)`` (ignored rows marked with
ignore_index = -100) vs torch.compile of that expression (and on GPU Liger-Kernel's cross-entropy when
importable; it writes its gradient into the logits, so it is checked before it is timed).

Sweeps: vocabulary size (25% of the targets ignored; about the same number of logits at each V) and
the ignored fraction 0/25/50/75% at the headline shape N=4096, V=32000. fp32 on CPU; bf16 on GPU.
Quick: the headline shape at 25% and 50% ignored (the 50% case times maskkern at 0% in its rounds),
fwd+bwd only on CPU (the targets' mode).

Bytes model (GB/s): fwd reads the logits of the counted rows (ignored rows need not be read);
fwd+bwd also writes the whole logits gradient. Targets are int64, 8 bytes a row.

    python bench/bench_masked_cross_entropy.py [--quick]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from _harness import AT_ZERO, Case, CaseResult, Context, Target, at_zero, main, pays
from torch import Tensor

import maskkern as mk
from maskkern import reference

KERNEL = "masked_cross_entropy"
HEADLINE = (4096, 32000)


def _eager(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target)


def _maskkern(backend: str):
    def fn(logits: Tensor, target: Tensor) -> Tensor:
        return mk.masked_cross_entropy(logits, target, backend=backend)

    return fn


def _liger(ctx: Context):
    if not ctx.on_gpu:
        return None
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception:  # not installed, or broken against this torch: the table goes on without it
        return None
    # Liger writes its gradient over the logits, in place. It is the last provider, so every
    # other provider's check (all made before any timing) sees the real logits; the timed calls
    # after its first one run on gradient values, which a memory-bound kernel does not notice.
    return lambda logits, target: liger_cross_entropy(logits, target)


def name(shape: tuple[int, int], dtype: torch.dtype, ignored: float) -> str:
    return f"N={shape[0]} V={shape[1]} {str(dtype).removeprefix('torch.')} ignored={ignored:.0%}"


def case(ctx: Context, shape: tuple[int, int], dtype: torch.dtype, ignored: float, sweep) -> Case:
    n, v = shape
    counted = n - round(n * ignored)

    def inputs() -> dict:
        logits = torch.randn(shape, dtype=dtype, device=ctx.device)
        target = torch.randint(0, v, (n,), device=ctx.device)
        target[torch.randperm(n, device=ctx.device)[counted:]] = -100
        return {"logits": logits, "target": target}

    es = dtype.itemsize
    fwd = counted * v * es + 8 * n
    plot, x_name, x = sweep
    providers = ctx.providers(_maskkern, _eager, liger=_liger(ctx))
    # A CPU quick run measures the targets' mode only: eager's fwd+bwd alone takes 0.65 s a call.
    modes = ("fwd+bwd",) if ctx.quick and not ctx.on_gpu else ("fwd", "fwd+bwd")
    paying = x_name == "ignored" and ignored > 0  # the ignored sweep: how much ignoring pays
    if paying:
        full = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1)).to(ctx.device)
        providers[AT_ZERO] = at_zero(ctx, _maskkern, target=full)
    return Case(
        name=name(shape, dtype, ignored),
        x_name=x_name,
        x=x,
        config=dict(shape=list(shape), dtype=str(dtype).removeprefix("torch."), ignored=ignored),
        inputs=inputs,
        providers=providers,
        reference=lambda logits, target: reference.masked_cross_entropy(logits, target),
        grad_inputs=("logits",),
        modes=modes,
        bytes={"fwd": fwd, "fwd+bwd": fwd + n * v * es},
        plot=plot,
        baselines=(AT_ZERO,) if paying else (),
    )


def _dtypes(ctx: Context) -> list[torch.dtype]:
    return [torch.bfloat16] if ctx.on_gpu else [torch.float32]


def _vocabs(ctx: Context) -> list[int]:
    if ctx.quick:
        return []
    return [4096, 32000, 50257, 128256] if ctx.on_gpu else [1024, 8192, 32000, 128256]


def _vocab_shape(ctx: Context, v: int) -> tuple[int, int]:
    """About 2^28 logits on GPU, 2^25 on CPU (a quarter of the headline's, to keep the sweep short)."""
    return (max(1, (1 << (28 if ctx.on_gpu else 25)) // v), v)


def _head_shape(ctx: Context) -> tuple[int, int]:
    return (16384, 128256) if ctx.on_gpu else HEADLINE


def cases(ctx: Context) -> list[Case]:
    """Quick: the headline shape with 25/50% ignored. Full: also 0% and 75%, and the vocabulary sweep."""
    out = []
    for dtype in _dtypes(ctx):
        d = str(dtype).removeprefix("torch.")
        for p in [0.25, 0.5] if ctx.quick else [0.0, 0.25, 0.5, 0.75]:
            out.append(case(ctx, _head_shape(ctx), dtype, p, (f"ignored {d}", "ignored", p)))
        for v in _vocabs(ctx):
            out.append(case(ctx, _vocab_shape(ctx, v), dtype, 0.25, (f"vocab {d}", "V", v)))
    return out


def _peak_buffers(result: CaseResult | None, provider: str, logits_bytes: int) -> float | None:
    """``provider``'s fwd+bwd peak memory above the inputs, in logits-sized buffers."""
    m = result and result.times.get((provider, "fwd+bwd"))
    return None if not m or m.peak_bytes is None else m.peak_bytes / logits_bytes


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """fwd+bwd at the headline shape with 25% ignored: × eager and × compile (CPU; × compile not in a
    quick run, which has no compile peer) or × Liger (GPU),
    peak memory above the inputs in logits-sized buffers; and ignoring pays (50% vs 0% ignored)."""
    out = []
    for dtype in _dtypes(ctx):
        shape = _head_shape(ctx)
        at = name(shape, dtype, 0.25)
        head = results.get(at)
        label = f"masked_cross_entropy fwd+bwd {at}"
        logits_bytes = shape[0] * shape[1] * dtype.itemsize
        peak = _peak_buffers(head, "maskkern", logits_bytes)
        if ctx.on_gpu:
            out.append(Target(f"{label}: × Liger", head and head.ratio("liger", "fwd+bwd"), 1.0, set_at=at))
            # Liger writes its gradient over the logits (DESIGN.md: silent corruption), so its peak
            # is ~0 buffers; a caller who keeps the logits intact clones them first: + 1 buffer.
            liger = _peak_buffers(head, "liger", logits_bytes)
            over = None if peak is None or liger is None else peak - (liger + 1)
            label_mem = f"{label}: peak memory - (Liger's + the 1 logits copy it needs) (logits buffers)"
            out.append(Target(label_mem, over, 0.01, "<=", "", set_at=at))  # (N,)-sized vectors: 1% slack
        else:
            out.append(Target(f"{label}: × eager", head and head.ratio("eager", "fwd+bwd"), 3, set_at=at))
            if ctx.compiles:
                out.append(
                    Target(f"{label}: × compile", head and head.ratio("compile", "fwd+bwd"), 2, set_at=at)
                )
        # One logits-sized buffer, plus (N,)-sized vectors (targets, per-row losses): 1% of slack.
        label_mem = f"{label}: peak memory above inputs (logits buffers)"
        out.append(Target(label_mem, peak, 1.01, "<=", "", set_at=at))
        at = name(shape, dtype, 0.5)
        label = f"masked_cross_entropy ignoring pays {at}: fwd+bwd time at 50% / 0% ignored"
        out.append(Target(label, pays(results.get(at)), 0.65, "<=", "", set_at=at))
    return out


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
