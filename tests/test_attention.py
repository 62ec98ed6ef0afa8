"""attention on every backend available here against F.scaled_dot_product_attention (where SDPA
can express the masks) and against q·kᵀ -> maskkern.reference.masked_softmax -> ·v (everywhere)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import maskkern as mk
from maskkern import reference
from maskkern.testing import profiled_peak_bytes

from .utils import (
    FLOAT_DTYPES,
    assert_close,
    assert_compiles_fullgraph,
    assert_forward_backward_close,
    backend_device_params,
    interpreted_fast_gradcheck,
)

BACKENDS = backend_device_params()
B, H, LQ, LK, D, DV = 2, 3, 5, 11, 8, 6


def _randn(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)


def _qkv(dtype, device, q_shape=(B, H, LQ, D), k_shape=(B, H, LK, D), v_shape=(B, H, LK, DV)):
    return [_randn(s, dtype, device).requires_grad_() for s in (q_shape, k_shape, v_shape)]


def _keep(shape, device):
    """A random bool keep-mask in which every row keeps at least one key (SDPA's domain)."""
    m = torch.rand(shape, device=device) < 0.6
    m[..., torch.randint(shape[-1], ())] = True
    return m


def _additive(shape, dtype, device):
    a = torch.randn(shape, dtype=torch.float64, device=device)
    a = a.masked_fill(~_keep(shape, device), float("-inf"))
    return a.to(dtype)


def _tril(lq, lk, device):
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def _key_mask(lengths, lk):
    """SDPA's spelling of maskkern's ``lengths``: keys j < lengths[b] are visible."""
    return torch.arange(lk, device=lengths.device) < lengths[:, None, None, None]


def _same(kw):
    """Arguments that mean the same to mk.attention and to SDPA."""
    return kw, {("attn_mask" if k == "mask" else k): v for k, v in kw.items()}


# Each case: (q, k, v shapes) and make(dtype, device) -> (mk.attention kwargs, SDPA kwargs or None
# where SDPA cannot express it: those are compared with the reference only).
def _lengths_case(dt, dev):
    lengths = torch.tensor([7, LK], device=dev)
    return {"lengths": lengths}, {"attn_mask": _key_mask(lengths, LK)}


def _lengths_causal_case(dt, dev):
    lengths = torch.tensor([LK - 3, 4], device=dev)
    return {"lengths": lengths, "causal": True}, {"attn_mask": _key_mask(lengths, LK) & _tril(LK, LK, dev)}


SHAPES = ((B, H, LQ, D), (B, H, LK, D), (B, H, LK, DV))
SQUARE = ((B, H, LK, D), (B, H, LK, D), (B, H, LK, DV))
CASES = {
    "plain": (SHAPES, lambda dt, dev: _same({})),
    "2d": (((LQ, D), (LK, D), (LK, DV)), lambda dt, dev: _same({})),
    "3d": (((B, LQ, D), (B, LK, D), (B, LK, DV)), lambda dt, dev: _same({})),
    "scale": (SHAPES, lambda dt, dev: _same({"scale": 0.3})),
    "broadcast-kv": ((SHAPES[0], (1, H, LK, D), (1, 1, LK, DV)), lambda dt, dev: _same({})),
    "bool-keys": (SHAPES, lambda dt, dev: _same({"mask": _keep((B, 1, 1, LK), dev)})),
    "bool-b1qk": (SHAPES, lambda dt, dev: _same({"mask": _keep((B, 1, LQ, LK), dev)})),
    "bool-full": (SHAPES, lambda dt, dev: _same({"mask": _keep((B, H, LQ, LK), dev)})),
    "additive-qk": (SHAPES, lambda dt, dev: _same({"mask": _additive((LQ, LK), dt, dev)})),
    "additive-full": (SHAPES, lambda dt, dev: _same({"mask": _additive((B, H, LQ, LK), dt, dev)})),
    "causal-square": (SQUARE, lambda dt, dev: ({"causal": True}, {"is_causal": True})),
    "causal-wide": (SHAPES, lambda dt, dev: ({"causal": True}, {"is_causal": True})),
    "causal-tall": (
        ((B, H, LK, D), (B, H, LQ, D), (B, H, LQ, DV)),
        lambda dt, dev: ({"causal": "top_left"}, {"is_causal": True}),
    ),
    "lengths": (SHAPES, _lengths_case),
    "lengths-causal": (SQUARE, _lengths_causal_case),
    # Beyond SDPA (bottom-right causal; rows with no visible key): the reference only.
    "causal-bottom-right": (SHAPES, lambda dt, dev: ({"causal": "bottom_right"}, None)),
    "causal-bottom-right-tall": (
        ((B, H, LK, D), (B, H, LQ, D), (B, H, LQ, DV)),
        lambda dt, dev: ({"causal": "bottom_right"}, None),
    ),
    "query-lengths": (SHAPES, lambda dt, dev: ({"query_lengths": torch.tensor([2, LQ], device=dev)}, None)),
    "lengths-zero": (SHAPES, lambda dt, dev: ({"lengths": torch.tensor([0, 4], device=dev)}, None)),
    "all-combined": (
        SHAPES,
        lambda dt, dev: (
            {
                "mask": torch.rand(B, 1, LQ, LK, device=dev) < 0.7,
                "lengths": torch.tensor([9, 3], device=dev),
                "query_lengths": torch.tensor([4, LQ], device=dev),
                "causal": "bottom_right",
                "scale": 0.5,
            },
            None,
        ),
    ),
}


def _reference(q, k, v, mask=None, *, scale=None, **kw):
    """q·kᵀ -> reference.masked_softmax -> ·v in the inputs' dtype (call it with fp64)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0  # D = 0: the scores are 0 anyway
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    return reference.masked_softmax(q @ k.mT, mask, scale=scale, **kw) @ v


def _expected(q, k, v, mk_kw, sdpa_kw):
    """The fp64 truth: SDPA where it expresses the case, else the reference."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    if sdpa_kw is None:
        out = _reference(q, k, v, **mk_kw)
    else:
        sdpa_kw = {
            n: (x.double() if torch.is_tensor(x) and x.is_floating_point() else x) for n, x in sdpa_kw.items()
        }
        out = F.scaled_dot_product_attention(q, k, v, **sdpa_kw)
    return out, (q, k, v)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_backward_match_sdpa_and_reference(backend, device, case, dtype):
    shapes, make = CASES[case]
    mk_kw, sdpa_kw = make(dtype, device)
    q, k, v = _qkv(dtype, device, *shapes)
    before = [x.detach().clone() for x in (q, k, v)] + [
        x.clone() for x in mk_kw.values() if torch.is_tensor(x)
    ]

    out = mk.attention(q, k, v, **mk_kw, backend=backend)
    assert out.shape == (*torch.broadcast_shapes(q.shape[:-2], v.shape[:-2]), q.shape[-2], DV)
    assert out.dtype == dtype and not out.isnan().any()
    ref, ref_inputs = _expected(q, k, v, mk_kw, sdpa_kw)
    # Three roundings to the input dtype (scaled q·kᵀ, probabilities, output) on O(1) values where
    # masked_softmax alone has one: fp16/bf16 errors measured up to ~7x the plain tolerance, for
    # the output and the gradients alike.
    assert_forward_backward_close(out, ref, (q, k, v), ref_inputs, dtype, grad_scale=10.0, out_scale=10.0)

    after = [q, k, v] + [x for x in mk_kw.values() if torch.is_tensor(x)]
    for now, was in zip(after, before, strict=True):
        assert torch.equal(now.detach(), was), "an input was modified"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fully_masked_queries_give_zeros_with_zero_grad(backend, device):
    q, k, v = _qkv(torch.float32, device)
    mask = torch.ones(B, 1, LQ, LK, dtype=torch.bool, device=device)
    mask[0, :, 1] = False  # one query row sees nothing
    lengths = torch.tensor([LK, 0], device=device)  # batch 1 has no keys at all
    qlens = torch.tensor([3, LQ], device=device)  # batch 0: queries 3.. are padding
    out = mk.attention(q, k, v, mask, lengths=lengths, query_lengths=qlens, backend=backend)
    unchecked = mk.attention(
        q, k, v, mask, lengths=lengths, query_lengths=qlens, check_lengths=False, backend=backend
    )
    torch.testing.assert_close(unchecked, out, rtol=0, atol=0)  # the flag skips a check, nothing else
    dead = torch.zeros(B, H, LQ, dtype=torch.bool, device=device)
    dead[0, :, 1] = dead[1] = dead[0, :, 3:] = True
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    ref, _ = _expected(q, k, v, {"mask": mask, "lengths": lengths, "query_lengths": qlens}, None)
    assert_close(out.double(), ref, torch.float32)
    out.backward(torch.randn_like(out))
    assert torch.equal(q.grad[dead], torch.zeros_like(q.grad[dead]))
    assert not any(x.grad.isnan().any() for x in (q, k, v))
    # The eager spelling, for contrast: masked_fill(-inf) + softmax gives NaN on those rows.
    keep = reference.masked_softmax_keep((*out.shape[:-1], LK), device, mask, lengths, qlens)
    eager = F.softmax((q @ k.mT).masked_fill(~keep, float("-inf")), -1) @ v
    assert eager[dead].isnan().all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize(
    "shapes",
    [
        ((0, H, LQ, D), (0, H, LK, D), (0, H, LK, DV)),
        ((B, H, 0, D), (B, H, LK, D), (B, H, LK, DV)),
        ((B, H, LQ, D), (B, H, 0, D), (B, H, 0, DV)),
        ((B, H, LQ, 0), (B, H, LK, 0), (B, H, LK, DV)),
        ((B, H, LQ, D), (B, H, LK, D), (B, H, LK, 0)),
    ],
    ids=["batch0", "lq0", "lk0", "d0", "dv0"],
)
def test_empty(backend, device, shapes):
    q, k, v = _qkv(torch.float32, device, *shapes)
    out = mk.attention(q, k, v, causal=True, backend=backend)
    ref = _reference(*(x.detach() for x in (q, k, v)), causal=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)  # no keys (Lk = 0) gives zeros, as a fully masked row
    out.sum().backward()
    assert all(x.grad.shape == x.shape for x in (q, k, v))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_inputs(backend, device):
    """The usual (B, L, H, D) projections viewed as (B, H, L, D), and a transposed key mask."""
    q, k, v = (
        _randn((B, n, H, d), torch.float32, device).transpose(1, 2) for n, d in ((LQ, D), (LK, D), (LK, DV))
    )
    mask = _keep((LK, B), device).t()[:, None, None, :]
    assert not any(x.is_contiguous() for x in (q, k, v, mask))
    out = mk.attention(q, k, v, mask, backend=backend)
    assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), torch.float32)


