"""pad_embedding on every backend available here against nn.Embedding / F.embedding and
maskkern.reference.pad_embedding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import maskkern as mk
from maskkern import reference

from .utils import FLOAT_DTYPES, assert_close, assert_compiles_fullgraph, backend_device_params

BACKENDS = backend_device_params()
V, D = 11, 19
DTYPE_IDS = lambda d: str(d).removeprefix("torch.")

# padding_idx cases: None, an id present in the batch (first, middle, negative = last), and a pad
# id that the batch does not contain.
PADS = {"none": None, "first": 0, "middle": 5, "negative": -1, "absent": 3}


def _ids(shape, device, pad=None, dtype=torch.int64, num=V, present=True):
    ids = torch.randint(0, num, shape)
    if pad is not None:
        p = pad % num
        ids = ids.masked_fill(ids == p, (p + 1) % num)
        if present:
            ids.view(-1)[: max(1, ids.numel() // 4)] = p
    return ids.to(device=device, dtype=dtype)


def _weight(dtype, device, num=V, dim=D, requires_grad=True):
    w = torch.randn(num, dim, dtype=torch.float64).to(device=device, dtype=dtype)
    return w.requires_grad_(requires_grad)


def _eager_grad(ids, weight, grad, **kw):
    """The weight gradient of the eager reference, computed in fp64 and rounded once."""
    w = weight.detach().double().requires_grad_()
    out = reference.pad_embedding(ids, w, **kw)
    (gw,) = torch.autograd.grad(out, w, grad.double())
    return gw.to(weight.dtype)


def _bits(t):
    """A view that compares -0.0 != 0.0 and NaN payloads: "the same bits"."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=DTYPE_IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pad", list(PADS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_nn_embedding(backend, device, pad, dtype, index_dtype):
    """Default semantics = F.embedding: the output is the same bits; the pad row gets no gradient;
    fp32/fp64 gradients are exact (tokens summed in order, like PyTorch's CPU backward)."""
    padding_idx = PADS[pad]
    ids = _ids((3, 7), device, padding_idx, index_dtype, present=pad != "absent")
    weight = _weight(dtype, device)
    weight.data[padding_idx if padding_idx is not None else 0] = 2.5  # a non-zero pad row is returned
    ids_before, weight_before = ids.clone(), weight.detach().clone()

    out = mk.pad_embedding(ids, weight, padding_idx, backend=backend)
    ref_w = weight.detach().clone().requires_grad_()
    ref = F.embedding(ids, ref_w, padding_idx)
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.equal(_bits(out), _bits(ref))

    grad = torch.randn(out.shape, dtype=torch.float64, device=device).to(dtype)
    (gw,) = torch.autograd.grad(out, weight, grad)
    if padding_idx is not None:
        assert torch.equal(gw[padding_idx], torch.zeros_like(gw[padding_idx]))
    if dtype in (torch.float32, torch.float64):
        # PyTorch's CPU backward adds a row's tokens in token order, like every maskkern backend
        # (its CUDA backward sums in another order): the same bits on any device.
        cpu_w = weight.detach().cpu().requires_grad_()
        (ref_gw,) = torch.autograd.grad(F.embedding(ids.cpu(), cpu_w, padding_idx), cpu_w, grad.cpu())
        assert torch.equal(gw.cpu(), ref_gw)
    else:
        # Eager accumulates fp16/bf16 in fp16/bf16; ours in fp32, rounded once: compare with the
        # sum in fp64 rounded once.
        assert_close(gw, _eager_grad(ids, weight, grad, padding_idx=padding_idx), dtype)
    assert torch.equal(ids, ids_before) and torch.equal(weight.detach(), weight_before)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", [None, 4.5])
@pytest.mark.parametrize("pad", ["first", "negative", "none"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_pad_and_scale(backend, device, pad, scale, dtype):
    padding_idx = PADS[pad]
    ids = _ids((2, 9), device, padding_idx)
    weight = _weight(dtype, device)
    if padding_idx is not None:
        weight.data[padding_idx] = float("nan")  # never read under zero_pad
    out = mk.pad_embedding(ids, weight, padding_idx, zero_pad=True, scale=scale, backend=backend)
    ref = reference.pad_embedding(ids, weight.detach(), padding_idx, zero_pad=True, scale=scale)
    assert torch.equal(_bits(out), _bits(ref))
    if padding_idx is not None:
        pads = ids == padding_idx % V
        assert torch.equal(_bits(out[pads]), _bits(torch.zeros_like(out[pads])))

    grad = torch.randn(out.shape, dtype=torch.float64, device=device).to(dtype)
    (gw,) = torch.autograd.grad(out, weight, grad)
    ref_gw = _eager_grad(ids, weight, grad, padding_idx=padding_idx, zero_pad=True, scale=scale)
    # The kernels sum a row's tokens, then scale once; eager scales each token: not the same
    # roundings, hence the tolerance (the kernels' result is the more accurate one).
    assert_close(gw, ref_gw, dtype, scale=10.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_scale_grad_by_freq(backend, device, dtype):
    ids = _ids((4, 8), device, pad=2, num=5)  # 5 ids over 32 tokens: many repeats
    weight = _weight(dtype, device, num=5)
    out = mk.pad_embedding(ids, weight, 2, scale_grad_by_freq=True, backend=backend)
    grad = torch.randn(out.shape, dtype=torch.float64, device=device).to(dtype)
    (gw,) = torch.autograd.grad(out, weight, grad)
    ref_gw = _eager_grad(ids, weight, grad, padding_idx=2, scale_grad_by_freq=True)
    assert torch.equal(gw[2], torch.zeros_like(gw[2]))
    assert_close(gw, ref_gw, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_many_repeats(backend, device, dtype):
    """A few hot rows take hundreds of tokens each (the contention case of atomic backwards)."""
    ids = _ids((6, 50), device, pad=0, num=4)
    weight = _weight(dtype, device, num=4, dim=40)
    out = mk.pad_embedding(ids, weight, 0, backend=backend)
    grad = torch.randn(out.shape, dtype=torch.float64, device=device).to(dtype)
    (gw,) = torch.autograd.grad(out, weight, grad)
    assert_close(gw, _eager_grad(ids, weight, grad, padding_idx=0), dtype, scale=10.0)


@pytest.mark.parametrize("zero_pad", [False, True])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_pad_batch(backend, device, zero_pad):
    ids = torch.full((3, 5), 4, device=device)
    weight = _weight(torch.float32, device)
    out = mk.pad_embedding(ids, weight, 4, zero_pad=zero_pad, backend=backend)
    expected = torch.zeros(3, 5, D, device=device) if zero_pad else weight.detach()[4].expand(3, 5, D)
    assert torch.equal(out, expected)
    out.backward(torch.randn_like(out))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty(backend, device, shape):
    ids = torch.zeros(shape, dtype=torch.int64, device=device)
    weight = _weight(torch.float32, device)
    out = mk.pad_embedding(ids, weight, 0, backend=backend)
    assert out.shape == (*shape, D)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    empty_dim = mk.pad_embedding(_ids((2, 3), device), _weight(torch.float32, device, dim=0), backend=backend)
    assert empty_dim.shape == (2, 3, 0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_ids_and_weight(backend, device):
    ids = _ids((7, 3), device, pad=1).t()  # (3, 7), transposed storage
    big = _weight(torch.float32, device, dim=D + 5, requires_grad=False)
    for weight in (big[:, 2 : 2 + D], big.t().contiguous().t()[:, :D]):  # row stride != D; column stride != 1
        weight = weight.detach().requires_grad_()
        assert not ids.is_contiguous() and not weight.is_contiguous()
        out = mk.pad_embedding(ids, weight, 1, scale=0.5, backend=backend)
        ref_w = weight.detach().clone().requires_grad_()
        ref = reference.pad_embedding(ids, ref_w, 1, scale=0.5)
        assert torch.equal(out, ref)
        g = torch.randn(D, 3, 7, device=device).permute(1, 2, 0)  # a strided grad
        (gw,) = torch.autograd.grad(out, weight, g)
        (ref_gw,) = torch.autograd.grad(ref, ref_w, g)
        assert_close(gw, ref_gw, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_IDS)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic(backend, device, dtype):
    """Two runs (and, on CPU, 1 or 2 threads) give the same bits."""
    ids = _ids((8, 40), device, pad=0, num=6)
    weight = _weight(dtype, device, num=6, dim=33)
    grad = torch.randn(8, 40, 33, device=device).to(dtype)

    def run():
        out = mk.pad_embedding(ids, weight, 0, scale_grad_by_freq=True, backend=backend)
        return _bits(torch.autograd.grad(out, weight, grad)[0])

    first = run()
    assert torch.equal(run(), first)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(run(), first)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck_zero_pad(backend, device):
    """Numerical gradcheck holds for the zero_pad form even with the pad present (the plain form
    fails it by design, as F.embedding documents: its analytic pad-row gradient is zero)."""
    ids = _ids((2, 5), device, pad=2, num=6)
    weight = _weight(torch.float64, device, num=6, dim=4)
    fn = lambda w: mk.pad_embedding(ids, w, 2, zero_pad=True, scale=1.5, backend=backend)
    assert torch.autograd.gradcheck(fn, (weight,), fast_mode=False)
    no_pad = _ids((2, 5), device, pad=2, num=6, present=False)
    fn = lambda w: mk.pad_embedding(no_pad, w, 2, scale_grad_by_freq=False, backend=backend)
    assert torch.autograd.gradcheck(fn, (weight,), fast_mode=False)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_range_ids(backend, device):
    weight = _weight(torch.float32, device)
    for bad in (V, -1, 10**6):
        ids = _ids((2, 4), device)
        ids[1, 2] = bad
        with pytest.raises(IndexError, match=f"id {bad}"):
            mk.pad_embedding(ids, weight, backend=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_unchecked_out_of_range_ids_read_nothing(backend, device):
    """check_ids=False: an out-of-range id gives a zero row and no gradient, never a stray access,
    on every backend alike (the torch one included)."""
    weight = _weight(torch.float32, device)
    ids = _ids((2, 4), device)
    ids[0, 1], ids[1, 3] = V, -3
    out = mk.pad_embedding(ids, weight, check_ids=False, backend=backend)
    ok = (ids >= 0) & (ids < V)
    assert torch.equal(out[~ok], torch.zeros_like(out[~ok]))
    assert torch.equal(out[ok], weight.detach()[ids[ok]])
    out.backward(torch.ones_like(out))
    counts = torch.bincount(ids[ok], minlength=V).float()
    assert torch.equal(weight.grad, counts[:, None].expand(V, D))


def _op_samples(device):
    """Arguments of maskkern::pad_embedding as the public function passes them."""
    w = torch.randn(V, D, device=device)
    yield _ids((3, 7), device, pad=0), w, 0, False, 1.0, False, True
    yield _ids((5,), device, pad=4, dtype=torch.int32), w, 4, True, 2.0, True, True
    yield _ids((2, 3), device), w, -1, False, 0.5, False, False


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    for ids, w, pad, zero_pad, scale, freq, check in _op_samples(device):
        for requires_grad in (False, True):
            args = (ids, w.clone().requires_grad_(requires_grad), pad, zero_pad, scale, freq, check, backend)
            torch.library.opcheck(torch.ops.maskkern.pad_embedding.default, args)
        grad = torch.randn(*ids.shape, D, device=device)
        args = (grad, ids, V, pad, scale, freq, backend)
        torch.library.opcheck(torch.ops.maskkern.pad_embedding_backward.default, args)


def test_opcheck_native_kernels():
    if not mk.backends()["cpu"].available:
        pytest.skip("maskkern._C not built")
    ids = _ids((9,), "cpu", pad=2)
    w = torch.randn(V, D)
    torch.library.opcheck(torch.ops.maskkern.pad_embedding_fwd.default, (ids, w, 2, True, 1.5))
    grad = torch.randn(9, D)
    torch.library.opcheck(torch.ops.maskkern.pad_embedding_bwd.default, (grad, ids, V, 2, True, 1.5))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def f(ids, weight):
        y = mk.pad_embedding(ids, weight, 0, zero_pad=True, scale=2.0, backend=backend)
        return (y * y).sum()

    ids = _ids((3, 7), device, pad=0)
    weight = _weight(torch.float32, device)
    assert_compiles_fullgraph(f, (ids, weight), [1], device)


# --- the module ---------------------------------------------------------------------------------


def test_module_is_an_nn_embedding():
    torch.manual_seed(1)
    m = mk.nn.PadEmbedding(V, D, padding_idx=-2)
    torch.manual_seed(1)
    e = torch.nn.Embedding(V, D, padding_idx=-2)
    assert isinstance(m, torch.nn.Embedding) and m.padding_idx == V - 2
    assert torch.equal(m.weight, e.weight) and torch.equal(m.weight[V - 2], torch.zeros(D))
    assert m.state_dict().keys() == e.state_dict().keys()
    e.weight.data.normal_()
    m.load_state_dict(e.state_dict())
    ids = _ids((4, 6), "cpu", pad=V - 2)
    assert torch.equal(m(ids), e(ids))
    e.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="sparse"):
        mk.nn.PadEmbedding(V, D, sparse=True)


def test_module_options_and_repr():
    m = mk.nn.PadEmbedding(V, D, padding_idx=0, zero_pad=True, scale=D**0.5, backend="torch")
    ids = _ids((2, 5), "cpu", pad=0)
    expected = reference.pad_embedding(ids, m.weight, 0, zero_pad=True, scale=D**0.5)
    assert torch.equal(m(ids), expected)
    text = repr(m)
    assert "zero_pad=True" in text and "scale=" in text and "'torch'" in text


def test_module_from_pretrained():
    w = torch.randn(V, D)
    m = mk.nn.PadEmbedding.from_pretrained(w, padding_idx=3, zero_pad=True)
    e = torch.nn.Embedding.from_pretrained(w, padding_idx=3)
    assert type(m) is mk.nn.PadEmbedding and not m.weight.requires_grad and m.zero_pad
    ids = _ids((3, 4), "cpu", pad=3)
    keep = (ids != 3)[..., None]
    assert torch.equal(m(ids), e(ids) * keep)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_module_max_norm(backend, device):
    torch.manual_seed(2)
    m = mk.nn.PadEmbedding(V, D, padding_idx=0, max_norm=1.0, backend=backend).to(device)
    e = torch.nn.Embedding(V, D, padding_idx=0, max_norm=1.0).to(device)
    e.load_state_dict(m.state_dict())
    ids = _ids((3, 4), device, pad=0)
    out, ref = m(ids), e(ids)
    assert torch.equal(m.weight, e.weight)  # the same rows were renormalised in place
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(m.weight.grad, e.weight.grad)


# --- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"input": torch.ones(3, 4)}, TypeError, "input"),
        ({"input": torch.ones(3, dtype=torch.int16)}, TypeError, "input"),
        ({"input": [1, 2]}, TypeError, "input"),
        ({"weight": torch.ones(V, D, dtype=torch.int64)}, TypeError, "weight"),
        ({"weight": torch.ones(V)}, ValueError, "weight"),
        ({"padding_idx": V}, IndexError, "padding_idx"),
        ({"padding_idx": -V - 1}, IndexError, "padding_idx"),
        ({"padding_idx": 1.0}, TypeError, "padding_idx"),
        ({"input": torch.tensor([0, V])}, IndexError, f"id {V}"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"scale": "2"}, TypeError, "scale"),
        ({"backend": "fast"}, ValueError, "backend"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"input": torch.tensor([[0, 1], [2, 3]]), "weight": torch.randn(V, D)} | kwargs
    with pytest.raises(exc, match=match):
        mk.pad_embedding(args.pop("input"), args.pop("weight"), **args)
