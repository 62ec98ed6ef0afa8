"""Reliability of every op on every backend that runs on CPU here: the same bits on every run (and,
for the C++ ``cpu`` backend, whatever the number of threads), the same results when called from
several Python threads at once, and inputs that are never written (docs/design.md: "Inputs are never
modified"; ``pad_embedding``'s backward "is deterministic").

Each op variant below makes its inputs (the output gradient fed to backward included) and runs
forward and backward through ``torch.autograd.grad``, which leaves no ``.grad`` behind; a run's
result is the output and the gradients of every input that requires one. The ``cpu`` backend gets
shapes above the C++ kernels' parallel thresholds (csrc/cpu/*.cpp: about 32K elements a task), so
that thread counts change how the work is split; interpreted ``triton`` (about 0.5 ms per program)
gets tiny ones.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

import maskkern as mk

from .utils import available_backends

BACKENDS = available_backends("cpu")
SAME_SIZE_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


class Op(NamedTuple):
    make: Callable[[bool, torch.Generator], dict[str, Tensor]]  # (tiny, rng) -> inputs, "grad_out" too
    forward: Callable[[dict[str, Tensor], str], Tensor]  # (inputs, backend) -> output


def _randn(rng: torch.Generator, *shape: int, grad: bool = False) -> Tensor:
    return torch.randn(shape, generator=rng).requires_grad_(grad)


def _randint(rng: torch.Generator, high: int, *shape: int) -> Tensor:
    return torch.randint(0, high, shape, generator=rng)


def _softmax_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    # 4·4·64 rows of 200 keys: 200K elements, 6x the kernels' 32K-element serial threshold.
    b, h, lq, lk = (2, 2, 3, 5) if tiny else (4, 4, 64, 200)
    return {
        "scores": _randn(rng, b, h, lq, lk, grad=True),
        "mask": torch.rand((b, 1, lq, lk), generator=rng) < 0.8,
        "lengths": _randint(rng, lk + 2, b),
        "query_lengths": _randint(rng, lq + 1, b),
        "grad_out": _randn(rng, b, h, lq, lk),
    }


def _softmax_additive_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    b, h, lq, lk = (2, 2, 3, 5) if tiny else (4, 4, 64, 200)
    return {
        "scores": _randn(rng, b, h, lq, lk, grad=True),
        "mask": _randn(rng, 1, h, lq, lk, grad=True),  # its gradient is summed over the batch
        "grad_out": _randn(rng, b, h, lq, lk),
    }


def _attention_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    # Scores 2·4·64·128: 64K elements.
    b, h, lq, lk, d = (1, 2, 3, 4, 4) if tiny else (2, 4, 64, 128, 32)
    return {
        "q": _randn(rng, b, h, lq, d, grad=True),
        "k": _randn(rng, b, h, lk, d, grad=True),
        "v": _randn(rng, b, h, lk, d, grad=True),
        "mask": torch.rand((lq, lk), generator=rng) < 0.9,
        "lengths": _randint(rng, lk + 1, b),
        "grad_out": _randn(rng, b, h, lq, d),
    }


def _embedding_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    # 8192 tokens of 64: 16 forward tasks of 512 tokens; 50 rows, each summed over ~160 tokens.
    n, v, d = (8, 6, 8) if tiny else (8192, 50, 64)
    return {
        "ids": _randint(rng, v, 2, n // 2),
        "weight": _randn(rng, v, d, grad=True),
        "grad_out": _randn(rng, 2, n // 2, d),
    }


def _cross_entropy_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    # 512 rows of 1000 classes: tasks of 32 rows. The logits are a strided view of a wider buffer
    # (see _cross_entropy), which the kernels must neither read past nor write.
    n, c = (6, 10) if tiny else (512, 1000)
    target = _randint(rng, c, n)
    target[::5] = -100
    return {
        "logits_buffer": _randn(rng, n, c + 3, grad=True),
        "target": target,
        "weight": torch.rand(c, generator=rng),
        "grad_out": torch.tensor(0.75),
    }


def _cross_entropy(x: dict[str, Tensor], backend: str) -> Tensor:
    c = x["weight"].shape[0]
    return mk.masked_cross_entropy(
        x["logits_buffer"][:, :c], x["target"], x["weight"], label_smoothing=0.1, z_loss=1e-3, backend=backend
    )


def _cross_entropy_3d_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    # (N, C, d) logits are copied to rows, and the gradient is computed in place in that copy.
    n, c, d = (2, 7, 3) if tiny else (16, 1000, 32)
    return {
        "logits": _randn(rng, n, c, d, grad=True),
        "target": _randint(rng, c, n, d),
        "mask": torch.rand((n, d), generator=rng) < 0.7,
        "grad_out": _randn(rng, n, d),
    }


def _linear_ce_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    # Two chunks of 128 tokens; each chunk's 128 x 512 logits are two row-kernel tasks.
    n, h, v = (6, 8, 10) if tiny else (256, 64, 512)
    target = _randint(rng, v, n)
    target[::7] = -100
    return {
        "hidden": _randn(rng, n, h, grad=True),
        "weight": _randn(rng, v, h, grad=True),
        "bias": _randn(rng, v, grad=True),
        "target": target,
    }


def _linear_ce_mean_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    return _linear_ce_inputs(tiny, rng) | {"grad_out": torch.tensor(1.5)}


def _linear_ce_none_inputs(tiny: bool, rng: torch.Generator) -> dict[str, Tensor]:
    x = _linear_ce_inputs(tiny, rng)
    return x | {"grad_out": _randn(rng, x["target"].shape[0])}


def _linear_ce(reduction: str) -> Callable[[dict[str, Tensor], str], Tensor]:
    def forward(x: dict[str, Tensor], backend: str) -> Tensor:
        chunk = (x["target"].shape[0] + 1) // 2
        return mk.linear_cross_entropy(
            x["hidden"],
            x["weight"],
            x["target"],
            x["bias"],
            reduction=reduction,
            label_smoothing=0.05,
            z_loss=1e-3,
            chunk_size=chunk,
            backend=backend,
        )

    return forward


OPS = {
    "masked_softmax": Op(
        _softmax_inputs,
        lambda x, backend: mk.masked_softmax(
            x["scores"],
            x["mask"],
            lengths=x["lengths"],
            query_lengths=x["query_lengths"],
            causal="bottom_right",
            scale=0.5,
            backend=backend,
        ),
    ),
    "masked_softmax_additive": Op(
        _softmax_additive_inputs,
        lambda x, backend: mk.masked_softmax(x["scores"], x["mask"], scale=0.3, backend=backend),
    ),
    "attention": Op(
        _attention_inputs,
        lambda x, backend: mk.attention(
            x["q"], x["k"], x["v"], x["mask"], lengths=x["lengths"], causal=True, backend=backend
        ),
    ),
    "pad_embedding": Op(
        _embedding_inputs,
        lambda x, backend: mk.pad_embedding(
            x["ids"], x["weight"], padding_idx=1, scale=2.0, scale_grad_by_freq=True, backend=backend
        ),
    ),
    "masked_cross_entropy": Op(_cross_entropy_inputs, _cross_entropy),
    "masked_cross_entropy_3d_none": Op(
        _cross_entropy_3d_inputs,
        lambda x, backend: mk.masked_cross_entropy(
            x["logits"], x["target"], mask=x["mask"], reduction="none", backend=backend
        ),
    ),
    "linear_cross_entropy": Op(_linear_ce_mean_inputs, _linear_ce("mean")),
    "linear_cross_entropy_none": Op(_linear_ce_none_inputs, _linear_ce("none")),
}
LOSSES = [name for name in OPS if "cross_entropy" in name]  # their backward may scale a buffer in place


def _inputs(name: str, backend: str, seed: int = 0, tiny: bool | None = None) -> dict[str, Tensor]:
    """Tiny inputs for interpreted Triton unless ``tiny`` says otherwise."""
    tiny = backend == "triton" if tiny is None else tiny
    return OPS[name].make(tiny, torch.Generator().manual_seed(seed))


def _run(name: str, x: dict[str, Tensor], backend: str) -> list[Tensor]:
    """Forward and backward: the output, then the gradient of each input that requires one."""
    out = OPS[name].forward(x, backend)
    wrt = [t for t in x.values() if t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, wrt, x["grad_out"])]


def _bits(t: Tensor) -> Tensor:
    """Floats as integers of their size: compared exactly, with no float semantics in the way."""
    return t.contiguous().view(SAME_SIZE_INT[t.element_size()]) if t.is_floating_point() else t


def assert_bit_identical(actual: list[Tensor], expected: list[Tensor]) -> None:
    """Same dtypes, shapes and bits (so -0.0 differs from 0.0, and a NaN equals the same NaN)."""
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"result {i}"
        differ = _bits(a) != _bits(e)
        assert not differ.any(), f"result {i}: {int(differ.sum())} of {a.numel()} elements differ"


@pytest.fixture
def restore_num_threads():
    """The intra-op thread count is process-wide: later tests get back what they had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_repeated_runs_are_bit_identical(name: str, backend: str):
    """No atomics, no reads of uninitialised memory, no order that depends on timing."""
    x = _inputs(name, backend)
    first = _run(name, x, backend)
    assert_bit_identical(_run(name, x, backend), first)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="maskkern._C is not built")
