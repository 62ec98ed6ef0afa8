"""varlen_attention on every backend available here against per-sequence attention calls (the
reference and mk.attention), plus masks.unpad / masks.pad and the cu_seqlens checks."""

from __future__ import annotations

import pytest
import torch

import maskkern as mk
from maskkern import reference

from .utils import (
    FLOAT_DTYPES,
    assert_close,
    assert_compiles_fullgraph,
    assert_forward_backward_close,
    backend_device_params,
    interpreted_fast_gradcheck,
)

BACKENDS = backend_device_params()


def _packed(total, heads, d, dtype, device):
    return torch.randn(total, heads, d, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()


def _cu(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)


def _check(backend, dtype, q, k, v, cu_q, cu_k=None, **kw):
    out = mk.varlen_attention(q, k, v, cu_q, cu_k, **kw, backend=backend)
    assert out.is_contiguous()
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference.varlen_attention(*ref_in, cu_q, cu_k, **kw)
    # Three roundings, as in test_attention.
    assert_forward_backward_close(out, ref, (q, k, v), ref_in, dtype, grad_scale=10.0, out_scale=10.0)
    return out


CASES = {
    "plain": {},
    "causal": {"causal": True},
    "bottom-right": {"causal": "bottom_right"},
    "sliding": {"causal": True, "window": (6, 0)},
    "band": {"window": (2, 3)},
    "scale": {"scale": 0.2},
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_per_sequence_reference(backend, device, case, dtype):
    lengths = [17, 0, 65, 1, 40]  # an empty sequence, a one-token one, one past a 64-row tile
    total = sum(lengths)
    cu = _cu(lengths, device)
    q, k, v = (
        _packed(total, 2, 16, dtype, device),
        _packed(total, 2, 16, dtype, device),
        _packed(total, 2, 8, dtype, device),
    )
    _check(backend, dtype, q, k, v, cu, **CASES[case])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_different_query_and_key_lengths_with_gqa(backend, device):
    lq, lk = [3, 20, 0, 9], [10, 5, 7, 9]
    cu_q, cu_k = _cu(lq, device).to(torch.int32), _cu(lk, device)
    q = _packed(sum(lq), 4, 8, torch.float64, device)
    k, v = _packed(sum(lk), 2, 8, torch.float64, device), _packed(sum(lk), 2, 8, torch.float64, device)
    for causal in (False, True, "bottom_right"):
        _check(backend, torch.float64, q, k, v, cu_q, cu_k, causal=causal, enable_gqa=True)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_equals_the_padded_call_with_lengths(backend, device):
    B, L, H, D = 3, 37, 2, 16
    lengths = torch.tensor([37, 5, 20], device=device)
    x = [torch.randn(B, L, H, D, device=device) for _ in range(3)]
    padded = mk.attention(
        *(t.transpose(1, 2) for t in x), lengths=lengths, query_lengths=lengths, causal=True, backend=backend
    )
    packed = [mk.masks.unpad(t, lengths) for t in x]
    (q, cu, max_len), (k, _, _), (v, _, _) = packed
    out = mk.varlen_attention(
        q, k, v, cu, max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True, backend=backend
    )
    assert_close(mk.masks.pad(out, cu, L), padded.transpose(1, 2), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck(backend, device):
    cu = _cu([2, 0, 3], device)
    inputs = tuple(_packed(5, 2, 3, torch.float64, device) for _ in range(3))
    fn = lambda q, k, v: mk.varlen_attention(q, k, v, cu, causal=True, window=(1, 0), backend=backend)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=interpreted_fast_gradcheck(backend, device))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def f(q, k, v, cu):
        out = mk.varlen_attention(q, k, v, cu, max_seqlen_q=7, max_seqlen_k=7, causal=True, backend=backend)
        return out.square().sum()

    q, k, v = (_packed(12, 2, 8, torch.float32, device) for _ in range(3))
    assert_compiles_fullgraph(f, (q, k, v, _cu([5, 7], device)), [0, 1, 2], device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    """The custom op in its packed mode (cu_seqlens, GQA, bottom-right causal, a window)."""
    cu_q, cu_k = _cu([3, 0, 6], device), _cu([5, 2, 4], device)
    q = _packed(9, 4, 8, torch.float64, device).detach().transpose(0, 1)[None].requires_grad_()
    k, v = (_packed(11, 2, d, torch.float64, device).detach().transpose(0, 1)[None] for d in (8, 6))
    k, v = k.requires_grad_(), v.requires_grad_()
    args = (q, k, v, None, None, None, cu_q, cu_k, 6, 5, 2, 3, 1, 0.3, True, backend)
    torch.library.opcheck(torch.ops.maskkern.attention.default, args)
    out, lse, tiles = (x.detach() for x in torch.ops.maskkern.attention(*args))
    q, k, v = (x.detach() for x in (q, k, v))  # the backward op has no autograd of its own
    grad = torch.randn_like(out)
    bwd_args = (
        grad,
        q,
        k,
        v,
        out,
        lse,
        None,
        tiles,
        None,
        None,
        cu_q,
        cu_k,
        6,
        5,
        2,
        3,
        1,
        0.3,
        False,
        backend,
    )
    torch.library.opcheck(torch.ops.maskkern.attention_backward.default, bwd_args)


def test_unpad_pad_round_trip():
    x = torch.randn(3, 6, 2, 4, requires_grad=True)
    lengths = torch.tensor([6, 0, 2])
    packed, cu, max_len = mk.masks.unpad(x, lengths)
    assert (
        packed.shape == (8, 2, 4) and cu.tolist() == [0, 6, 6, 8] and cu.dtype == torch.int32 and max_len == 6
    )
    assert torch.equal(packed[6:], x[2, :2])
    back = mk.masks.pad(packed, cu, 6)
    keep = mk.masks.lengths_to_mask(lengths, 6)[..., None, None]
    assert torch.equal(back, x * keep)
    back.sum().backward()
    assert torch.equal(x.grad, keep.expand_as(x).to(x.dtype))


@pytest.mark.parametrize(
    "cu,exc,match",
    [
        (torch.tensor([1, 4]), ValueError, "start at 0"),
        (torch.tensor([0, 4, 2]), ValueError, "non-decreasing"),
        (torch.tensor([0, 4, 9]), ValueError, "past"),
        (torch.tensor([0, 4, 7]), ValueError, "before the end"),
        (torch.tensor([0.0, 4.0]), TypeError, "cu_seqlens_q"),
        (torch.tensor([[0, 4]]), ValueError, "cu_seqlens_q"),
        (torch.tensor([0, 8], device="meta"), ValueError, "cu_seqlens_q must be on the same device as q"),
    ],
)
def test_bad_cu_seqlens(cu, exc, match):
    q, k, v = (torch.randn(8, 2, 4) for _ in range(3))
    with pytest.raises(exc, match=match):
        mk.varlen_attention(q, k, v, cu)
    if cu.dim() == 1 and not cu.is_floating_point():
        # masks.pad takes cu_seqlens too: the same checks.
        with pytest.raises(exc, match=match.replace("cu_seqlens_q", "cu_seqlens").replace(" q", " packed")):
            mk.masks.pad(q, cu, 8)


def test_bad_varlen_arguments():
    q, k, v = (torch.randn(8, 2, 4) for _ in range(3))
    cu = torch.tensor([0, 8])
    with pytest.raises(ValueError, match="heads"):
        mk.varlen_attention(q, k[:, :1].expand(8, 3, 4), v[:, :1].expand(8, 3, 4), cu, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        mk.varlen_attention(q, k[:, :1], v[:, :1], cu)
    with pytest.raises(ValueError, match="max_seqlen_q = 3 is less than cu_seqlens_q's longest"):
        mk.varlen_attention(q, k, v, cu, max_seqlen_q=3)
    with pytest.raises(ValueError, match="max_seqlen_k = 3 is less than cu_seqlens_k's longest"):
        mk.varlen_attention(q, k, v, cu, cu, max_seqlen_k=3)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        mk.varlen_attention(q, k, v, cu, max_seqlen_k=3.0)
    with pytest.raises(ValueError, match="max_len = 3 is less than cu_seqlens's longest"):
        mk.masks.pad(q, cu, 3)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        mk.varlen_attention(q, k[:5], v[:5], cu)
    with pytest.raises(ValueError, match="total, heads, dim"):
        mk.varlen_attention(q[None], k[None], v[None], cu)
    with pytest.raises(ValueError, match="lengths must be"):
        mk.masks.unpad(torch.randn(2, 3), torch.tensor([4, 1]))
