"""masked_softmax on every backend available here against maskkern.reference.masked_softmax."""

from __future__ import annotations

import pytest
import torch

import maskkern as mk
from maskkern import reference

from .utils import (
    FLOAT_DTYPES,
    INF_MINUS_INF,
    TOL,
    assert_close,
    assert_compiles_fullgraph,
    assert_forward_backward_close,
    backend_device_params,
    interpreted_fast_gradcheck,
)

BACKENDS = backend_device_params()
B, H, LQ, LK = 2, 3, 5, 19


def _scores(shape, dtype, device, requires_grad=False):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def _bool_mask(shape, device, p_keep=0.7):
    return torch.rand(shape, device=device) < p_keep


def _additive_mask(shape, dtype, device):
    m = torch.randn(shape, dtype=torch.float64, device=device)
    m = m.masked_fill(torch.rand(shape, device=device) < 0.3, float("-inf"))
    return m.to(dtype)


# Each case: (scores shape, kwargs factory(dtype, device)).
CASES = {
    "plain-2d": ((LQ, LK), lambda dt, dev: {}),
    "plain-4d": ((B, H, LQ, LK), lambda dt, dev: {}),
    "scale": ((B, LQ, LK), lambda dt, dev: {"scale": 0.37}),
    "mask-keys": ((B, H, LQ, LK), lambda dt, dev: {"mask": _bool_mask((LK,), dev)}),
    "mask-qk": ((B, H, LQ, LK), lambda dt, dev: {"mask": _bool_mask((LQ, LK), dev)}),
    "mask-b11k": ((B, H, LQ, LK), lambda dt, dev: {"mask": _bool_mask((B, 1, 1, LK), dev)}),
    "mask-b1qk": ((B, H, LQ, LK), lambda dt, dev: {"mask": _bool_mask((B, 1, LQ, LK), dev)}),
    "mask-full": ((B, H, LQ, LK), lambda dt, dev: {"mask": _bool_mask((B, H, LQ, LK), dev)}),
    "mask-3d": ((B, LQ, LK), lambda dt, dev: {"mask": _bool_mask((B, 1, LK), dev)}),
    "mask-5d": ((2, 2, 3, LQ, LK), lambda dt, dev: {"mask": _bool_mask((2, 1, 3, 1, LK), dev)}),
    "mask-rows": ((B, H, LQ, LK), lambda dt, dev: {"mask": _bool_mask((B, 1, LQ, 1), dev, 0.5)}),
    "additive-keys": ((B, H, LQ, LK), lambda dt, dev: {"mask": _additive_mask((LK,), dt, dev)}),
    "additive-full": ((B, H, LQ, LK), lambda dt, dev: {"mask": _additive_mask((B, H, LQ, LK), dt, dev)}),
    "lengths": ((B, H, LQ, LK), lambda dt, dev: {"lengths": torch.tensor([7, LK], device=dev)}),
    "lengths-0-and-over": ((B, H, LQ, LK), lambda dt, dev: {"lengths": torch.tensor([0, 1000], device=dev)}),
    "lengths-int32-3d": ((B, LQ, LK), lambda dt, dev: {"lengths": torch.tensor([3, 11], device=dev).int()}),
    "lengths-2d": ((LQ, LK), lambda dt, dev: {"lengths": torch.tensor(4, device=dev)}),
    "query-lengths": ((B, H, LQ, LK), lambda dt, dev: {"query_lengths": torch.tensor([2, 9], device=dev)}),
    "causal": ((B, H, LQ, LK), lambda dt, dev: {"causal": True}),
    "causal-square": ((B, H, LK, LK), lambda dt, dev: {"causal": "top_left"}),
    "causal-bottom-right": ((B, H, LQ, LK), lambda dt, dev: {"causal": "bottom_right"}),
    "causal-bottom-right-tall": ((B, LK, LQ), lambda dt, dev: {"causal": "bottom_right"}),
    "causal-tall": ((B, LK, LQ), lambda dt, dev: {"causal": True}),
    "all-combined": (
        (B, H, LQ, LK),
        lambda dt, dev: {
            "mask": _bool_mask((B, 1, LQ, LK), dev),
            "lengths": torch.tensor([12, 3], device=dev),
            "query_lengths": torch.tensor([4, 5], device=dev),
            "causal": "bottom_right",
            "scale": 0.5,
        },
    ),
    "all-combined-additive": (
        (B, H, LQ, LK),
        lambda dt, dev: {
            "mask": _additive_mask((1, H, 1, LK), dt, dev),
            "lengths": torch.tensor([LK, 6], device=dev),
            "causal": True,
            "scale": 2.0,
        },
    ),
}