@pytest.mark.parametrize("layout", ["bhld", "blhd", "hbld", "qkv-slice"], ids=lambda s: s)
def test_cpu_gradients_take_their_inputs_layout(layout):
    """The CPU backward returns each gradient in its input's (dense) layout, so that autograd
    accumulates it into .grad, or passes it back through the projection's view, without a copy;
    a non-dense input (a slice of a packed qkv) gets a contiguous gradient. Values against the
    reference, the key-parallel dQ copies included (batch 1, one head: few (sequence, head) pairs)."""
    batch, heads, length = (1, 1, 200) if layout == "bhld" else (2, 3, 77)

    def make(dim: int) -> torch.Tensor:
        if layout == "bhld":
            x = _randn((batch, heads, length, dim), torch.float32, "cpu")
        elif layout == "blhd":
            x = _randn((batch, length, heads, dim), torch.float32, "cpu").transpose(1, 2)
        elif layout == "hbld":
            x = _randn((heads, batch, length, dim), torch.float32, "cpu").permute(1, 0, 2, 3)
        else:
            x = _randn((batch, length, 3, heads, dim), torch.float32, "cpu")[:, :, 1].transpose(1, 2)
        return x.detach().requires_grad_()

    q, k, v = make(D), make(D), make(DV)
    lengths = torch.tensor([length, length // 2][:batch])
    out = mk.attention(q, k, v, lengths=lengths, causal=True, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out), retain_graph=True)
    for x, g in zip((q, k, v), grads, strict=True):
        if layout == "qkv-slice":
            assert g.is_contiguous()
        elif heads > 1:  # with size-1 dims the strides of a dense layout are ambiguous
            assert g.stride() == x.stride()
    ref_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*ref_inputs, lengths=lengths, causal=True)
    assert_forward_backward_close(out, ref, (q, k, v), ref_inputs, torch.float32)


