"""masked_cross_entropy on every backend available here against F.cross_entropy (computed in fp64 on
the same input values) and maskkern.reference.masked_cross_entropy (mask, z_loss)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import maskkern as mk
from maskkern import reference
from maskkern._dtypes import compute_dtype
from maskkern.ops.masked_cross_entropy import scale_kernel

from .utils import (
    FLOAT_DTYPES,
    INF_MINUS_INF,
    assert_close,
    assert_compiles_fullgraph,
    assert_forward_backward_close,
    backend_device_params,
)

BACKENDS = backend_device_params()
C = 11
LAYOUTS = {
    "1d": ((C,), ()),
    "2d": ((13, C), (13,)),
    "3d": ((3, C, 5), (3, 5)),
    "4d": ((2, C, 3, 2), (2, 3, 2)),
}
IGNORE = ("none", "some", "all")
# The full reduction × weight × label_smoothing matrix runs inside each test; interpreted Triton gets
# a smaller outer matrix (each program costs about 0.5 ms there).
MATRIX = list(itertools.product(("mean", "sum", "none"), (False, True), (0.0, 0.1)))


def _is_triton(backend: str) -> bool:
    return backend == "triton"


def _logits(shape, dtype, device, requires_grad=True):
    x = (torch.randn(shape, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def _targets(shape, device, ignore="some", ignore_index=-100, n_classes=C):
    t = torch.randint(0, n_classes, shape, device=device)
    if ignore == "some":
        drop = torch.rand(shape, device=device) < 0.4
        if drop.dim():
            drop.view(-1)[0] = True  # at least one ignored and one counted row
            drop.view(-1)[-1] = False
        t = t.masked_fill(drop, ignore_index)
    elif ignore == "all":
        t = torch.full_like(t, ignore_index)
    return t


def _weight(device, n_classes=C):
    return torch.rand(n_classes, dtype=torch.float64, device=device) + 0.25


def _eager(x, t, w, **kw):
    """F.cross_entropy in fp64 on x's values: the ground truth the op must round once from."""
    xr = x.detach().double().requires_grad_()
    out = F.cross_entropy(xr, t.long(), None if w is None else w.double(), **kw)
    return xr, out


def _check_against_eager(backend, x, t, w, dtype, grad_scale=10.0, **kw):
    before = x.detach().clone()
    out = mk.masked_cross_entropy(x, t, None if w is None else w.to(dtype), **kw, backend=backend)
    xr, ref = _eager(x, t, w, **kw)
    # Gradients are O(1/C) differences: an atol on the scale of the incoming gradient.
    assert_forward_backward_close(out, ref, [x], [xr], dtype, grad_scale=grad_scale)
    assert torch.equal(x.detach(), before), "input was modified"