def _reference(scores, **kw):
    """The reference in fp64, so that only the op's own rounding is measured."""
    kw = dict(kw)
    if kw.get("mask") is not None and kw["mask"].is_floating_point():
        kw["mask"] = kw["mask"].double()
    return reference.masked_softmax(scores.double(), **kw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_forward_backward_match_reference(backend, device, case, dtype):
    shape, make_kwargs = CASES[case]
    kw = make_kwargs(dtype, device)
    scores = _scores(shape, dtype, device, requires_grad=True)
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    before["scores"] = scores.detach().clone()

    out = mk.masked_softmax(scores, **kw, backend=backend)
    assert out.device == scores.device
    assert not out.isnan().any()
    ref_scores = scores.detach().double().requires_grad_()
    ref = _reference(ref_scores, **kw)
    # The gradient is a difference of O(|grad|) terms: compare with an atol on that scale.
    assert_forward_backward_close(out, ref, [scores], [ref_scores], dtype, grad_scale=10.0)

    for name, value in before.items():
        now = scores if name == "scores" else kw[name]
        assert torch.equal(now.detach(), value), f"{name} was modified"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_grad(backend, device):
    scores = _scores((B, H, LQ, LK), torch.float32, device, requires_grad=True)
    mask = torch.ones(B, 1, LQ, LK, dtype=torch.bool, device=device)
    mask[0, :, 1] = False  # a row masked by the bool mask
    additive = torch.zeros(LK, device=device)
    lengths = torch.tensor([LK, 0], device=device)  # batch 1: no keys at all
    qlens = torch.tensor([3, LQ], device=device)  # batch 0: rows 3.. are padding queries
    out = mk.masked_softmax(scores, mask, lengths=lengths, query_lengths=qlens, backend=backend)
    dead = torch.zeros(B, H, LQ, dtype=torch.bool, device=device)
    dead[0, :, 1] = dead[1] = dead[0, :, 3:] = True
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    torch.testing.assert_close(out[~dead].sum(-1), torch.ones_like(out[~dead].sum(-1)))
    out.backward(torch.randn_like(out))
    assert torch.equal(scores.grad[dead], torch.zeros_like(scores.grad[dead]))
    # A row that is -inf everywhere (additive masking) is dead too.
    all_inf = mk.masked_softmax(scores.detach(), additive - float("inf"), backend=backend)
    assert torch.equal(all_inf, torch.zeros_like(all_inf))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_in_kept_position_propagates_and_masked_nan_does_not(backend, device):
    scores = torch.randn(2, 6, device=device)
    scores[0, 2] = float("nan")
    scores[1, 5] = float("nan")
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1, 5] = False
    out = mk.masked_softmax(scores, mask, backend=backend)
    ref = reference.masked_softmax(scores, mask)
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert out[0].isnan().all() and not out[1].isnan().any()


@INF_MINUS_INF
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nonfinite_rows_are_nan_as_in_eager(backend, device):
    # The cpu kernel finds a kept NaN in the row's sum, or by a rescan when nothing else is left.
    scores = torch.randn(4, 40, device=device)
    scores[0, 7] = float("inf")  # inf - inf
    scores[1, 33] = float("nan")  # the only key the mask keeps
    scores[2] = float("-inf")
    scores[2, 17] = float("nan")  # all else -inf: the max is -inf
    mask = torch.ones(4, 40, dtype=torch.bool, device=device)
    mask[1] = False
    mask[1, 33] = True
    out = mk.masked_softmax(scores, mask, backend=backend)
    torch.testing.assert_close(out, reference.masked_softmax(scores, mask), equal_nan=True)
    assert out[:3].isnan().all() and not out[3].isnan().any()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 3, 0), (0, 0)])
