"""masked_softmax vs eager ``torch.softmax((x * scale).masked_fill(~keep, -inf), -1)`` vs torch.compile
of that expression (and on GPU Apex's fused ScaledMaskedSoftmax and Liger's softmax when importable).

The eager ``keep`` is materialised from lengths / causal the way users write it: ``arange(L) <
lengths[:, None]`` viewed as (B, 1, 1, L), ANDed with ``ones(L, L).tril()`` for causal. maskkern gets
the lengths (or the bool mask) and ``causal=`` and never materialises the mask.

Sweeps: sequence length (lengths uniform in [L/4, L], causal; about the same number of elements at
each L), key padding fraction 0/25/50/75% (lengths = L * (1 - p), no causal; each padded case also
times maskkern at 0% padding in its rounds, the baseline of "padding pays"), and the kinds of
masking at the headline shape (4, 8, 512, 512). fp32 on CPU; fp16 and bf16 on GPU.

Bytes model (GB/s): fwd reads the kept scores and writes the whole output; fwd+bwd also reads dY and
Y at the kept positions and writes the whole dX. Masked tails need not be read: a kernel that skips
them does less work the more padding there is, and its GB/s is not inflated. Lengths and a bool mask
count at their real storage ((B,) int64, (B, 1, 1, L) bool).

    python bench/bench_masked_softmax.py [--quick]
"""

from __future__ import annotations

import sys

import torch
from _harness import AT_ZERO, Case, CaseResult, Context, Target, at_zero, main, pays
from torch import Tensor

import maskkern as mk
from maskkern import reference

KERNEL = "masked_softmax"
SCALE = 0.125  # 1 / sqrt(head_dim = 64)
HEADLINE = (4, 8, 512, 512)


def keep_mask(lengths: Tensor | None, causal: bool, L: int, device: torch.device) -> Tensor | None:
    """The eager user's (B, 1, 1|L, L) keep-mask: key padding from lengths AND tril for causal."""
    keep = None
    if lengths is not None:
        keep = (torch.arange(L, device=device) < lengths[:, None])[:, None, None, :]
    if causal:
        tril = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        keep = tril if keep is None else keep & tril
    return keep


def _keep(scores: Tensor, lengths: Tensor | None, mask: Tensor | None, causal: bool) -> Tensor | None:
    """keep_mask() ANDed with a given bool mask: what every eager-style provider builds per call."""
    keep = keep_mask(lengths, causal, scores.shape[-1], scores.device)
    return mask if keep is None else keep if mask is None else keep & mask


def _masked_scores(scores: Tensor, keep: Tensor | None) -> Tensor:
    x = scores * SCALE
    return x if keep is None else x.masked_fill(~keep, float("-inf"))


