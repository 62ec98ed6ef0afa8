"""pad_embedding vs eager ``F.embedding(ids, weight, padding_idx)`` vs torch.compile of it.

Inputs: ids (16, 1024) int64 on CPU, (64, 2048) on GPU (16K tokens would time the Python call,
not the kernels), right-padded (every sequence has L * (1 - p) real tokens, uniform in
[1, V), then pad id 0), weight (V, D) with a gradient. Modes: ``fwd`` and ``fwd+bwd`` (backward of a
fixed random output gradient into a dense grad_weight).

Sweeps: padding fraction 0/25/50/75% at V = 32000, D = 1024 (the headline); vocabulary size and
embedding dim at 50% padding; and the semantics at the headline shape — default (= F.embedding: pad
positions output the pad row), ``zero_pad`` (eager: ``F.embedding(...) * (ids != pad)[..., None]``)
and ``zero_pad`` with the Transformer scale √D (eager: ``... * D ** 0.5 * mask``). fp32 on CPU; fp16
and bf16 on GPU.

Bytes model (GB/s): fwd reads the ids, the weight rows of the real tokens and the pad row once, and
writes the output; fwd+bwd also reads the output gradient at the real tokens (a pad token has no
weight gradient) and writes the whole dense grad_weight.

    python bench/bench_pad_embedding.py [--quick]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from _harness import AT_ZERO, Case, CaseResult, Context, Target, at_zero, main, pays
from torch import Tensor

import maskkern as mk
from maskkern import reference

KERNEL = "pad_embedding"
PAD = 0
HEADLINE = (32000, 1024)  # (V, D)
HEADLINE_PAD = 0.5

SEMANTICS = {  # label -> pad_embedding keyword arguments (besides padding_idx)
    "default": {},
    "zero_pad": {"zero_pad": True},
    "zero_pad+scale": {"zero_pad": True, "scale": "sqrt"},
}


def _kwargs(semantics: str, D: int) -> dict:
    kw = dict(SEMANTICS[semantics])
    if kw.get("scale") == "sqrt":
        kw["scale"] = D**0.5
    return kw


def _eager(kw: dict):
    """The expression users write: F.embedding, times the scale, times the pad mask."""

    def eager(ids: Tensor, weight: Tensor) -> Tensor:
        out = F.embedding(ids, weight, PAD)
        if kw.get("scale") is not None:
            out = out * kw["scale"]
        if kw.get("zero_pad"):
            out = out * (ids != PAD)[..., None]
        return out

    return eager


def _maskkern(kw: dict, check_ids: bool):
    def for_backend(backend: str):
        def fn(ids: Tensor, weight: Tensor) -> Tensor:
            return mk.pad_embedding(ids, weight, PAD, **kw, check_ids=check_ids, backend=backend)

        return fn

    return for_backend


def _reference(kw: dict):
    def ref(ids: Tensor, weight: Tensor) -> Tensor:
        return reference.pad_embedding(ids, weight, PAD, **kw)

    return ref


def name(V: int, D: int, dtype: torch.dtype, pad: float, semantics: str = "default") -> str:
    """A case's name (the table's row label, and how targets() finds it)."""
    return f"V={V} D={D} {str(dtype).removeprefix('torch.')} pad={pad:.0%} {semantics}"


def case(
    ctx: Context,
    V: int,
    D: int,
    dtype: torch.dtype,
    pad: float,
    sweep: tuple[str, str, object],
    semantics: str,
) -> Case:
    """sweep = (plot, x_name, x)."""
    B, L = ids_shape(ctx)
    real = round(L * (1 - pad))
    kw = _kwargs(semantics, D)
    maskkern_fn = _maskkern(kw, check_ids=ctx.checks_values)

    def inputs() -> dict:
        ids = torch.full((B, L), PAD, dtype=torch.int64)
        ids[:, :real] = torch.randint(1, V, (B, real))
        weight = torch.randn(V, D, dtype=dtype)
        return {"ids": ids.to(ctx.device), "weight": weight.to(ctx.device)}

    es, n, n_real = dtype.itemsize, B * L, B * real
    fwd = 8 * n + (n_real + 1) * D * es + n * D * es
    plot, x_name, x = sweep
    providers = ctx.providers(maskkern_fn, _eager(kw))
    paying = x_name == "padding" and pad > 0  # the padding sweep: how much padding pays
    if paying:
        no_pad = torch.randint(1, V, (B, L), generator=torch.Generator().manual_seed(1)).to(ctx.device)
        providers[AT_ZERO] = at_zero(ctx, maskkern_fn, ids=no_pad)
    return Case(
        name=name(V, D, dtype, pad, semantics),
        x_name=x_name,
        x=x,
        config=dict(
            ids=[B, L],
            V=V,
            D=D,
            dtype=str(dtype).removeprefix("torch."),
            pad_fraction=pad,
            padding="right",
            semantics=semantics,
            scale=kw.get("scale"),
        ),
        inputs=inputs,
        providers=providers,
        reference=_reference(kw),
        grad_inputs=("weight",),
        bytes={"fwd": fwd, "fwd+bwd": fwd + n_real * D * es + V * D * es},
        plot=plot,
        baselines=(AT_ZERO,) if paying else (),
    )


def ids_shape(ctx: Context) -> tuple[int, int]:
    """(B, L) of the ids."""
    return (64, 2048) if ctx.on_gpu else (16, 1024)


def _dtypes(ctx: Context) -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16] if ctx.on_gpu else [torch.float32]


def _vocab_sizes(ctx: Context) -> list[int]:
    return [1024, 8192, 32000, 65536] + ([128256] if ctx.on_gpu else [])


def _dims(ctx: Context) -> list[int]:
    return [256, 512, 1024, 2048] + ([4096] if ctx.on_gpu else [])


def cases(ctx: Context) -> list[Case]:
    """Quick: the headline at 50% padding (its baseline at 0% is timed inside it). Full: the sweeps in
    the module docstring."""
    V, D = HEADLINE
    out = []
    for dtype in _dtypes(ctx):
        d = str(dtype).removeprefix("torch.")
        for p in [0.5] if ctx.quick else [0.0, 0.25, 0.5, 0.75]:
            out.append(case(ctx, V, D, dtype, p, (f"padding {d}", "padding", p), "default"))
        if ctx.quick:
            continue
        for v in _vocab_sizes(ctx):
            if v != V:
                out.append(case(ctx, v, D, dtype, HEADLINE_PAD, (f"vocab {d}", "V", v), "default"))
        for dim in _dims(ctx):
            if dim != D:
                out.append(case(ctx, V, dim, dtype, HEADLINE_PAD, (f"dim {d}", "D", dim), "default"))
        for semantics in SEMANTICS:
            if semantics != "default":
                sweep = (f"semantics {d}", "semantics", semantics)
                out.append(case(ctx, V, D, dtype, HEADLINE_PAD, sweep, semantics))
    return out


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """fwd+bwd at the headline (50% padding): × eager and × compile (not in a CPU quick run, which has
    no compile peer); padding pays (fwd+bwd time at
    50% padding / at 0%; ~0.75 is the floor: the output and the grad_weight fill do not shrink)."""
    V, D = HEADLINE
    B, L = ids_shape(ctx)
    out = []
    for dtype in _dtypes(ctx):
        d = str(dtype).removeprefix("torch.")
        at = name(V, D, dtype, HEADLINE_PAD)
        head = results.get(at)
        label = f"pad_embedding fwd+bwd {at}, ids {B}×{L}"
        need = 2.0
        out.append(Target(f"{label}: × eager", head and head.ratio("eager", "fwd+bwd"), need, set_at=at))
        if ctx.compiles:
            out.append(
                Target(f"{label}: × compile", head and head.ratio("compile", "fwd+bwd"), need, set_at=at)
            )
        at = name(V, D, dtype, 0.5)
        label = f"pad_embedding padding pays {d}, ids {B}×{L}: fwd+bwd time at 50% / 0% padding (floor ~0.75)"
        out.append(Target(label, pays(results.get(at)), 0.85, "<=", "", set_at=at))
    return out


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