def test_empty(backend, device, shape):
    scores = torch.randn(shape, device=device, requires_grad=True)
    out = mk.masked_softmax(scores, causal=True, backend=backend)
    assert out.shape == scores.shape
    out.sum().backward()
    assert scores.grad.shape == scores.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_scores_and_mask(backend, device):
    base = torch.randn(B, LK, H, LQ, device=device)
    scores = base.permute(0, 2, 3, 1)  # (B, H, LQ, LK), last dim strided
    mask = _bool_mask((LK, B), device).t()[:, None, None, :]  # (B, 1, 1, LK), transposed storage
    assert not scores.is_contiguous() and not mask.is_contiguous()
    out = mk.masked_softmax(scores, mask, backend=backend)
    assert_close(out, reference.masked_softmax(scores, mask), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lk", [1, 17, 1000])
def test_row_lengths(backend, device, lk):
    scores = _scores((2, 3, lk), torch.float32, device, requires_grad=True)
    lengths = torch.tensor([lk, max(lk // 2, 1)], device=device)
    out = mk.masked_softmax(scores, lengths=lengths, causal="bottom_right", backend=backend)
    ref_scores = scores.detach().double().requires_grad_()
    ref = reference.masked_softmax(ref_scores, lengths=lengths, causal="bottom_right")
    assert_forward_backward_close(out, ref, [scores], [ref_scores], torch.float32, grad_scale=10.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("lk", [40, 1000])
def test_bool_key_padding_mask(backend, device, lk):
    """Bool masks whose rows end in dropped keys, as a key padding mask (B, 1, 1, Lk) does: the
    cpu kernel does not read those keys, in runs of 32 and then one by one."""
    kept = [0, 1, 7, lk - 33, lk - 32, lk - 31, lk]
    scores = _scores((len(kept), 2, 3, lk), torch.float32, device, requires_grad=True)
    mask = torch.arange(lk, device=device) < torch.tensor(kept, device=device)[:, None]
    mask &= _bool_mask((len(kept), lk), device, 0.8)  # holes within the kept prefix as well
    mask = mask[:, None, None, :]
    out = mk.masked_softmax(scores, mask, causal="bottom_right", backend=backend)
    ref_scores = scores.detach().double().requires_grad_()
    ref = reference.masked_softmax(ref_scores, mask, causal="bottom_right")
    assert_forward_backward_close(out, ref, [scores], [ref_scores], torch.float32, grad_scale=10.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_very_long_row(backend, device):
    """70000 keys: past any single-block limit (the Triton kernel loops over the row)."""
    lk = 70000
    scores = _scores((1, 1, lk), torch.float32, device, requires_grad=True)
    lengths = torch.tensor([lk - 1234], device=device)
    out = mk.masked_softmax(scores, lengths=lengths, scale=0.5, backend=backend)
    ref_scores = scores.detach().clone().requires_grad_()
    ref = reference.masked_softmax(ref_scores, lengths=lengths, scale=0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-8)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(scores.grad, ref_scores.grad, rtol=1e-4, atol=1e-8)


GRADCHECK_CASES = ["all-combined", "all-combined-additive", "mask-5d", "lengths-2d", "causal-tall"]


@pytest.mark.parametrize("case", GRADCHECK_CASES)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck(backend, device, case):
    shape, make_kwargs = CASES[case]
    kw = make_kwargs(torch.float64, device)
    scores = _scores(shape, torch.float64, device, requires_grad=True)
    mask = kw.pop("mask", None)
    if mask is not None and mask.is_floating_point():
        # A float mask gets its own gradient; keep it finite so gradcheck's perturbations are valid.
        mask = torch.randn(mask.shape, dtype=torch.float64, device=device, requires_grad=True)
        fn = lambda s, m: mk.masked_softmax(s, m, **kw, backend=backend)
        inputs = (scores, mask)
    else:
        fn = lambda s: mk.masked_softmax(s, mask, **kw, backend=backend)
        inputs = (scores,)
    fast = interpreted_fast_gradcheck(backend, device) and case != "all-combined"
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)


def _op_samples(device):
    """Arguments of the custom op maskkern::masked_softmax as the public function passes them."""
    s = torch.randn(B, H, LQ, LK, device=device)
    yield s, None, None, None, 0, 1.0
    yield s, _bool_mask((B, 1, 1, LK), device), torch.tensor([3, LK], device=device), None, 1, 0.5
    yield s, torch.randn(LQ, LK, device=device), None, torch.tensor([2, 5], device=device), 2, 2.0
    yield torch.randn(LQ, LK, device=device), None, torch.tensor([4], device=device), None, 2, 1.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    for scores, mask, lengths, qlens, causal, scale in _op_samples(device):
        for requires_grad in (False, True):
            s = scores.clone().requires_grad_(requires_grad)
            float_mask = mask is not None and mask.is_floating_point()
            m = mask.clone().requires_grad_(requires_grad) if float_mask else mask
            args = (s, m, lengths, qlens, causal, scale, True, backend)
            torch.library.opcheck(torch.ops.maskkern.masked_softmax.default, args)
        # The backward op, as autograd calls it: with the forward's bool mask (None for a float one).
        y = torch.ops.maskkern.masked_softmax(scores, mask, lengths, qlens, causal, scale, False, backend)
        keep = mask if mask is not None and mask.dtype == torch.bool else None
        args = (torch.randn_like(y), y, keep, lengths, qlens, causal, scale, backend)
        torch.library.opcheck(torch.ops.maskkern.masked_softmax_backward.default, args)


@pytest.mark.parametrize("device", ["cpu"])
def test_opcheck_native_kernels(device):
    if not mk.backends()["cpu"].available:
        pytest.skip("maskkern._C not built")
    s = torch.randn(B, H, LQ, LK, device=device)
    mask = _bool_mask((B, 1, 1, LK), device).expand(B, H, LQ, LK)
    lengths = torch.tensor([3, LK], device=device)
    torch.library.opcheck(torch.ops.maskkern.masked_softmax_fwd.default, (s, mask, lengths, None, 1, 0.5))
    y = torch.softmax(s, -1)
    torch.library.opcheck(torch.ops.maskkern.masked_softmax_bwd.default, (s, y, mask, lengths, None, 1, 0.5))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def f(scores, mask, lengths):
        y = mk.masked_softmax(scores, mask, lengths=lengths, causal=True, scale=0.5, backend=backend)
        return (y * y).sum()

    scores = torch.randn(B, H, LQ, LK, device=device, requires_grad=True)
    mask = _bool_mask((B, 1, 1, LK), device)
    lengths = torch.tensor([4, LK], device=device)
    assert_compiles_fullgraph(f, (scores, mask, lengths), [0], device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_check_lengths_false_skips_only_the_check(backend, device):
    """check_lengths=False gives the same result on valid lengths; a negative length then masks
    its whole row (zeros, zero gradient) and nothing is read out of bounds, on every backend."""
    scores = torch.randn(B, H, LQ, LK, device=device)
    lengths, qlens = torch.tensor([4, LK], device=device), torch.tensor([LQ, 2], device=device)
    kw = dict(lengths=lengths, query_lengths=qlens, causal=True, backend=backend)
    expected = mk.masked_softmax(scores, **kw)
    torch.testing.assert_close(mk.masked_softmax(scores, **kw, check_lengths=False), expected, rtol=0, atol=0)
    module = mk.nn.MaskedSoftmax(causal=True, check_lengths=False, backend=backend)
    torch.testing.assert_close(module(scores, lengths=lengths, query_lengths=qlens), expected, rtol=0, atol=0)

    negative = dict(
        lengths=torch.tensor([-3, LK], device=device), query_lengths=torch.tensor([LQ, -1], device=device)
    )
    with pytest.raises(ValueError, match="lengths"):  # checked by default, whatever the backend
        mk.masked_softmax(scores, **negative, backend=backend)
    x = scores.clone().requires_grad_()
    y = mk.masked_softmax(x, **negative, check_lengths=False, backend=backend)
    assert torch.equal(y, torch.zeros_like(y))
    y.backward(torch.randn_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x.grad))


def test_module_matches_function():
    scores = torch.randn(B, H, LQ, LK)
    lengths = torch.tensor([4, LK])
    m = mk.nn.MaskedSoftmax(scale=0.5, causal="bottom_right")
    expected = mk.masked_softmax(scores, lengths=lengths, scale=0.5, causal="bottom_right")
    torch.testing.assert_close(m(scores, lengths=lengths), expected)
    assert "bottom_right" in repr(m)
    with pytest.raises(ValueError, match="dim"):
        mk.nn.MaskedSoftmax(dim=1)


def test_default_backend_on_cpu():
    expected = "cpu" if mk.backends()["cpu"].available else "torch"
    assert mk._backend.resolve_backend(None, torch.device("cpu")) == expected


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"scores": torch.ones(3, 4, dtype=torch.int64)}, TypeError, "scores"),
        ({"scores": torch.ones(4)}, ValueError, "scores"),
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, ValueError, "mask"),
        ({"mask": torch.ones(3, 4, dtype=torch.int32)}, TypeError, "mask"),
        ({"lengths": torch.tensor([1.0, 2.0])}, TypeError, "lengths"),
        ({"lengths": torch.tensor([1, 2, 3])}, ValueError, "lengths"),
        ({"lengths": torch.tensor([1, -1])}, ValueError, "lengths"),
        ({"query_lengths": torch.tensor([-5, 1])}, ValueError, "query_lengths"),
        ({"causal": "diagonal"}, ValueError, "causal"),
        ({"scale": float("nan")}, ValueError, "scale"),
        ({"backend": "fast"}, ValueError, "backend"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"scores": torch.randn(2, 3, 4)} | kwargs
    scores = args.pop("scores")
    with pytest.raises(exc, match=match):
        mk.masked_softmax(scores, **args)


def test_tolerances_cover_every_dtype():
    assert set(TOL) == set(FLOAT_DTYPES)
