"""The cpu backend's streamed outputs (csrc/cpu/stream_store.h): outputs of at least 16 MiB are
written with streaming stores, a path the small shapes of the op tests never reach. Odd row lengths
start rows at every alignment, and lengths / causal end their data mid cache line, where the data
and the zero tail share a line; rows of whole cache lines take the softmax's straight-from-registers
path."""

from __future__ import annotations

import pytest
import torch

import maskkern as mk
from maskkern import reference

from .utils import assert_close

STREAM_BYTES = 16 << 20
DTYPES = [torch.float32, torch.bfloat16]
# The softmax streams whole-line rows straight from the registers, a path per dtype width.
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _elements(dtype: torch.dtype) -> int:
    """Just over the streaming threshold for dtype."""
    return STREAM_BYTES // dtype.itemsize + 4096


def _check(out: torch.Tensor, expected: torch.Tensor, leaf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out and its gradient for leaf (for one seeded output gradient) against expected's; returns
    out's gradient."""
    assert_close(out, expected, dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (grad,), (expected_grad,) = torch.autograd.grad(out, leaf, g), torch.autograd.grad(expected, leaf, g)
    assert_close(grad, expected_grad, dtype)
    return grad


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("lk", [2053, 2048])
def test_masked_softmax_streamed(dtype: torch.dtype, lk: int) -> None:
    lq = -(-_elements(dtype) // (2 * lk))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, lq, lk, generator=gen).to(dtype).requires_grad_()
    mask = torch.rand(2, 1, 1, lk, generator=gen) < 0.9
    kwargs = dict(lengths=torch.tensor([lk - 37, 1001]), causal="bottom_right", scale=0.3)
    out = mk.masked_softmax(x, mask, backend="cpu", **kwargs)
    expected = reference.masked_softmax(x, mask, **kwargs)
    assert out.nbytes >= STREAM_BYTES
    _check(out, expected, x, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_cross_entropy_streamed(dtype: torch.dtype) -> None:
    C = 32771
    N = -(-_elements(dtype) // C)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(N, C, generator=gen).to(dtype).requires_grad_()
    target = torch.randint(0, C, (N,), generator=gen)
    target[::3] = -100
    out = mk.masked_cross_entropy(logits, target, label_smoothing=0.1, backend="cpu")
    expected = reference.masked_cross_entropy(logits, target, label_smoothing=0.1)
    assert _check(out, expected, logits, dtype).nbytes >= STREAM_BYTES


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pad_embedding_streamed(dtype: torch.dtype) -> None:
    D = 4099
    rows = -(-_elements(dtype) // D)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, D, generator=gen).to(dtype).requires_grad_()
    ids = torch.randint(0, rows, (rows,), generator=gen)
    ids[::4] = 0
    out = mk.pad_embedding(ids, weight, padding_idx=0, backend="cpu")
    expected = reference.pad_embedding(ids, weight, padding_idx=0)
    assert out.nbytes >= STREAM_BYTES
    assert_close(out, expected, dtype)
    g = torch.randn(out.shape, generator=gen).to(dtype)
    (grad,) = torch.autograd.grad(out, weight, g)
    assert grad.nbytes >= STREAM_BYTES
    # Summed in fp32 and rounded once, as the kernels define it (eager bf16 rounds every add).
    assert_close(grad, reference.pad_embedding_backward(g, ids, rows, 0, 1.0, False), dtype)