# gradcheck perturbs every input element: tiny shapes (q 2x2x3x3, k 2x2x4x3, v 2x2x4x2) keep it fast.
def _small(lq=3, lk=4, batch=(2, 2)):
    return (*batch, lq, 3), (*batch, lk, 3), (*batch, lk, 2)


GRADCHECK_CASES = {
    "all-combined": (
        _small(),
        lambda dev: {
            "mask": torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 0, 1, 1]], dtype=torch.bool, device=dev),
            "lengths": torch.tensor([3, 1], device=dev),
            "query_lengths": torch.tensor([2, 3], device=dev),
            "causal": "bottom_right",
            "scale": 0.5,
        },
    ),
    "additive": (_small(), lambda dev: {"mask": torch.zeros(2, 1, 3, 4, dtype=torch.float64, device=dev)}),
    "lengths-causal": (
        _small(4, 4),
        lambda dev: {"lengths": torch.tensor([3, 2], device=dev), "causal": True},
    ),
    "lengths-zero": (_small(), lambda dev: {"lengths": torch.tensor([0, 2], device=dev)}),
    "2d": (_small(batch=()), lambda dev: {}),
    "broadcast-kv": (((2, 2, 3, 3), (1, 2, 4, 3), (1, 1, 4, 2)), lambda dev: {}),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck(backend, device, case):
    shapes, make = GRADCHECK_CASES[case]
    kw = make(device)
    inputs = _qkv(torch.float64, device, *shapes)
    mask = kw.pop("mask", None)
    if mask is not None and mask.is_floating_point():
        # An additive mask gets a gradient too (finite values keep gradcheck's perturbations valid).
        inputs.append(torch.randn(mask.shape, dtype=torch.float64, device=device, requires_grad=True))
        fn = lambda q, k, v, m: mk.attention(q, k, v, m, **kw, backend=backend)
    else:
        fn = lambda q, k, v: mk.attention(q, k, v, mask, **kw, backend=backend)
    fast = interpreted_fast_gradcheck(backend, device) and case != "all-combined"
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def f(q, k, v, lengths):
        return mk.attention(q, k, v, lengths=lengths, causal=True, backend=backend).square().sum()

    q, k, v = _qkv(torch.float32, device, *SQUARE)
    assert_compiles_fullgraph(f, (q, k, v, torch.tensor([4, LK], device=device)), [0, 1, 2], device)