def _eager(causal: bool):
    def eager(scores: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return torch.softmax(_masked_scores(scores, _keep(scores, lengths, mask, causal)), -1)

    return eager


def _maskkern(causal: bool, check_lengths: bool):
    def for_backend(backend: str):
        def fn(scores: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
            return mk.masked_softmax(
                scores,
                mask,
                lengths=lengths,
                causal=causal,
                scale=SCALE,
                check_lengths=check_lengths,
                backend=backend,
            )

        return fn

    return for_backend


def _reference(causal: bool):
    def ref(scores: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return reference.masked_softmax(scores, mask, lengths=lengths, causal=causal, scale=SCALE)

    return ref


def _peers(ctx: Context, causal: bool, dtype: torch.dtype, L: int) -> dict:
    """On GPU, when importable: Apex's fused ScaledMaskedSoftmax (within its limits: fp16/bf16,
    16 < L <= 4096, L % 8 == 0; it wants a dense [B, 1, L, L] mask, True = masked) and Liger's
    softmax after the eager masked_fill."""
    peers: dict = {}
    if not ctx.on_gpu:
        return peers
    try:
        from apex.transformer.functional.fused_softmax import ScaledMaskedSoftmax

        if dtype != torch.float32 and 16 < L <= 4096 and L % 8 == 0:

            def apex(scores: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
                keep = _keep(scores, lengths, mask, causal)
                keep = torch.ones((), dtype=torch.bool, device=scores.device) if keep is None else keep
                dense = ~keep.expand(scores.shape[0], 1, L, L).contiguous()
                return ScaledMaskedSoftmax.apply(scores, dense, SCALE)

            peers["apex"] = apex
    except Exception:  # not installed, or broken against this torch: the table goes on without it
        pass
    try:
        from liger_kernel.transformers.functional import liger_softmax

        def liger(scores: Tensor, lengths: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
            return liger_softmax(_masked_scores(scores, _keep(scores, lengths, mask, causal)))

        peers["liger"] = liger
    except Exception:  # not installed, or broken against this torch: the table goes on without it
        pass
    return peers


def kept_pairs(key_lengths: list[int], query_lengths: list[int], causal: bool) -> int:
    """The (query, key) positions the masks keep in one head, summed over the batch: query i < q of
    a sequence sees the keys j < k (and j <= i when causal, top-left)."""
    total = 0
    for k, q in zip(key_lengths, query_lengths, strict=True):
        m = min(q, k)
        total += m * (m + 1) // 2 + (q - m) * k if causal else q * k
    return total


def name(shape: tuple[int, ...], dtype: torch.dtype, label: str) -> str:
    """A case's name (the table's row label, and how targets() finds it)."""
    return f"{shape} {str(dtype).removeprefix('torch.')} {label}"


def case(
    ctx: Context,
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
    label: str,
    sweep: tuple[str, str, object],
    *,
    lengths: str | float | None,
    causal: bool,
    bool_mask: bool = False,
) -> Case:
    """sweep = (plot, x_name, x). lengths: "uniform" (in [L/4, L]), a padding fraction p (lengths =
    L * (1 - p)) or None; bool_mask: the key padding as a (B, 1, 1, L) bool mask instead of lengths."""
    B, H, Lq, L = shape
    gen = torch.Generator().manual_seed(0)
    if lengths == "uniform":
        lens = torch.randint(L // 4, L + 1, (B,), generator=gen).tolist()
    elif lengths is None:
        lens = [L] * B
    else:
        lens = [round(L * (1 - lengths))] * B

    def inputs() -> dict:
        scores = torch.randn(shape, dtype=dtype, device=ctx.device)
        if lengths is None:
            return {"scores": scores}
        lens_t = torch.tensor(lens, device=ctx.device)
        if bool_mask:
            return {"scores": scores, "mask": keep_mask(lens_t, False, L, ctx.device)}
        return {"scores": scores, "lengths": lens_t}

    es, n = dtype.itemsize, B * H * Lq * L
    k = H * kept_pairs(lens, [Lq] * B, causal)
    side = 0 if lengths is None else B * L if bool_mask else 8 * B
    fwd = k * es + n * es + side
    plot, x_name, x = sweep
    maskkern_fn = _maskkern(causal, check_lengths=ctx.checks_values)
    providers = ctx.providers(maskkern_fn, _eager(causal), **_peers(ctx, causal, dtype, L))
    padded = isinstance(lengths, float) and lengths > 0
    if padded:
        full = torch.full((B,), L, device=ctx.device)
        providers[AT_ZERO] = at_zero(ctx, maskkern_fn, lengths=full)
    return Case(
        name=name(shape, dtype, label),
        x_name=x_name,
        x=x,
        config=dict(
            shape=list(shape),
            dtype=str(dtype).removeprefix("torch."),
            lengths=lengths,
            causal=causal,
            mask="bool (B,1,1,L)" if bool_mask else "lengths" if lengths is not None else "none",
            scale=SCALE,
        ),
        inputs=inputs,
        providers=providers,
        reference=_reference(causal),
        grad_inputs=("scores",),
        bytes={"fwd": fwd, "fwd+bwd": fwd + 2 * k * es + n * es + side},
        plot=plot,
        baselines=(AT_ZERO,) if padded else (),
    )


def _dtypes(ctx: Context) -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16] if ctx.on_gpu else [torch.float32]


GPU_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]  # the span the GPU targets are set over


def _seq_lengths(ctx: Context) -> list[int]:
    if ctx.quick:  # on GPU the two ends of the span the targets cover
        return [512, 16384] if ctx.on_gpu else [512]
    return GPU_LENGTHS if ctx.on_gpu else [128, 256, 512, 1024, 2048]


def _seq_shape(ctx: Context, L: int) -> tuple[int, int, int, int]:
    """About the same number of elements at every L (2^23 on CPU, 2^28 on GPU): B up to 4, then H.
    On CPU, L = 512 gives the headline shape (4, 8, 512, 512)."""
    elems = 1 << (28 if ctx.on_gpu else 23)
    B = min(4, max(1, elems // (L * L)))
    return (B, max(1, elems // (B * L * L)), L, L)


def _pad_shape(ctx: Context) -> tuple[int, int, int, int]:
    return (4, 16, 2048, 2048) if ctx.on_gpu else HEADLINE


SEQ_LABEL = "lengths~U[L/4,L] causal"
VARIANTS = {  # the kinds of masking at the headline shape
    "no mask": dict(lengths=None, causal=False),
    "lengths": dict(lengths="uniform", causal=False),
    "bool mask": dict(lengths="uniform", causal=False, bool_mask=True),
    "causal": dict(lengths=None, causal=True),
    "bool mask+causal": dict(lengths="uniform", causal=True, bool_mask=True),
}


def cases(ctx: Context) -> list[Case]:
    """Quick: the headline case and padding 50% (its baseline at 0% is timed inside it). Full: the
    sweeps in the module docstring."""
    out = []
    for dtype in _dtypes(ctx):
        d = str(dtype).removeprefix("torch.")
        for L in _seq_lengths(ctx):
            sweep = (f"seqlen {d}", "L", L)
            out.append(case(ctx, _seq_shape(ctx, L), dtype, SEQ_LABEL, sweep, lengths="uniform", causal=True))
        for p in [0.5] if ctx.quick else [0.0, 0.25, 0.5, 0.75]:
            sweep = (f"padding {d}", "padding", p)
            out.append(case(ctx, _pad_shape(ctx), dtype, f"pad={p:.0%}", sweep, lengths=p, causal=False))
        if not ctx.quick:
            for label, kw in VARIANTS.items():
                out.append(case(ctx, HEADLINE, dtype, label, (f"masking {d}", "masking", label), **kw))
    return out


def _min_of_all(values: list[float | None]) -> float | None:
    """The least of ``values``; None (not measured) if any is missing: a sweep point that failed
    must not drop out of the target."""
    return None if not values or any(v is None for v in values) else min(values)


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """CPU: the headline ratios (× compile where the compile peer runs: not in a quick run); GPU: % of
    the copy bandwidth and × compile over the L sweep (set over the full sweep, indicative over a
    quick run's two ends); both: padding pays (fwd+bwd time at 50% padding / at 0%)."""
    out = []
    for dtype in _dtypes(ctx):
        d = str(dtype).removeprefix("torch.")
        if ctx.on_gpu:
            seq = [results.get(name(_seq_shape(ctx, L), dtype, SEQ_LABEL)) for L in _seq_lengths(ctx)]
            fwd = [r and r.times.get(("maskkern", "fwd")) for r in seq]
            pct = [m and m.gbps and 100 * m.gbps / ctx.copy_gbps for m in fwd]
            x_compile = [r and r.ratio("compile", "fwd+bwd") for r in seq]
            at = {"set_at": _sweep(d, GPU_LENGTHS), "measured_at": _sweep(d, _seq_lengths(ctx))}
            span = f"{d}, L {GPU_LENGTHS[0]}..{GPU_LENGTHS[-1]}"
            out += [
                Target(f"masked_softmax fwd {span}: min % of copy", _min_of_all(pct), 85, unit="%", **at),
                Target(f"masked_softmax fwd+bwd {span}: min × compile", _min_of_all(x_compile), 1.5, **at),
            ]
        else:
            at = name(HEADLINE, dtype, SEQ_LABEL)
            head = results.get(at)
            label = f"masked_softmax fwd+bwd {at}"
            out.append(Target(f"{label}: × eager", head and head.ratio("eager", "fwd+bwd"), 20, set_at=at))
            if ctx.compiles:
                out.append(
                    Target(f"{label}: × compile", head and head.ratio("compile", "fwd+bwd"), 2, set_at=at)
                )
        at = name(_pad_shape(ctx), dtype, "pad=50%")
        label = f"masked_softmax padding pays {at}: fwd+bwd time at 50% / 0% padding (bandwidth floor 0.7)"
        out.append(Target(label, pays(results.get(at)), 0.75, "<=", "", set_at=at))
    return out


def _sweep(d: str, lengths: list[int]) -> str:
    """The L sweep a GPU target reads: its cases' names, in short."""
    return f"{SEQ_LABEL} {d}, L in {lengths}, about 2^28 elements each"


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
