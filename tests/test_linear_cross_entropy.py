"""linear_cross_entropy on every backend available here against the eager expression
F.cross_entropy(F.linear(hidden, weight, bias), target) computed in fp64, gradients included."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import maskkern as mk
from maskkern import reference
from maskkern.ops.linear_cross_entropy import CPU_CHUNK_BYTES, auto_chunk_size

from .utils import (
    assert_compiles_fullgraph,
    assert_forward_backward_close,
    backend_device_params,
)

BACKENDS = backend_device_params()
B, T, H, V = 2, 5, 16, 37


def _inputs(dtype, device, bias=True, ignore="some", shape=(B, T)):
    hidden = torch.randn(*shape, H, dtype=torch.float64, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, dtype=torch.float64, device=device) / H**0.5).to(dtype).requires_grad_()
    b = torch.randn(V, dtype=torch.float64, device=device).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, V, shape, device=device)
    if ignore == "some":
        target.view(-1)[::3] = -100
    elif ignore == "all":
        target.fill_(-100)
    return hidden, weight, b, target


def _leaves(hidden, weight, bias):
    return [x for x in (hidden, weight, bias) if x is not None]


def _check(backend, dtype, hidden, weight, bias, target, grad_scale=10.0, **kw):
    before = [x.detach().clone() for x in _leaves(hidden, weight, bias)]
    out = mk.linear_cross_entropy(hidden, weight, target, bias, **kw, backend=backend)
    ref_leaves = [x.detach().double().requires_grad_() for x in _leaves(hidden, weight, bias)]
    ref_bias = ref_leaves[2] if bias is not None else None
    kw.pop("chunk_size", None)
    ref = reference.linear_cross_entropy(ref_leaves[0], ref_leaves[1], target, ref_bias, **kw)
    # bf16: the chunk's logits gradient is rounded to bf16 before the bf16 matmuls, as in eager.
    scale = grad_scale * (4 if dtype == torch.bfloat16 else 1)
    assert_forward_backward_close(out, ref, _leaves(hidden, weight, bias), ref_leaves, dtype, scale)
    for x, b in zip(_leaves(hidden, weight, bias), before, strict=True):
        assert torch.equal(x.detach(), b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_matches_eager_expression(backend, device, reduction, bias, dtype):
    for chunk_size in (None, 1, 4) if backend != "triton" else (4,):
        hidden, weight, b, target = _inputs(dtype, device, bias)
        _check(backend, dtype, hidden, weight, b, target, reduction=reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_against_f_cross_entropy_directly(backend, device):
    hidden, weight, b, target = _inputs(torch.float32, device)
    out = mk.linear_cross_entropy(
        hidden, weight, target, b, label_smoothing=0.1, ignore_index=-100, backend=backend
    )
    ref = F.cross_entropy(F.linear(hidden, weight, b).flatten(0, 1), target.flatten(), label_smoothing=0.1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_smoothing_z_loss_ignore_index(backend, device):
    hidden, weight, b, target = _inputs(torch.float64, device)
    target.view(-1)[::3] = 7  # an ignore_index inside [0, V)
    for reduction in ("mean", "none"):
        _check(
            backend, torch.float64, hidden, weight, b, target, reduction=reduction, label_smoothing=0.2,
            z_loss=0.01, ignore_index=7, chunk_size=3,
        )  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_only_some_inputs_need_grad(backend, device):
    hidden, weight, b, target = _inputs(torch.float32, device)
    weight.requires_grad_(False)
    out = mk.linear_cross_entropy(hidden, weight, target, b, backend=backend)
    gh, gb = torch.autograd.grad(out, (hidden, b))
    ref = reference.linear_cross_entropy(hidden, weight, target, b)
    rh, rb = torch.autograd.grad(ref, (hidden, b))
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gb, rb)
    with torch.no_grad():
        torch.testing.assert_close(mk.linear_cross_entropy(hidden, weight, target, b, backend=backend), ref)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_all_ignored_mean_is_nan_with_zero_grads(backend, device):
    hidden, weight, b, target = _inputs(torch.float32, device, ignore="all")
    out = mk.linear_cross_entropy(hidden, weight, target, b, backend=backend)
    assert out.isnan()
    for g in torch.autograd.grad(out, (hidden, weight, b)):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_and_flat(backend, device):
    hidden, weight, b, target = _inputs(torch.float32, device, shape=(0,))
    out = mk.linear_cross_entropy(hidden, weight, target, b, reduction="sum", backend=backend)
    assert out.item() == 0
    hidden, weight, b, target = _inputs(torch.float32, device, shape=(7,))
    _check(backend, torch.float32, hidden, weight, b, target, chunk_size=2)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gradcheck(backend, device):
    # Small on purpose: gradcheck perturbs every element of hidden, weight and bias.
    hidden = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 5, -100, 2, 2], device=device)
    for reduction in ("mean", "none"):
        fn = lambda h, w, bb, reduction=reduction: mk.linear_cross_entropy(
            h,
            w,
            target,
            bb,
            reduction=reduction,
            label_smoothing=0.1,
            z_loss=0.01,
            chunk_size=2,
            backend=backend,
        )
        assert torch.autograd.gradcheck(fn, (hidden, weight, b))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_opcheck(backend, device):
    hidden, weight, b, target = (x.detach() for x in _inputs(torch.float32, device))
    for reduction, bias, needs in [("mean", b, (True, True, True)), ("none", None, (True, True, False))]:
        for requires_grad in (False, True):
            leaves = [x.clone().requires_grad_(requires_grad) for x in (hidden, weight)]
            args = (
                *leaves,
                target,
                bias,
                -100,
                reduction,
                0.1,
                0.01,
                3,
                *[n and requires_grad for n in needs],
            )
            torch.library.opcheck(torch.ops.maskkern.linear_cross_entropy.default, (*args, backend))
    grad = torch.randn(B, T, device=device)
    args = (grad, hidden, weight, target, b, -100, 0.0, 0.0, 4, True, True, True, backend)
    torch.library.opcheck(torch.ops.maskkern.linear_cross_entropy_backward.default, args)
    # the "sum"/"mean" backward ops (an absent gradient is an empty tensor)
    for grad_loss in (torch.tensor(0.5, device=device), torch.tensor(1.0, device=device)):
        args = (hidden.clone(), weight.clone(), hidden.new_empty(0), grad_loss)
        torch.library.opcheck(torch.ops.maskkern.linear_cross_entropy_scale.default, args)
        torch.library.opcheck(torch.ops.maskkern.linear_cross_entropy_scale_.default, args)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def f(hidden, weight, target, bias):
        return mk.linear_cross_entropy(
            hidden, weight, target, bias, label_smoothing=0.1, chunk_size=4, backend=backend
        )

    hidden, weight, b, target = _inputs(torch.float32, device)
    assert_compiles_fullgraph(f, (hidden, weight, target, b), [0, 1, 3], device)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_retained_graph_and_scaled_loss(backend, device):
    hidden, weight, b, target = _inputs(torch.float32, device)
    loss = mk.linear_cross_entropy(hidden, weight, target, b, backend=backend)
    loss.backward(retain_graph=True)
    once = [x.grad.clone() for x in (hidden, weight, b)]
    (loss * 3).backward()
    for x, g in zip((hidden, weight, b), once, strict=True):
        torch.testing.assert_close(x.grad, 4 * g)


def test_auto_chunk_size():
    cpu = torch.device("cpu")
    assert auto_chunk_size(8192, 32000, 1024, torch.float32, cpu) == CPU_CHUNK_BYTES // (32000 * 4)
    assert auto_chunk_size(10, 32000, 1024, torch.float32, cpu) == 10
    assert auto_chunk_size(8192, 10**9, 1024, torch.float32, cpu) == 1


def test_module():
    hidden, weight, b, target = _inputs(torch.float32, "cpu")
    m = mk.nn.LinearCrossEntropyLoss(reduction="sum", label_smoothing=0.1, chunk_size=3)
    ref = F.cross_entropy(
        F.linear(hidden, weight, b).flatten(0, 1), target.flatten(), reduction="sum", label_smoothing=0.1
    )
    torch.testing.assert_close(m(hidden, weight, target, b), ref)
    assert "chunk_size=3" in repr(m)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden"),
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight"),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, "bias"),
        (lambda a: a.update(target=a["target"][:, :-1]), ValueError, "target"),
        (lambda a: a.update(target=a["target"].float()), TypeError, "target"),
        (lambda a: a["target"].view(-1).__setitem__(0, V), IndexError, "target"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
        (lambda a: a.update(reduction="avg"), ValueError, "reduction"),
        (lambda a: a.update(label_smoothing=-0.1), ValueError, "label_smoothing"),
    ],
)
def test_bad_inputs(change, exc, match):
    hidden, weight, b, target = (x.detach() for x in _inputs(torch.float32, "cpu"))
    args = {"hidden": hidden, "weight": weight, "bias": b, "target": target}
    change(args)
    h, w, t = args.pop("hidden"), args.pop("weight"), args.pop("target")
    with pytest.raises(exc, match=match):
        mk.linear_cross_entropy(h, w, t, **args)


def _ignore_rows(target: torch.Tensor, pattern: str) -> torch.Tensor:
    """Set the targets of ``pattern`` ("none", "spread", "contiguous" or "all") to -100: 0%, 50%
    spread across the batch (a random half), 50% as one block at the end, or 100%."""
    flat = target.view(-1)
    n = flat.numel()
    if pattern == "spread":
        gen = torch.Generator().manual_seed(0)
        flat[torch.randperm(n, generator=gen)[: n // 2].to(flat.device)] = -100
    elif pattern == "contiguous":
        flat[n - n // 2 :] = -100
    elif pattern == "all":
        flat.fill_(-100)
    return target


@pytest.mark.parametrize("pattern", ["none", "spread", "contiguous", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignored_fractions_match_reference(backend, device, reduction, pattern):
    # Only the counted rows are computed: 0%, 50% (spread, contiguous) and 100% ignored, with and
    # without bias, smoothing and z-loss, chunk sizes that split the counted rows unevenly.
    for dtype in (torch.float64, torch.float32):
        for bias, smoothing, z in ((True, 0.0, 0.0), (False, 0.1, 0.0), (True, 0.2, 0.01)):
            for chunk_size in (None, 3) if backend != "triton" else (3,):
                hidden, weight, b, target = _inputs(dtype, device, bias, ignore="none", shape=(3, 8))
                _ignore_rows(target, pattern)
                _check(
                    backend, dtype, hidden, weight, b, target, reduction=reduction,
                    label_smoothing=smoothing, z_loss=z, chunk_size=chunk_size,
                )  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pattern", ["spread", "contiguous", "all"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignored_rows_get_exact_zero_gradient(backend, device, pattern, reduction):
    hidden, weight, b, target = _inputs(torch.float32, device, ignore="none", shape=(4, 6))
    _ignore_rows(target, pattern)
    out = mk.linear_cross_entropy(
        hidden, weight, target, b, reduction=reduction, label_smoothing=0.1, z_loss=0.01, chunk_size=5,
        backend=backend,
    )  # fmt: skip
    # A large incoming gradient everywhere, the ignored positions of "none" included.
    g = torch.full_like(out, 1e30)
    gh, gw, gb = torch.autograd.grad(out, (hidden, weight, b), g)
    ignored = target == -100
    assert torch.equal(gh[ignored], torch.zeros_like(gh[ignored]))
    if reduction == "none":
        assert torch.equal(out[ignored], torch.zeros_like(out[ignored]))
    if pattern == "all":
        assert out.isnan().all() if reduction == "mean" else torch.equal(out, torch.zeros_like(out))
        assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))
    else:
        assert gh[~ignored].abs().sum() > 0 and gw.isfinite().all()


@pytest.mark.parametrize("pattern", ["spread", "all"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph_with_ignored_rows(backend, device, pattern):
    def f(hidden, weight, target, bias):
        return mk.linear_cross_entropy(
            hidden, weight, target, bias, z_loss=0.01, chunk_size=3, backend=backend
        )

    hidden, weight, b, target = _inputs(torch.float32, device, ignore="none")
    _ignore_rows(target, pattern)
    if pattern == "all":  # the mean over no rows is NaN: compare a sum instead
        f_sum = lambda h, w, t, bb: mk.linear_cross_entropy(h, w, t, bb, reduction="sum", backend=backend)
        assert_compiles_fullgraph(f_sum, (hidden, weight, target, b), [0, 1, 3], device)
    else:
        assert_compiles_fullgraph(f, (hidden, weight, target, b), [0, 1, 3], device)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_only_counted_rows_are_computed(backend, device, reduction, monkeypatch):
    # The row kernel (and so the matmuls, whose logits it receives) sees the counted rows only.
    lce = importlib.import_module("maskkern.ops.linear_cross_entropy")  # the name is the function's
    seen = []
    real = lce.row_kernel

    def spy(name):
        kernel = real(name)

        def wrapped(logits, target, valid, *args):
            seen.append((logits.shape[0], bool((target != -100).all()), bool(valid.all())))
            return kernel(logits, target, valid, *args)

        return wrapped

    monkeypatch.setattr(lce, "row_kernel", spy)
    hidden, weight, b, target = _inputs(torch.float32, device, ignore="none", shape=(4, 6))
    _ignore_rows(target, "spread")
    out = mk.linear_cross_entropy(
        hidden, weight, target, b, reduction=reduction, chunk_size=5, backend=backend
    )
    out.sum().backward()
    passes = 2 if reduction == "none" else 1  # "none" recomputes the chunks in backward
    assert sum(rows for rows, _, _ in seen) == passes * 12
    assert all(counted and valid for _, counted, valid in seen)
    assert max(rows for rows, _, _ in seen) == 5