def test_default_scale_is_sdpa_scale():
    q, k, v = (x.detach() for x in _qkv(torch.float64, "cpu"))
    torch.testing.assert_close(
        mk.attention(q, k, v, backend="torch"), mk.attention(q, k, v, scale=D**-0.5, backend="torch")
    )


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"q": torch.ones(B, LQ, D, dtype=torch.int64)}, TypeError, "q"),
        ({"q": torch.ones(D)}, ValueError, "q"),
        ({"k": "keys"}, TypeError, "k"),
        ({"k": torch.ones(B, LK, D, dtype=torch.float64)}, TypeError, "k"),
        ({"k": torch.ones(B, LK, D + 1)}, ValueError, "k"),
        ({"v": torch.ones(B, LK + 1, DV)}, ValueError, "v"),
        ({"k": torch.ones(4, LK, D), "v": torch.ones(4, LK, DV)}, ValueError, "batch dims"),  # GQA-like
        ({"mask": torch.ones(LQ, LK + 1, dtype=torch.bool)}, ValueError, "mask"),
        ({"mask": torch.ones(LQ, LK, dtype=torch.int32)}, TypeError, "mask"),
        ({"lengths": torch.tensor([1.0, 2.0])}, TypeError, "lengths"),
        ({"lengths": torch.tensor([1, 2, 3])}, ValueError, "lengths"),
        ({"lengths": torch.tensor([1, -1])}, ValueError, "lengths"),
        ({"query_lengths": torch.tensor([3])}, ValueError, "query_lengths"),
        ({"causal": "diagonal"}, ValueError, "causal"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"scale": "0.5"}, TypeError, "scale"),
        ({"backend": "fast"}, ValueError, "backend"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"q": torch.randn(B, LQ, D), "k": torch.randn(B, LK, D), "v": torch.randn(B, LK, DV)} | kwargs
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        mk.attention(q, k, v, **args)


# --- the fused kernels: odd sizes, windows, GQA, tile summaries, memory ---------------------------


def _bhld(b, h, length, d, dtype, device):
    """(B, H, L, D) as a view of (B, L, H, D) memory: how Hugging Face passes its projections."""
    return _randn((b, length, h, d), dtype, device).transpose(1, 2).requires_grad_()


def _check_against_reference(q, k, v, dtype, backend, **kw):
    """Forward and backward of mk.attention against the fp64 reference (maskkern.reference)."""
    out = mk.attention(q, k, v, **kw, backend=backend)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_kw = {n: (x.double() if torch.is_tensor(x) and x.is_floating_point() else x) for n, x in kw.items()}
    ref = reference.attention(*ref_in, **ref_kw)
    # As above: three roundings to fp16/bf16 on O(1) values.
    assert_forward_backward_close(out, ref, (q, k, v), ref_in, dtype, grad_scale=10.0, out_scale=10.0)


def _interpreted(backend):
    """The Triton interpreter runs ~0.5 ms per program: its cases stay small."""
    return backend == "triton"


