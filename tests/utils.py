"""Helpers shared by the op tests: which backends run on which device, per-dtype tolerances (the
table in maskkern.testing, which the benchmarks use too), and the test bodies every op repeats."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

import maskkern
from maskkern._backend import triton_interpreting
from maskkern.testing import TOL

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# The Triton interpreter computes inf - inf with numpy, which warns; that NaN is what is tested.
INF_MINUS_INF = pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")


def available_backends(device: str) -> list[str]:
    """The backends that run on ``device`` here (triton on CPU only under TRITON_INTERPRET=1)."""
    status = maskkern.backends()
    ok = {name for name, s in status.items() if s.available}
    if device == "cuda":
        candidates = ["triton", "cuda", "torch"]
    else:  # Triton runs CPU tensors only in its interpreter (on a GPU machine it is off)
        candidates = ["cpu", "torch"] + (["triton"] if triton_interpreting() else [])
    return [b for b in candidates if b in ok]


def backend_device_params() -> list[tuple[str, str]]:
    """(backend, device) pairs for parametrize: every backend on every device it can serve."""
    return [(b, d) for d in DEVICES for b in available_backends(d)]


def interpreted_fast_gradcheck(backend: str, device: str) -> bool:
    """gradcheck's fast mode for a Triton kernel run by the CPU interpreter (~0.1 s a call): the
    full Jacobian costs two calls per input element, 20-40 s per small attention case. Fast mode
    checks a random projection of the same Jacobian; each op keeps one full-mode case on the
    interpreter, and every case runs in full mode on the cpu and torch backends."""
    return backend == "triton" and device == "cpu"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=True)


def assert_forward_backward_close(
    out: torch.Tensor,
    ref: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    ref_inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    grad_scale: float = 1.0,
    out_scale: float = 1.0,
) -> None:
    """An op's output ``out`` and its gradients w.r.t. ``inputs`` against the fp64 reference ``ref``
    computed from ``ref_inputs`` (fp64 leaf copies of the inputs), for one random incoming
    gradient: within TOL[dtype], the output's atol scaled by ``out_scale`` and the gradients' by
    ``grad_scale``."""
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out.double(), ref, dtype, scale=out_scale)
    g = torch.randn_like(ref).to(out.dtype)
    grads = torch.autograd.grad(out, list(inputs), g)
    ref_grads = torch.autograd.grad(ref, list(ref_inputs), g.double())
    for i, (a, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert a.shape == r.shape, f"gradient {i}: shape {tuple(a.shape)}, expected {tuple(r.shape)}"
        assert_close(a.double(), r, dtype, scale=grad_scale)


def assert_compiles_fullgraph(
    f: Callable[..., torch.Tensor], args: Sequence[object], wrt: Sequence[int], device: str
) -> None:
    """``torch.compile(f, fullgraph=True)`` (no graph break) gives eager ``f``'s loss and its
    gradients w.r.t. ``args[i]`` for i in ``wrt`` (leaves that require grad)."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, [args[i] for i in wrt])
    ref_args = list(args)
    for i in wrt:
        ref_args[i] = args[i].detach().clone().requires_grad_()
    ref = f(*ref_args)
    ref_grads = torch.autograd.grad(ref, [ref_args[i] for i in wrt])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)