@pytest.mark.parametrize("ignore", IGNORE)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_f_cross_entropy(backend, device, dtype, layout, ignore):
    if _is_triton(backend) and (dtype == torch.float16 or layout in ("1d", "4d")):
        pytest.skip("interpreted Triton: a smaller matrix (bf16 covers the half path)")
    shape, tshape = LAYOUTS[layout]
    for reduction, weighted, smoothing in MATRIX:
        if _is_triton(backend) and weighted != (smoothing > 0):
            continue
        x = _logits(shape, dtype, device)
        t = _targets(tshape, device, ignore)
        w = _weight(device) if weighted else None
        _check_against_eager(backend, x, t, w, dtype, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("ignore_index", [-100, 0, 4, C - 1, 1000, -1])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignore_index_inside_and_outside_range(backend, device, ignore_index):
    x = _logits((17, C), torch.float32, device)
    t = _targets((17,), device, "some", ignore_index)
    for reduction, smoothing in [("mean", 0.2), ("none", 0.0), ("sum", 0.0)]:
        _check_against_eager(
            backend,
            x,
            t,
            _weight(device),
            torch.float32,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=smoothing,
        )


@pytest.mark.parametrize("n_classes", [1, 7, 50257])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vocab_sizes(backend, device, n_classes):
    x = _logits((3, n_classes), torch.float32, device)
    t = torch.randint(0, n_classes, (3,), device=device)
    t[1] = -100
    for reduction, smoothing in [("mean", 0.1), ("none", 0.0)]:
        _check_against_eager(
            backend, x, t, None, torch.float32, reduction=reduction, label_smoothing=smoothing
        )


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_long_rows_half_precision(backend, device):
    """A row longer than one Triton block, in bf16: the looped path and the fp32 accumulation."""
    x = _logits((2, 40000), torch.bfloat16, device)
    t = torch.tensor([123, 39999], device=device)
    _check_against_eager(backend, x, t, None, torch.bfloat16, reduction="sum", label_smoothing=0.05)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_ignored_mean_is_nan_with_zero_grad(backend, device):
    for w, smoothing, z in [(None, 0.0, 0.0), (_weight(device), 0.3, 0.01)]:
        x = _logits((5, C), torch.float32, device)
        t = torch.full((5,), -100, device=device)
        out = mk.masked_cross_entropy(x, t, w, label_smoothing=smoothing, z_loss=z, backend=backend)
        assert out.isnan()
        out.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        if z == 0.0:
            assert F.cross_entropy(x.detach(), t, w, label_smoothing=smoothing).isnan()
        for reduction in ("sum", "none"):
            x.grad = None
            out = mk.masked_cross_entropy(x, t, w, reduction=reduction, z_loss=z, backend=backend)
            assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mask_is_ignore_index_without_a_sentinel(backend, device):
    x = _logits((4, C, 3), torch.float32, device)
    t = torch.randint(0, C, (4, 3), device=device)
    mask = torch.rand(4, 3, device=device) < 0.6
    mask[0, 0] = True
    t[1, 1] = -100  # ignore_index still applies where the mask keeps the target
    mask[1, 1] = True
    w = _weight(device)
    for reduction, smoothing in [("mean", 0.1), ("sum", 0.0), ("none", 0.2)]:
        out = mk.masked_cross_entropy(
            x, t, w.float(), mask=mask, reduction=reduction, label_smoothing=smoothing, backend=backend
        )
        xr, ref = _eager(x, t.masked_fill(~mask, -100), w, reduction=reduction, label_smoothing=smoothing)
        assert_close(out.double(), ref, torch.float32)
        (dx,) = torch.autograd.grad(out.sum(), x)
        (ref_dx,) = torch.autograd.grad(ref.sum(), xr)
        assert_close(dx.double(), ref_dx, torch.float32, scale=10.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_z_loss(backend, device):
    x = _logits((9, C), torch.float64, device)
    t = _targets((9,), device, "some")
    lse = torch.logsumexp(x.detach(), -1)
    valid = t != -100
    base = F.cross_entropy(x.detach(), t)
    manual = base + 1e-2 * (lse[valid] ** 2).mean()  # the z term divides by the count, unweighted
    out = mk.masked_cross_entropy(x, t, z_loss=1e-2, backend=backend)
    torch.testing.assert_close(out, manual)
    w = _weight(device)
    mask = torch.rand(9, device=device) < 0.7
    for reduction, smoothing in [("mean", 0.1), ("sum", 0.0), ("none", 0.3)]:
        kw = dict(mask=mask, reduction=reduction, label_smoothing=smoothing, z_loss=3e-2)
        out = mk.masked_cross_entropy(x, t, w, **kw, backend=backend)
        xr = x.detach().clone().requires_grad_()
        ref = reference.masked_cross_entropy(xr, t, w, **kw)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(ref)
        (dx,) = torch.autograd.grad(out, x, g)
        (ref_dx,) = torch.autograd.grad(ref, xr, g)
        torch.testing.assert_close(dx, ref_dx)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_and_int32(backend, device):
    wide = _logits((6, C + 5), torch.float32, device, requires_grad=False)
    rows = wide[:, 2 : C + 2].requires_grad_()  # row stride > C: read in place, no copy
    transposed = _logits((C, 6), torch.float32, device, requires_grad=False).t().requires_grad_()
    t = _targets((6,), device, "some").int()
    for x in (rows, transposed):
        assert not x.is_contiguous()
        _check_against_eager(backend, x, t, _weight(device), torch.float32, label_smoothing=0.1)
    channels_last = _logits((2, 3, 4, C), torch.float32, device, requires_grad=False).permute(0, 3, 1, 2)
    _check_against_eager(
        backend,
        channels_last.requires_grad_(),
        _targets((2, 3, 4), device).int(),
        None,
        torch.float32,
        reduction="none",
    )


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("shape,tshape", [((0, C), (0,)), ((2, C, 0), (2, 0)), ((0, C, 3), (0, 3))])
def test_empty(backend, device, shape, tshape):
    x = _logits(shape, torch.float32, device)
    t = torch.zeros(tshape, dtype=torch.int64, device=device)
    for reduction in ("mean", "sum", "none"):
        out = mk.masked_cross_entropy(x, t, reduction=reduction, backend=backend)
        ref = F.cross_entropy(x.detach(), t, reduction=reduction)
        torch.testing.assert_close(out, ref, equal_nan=True)
        (dx,) = torch.autograd.grad(out.sum(), x)
        assert dx.shape == x.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_weight_requiring_grad_raises_like_eager(backend, device):
    """Class weights are constants: eager raises when they require grad (under grad mode), so do we."""
    x = _logits((4, C), torch.float32, device)
    t = torch.arange(4, device=device)
    w = torch.rand(C, device=device, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        F.cross_entropy(x, t, w)
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        mk.masked_cross_entropy(x, t, w, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(
            mk.masked_cross_entropy(x, t, w, backend=backend), F.cross_entropy(x, t, w)
        )
    out = mk.masked_cross_entropy(x, t, w.detach(), backend=backend)
    torch.testing.assert_close(out, F.cross_entropy(x, t, w.detach()))


@INF_MINUS_INF
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_and_inf_flow_like_eager(backend, device):
    x = _logits((4, C), torch.float32, device, requires_grad=False)
    x[0, 3] = float("nan")
    x[1, 2] = float("inf")
    x[2, 5] = float("-inf")
    t = torch.tensor([1, 2, 5, 0], device=device)
    out = mk.masked_cross_entropy(x, t, reduction="none", backend=backend)
    ref = F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(out, ref, equal_nan=True)
    # An ignored row is never read: its NaN does not reach the loss.
    t[0] = -100
    assert not mk.masked_cross_entropy(x[[0, 3]], t[[0, 3]], backend=backend).isnan()


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch.")
)
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_half_accuracy_no_worse_than_eager(backend, device, dtype):
    """Errors against an fp64 ground truth on the same half inputs: no worse than eager PyTorch's own
    error at that dtype plus a small margin — for random and for confident predictions, where the
    true-class gradient is a small difference (the case Liger PR #1329 got wrong)."""
    if device == "cpu" and dtype == torch.float16 and _is_triton(backend):
        pytest.skip("bf16 covers the interpreted half path")
    n, c = (8, 300) if _is_triton(backend) else (64, 1000)
    t = torch.randint(0, c, (n,), device=device)
    for confident in (False, True):
        x64 = torch.randn(n, c, dtype=torch.float64, device=device) * 2
        if confident:
            x64[torch.arange(n), t] += 25.0  # softmax(x_y) -> 1
        x = x64.to(dtype).requires_grad_()
        xr, truth = _eager(x, t, None, label_smoothing=0.1)
        (truth_dx,) = torch.autograd.grad(truth, xr)
        errors = {}
        for name, fn in {
            "maskkern": lambda x: mk.masked_cross_entropy(x, t, label_smoothing=0.1, backend=backend),
            "eager": lambda x: F.cross_entropy(x, t, label_smoothing=0.1),
        }.items():
            out = fn(x)
            (dx,) = torch.autograd.grad(out, x)
            true_class = dx[torch.arange(n), t].double()
            errors[name] = (
                (out.double() - truth).abs().item(),
                (dx.double() - truth_dx).abs().max().item(),
                ((true_class - truth_dx[torch.arange(n), t]).abs() / truth_dx[torch.arange(n), t].abs())
                .max()
                .item(),
            )
        ulp = torch.finfo(dtype).eps
        for ours, eager in zip(errors["maskkern"], errors["eager"], strict=True):
            assert ours <= eager + ulp, (errors, confident)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck(backend, device):
    x = _logits((5, 7), torch.float64, device)
    t = torch.tensor([0, -100, 6, 3, 3], device=device)
    w = _weight(device, 7)
    for kw in (
        dict(weight=w, label_smoothing=0.2, z_loss=0.05),
        dict(weight=w, reduction="none", ignore_index=-100),
        dict(reduction="sum", label_smoothing=0.5),
    ):
        fn = lambda x, kw=kw: mk.masked_cross_entropy(x, t, **kw, backend=backend)
        assert torch.autograd.gradcheck(fn, (x,))
    x3 = _logits((2, 4, 3), torch.float64, device)
    t3 = torch.randint(0, 4, (2, 3), device=device)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=device)
    fn = lambda x: mk.masked_cross_entropy(x, t3, mask=mask, z_loss=0.1, label_smoothing=0.1, backend=backend)
    assert torch.autograd.gradcheck(fn, (x3,))


def _op_samples(device, backend):
    x = torch.randn(6, C, device=device)
    t = torch.tensor([0, 3, -100, 10, 5, 5], device=device)
    w = torch.rand(C, device=device)
    mask = torch.tensor([True, True, True, False, True, True], device=device)
    yield x, t, None, None, -100, "mean", 0.0, 0.0
    yield x, t.int().masked_fill(t == -100, 5), w, mask, 5, "none", 0.1, 0.01
    yield x, t, w, None, -100, "sum", 0.2, 0.0
    yield torch.randn(2, C, 3, device=device), t.view(2, 3), w, mask.view(2, 3), -100, "mean", 0.1, 0.1
    yield torch.randn(C, device=device), torch.tensor(4, device=device), None, None, -100, "mean", 0.0, 0.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    for x, *rest in _op_samples(device, backend):
        for requires_grad in (False, True):
            args = (x.clone().requires_grad_(requires_grad), *rest, requires_grad, backend)
            torch.library.opcheck(torch.ops.maskkern.masked_cross_entropy.default, args)
    grad_rows, grad_loss = torch.randn(6, C, device=device), torch.randn(6, device=device)
    valid = torch.tensor([True, False, True, True, False, True], device=device)
    backward = torch.ops.maskkern.masked_cross_entropy_backward.default
    torch.library.opcheck(backward, (grad_rows, grad_loss, valid))
    torch.library.opcheck(backward, (grad_rows, grad_loss[0], valid))
    backward_ = torch.ops.maskkern.masked_cross_entropy_backward_.default
    torch.library.opcheck(backward_, (grad_rows.clone(), grad_loss, valid, backend))
    torch.library.opcheck(backward_, (grad_rows.clone(), grad_loss[0], valid, backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_ops_agree(backend, device):
    """The in-place backward op (the backend's scale_ kernel) gives what the out-of-place one does,
    into the buffer it is given, for one factor per row and for one factor for all rows."""
    grad_rows = torch.randn(6, C, device=device)
    grad_rows[1] = grad_rows[4] = 0  # rows that do not count are zeros
    valid = torch.tensor([True, False, True, True, False, True], device=device)
    for grad_loss in (torch.randn(6, device=device), torch.tensor(0.7, device=device)):
        expected = torch.ops.maskkern.masked_cross_entropy_backward(grad_rows, grad_loss, valid)
        buffer = grad_rows.clone()
        torch.ops.maskkern.masked_cross_entropy_backward_(buffer, grad_loss, valid, backend)
        torch.testing.assert_close(buffer, expected, rtol=0, atol=0)


def test_opcheck_native_kernel():
    if not mk.backends()["cpu"].available:
        pytest.skip("maskkern._C not built")
    x = torch.randn(6, C)
    t = torch.tensor([0, 3, 1, 10, 5, 5])
    valid = torch.tensor([True, False, True, True, True, True])
    op = torch.ops.maskkern.masked_cross_entropy_fwd.default
    torch.library.opcheck(op, (x, t, valid, None, 0.0, 0.0, None, None))
    scales = torch.tensor([0.2, 0.25])
    torch.library.opcheck(op, (x, t, valid, torch.rand(C), 0.1, 0.01, scales, torch.empty(6, C)))
    scale_ = torch.ops.maskkern.masked_cross_entropy_scale_.default
    torch.library.opcheck(scale_, (torch.randn(6, C), valid, torch.randn(6)))
    torch.library.opcheck(scale_, (torch.randn(6, C, dtype=torch.float16), valid, torch.tensor([0.5])))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_scale_kernel_skips_rows_that_do_not_count(backend, device):
    """The in-place backward kernel scales the counted rows (one rounding from fp32, as torch's
    multiply) and leaves the others untouched, whatever their factor; one factor serves all rows."""
    scale_ = scale_kernel(backend)
    valid = torch.tensor([True, False, True, True], device=device)
    for dtype in FLOAT_DTYPES:
        grad = torch.randn(4, 37, dtype=torch.float64).to(dtype).to(device)
        grad[1] = 7  # a row that does not count: left as it is
        cdt = compute_dtype(dtype)
        for factors in ([0.3, float("inf"), 1.0, -2.5], [-0.5]):
            factors = torch.tensor(factors, dtype=cdt, device=device)
            expected = torch.where(valid[:, None], (grad.to(cdt) * factors[:, None]).to(dtype), grad)
            scale_(grad, valid, factors)
            torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("keep_graph", [False, True])
def test_inf_incoming_gradient_at_ignored_rows(backend, device, keep_graph):
    """Eager gives an ignored row a zero gradient whatever the incoming gradient holds there:
    so must we, on the in-place and the out-of-place backward (no 0 * inf = NaN)."""
    x = _logits((5, C), torch.float32, device)
    t = torch.tensor([1, -100, 3, -100, 0], device=device)
    g = torch.tensor([0.5, float("inf"), -1.0, float("nan"), 2.0], device=device)
    ours = mk.masked_cross_entropy(x, t, reduction="none", backend=backend)
    (dx,) = torch.autograd.grad(ours, x, g, retain_graph=keep_graph)
    eager = F.cross_entropy(x, t, reduction="none")
    (dx_eager,) = torch.autograd.grad(eager, x, g)
    assert torch.equal(dx[1], torch.zeros_like(dx[1])) and torch.equal(dx[3], torch.zeros_like(dx[3]))
    torch.testing.assert_close(dx, dx_eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    def f(x, t, w, mask):
        return mk.masked_cross_entropy(x, t, w, mask=mask, label_smoothing=0.1, z_loss=1e-3, backend=backend)

    x = _logits((2, C, 3), torch.float32, device)
    t = _targets((2, 3), device)
    w, mask = _weight(device).float(), torch.rand(2, 3, device=device) < 0.8
    assert_compiles_fullgraph(f, (x, t, w, mask), [0], device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_second_backward_through_retained_graph(backend, device):
    """The saved gradient buffer is handed on (unit gradient) or multiplied out of place: it stays
    valid for another backward, and the accumulated .grad is not an alias that grows with it."""
    x = _logits((4, C), torch.float32, device)
    t = torch.tensor([1, 2, 3, 4], device=device)
    loss = mk.masked_cross_entropy(x, t, backend=backend)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    (loss * 2).backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(x.grad, 4 * once)
    xr = x.detach().requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(xr, t), xr)
    torch.testing.assert_close(once, ref)


def test_no_grad_and_frozen_input_skip_the_gradient():
    x = _logits((4, C), torch.float32, "cpu", requires_grad=False)
    t = torch.tensor([1, 2, 3, 4])
    _, grad = torch.ops.maskkern.masked_cross_entropy(x, t, None, None, -100, "mean", 0.0, 0.0, False, "cpu")
    assert grad.numel() == 0
    with torch.no_grad():
        mk.masked_cross_entropy(x.requires_grad_(), t)


def test_module_matches_cross_entropy_loss():
    w = torch.rand(C)
    ours = mk.nn.MaskedCrossEntropyLoss(w, ignore_index=2, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(w, ignore_index=2, label_smoothing=0.1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, t = torch.randn(7, C), torch.randint(0, C, (7,))
    torch.testing.assert_close(ours(x, t), theirs(x, t))
    mask = torch.rand(7) < 0.5
    mask[0] = True
    z = mk.nn.MaskedCrossEntropyLoss(reduction="sum", z_loss=0.01)
    torch.testing.assert_close(
        z(x, t, mask), reference.masked_cross_entropy(x, t, mask=mask, reduction="sum", z_loss=0.01)
    )
    assert "z_loss=0.01" in repr(z)
    with pytest.raises(ValueError, match="reduction"):
        mk.nn.MaskedCrossEntropyLoss(reduction="avg")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"input": torch.ones(3, C, dtype=torch.int64)}, TypeError, "input"),
        ({"input": torch.tensor(1.0)}, ValueError, "input"),
        ({"target": torch.zeros(3, dtype=torch.float32)}, TypeError, "target"),
        ({"target": torch.zeros(4, dtype=torch.int64)}, ValueError, "target"),
        ({"target": torch.tensor([0, C, 1])}, IndexError, "target"),
        ({"target": torch.tensor([0, -1, 1])}, IndexError, "target"),
        ({"weight": torch.ones(C + 1)}, ValueError, "weight"),
        ({"weight": torch.ones(C, dtype=torch.int64)}, TypeError, "weight"),
        ({"mask": torch.ones(3)}, TypeError, "mask"),
        ({"mask": torch.ones(4, dtype=torch.bool)}, ValueError, "mask"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": float("nan")}, ValueError, "label_smoothing"),
        ({"z_loss": -1.0}, ValueError, "z_loss"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"backend": "fast"}, ValueError, "backend"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"input": torch.randn(3, C), "target": torch.tensor([0, 1, 2])} | kwargs
    x, t = args.pop("input"), args.pop("target")
    weight = args.pop("weight", None)
    with pytest.raises(exc, match=match):
        mk.masked_cross_entropy(x, t, weight, **args)


def test_masked_target_out_of_range_is_fine():
    x = torch.randn(3, C)
    t = torch.tensor([0, 99, 1])
    mask = torch.tensor([True, False, True])
    torch.testing.assert_close(
        mk.masked_cross_entropy(x, t, mask=mask), F.cross_entropy(x[[0, 2]], t[[0, 2]])
    )
