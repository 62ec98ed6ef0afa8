"""attention on every backend available here against F.scaled_dot_product_attention (where SDPA
can express the masks) and against q·kᵀ -> maskkern.reference.masked_softmax -> ·v (everywhere)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import maskkern as mk
from maskkern import reference

from .utils import FLOAT_DTYPES, assert_close, backend_device_params

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
    # masked_softmax alone has one: fp16/bf16 errors measured up to ~7x the plain tolerance.
    assert_close(out.double(), ref, dtype, scale=10.0)

    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    for g, rg in zip(grads, ref_grads, strict=True):
        # The same budget holds for the gradients (measured up to ~7x too).
        assert_close(g.double(), rg, dtype, scale=10.0)

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
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def f(q, k, v, lengths):
        return mk.attention(q, k, v, lengths=lengths, causal=True, backend=backend).square().sum()

    q, k, v = _qkv(torch.float32, device, *SQUARE)
    lengths = torch.tensor([4, LK], device=device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(q, k, v, lengths)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = f(q, k, v, lengths)
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)


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