ODD = [(1, 1, 8), (17, 17, 40), (63, 65, 64), (65, 63, 80), (130, 130, 8), (257, 200, 40)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("lq,lk,d", ODD, ids=lambda x: str(x))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_odd_sizes_with_lengths_and_causal(backend, device, lq, lk, d, dtype):
    if _interpreted(backend) and lq * lk > 20000:
        pytest.skip("interpreted Triton: the 257 x 200 case runs in the compiled GPU suite")
    q, k, v = (
        _bhld(2, 2, lq, d, dtype, device),
        _bhld(2, 2, lk, d, dtype, device),
        _bhld(2, 2, lk, 24, dtype, device),
    )
    lengths = torch.tensor([max(lk // 2, 1), lk], device=device)
    query_lengths = torch.tensor([lq, max(lq - 5, 0)], device=device)
    for causal in (False, True, "bottom_right"):
        _check_against_reference(
            q, k, v, dtype, backend, lengths=lengths, query_lengths=query_lengths, causal=causal
        )


WINDOWS = {
    "sliding-causal": {"window": (7, 0), "causal": True},
    "sliding-bottom-right": {"window": (5, 0), "causal": "bottom_right"},
    "band": {"window": (3, 9)},
    "left-only": {"window": (10, -1)},
    "right-only": {"window": (-1, 2)},
    "with-lengths": {"window": (20, 4), "lengths": "half"},
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(WINDOWS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_window(backend, device, case, dtype):
    lq, lk = (40, 70) if "bottom" in case else (70, 70)
    q, k, v = (
        _bhld(2, 2, lq, 16, dtype, device),
        _bhld(2, 2, lk, 16, dtype, device),
        _bhld(2, 2, lk, 8, dtype, device),
    )
    kw = dict(WINDOWS[case])
    if kw.get("lengths") == "half":
        kw["lengths"] = torch.tensor([lk // 2, lk], device=device)
    _check_against_reference(q, k, v, dtype, backend, **kw)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_grouped_query_heads(backend, device, hq, hkv):
    q = _bhld(2, hq, 33, 16, torch.float64, device)
    k, v = _bhld(2, hkv, 47, 16, torch.float64, device), _bhld(2, hkv, 47, 8, torch.float64, device)
    lengths = torch.tensor([20, 47], device=device)
    _check_against_reference(
        q, k, v, torch.float64, backend, lengths=lengths, causal="bottom_right", enable_gqa=True
    )
    # SDPA's spelling of the same (it repeats k and v across the group).
    out = mk.attention(q, k, v, causal=True, enable_gqa=True, backend=backend)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(out, sdpa, torch.float64)


# D and Dv above 80, to the fused kernels' cap: cpu and torch at every pair, interpreted Triton at
# one small D = 128 case (its programs cost ~0.5 ms each).
HEAD_DIMS = [(128, 128), (256, 256), (128, 40), (96, 256), (256, 8)]
LARGE_HEAD_CASES = [(b, dev, d, dv) for b, dev in BACKENDS if b != "triton" for d, dv in HEAD_DIMS]
LARGE_HEAD_CASES += [(b, dev, 128, 128) for b, dev in BACKENDS if b == "triton"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend,device,d,dv", LARGE_HEAD_CASES)
def test_large_head_dims(backend, device, d, dv, dtype):
    lq, lk = (17, 20) if _interpreted(backend) else (33, 70)  # 70 keys: two of cpu's 64-key tiles
    q, k, v = (
        _bhld(1, 2, lq, d, dtype, device),
        _bhld(1, 2, lk, d, dtype, device),
        _bhld(1, 2, lk, dv, dtype, device),
    )
    lengths = torch.tensor([lk - 3], device=device)
    _check_against_reference(q, k, v, dtype, backend, lengths=lengths, causal="bottom_right", window=(12, 2))


@pytest.mark.parametrize("case", ["padded-window-gqa", "additive", "packed"])
def test_cuda_composite_with_the_cpu_softmax(case):
    """backend="cuda" runs cuBLAS matmuls around maskkern's masked softmax (its CUDA kernel): the
    same composite with the softmax on its cpu kernel, which the CUDA one matches, against the
    torch composite, forward and backward (with the additive mask's gradient)."""
    from maskkern.ops.attention import _materialised_bwd, _materialised_fwd, _softmax_composite

    dt = torch.float64
    q, k, v = (
        _randn((2, 4, 9, 8), dt, "cpu"),
        _randn((2, 2, 11, 8), dt, "cpu"),
        _randn((2, 2, 11, 6), dt, "cpu"),
    )
    mask = lengths = qlens = cu_q = cu_k = None
    causal, left, right = 2, 4, -1
    if case == "padded-window-gqa":
        mask = (torch.rand(2, 1, 9, 11) < 0.7).expand(2, 4, 9, 11)
        lengths, qlens = torch.tensor([5, 11]), torch.tensor([9, 4])
    elif case == "additive":
        mask = _additive((2, 4, 9, 11), dt, "cpu")
        causal, left = 1, -1
    else:
        q, k, v = q[:1], k[:1], v[:1]
        cu_q, cu_k = torch.tensor([0, 3, 3, 9]), torch.tensor([0, 5, 6, 11])
        left, right = 2, 1
    args = (lengths, qlens, cu_q, cu_k, 9, 11, causal, left, right, 0.3, 64, 64)
    fwd, bwd = _softmax_composite("cpu")
    out, _ = fwd(q, k, v, mask, None, *args)
    ref, lse = _materialised_fwd(q, k, v, mask, None, *args)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    got = bwd(grad, q, k, v, out, None, mask, None, *args, want_ds=True)
    want = _materialised_bwd(grad, q, k, v, ref, lse, mask, None, *args, want_ds=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def _padding_causal_mask(lengths, lq, lk, device):
    return _key_mask(lengths, lk) & _tril(lq, lk, device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", ["padding-causal", "random-blocks", "broadcast-keys", "all-false-tiles"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bool_masks_through_tile_summaries(backend, device, kind, dtype):
    """Bool masks whose tiles are empty, full and partial on the kernels' grid (64 x 64 on cpu)."""
    L = 130
    q, k, v = (_bhld(2, 2, L, 16, dtype, device) for _ in range(3))
    if kind == "padding-causal":
        mask = _padding_causal_mask(torch.tensor([70, 130], device=device), L, L, device)
    elif kind == "random-blocks":
        mask = (torch.rand(2, 2, 3, 3, device=device) < 0.5).repeat_interleave(64, 2).repeat_interleave(64, 3)
        mask = mask[..., :L, :L] & (torch.rand(2, 2, L, L, device=device) < 0.9)
    elif kind == "broadcast-keys":
        mask = torch.arange(L, device=device) < torch.tensor([3, 100], device=device)[:, None, None, None]
    else:
        mask = torch.zeros(1, 1, L, L, dtype=torch.bool, device=device)
        mask[..., :64, :64] = True  # one kept tile; every other tile is skipped
    _check_against_reference(q, k, v, dtype, backend, mask=mask)


def test_mask_tiles_summary():
    from maskkern.ops.attention import mask_tiles

    mask = torch.zeros(1, 1, 5, 7, dtype=torch.bool)
    mask[..., :2, :3] = True  # tile (0, 0) of 2 x 3 tiles is full
    mask[..., 4, 6] = True  # the last, clipped tile keeps one of its one element
    mask[..., 2, 0] = True
    tiles = mask_tiles(mask, 2, 3)
    assert tiles.dtype == torch.int8 and tiles.shape == (1, 1, 3, 3)
    assert tiles[0, 0].tolist() == [[2, 0, 0], [1, 0, 0], [0, 0, 2]]
    keys = torch.tensor([True, True, False])[None, None, None, :]  # a broadcast query dim stays one tile
    assert mask_tiles(keys, 64, 2).tolist() == [[[[2, 0]]]]
    assert mask_tiles(keys.expand(2, 3, 40, 3), 16, 2).shape == (1, 1, 1, 2)  # stride 0: stored shape


def _tile_counts(m, block_q, block_k):
    """The kept elements of each tile of m (..., Lq, Lk), counted in a zero-padded copy (a dim of
    size 1 is one tile)."""
    (lq, lk), tq, tk = (
        m.shape[-2:],
        (1 if m.shape[-2] == 1 else block_q),
        (1 if m.shape[-1] == 1 else block_k),
    )
    nq, nk = -(-lq // tq), -(-lk // tk)
    padded = F.pad(m.int(), (0, nk * tk - lk, 0, nq * tq - lq))
    return padded.unflatten(-1, (nk, tk)).unflatten(-3, (nq, tq)).sum((-3, -1))


@pytest.mark.parametrize("lq,lk", [(1, 3), (64, 64), (65, 130), (1100, 70)])
def test_mask_tiles_matches_counting_the_padded_mask(lq, lk):
    """Against its eager spelling, on random masks with empty, full and partial tiles (above 1024
    rows: more than one block of tile rows), stored row- or column-major."""
    from maskkern.ops.attention import mask_tiles

    mask = torch.rand(2, 3, lq, lk) < torch.tensor([0.0, 0.5, 0.98])[:, None, None]
    mask[1, :, : lq // 2] = True
    column_major = mask.transpose(-2, -1).contiguous().transpose(-2, -1)
    for block_q, block_k in ((64, 64), (16, 32), (128, 16)):
        counts, size = (_tile_counts(m, block_q, block_k) for m in (mask, torch.ones_like(mask[0, 0])))
        expected = torch.where(counts == 0, 0, torch.where(counts == size, 2, 1)).to(torch.int8)
        for m in (mask, column_major):
            assert torch.equal(mask_tiles(m, block_q, block_k), expected)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in BACKENDS if b != "triton"])
def test_forward_holds_no_scores(backend, device):
    """At q (1, 1, 8192, 64) the scores alone would be 256 MB: the fused forward adds < 16 MB."""
    if backend == "torch":
        pytest.skip("the torch backend is the materialised reference")
    q, k, v = (torch.randn(1, 1, 8192, 64, device=device) for _ in range(3))
    lengths = torch.tensor([6000], device=device)
    peak = profiled_peak_bytes(lambda: mk.attention(q, k, v, lengths=lengths, causal=True, backend=backend))
    assert peak < 16 << 20, f"{peak / 2**20:.1f} MB"
    grad_peak = profiled_peak_bytes(
        lambda: torch.autograd.grad(
            mk.attention(q.requires_grad_(), k, v, lengths=lengths, causal=True, backend=backend).sum(), q
        )
    )
    assert grad_peak < 48 << 20, f"{grad_peak / 2**20:.1f} MB"  # out, lse, dq, dk, dv: 2 MB each


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in BACKENDS if b == "cpu"])
def test_bool_mask_takes_the_memory_lengths_take(backend, device):
    """A bool mask's tile summary reads it through views, once per call: at q (1, 1, 4095, 64) a
    padding + causal bool mask (16 MB) takes what lengths + causal take, forward and backward (an
    int32 copy of it would add 64 MB, a bool or padded one 16 MB); a (512, 512) mask expanded to
    (4, 8, 512, 512) takes what the (512, 512) one does (an expanded bool copy would add 8 MB)."""

    def peaks(q, k, v, **kw):
        fwd = profiled_peak_bytes(lambda: mk.attention(q, k, v, **kw, backend=backend))
        leaf = q.detach().requires_grad_()
        out = lambda: mk.attention(leaf, k, v, **kw, backend=backend).sum()
        return fwd, profiled_peak_bytes(lambda: torch.autograd.grad(out(), leaf))

    slack = 1 << 20  # the summary itself (4 kB) and the allocator's rounding
    L = 4095  # not a whole number of tiles: the ragged last row and column of tiles too
    q, k, v = (torch.randn(1, 1, L, 64, device=device) for _ in range(3))
    lengths = torch.tensor([3000], device=device)
    fwd_lengths, bwd_lengths = peaks(q, k, v, lengths=lengths, causal=True)
    fwd_mask, bwd_mask = peaks(q, k, v, mask=_padding_causal_mask(lengths, L, L, device))
    assert fwd_mask < fwd_lengths + slack, f"{fwd_mask / 2**20:.1f} MB, {fwd_lengths / 2**20:.1f} MB"
    assert bwd_mask < bwd_lengths + slack, f"{bwd_mask / 2**20:.1f} MB, {bwd_lengths / 2**20:.1f} MB"

    q, k, v = (torch.randn(4, 8, 512, 64, device=device) for _ in range(3))
    tril = _tril(512, 512, device)
    stored, expanded = peaks(q, k, v, mask=tril), peaks(q, k, v, mask=tril.expand(4, 8, 512, 512))
    for a, b in zip(expanded, stored, strict=True):
        assert a < b + slack, f"{a / 2**20:.1f} MB, {b / 2**20:.1f} MB"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    q, k = _bhld(2, 4, 9, 8, torch.float64, device), _bhld(2, 2, 11, 8, torch.float64, device)
    v = _bhld(2, 2, 11, 6, torch.float64, device)
    lengths, mask = torch.tensor([5, 11], device=device), torch.rand(2, 1, 9, 11, device=device) < 0.7
    args = (q, k, v, mask[:, :, :, :], lengths, None, None, None, 9, 11, 1, 4, -1, 0.3, True, backend)
    torch.library.opcheck(torch.ops.maskkern.attention.default, args)
    out, lse, tiles = (x.detach() for x in torch.ops.maskkern.attention(*args))
    grad = torch.randn_like(out)
    q, k, v = (x.detach() for x in (q, k, v))  # the backward op has no autograd of its own
    bwd_args = (
        grad,
        q,
        k,
        v,
        out,
        lse,
        mask,
        tiles,
        lengths,
        None,
        None,
        None,
        9,
        11,
        1,
        4,
        -1,
        0.3,
        False,
        backend,
    )
    torch.library.opcheck(torch.ops.maskkern.attention_backward.default, bwd_args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph_gqa_window(backend, device):
    def f(q, k, v, mask):
        out = mk.attention(q, k, v, mask, causal=True, window=(5, 0), enable_gqa=True, backend=backend)
        return out.square().sum()

    q, k, v = (
        _bhld(2, 4, 20, 8, torch.float32, device),
        _bhld(2, 2, 20, 8, torch.float32, device),
        _bhld(2, 2, 20, 8, torch.float32, device),
    )
    mask = torch.rand(2, 1, 1, 20, device=device) < 0.8
    assert_compiles_fullgraph(f, (q, k, v, mask), [0, 1, 2], device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_in_a_kept_position_propagates(backend, device):
    q, k, v = (_randn((1, 1, 6, 4), torch.float32, device) for _ in range(3))
    k[0, 0, 2, 1] = float("nan")
    out = mk.attention(q, k, v, lengths=torch.tensor([4], device=device), backend=backend)
    assert out.isnan().all()
    hidden = mk.attention(q, k, v, lengths=torch.tensor([2], device=device), backend=backend)
    assert not hidden.isnan().any()  # a NaN in a key no query sees is never read


GQA_WINDOW_GRADCHECK = {
    "gqa-window": (
        {"causal": True, "window": (1, 0), "enable_gqa": True},
        ((1, 4, 4, 3), (1, 2, 4, 3), (1, 2, 4, 2)),
    ),
    "band-lengths": ({"window": (1, 1), "lengths": [3]}, ((1, 1, 4, 3), (1, 1, 5, 3), (1, 1, 5, 2))),
}


@pytest.mark.parametrize("case", list(GQA_WINDOW_GRADCHECK))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_gqa_window(backend, device, case):
    kw, shapes = GQA_WINDOW_GRADCHECK[case]
    kw = {n: (torch.tensor(x, device=device) if isinstance(x, list) else x) for n, x in kw.items()}
    inputs = _qkv(torch.float64, device, *shapes)
    assert torch.autograd.gradcheck(
        lambda q, k, v: mk.attention(q, k, v, **kw, backend=backend),
        tuple(inputs),
        fast_mode=interpreted_fast_gradcheck(backend, device),
    )


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"window": (2,)}, TypeError, "window"),
        ({"window": (-2, 0)}, ValueError, "window"),
        (
            {"enable_gqa": True, "k": torch.ones(B, 3, LK, D), "v": torch.ones(B, 3, LK, DV)},
            ValueError,
            "multiple",
        ),
        (
            {"q": torch.ones(4, LQ, D), "k": torch.ones(2, LK, D), "v": torch.ones(2, LK, DV)},
            ValueError,
            "enable_gqa",
        ),
        ({"enable_gqa": False}, ValueError, "batch dims.*4 heads.*enable_gqa=True"),
        (
            {"q": torch.ones(B, 4, LQ, 300), "k": torch.ones(B, 2, LK, 300), "backend": "cpu"},
            ValueError,
            "D .*256.*cpu",
        ),
    ],
)
def test_bad_new_arguments(kwargs, exc, match):
    args = {"q": torch.randn(B, 4, LQ, D), "k": torch.randn(B, 2, LK, D), "v": torch.randn(B, 2, LK, DV)}
    args |= {"enable_gqa": True} | kwargs
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        mk.attention(q, k, v, **args)


def _contract_args(**change):
    """Arguments of the cpu kernel ops attention_fwd / attention_bwd (the schema comment in
    csrc/maskkern.cpp), valid unless ``change`` breaks them: (fwd args, bwd args)."""
    t = {
        "q": torch.randn(2, 2, 4, 8, dtype=torch.float64),
        "k": torch.randn(2, 1, 4, 8, dtype=torch.float64),
        "v": torch.randn(2, 1, 4, 6, dtype=torch.float64),
        "mask": None,
        "tiles": None,
        "lengths": None,
        "qlens": None,
        "cu_q": None,
        "cu_k": None,
        "causal": 0,
        "block_q": 64,
        "block_k": 64,
    }
    t["grad"] = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    t["out"] = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    t["lse"] = torch.randn(2, 2, 4, dtype=torch.float64)
    t |= change
    masks = (t["mask"], t["tiles"], t["lengths"], t["qlens"], t["cu_q"], t["cu_k"], 4, 4, t["causal"], -1, -1)
    tail = (*masks, 0.3, t["block_q"], t["block_k"])
    return (t["q"], t["k"], t["v"], *tail), (t["grad"], t["q"], t["k"], t["v"], t["out"], t["lse"], *tail)


def _packed(**change):
    q, k, v = (
        torch.randn(1, 2, 6, 8, dtype=torch.float64),
        torch.randn(1, 1, 6, 8, dtype=torch.float64),
        torch.randn(1, 1, 6, 6, dtype=torch.float64),
    )
    cu = torch.tensor([0, 2, 6])
    base = {
        "q": q,
        "k": k,
        "v": v,
        "cu_q": cu,
        "cu_k": cu,
        "grad": torch.randn(1, 2, 6, 6, dtype=torch.float64),
        "out": torch.randn(1, 2, 6, 6, dtype=torch.float64),
        "lse": torch.randn(1, 2, 6, dtype=torch.float64),
    }
    return _contract_args(**(base | change))


_F64 = {"dtype": torch.float64}
KERNEL_CONTRACT_VIOLATIONS = {
    "q last-dim stride": lambda: _contract_args(q=torch.randn(2, 2, 8, 4, **_F64).transpose(-1, -2)),
    "k dtype": lambda: _contract_args(k=torch.randn(2, 1, 4, 8)),
    "q dims": lambda: _contract_args(q=torch.randn(2, 4, 8, **_F64)),
    "k batch": lambda: _contract_args(k=torch.randn(1, 1, 4, 8, **_F64)),
    "v keys": lambda: _contract_args(v=torch.randn(2, 1, 5, 6, **_F64)),
    "gqa heads": lambda: _contract_args(
        q=torch.randn(2, 3, 4, 8, **_F64),
        k=torch.randn(2, 2, 4, 8, **_F64),
        v=torch.randn(2, 2, 4, 6, **_F64),
    ),
    "D limit": lambda: _contract_args(
        q=torch.randn(2, 2, 4, 257, **_F64), k=torch.randn(2, 1, 4, 257, **_F64)
    ),
    "lengths size": lambda: _contract_args(lengths=torch.tensor([2])),
    "lengths dtype": lambda: _contract_args(lengths=torch.tensor([2, 3], dtype=torch.int32)),
    "query_lengths size": lambda: _contract_args(qlens=torch.tensor([1, 2, 3])),
    "mask shape": lambda: _contract_args(mask=torch.ones(2, 2, 2, 2, dtype=torch.bool)),
    "mask broadcast": lambda: _contract_args(mask=torch.ones(1, 1, 4, 4, dtype=torch.bool)),
    "mask dtype": lambda: _contract_args(mask=torch.zeros(2, 2, 4, 4)),
    "mask_tiles without mask": lambda: _contract_args(tiles=torch.full((2, 2, 1, 1), 2, dtype=torch.int8)),
    "mask_tiles shape": lambda: _contract_args(
        mask=torch.ones(2, 2, 4, 4, dtype=torch.bool), tiles=torch.full((2, 2, 2, 1), 2, dtype=torch.int8)
    ),
    "causal code": lambda: _contract_args(causal=3),
    "block size": lambda: _contract_args(block_q=0),
    "cu_seqlens alone": lambda: _packed(cu_k=None),
    "cu_seqlens start": lambda: _packed(cu_q=torch.tensor([1, 2, 6])),
    "cu_seqlens order": lambda: _packed(cu_q=torch.tensor([0, 4, 2])),
    "cu_seqlens end": lambda: _packed(cu_k=torch.tensor([0, 2, 7])),
    "cu_seqlens dtype": lambda: _packed(cu_q=torch.tensor([0, 2, 6], dtype=torch.int32)),
    "cu_seqlens batch": lambda: _packed(q=torch.randn(2, 2, 6, 8, **_F64)),
    "cu_seqlens with lengths": lambda: _packed(lengths=torch.tensor([6])),
}

# Cases that only attention_bwd's extra arguments break.
BWD_CONTRACT_VIOLATIONS = {
    "grad_out stride": lambda: _contract_args(grad=torch.randn(2, 2, 6, 4, **_F64).transpose(-1, -2)),
    "out shape": lambda: _contract_args(out=torch.randn(2, 2, 4, 5, **_F64)),
    "lse shape": lambda: _contract_args(lse=torch.randn(2, 2, 3, **_F64)),
    "lse dtype": lambda: _contract_args(lse=torch.randn(2, 2, 4)),
}


@pytest.mark.parametrize("case", ["valid", *KERNEL_CONTRACT_VIOLATIONS, *BWD_CONTRACT_VIOLATIONS])
def test_kernel_ops_check_their_contract(case):
    """A direct call of the cpu kernel ops that breaks their contract raises (csrc/checks.h) instead
    of reading the wrong elements or past the end of a tensor."""
    if not mk.backends()["cpu"].available:
        pytest.skip("maskkern._C not built")
    fwd, bwd = torch.ops.maskkern.attention_fwd, torch.ops.maskkern.attention_bwd
    if case == "valid":
        for fwd_args, bwd_args in (_contract_args(), _packed()):
            fwd(*fwd_args)
            bwd(*bwd_args)
        return
    if case in BWD_CONTRACT_VIOLATIONS:
        calls = [(bwd, BWD_CONTRACT_VIOLATIONS[case]()[1])]
    else:
        calls = zip((fwd, bwd), KERNEL_CONTRACT_VIOLATIONS[case](), strict=True)
    for op, args in calls:
        with pytest.raises(RuntimeError, match="kernel contract"):
            op(*args)