@pytest.mark.parametrize("name", OPS)
def test_cpu_backend_is_bit_identical_across_thread_counts(name: str, restore_num_threads):
    """1, 2 and 3 threads split the rows/tokens differently (3 unevenly); no result may depend on it."""
    x = _inputs(name, "cpu")
    torch.set_num_threads(1)
    serial = _run(name, x, "cpu")
    for threads in (2, 3):
        torch.set_num_threads(threads)
        assert_bit_identical(_run(name, x, "cpu"), serial)


# --- concurrency ---------------------------------------------------------------------------------

WORKERS = 4
CALLS = {"cpu": 8, "torch": 8, "triton": 2}  # per worker; interpreted launches cost ~0.1 s here


@pytest.fixture
def serial_triton_interpreter(monkeypatch):
    """The Triton interpreter is not thread-safe (each launch patches triton.language and sets the
    grid index of one process-global builder), which a GPU launch is: here launches take one lock,
    and everything around them — maskkern's launchers, custom ops and autograd — runs concurrently."""
    from triton.runtime import interpreter

    lock = threading.Lock()
    launch = interpreter.GridExecutor.__call__

    def locked(self, *args, **kwargs):
        with lock:
            return launch(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", locked)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_concurrent_calls_match_serial_calls(name: str, backend: str, request):
    """WORKERS Python threads, each call on its own inputs, forward and backward: the kernels release
    the GIL and may share state (buffers, caches, the intra-op pool) — nothing may leak between calls."""
    if backend == "triton":  # on CPU here: interpreted
        request.getfixturevalue("serial_triton_interpreter")
    # Large inputs only where native kernels (with their intra-op threads) overlap; elsewhere the
    # custom ops and autograd glue run concurrently on tiny ones.
    tiny = backend != "cpu"
    inputs = [_inputs(name, backend, seed, tiny) for seed in range(WORKERS * CALLS[backend])]
    serial = [_run(name, x, backend) for x in inputs]
    with ThreadPoolExecutor(WORKERS) as pool:
        concurrent = list(pool.map(lambda x: _run(name, x, backend), inputs))
    for seed, (c, s) in enumerate(zip(concurrent, serial, strict=True)):
        try:
            assert_bit_identical(c, s)
        except AssertionError as exc:
            raise AssertionError(f"call {seed}: {exc}") from None


# --- inputs are never modified -------------------------------------------------------------------


def _snapshot(x: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: t.detach().clone() for k, t in x.items()}


def assert_unmodified(x: dict[str, Tensor], before: dict[str, Tensor]) -> None:
    for k, t in x.items():
        try:
            assert_bit_identical([t.detach()], [before[k]])
        except AssertionError as exc:
            raise AssertionError(f"input {k!r} was modified: {exc}") from None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPS)
def test_inputs_are_never_modified(name: str, backend: str):
    """Forward and backward write only their own buffers: not the inputs, views of them, or the
    output gradient (which the losses' backward could be tempted to scale in place)."""
    x = _inputs(name, backend)
    before = _snapshot(x)
    _run(name, x, backend)
    assert_unmodified(x, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_loss_backward_through_a_kept_graph(name: str, backend: str):
    """The losses' backward scales a saved gradient buffer in place when the graph is freed after it,
    out of place when it is kept (retain_graph, create_graph). Backward three times through one
    graph — kept, kept, freed — gives the same gradients each time and never writes the user's
    logits (the Liger bug) or the output gradient."""
    x = _inputs(name, backend)
    before = _snapshot(x)
    out = OPS[name].forward(x, backend)
    wrt = [t for t in x.values() if t.requires_grad]
    grads = [
        torch.autograd.grad(out, wrt, x["grad_out"], **kept)
        for kept in ({"retain_graph": True}, {"create_graph": True}, {})
    ]
    for a, b in itertools.pairwise(grads):
        assert_bit_identical([g.detach() for g in b], [g.detach() for g in a])
    assert_unmodified(x, before)
