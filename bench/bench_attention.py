"""attention vs eager ``F.softmax((q @ k.mT * scale).masked_fill(~keep, -inf), -1) @ v`` vs
torch.compile of that expression vs ``F.scaled_dot_product_attention(q, k, v, attn_mask=keep)``.

keep = key padding from lengths (uniform in [L/4, L]) AND causal, materialised the way users write
it (bench_masked_softmax.keep_mask: (B, 1, 1, L) lengths mask & (L, L) tril) for eager and SDPA;
maskkern gets ``lengths=`` and ``causal=True``. Every query sees key 0, so no row is empty and
SDPA's output is defined everywhere.

Sweep: sequence length, with about the same number of scores (B, H, L, L) at each L; head dim 64.
fp32 on CPU; fp16 and bf16 on GPU. mk.attention is two torch matmuls around masked_softmax: like
eager it holds the (L, L) probabilities; SDPA's fused kernels (flash attention on CPU and GPU) do
not. So the table shows what the fused masked softmax buys inside the unfused expression, and how
far that stays from a fused attention. No bytes model: the matmuls make it compute-bound.

    python bench/bench_attention.py [--quick]
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from _harness import Case, Context, main
from bench_masked_softmax import keep_mask
from torch import Tensor

import maskkern as mk
from maskkern import reference

KERNEL = "attention"
HEAD_DIM = 64
SCALE = 1 / math.sqrt(HEAD_DIM)  # SDPA's default, and mk.attention's

# (rtol, atol) of the output and the q/k/v gradients against the float64 reference, looser than
# the softmax's: the matmuls accumulate L products per value and round the scores to the inputs'
# dtype before the softmax. fp32: maskkern, eager and SDPA all measured 1-3e-6 max abs error at
# the CPU headline (values up to 5). fp16/bf16 (not yet run on a GPU): every score carries its
# 2^-11 / 2^-8 relative rounding, so the bounds are a few of those over O(1) values.
TOL = {torch.float32: (1e-4, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}


def _eager(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    keep = keep_mask(lengths, True, k.shape[-2], q.device)
    return F.softmax((q @ k.mT * SCALE).masked_fill(~keep, float("-inf")), -1) @ v


def _sdpa(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask(lengths, True, k.shape[-2], q.device))


def _maskkern(check_lengths: bool):
    def for_backend(backend: str):
        def fn(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
            kw = dict(lengths=lengths, causal=True, check_lengths=check_lengths, backend=backend)
            return mk.attention(q, k, v, **kw)

        return fn

    return for_backend


def _reference(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """q·kᵀ -> reference.masked_softmax -> ·v in float64, returned in the inputs' dtype."""
    q64, k64, v64 = (x.double() for x in (q, k, v))
    probs = reference.masked_softmax(q64 @ k64.mT, lengths=lengths, causal=True, scale=SCALE)
    return (probs @ v64).to(q.dtype)


def name(shape: tuple[int, int, int, int], dtype: torch.dtype) -> str:
    """A case's name (the table's row label)."""
    return f"q {shape} {str(dtype).removeprefix('torch.')} lengths~U[L/4,L] causal"


def case(ctx: Context, shape: tuple[int, int, int, int], dtype: torch.dtype) -> Case:
    """shape = q's (B, H, L, HEAD_DIM); k and v have the same."""
    B, L = shape[0], shape[2]
    lens = torch.randint(L // 4, L + 1, (B,), generator=torch.Generator().manual_seed(0))

    def inputs() -> dict:
        q, k, v = (torch.randn(shape, dtype=dtype, device=ctx.device) for _ in range(3))
        return {"q": q, "k": k, "v": v, "lengths": lens.to(ctx.device)}

    providers = ctx.providers(_maskkern(check_lengths=ctx.checks_values), _eager, sdpa=_sdpa)
    d = str(dtype).removeprefix("torch.")
    return Case(
        name=name(shape, dtype),
        x_name="L",
        x=L,
        config=dict(q=list(shape), dtype=d, lengths="uniform [L/4, L]", causal=True, scale=SCALE),
        inputs=inputs,
        providers=providers,
        reference=_reference,
        grad_inputs=("q", "k", "v"),
        plot=f"seqlen {d}",
        tol=TOL[dtype],
    )


def _seq_lengths(ctx: Context) -> list[int]:
    if ctx.on_gpu:
        return [1024, 4096] if ctx.quick else [512, 1024, 2048, 4096, 8192]
    return [512] if ctx.quick else [256, 512, 1024]


def _shape(ctx: Context, L: int) -> tuple[int, int, int, int]:
    """About 2^23 scores on CPU (L = 512: the masked_softmax headline (4, 8, 512, 512)), 2^27 on
    GPU: B up to 4, then H."""
    scores = 1 << (27 if ctx.on_gpu else 23)
    B = min(4, max(1, scores // (L * L)))
    return (B, max(1, scores // (B * L * L)), L, HEAD_DIM)


def cases(ctx: Context) -> list[Case]:
    """The sequence-length sweep (quick: one or two lengths)."""
    dtypes = [torch.float16, torch.bfloat16] if ctx.on_gpu else [torch.float32]
    return [case(ctx, _shape(ctx, L), dtype) for dtype in dtypes for L in _seq_lengths(ctx)]


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
