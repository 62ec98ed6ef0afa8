"""attention and varlen_attention vs ``F.scaled_dot_product_attention`` with the same masks, the
eager ``F.softmax((q @ k.mT * scale).masked_fill(~keep, -inf), -1) @ v``, torch.compile of it and
FlexAttention (compiled; its BlockMask built outside the timing, as a user caches it).

keep = key padding from lengths (uniform in [L/4, L], seeded) AND causal, materialised the way
users write it (bench_masked_softmax.keep_mask: (B, 1, 1, L) lengths mask & (L, L) tril) for eager
and SDPA; maskkern gets ``lengths=`` and ``causal=True`` (and, as ``maskkern-mask``, the same bool
mask, which its tile summary turns back into skipped and mask-free tiles). Every query sees key 0,
so no row is empty and SDPA's output is defined everywhere.

Cases (CPU fp32; GPU bf16): the headline q (4, 8, 512, 64); the same with query_lengths = lengths
(SDPA gets its key mask, does the padded queries' work anyway and is timed as a baseline); no mask;
causal only; padding pays (lengths and query_lengths at 50% against 100%, maskkern alone); packed
sequences (varlen_attention, its output padded back) against the padded call with lengths and
query_lengths (and on GPU flash-attn's ``flash_attn_varlen_func`` on the same packed tensors, when
importable); the forward at q (1, 1, 8192, 64) for memory; on GPU an L sweep against FlexAttention.
A --quick run has the first four at the headline shape (the targets' cases; no compile peer on CPU).

FLOP model (the GFLOP/s column): the useful work, counted on the (query, key) pairs the masks keep,
whoever computes them: forward 4·D per kept pair per head (2·D for q·k, 2·Dv for p·v, Dv = D),
backward 2.5× the forward (five matmuls to the forward's two, as FlashAttention counts), so fwd+bwd
is 3.5× the forward. The same count is every provider's, so a provider that also computes the
pairs a mask drops (SDPA's, eager's) shows a lower rate for the same answer. The kernels' GFLOP/s
are read against the machine's matmul rate (a square torch.mm, measured at the start: % matmul).

    python bench/bench_attention.py [--quick]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _harness import AT_ZERO, Case, CaseResult, Context, Target, at_zero, main, pays, ratio
from bench_masked_softmax import keep_mask, kept_pairs
from torch import Tensor

import maskkern as mk
from maskkern import reference
from maskkern.testing import ATTENTION_TOL

KERNEL = "attention"
HEAD_DIM = 64
SCALE = 1 / math.sqrt(HEAD_DIM)  # SDPA's default, and mk.attention's
HEADLINE = (4, 8, 512, HEAD_DIM)
GPU_LENGTHS = [1024, 2048, 4096, 8192, 16384]  # the span the GPU target is set over


def _flex():
    """FlexAttention's (flex_attention, create_block_mask), or None where it is missing."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


FLEX = _flex()


def _flash_varlen():
    """flash-attn's flash_attn_varlen_func, or None where it is not importable."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # not installed, or built against another torch: the table goes on without it
        return None
    return flash_attn_varlen_func


def _gflop(shape: tuple[int, ...], pairs: int) -> dict[str, float]:
    """The FLOP model of the module docstring, per mode, for ``pairs`` kept pairs in each of
    ``shape``'s heads."""
    fwd = 4 * shape[3] * shape[1] * pairs / 1e9
    return {"fwd": fwd, "fwd+bwd": 3.5 * fwd}


def _lengths(B: int, L: int) -> Tensor:
    return torch.randint(L // 4, L + 1, (B,), generator=torch.Generator().manual_seed(0))


def _mk(**fixed):
    """mk.attention(q, k, v, lengths=..., **fixed) on one backend."""

    def for_backend(backend: str):
        def fn(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None = None, **_) -> Tensor:
            return mk.attention(q, k, v, lengths=lengths, scale=SCALE, backend=backend, **fixed)

        return fn

    return for_backend


def _eager(causal: bool):
    def fn(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None = None, **_) -> Tensor:
        keep = keep_mask(lengths, causal, k.shape[-2], q.device)
        scores = q @ k.mT * SCALE
        return F.softmax(scores if keep is None else scores.masked_fill(~keep, float("-inf")), -1) @ v

    return fn


def _sdpa(causal: bool, as_mask: bool = True):
    """SDPA with the bool mask (``as_mask``) or, without lengths, ``is_causal``."""

    def fn(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None = None, **_) -> Tensor:
        if lengths is None and not as_mask:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep_mask(lengths, causal, k.shape[-2], q.device)
        )

    return fn


def _flex_provider(q: Tensor, k: Tensor, v: Tensor, block_mask=None, **_) -> Tensor:
    return FLEX[0](q, k, v, block_mask=block_mask, scale=SCALE)


def _block_mask(lengths: Tensor, L: int, device: torch.device):
    """FlexAttention's BlockMask of key padding AND causal (built once per input, untimed)."""

    def keep(b, h, q_idx, kv_idx):
        return (kv_idx < lengths[b]) & (kv_idx <= q_idx)

    return FLEX[1](keep, lengths.numel(), None, L, L, device=device)


def _reference(**fixed):
    def fn(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None = None, **_) -> Tensor:
        q64, k64, v64 = (x.double() for x in (q, k, v))
        return reference.attention(q64, k64, v64, lengths=lengths, scale=SCALE, **fixed).to(q.dtype)

    return fn


def _d(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def name(label: str, shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """A case's name (the table's row label)."""
    return f"{label} q {shape} {_d(dtype)}"


def _qkv(ctx: Context, shape, dtype, **extra):
    def inputs() -> dict:
        q, k, v = (torch.randn(shape, dtype=dtype, device=ctx.device) for _ in range(3))
        return {"q": q, "k": k, "v": v} | {n: (x() if callable(x) else x) for n, x in extra.items()}

    return inputs


def _case(
    ctx, label, shape, dtype, inputs, providers, ref, pairs, *, baselines=(), modes=("fwd", "fwd+bwd")
) -> Case:
    """``pairs``: the kept (query, key) pairs per head (kept_pairs), the FLOP model's count."""
    return Case(
        name=name(label, shape, dtype),
        x_name="L",
        x=shape[2],
        config=dict(case=label, q=list(shape), dtype=_d(dtype), scale=SCALE),
        inputs=inputs,
        providers=providers,
        reference=ref,
        grad_inputs=("q", "k", "v") if "fwd+bwd" in modes else (),
        modes=modes,
        plot=f"cases {_d(dtype)}",
        tol=ATTENTION_TOL[dtype],
        baselines=baselines,
        work=_gflop(shape, pairs),
        work_unit="GFLOP",
    )


def headline(ctx: Context, shape, dtype) -> Case:
    """Key padding + causal: maskkern (lengths, and the bool mask) vs eager, compile, SDPA, Flex."""
    B, L = shape[0], shape[2]
    lens = _lengths(B, L).to(ctx.device)
    extra = {"lengths": lens}
    peers = {"sdpa": _sdpa(True)}
    if FLEX is not None and ctx.on_gpu:
        extra["block_mask"] = lambda: _block_mask(lens, L, ctx.device)
        peers["flex"] = _flex_provider
    providers = ctx.providers(
        _mk(causal=True, check_lengths=ctx.checks_values), _eager(True), nocache=False, **peers
    )

    def with_mask(q, k, v, lengths, **_):
        return mk.attention(q, k, v, keep_mask(lengths, True, L, q.device), scale=SCALE)

    providers["maskkern-mask"] = with_mask
    return _case(
        ctx,
        "lengths+causal",
        shape,
        dtype,
        _qkv(ctx, shape, dtype, **extra),
        providers,
        _reference(causal=True),
        kept_pairs(lens.tolist(), [L] * B, True),
    )


def flex_forward(ctx: Context, shape, dtype) -> Case:
    """CPU FlexAttention has no backward: its forward alone, beside maskkern's and SDPA's."""
    B, L = shape[0], shape[2]
    lens = _lengths(B, L)
    providers = {"maskkern": _mk(causal=True)("cpu"), "eager": _eager(True), "sdpa": _sdpa(True)}
    providers["flex"] = _flex_provider
    inputs = _qkv(ctx, shape, dtype, lengths=lens, block_mask=lambda: _block_mask(lens, L, ctx.device))
    return _case(
        ctx,
        "flex fwd lengths+causal",
        shape,
        dtype,
        inputs,
        providers,
        _reference(causal=True),
        kept_pairs(lens.tolist(), [L] * B, True),
        modes=("fwd",),
    )


def query_lengths(ctx: Context, shape, dtype) -> Case:
    """query_lengths = lengths too: maskkern skips the padded queries; SDPA computes them anyway."""
    lens = _lengths(shape[0], shape[2]).to(ctx.device)
    maskkern = _mk(causal=True, query_lengths=lens)(_backend(ctx))
    providers = {"maskkern": maskkern, "eager": _eager(True), "sdpa": _sdpa(True)}
    ref = _reference(causal=True, query_lengths=lens)
    inputs = _qkv(ctx, shape, dtype, lengths=lens)
    label = "lengths+query_lengths+causal"
    pairs = kept_pairs(lens.tolist(), lens.tolist(), True)
    return _case(ctx, label, shape, dtype, inputs, providers, ref, pairs, baselines=("eager", "sdpa"))


def _backend(ctx: Context) -> str:
    return ctx.maskkern_backends(nocache=False)[0][1]


def unmasked(ctx: Context, shape, dtype, causal: bool) -> Case:
    """Nothing to skip (no mask), or causal only: maskkern vs SDPA (``is_causal``)."""
    providers = {"maskkern": _mk(causal=causal)(_backend(ctx)), "sdpa": _sdpa(causal, as_mask=False)}
    providers["eager"] = _eager(causal)
    label = "causal only" if causal else "no mask"
    full = [shape[2]] * shape[0]
    inputs, ref = _qkv(ctx, shape, dtype), _reference(causal=causal)
    return _case(ctx, label, shape, dtype, inputs, providers, ref, kept_pairs(full, full, causal))


def padding_pays(ctx: Context, shape, dtype) -> Case:
    """lengths = query_lengths = L/2 against L (AT_ZERO, same rounds): work goes with the square."""
    B, L = shape[0], shape[2]
    half = torch.full((B,), L // 2, device=ctx.device)
    full = torch.full((B,), L, device=ctx.device)

    def maskkern(backend):
        def fn(q, k, v, lengths, **_):
            return mk.attention(q, k, v, lengths=lengths, query_lengths=lengths, causal=True, backend=backend)

        return fn

    providers = {"maskkern": maskkern(_backend(ctx)), "eager": _eager(True)}
    providers[AT_ZERO] = at_zero(ctx, maskkern, lengths=full)
    ref = _reference(causal=True, query_lengths=half)
    inputs = _qkv(ctx, shape, dtype, lengths=half)
    label = "pad=50% (keys and queries)"
    pairs = kept_pairs([L // 2] * B, [L // 2] * B, True)
    return _case(ctx, label, shape, dtype, inputs, providers, ref, pairs, baselines=("eager", AT_ZERO))


def varlen(ctx: Context, shape, dtype) -> Case:
    """The headline's sequences packed (varlen_attention) against the padded call with lengths =
    query_lengths (the same work; timed as a baseline in the same rounds). Each side reads and
    writes its own layout: the padded baselines get the output gradient padded (Case.grad_layout),
    so neither times a layout conversion."""
    B, H, L, D = shape
    lens = _lengths(B, L).to(ctx.device)
    cu = torch.zeros(B + 1, dtype=torch.int64, device=ctx.device)
    cu[1:] = lens.cumsum(0)
    max_len = int(lens.max())
    keep = mk.masks.lengths_to_mask(lens, L)
    backend = _backend(ctx)

    def inputs() -> dict:
        q, k, v = (torch.randn(B, L, H, D, dtype=dtype, device=ctx.device) for _ in range(3))
        padded = {n: x.transpose(1, 2) for n, x in (("q", q), ("k", k), ("v", v))}
        packed = {f"{n}_packed": x[keep].detach() for n, x in (("q", q), ("k", k), ("v", v))}
        return padded | packed | {"lengths": lens}

    def packed_fn(q_packed, k_packed, v_packed, **_):
        return mk.varlen_attention(
            q_packed,
            k_packed,
            v_packed,
            cu,
            max_seqlen_q=max_len,
            max_seqlen_k=max_len,
            causal=True,
            backend=backend,
        )

    def padded_fn(q, k, v, lengths, **_):
        return mk.attention(q, k, v, lengths=lengths, query_lengths=lengths, causal=True, backend=backend)

    padded_ref = _reference(causal=True, query_lengths=lens)

    def ref(q_packed, k_packed, v_packed, lengths, **_):
        # Of the packed tensors, as maskkern's output is (the padded ones feed the baselines).
        q, k, v = (mk.masks.pad(x, cu, L).transpose(1, 2) for x in (q_packed, k_packed, v_packed))
        return padded_ref(q, k, v, lengths=lengths).transpose(1, 2)[keep]

    providers = {"maskkern": packed_fn, "padded": padded_fn, "eager": _eager(True)}
    flash = _flash_varlen() if ctx.on_gpu else None  # flash-attn is CUDA only
    if flash is not None:
        cu32 = cu.to(torch.int32)

        def flash_fn(q_packed, k_packed, v_packed, **_):
            return flash(
                q_packed, k_packed, v_packed, cu32, cu32, max_len, max_len, softmax_scale=SCALE, causal=True
            )

        providers["flash-attn"] = flash_fn
    pairs = kept_pairs(lens.tolist(), lens.tolist(), True)
    case = _case(ctx, "packed", shape, dtype, inputs, providers, ref, pairs, baselines=("padded", "eager"))
    # The packed tensors are what maskkern and the reference read; the padded ones get gradients too,
    # for the baselines' backward (the check finds none from the packed side, as expected).
    case.grad_inputs = ("q_packed", "k_packed", "v_packed", "q", "k", "v")

    def padded_grad(grad: torch.Tensor) -> torch.Tensor:
        return mk.masks.pad(grad, cu, L).transpose(1, 2)

    case.grad_layout = {"padded": padded_grad, "eager": padded_grad}
    return case


def long_forward(ctx: Context, dtype) -> Case:
    """q (1, 1, 8192, 64), forward only: the (L, L) scores alone would be 256 MB in fp32."""
    shape = (1, 1, 8192, HEAD_DIM)
    providers = {"maskkern": _mk(causal=True)(_backend(ctx)), "eager": _eager(True)}
    providers["sdpa"] = _sdpa(True, as_mask=False)
    inputs, pairs = _qkv(ctx, shape, dtype), kept_pairs([shape[2]], [shape[2]], True)
    return _case(ctx, "causal, long", shape, dtype, inputs, providers, None, pairs, modes=("fwd",))


def _dtype(ctx: Context) -> torch.dtype:
    return torch.bfloat16 if ctx.on_gpu else torch.float32


def _gpu_lengths(ctx: Context) -> list[int]:
    return [GPU_LENGTHS[0], GPU_LENGTHS[-1]] if ctx.quick else GPU_LENGTHS


def _gpu_shape(L: int) -> tuple[int, int, int, int]:
    """About 2^30 scores per call: B up to 4, then H."""
    B = min(4, max(1, (1 << 30) // (16 * L * L)))
    return (B, 16, L, HEAD_DIM)


def cases(ctx: Context) -> list[Case]:
    """CPU: the headline set at (4, 8, 512, 64) (quick: the headline, its query_lengths and packed
    variants and padding pays, those three in fwd+bwd only); GPU: the L sweep against SDPA and
    FlexAttention, bf16."""
    dtype = _dtype(ctx)
    if ctx.on_gpu:
        return [headline(ctx, _gpu_shape(L), dtype) for L in _gpu_lengths(ctx)] + [
            varlen(ctx, _gpu_shape(4096), dtype)
        ]
    out = [
        headline(ctx, HEADLINE, dtype),
        query_lengths(ctx, HEADLINE, dtype),
        padding_pays(ctx, HEADLINE, dtype),
    ]
    out.append(varlen(ctx, HEADLINE, dtype))
    if ctx.quick:  # past the headline, the targets read fwd+bwd only
        for case in out[1:]:
            case.modes = ("fwd+bwd",)
    else:
        out += [
            unmasked(ctx, HEADLINE, dtype, False),
            unmasked(ctx, HEADLINE, dtype, True),
            long_forward(ctx, dtype),
        ]
        if FLEX is not None:
            out.append(flex_forward(ctx, HEADLINE, dtype))
    return out


def _peak(result: CaseResult | None, provider: str, mode: str) -> float | None:
    m = result and result.times.get((provider, mode))
    return None if m is None or m.peak_bytes is None else m.peak_bytes


def targets(ctx: Context, results: dict[str, CaseResult]) -> list[Target]:
    """The issue's targets, each set at its case at the headline shape: × SDPA's time with the same
    masks (<= means maskkern is that fraction of SDPA's time), padding pays, packed vs padded,
    memory; on GPU the L sweep against FlexAttention (indicative over a quick run's two ends)."""
    dtype = _dtype(ctx)

    def vs(mode: str, peer: str = "sdpa") -> Callable[[CaseResult | None], float | None]:
        return lambda r: r and ratio(r.p50("maskkern", mode), r.p50(peer, mode))

    if ctx.on_gpu:
        sweep = [results.get(name("lengths+causal", _gpu_shape(L), dtype)) for L in _gpu_lengths(ctx)]
        flex = [vs("fwd+bwd", "flex")(r) for r in sweep]
        worst = None if any(x is None for x in flex) else max(flex)
        span = f"{_d(dtype)} L {GPU_LENGTHS[0]}..{GPU_LENGTHS[-1]}"
        at = {
            "set_at": f"lengths+causal {_d(dtype)}, L in {GPU_LENGTHS}",
            "measured_at": f"lengths+causal {_d(dtype)}, L in {_gpu_lengths(ctx)}",
        }
        return [Target(f"attention fwd+bwd {span}: max time / FlexAttention's", worst, 1.0, "<=", "", **at)]

    def mem(r: CaseResult | None) -> float | None:
        return ratio(_peak(r, "maskkern", "fwd+bwd"), _peak(r, "sdpa", "fwd+bwd"))

    def long_mb(r: CaseResult | None) -> float | None:
        peak = _peak(r, "maskkern", "fwd")
        return peak and peak / 2**20

    # (case label, shape, what, measure, required, unit); the last three only in a full run.
    rows = [
        ("lengths+causal", HEADLINE, "fwd+bwd: time / SDPA's", vs("fwd+bwd"), 0.5, ""),
        ("lengths+causal", HEADLINE, "fwd: time / SDPA's", vs("fwd"), 0.5, ""),
        ("lengths+query_lengths+causal", HEADLINE, "fwd+bwd: time / SDPA's", vs("fwd+bwd"), 0.35, ""),
        ("pad=50% (keys and queries)", HEADLINE, "padding pays: fwd+bwd at 50% / 0%", pays, 0.35, ""),
        (
            "packed",
            HEADLINE,
            "varlen_attention / padded with lengths, fwd+bwd",
            vs("fwd+bwd", "padded"),
            1.05,
            "",
        ),
        ("lengths+causal", HEADLINE, "fwd+bwd peak memory above inputs / SDPA's", mem, 1.1, ""),
    ]
    if not ctx.quick:
        rows += [
            ("no mask", HEADLINE, "fwd+bwd: time / SDPA's", vs("fwd+bwd"), 1.15, ""),
            ("causal only", HEADLINE, "fwd+bwd: time / SDPA is_causal", vs("fwd+bwd"), 0.75, ""),
            ("causal, long", (1, 1, 8192, HEAD_DIM), "fwd: MB above inputs", long_mb, 16, "MB"),
        ]
    out = []
    for label, shape, what, measure, required, unit in rows:
        at = name(label, shape, dtype)
        out.append(
            Target(f"attention {at} {what}", measure(results.get(at)), required, "<=", unit, set_at=at)
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main([sys.modules[__name__]]))
