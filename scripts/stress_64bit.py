"""Stress test of 64-bit offsets: each C++ CPU kernel (the ``cpu`` backend) on a tensor of more than
2**31 elements, checked chunk by chunk against maskkern.reference / plain torch so that the
reference never holds more than one chunk in fp32. The rows past flat index 2**31 are reported
separately: a 32-bit offset would go wrong exactly there.

Not part of CI or pytest: it needs about 14 GiB of free RAM and several minutes (2 cores).

Usage: .venv/bin/python scripts/stress_64bit.py [--only softmax_fwd softmax_bwd ...] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

import maskkern as mk
from maskkern import reference

LIMIT = 2**31  # one past the largest int32 offset
CHUNK_ELEMENTS = 1 << 25  # elements per reference chunk (128 MiB in fp32)
GIB = 1 << 30
T = TypeVar("T")


@dataclass
class Check:
    """The running comparison of a big result with its reference, fed chunk by chunk.

    Passes when every element has |actual - expected| <= atol + rtol·|expected| (NaN only where
    the reference has NaN). ``worst`` is the largest |actual - expected| / (atol + rtol·|expected|).
    """

    rtol: float
    atol: float
    max_err: float = 0.0
    max_err_tail: float = 0.0  # over elements at flat index >= 2**31
    worst: float = 0.0
    tail_seen: bool = False

    def add(self, actual: Tensor, expected: Tensor, tail: bool) -> None:
        # fp32 holds every fp16/bf16 value and the fp32 references exactly: half the memory of fp64.
        a, e = actual.float(), expected.float()
        diff = (a - e).abs()
        same = (a == e) | (a.isnan() & e.isnan())  # inf == inf, NaN where expected
        diff = diff.masked_fill(same, 0.0).nan_to_num(nan=math.inf)
        err = diff.max().item() if diff.numel() else 0.0
        ratio = (diff / (self.atol + self.rtol * e.abs().nan_to_num(0.0))).max().item() if diff.numel() else 0
        self.max_err, self.worst = max(self.max_err, err), max(self.worst, ratio)
        if tail:
            self.max_err_tail, self.tail_seen = max(self.max_err_tail, err), True

    @property
    def ok(self) -> bool:
        return self.worst <= 1.0 and self.tail_seen


@dataclass
class Result:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    seconds: float
    checks: dict[str, Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def __str__(self) -> str:
        numel = math.prod(self.shape)
        parts = [
            f"{self.name:<22} shape={self.shape} {str(self.dtype).removeprefix('torch.')}",
            f"elements={numel:,} ({numel / LIMIT:.4f} x 2^31)",
            f"kernel {self.seconds:.2f} s",
        ]
        for what, c in self.checks.items():
            parts.append(
                f"{what}: max err {c.max_err:.3g} (past 2^31: {c.max_err_tail:.3g}), worst/tol {c.worst:.3g}"
            )
        parts.append("PASS" if self.ok else "FAIL")
        return "  ".join(parts)


def row_chunks(n_rows: int, row_len: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, past_limit) over rows, CHUNK_ELEMENTS at a time; past_limit when the chunk
    holds an element at flat index >= 2**31."""
    step = max(1, CHUNK_ELEMENTS // max(row_len, 1))
    for start in range(0, n_rows, step):
        end = min(n_rows, start + step)
        yield start, end, end * row_len > LIMIT


def fill_normal_(x: Tensor, gen: torch.Generator, std: float = 1.0) -> Tensor:
    """Normal values in place, a chunk of rows at a time (no fp32 copy of the whole tensor)."""
    rows = x.view(-1, x.shape[-1])
    for start, end, _ in row_chunks(rows.shape[0], rows.shape[1]):
        rows[start:end].normal_(0.0, std, generator=gen)
    return x


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn() and the seconds it took."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


# --- masked_softmax -------------------------------------------------------------------------------

# (1, 1, 33000, 65100) fp16: 2,148,300,000 elements, 4.3 GB; rows 32988.. lie past 2**31.
SOFTMAX_LQ, SOFTMAX_LK = 33000, 65100
SOFTMAX_SCALE, SOFTMAX_LENGTH = 0.5, SOFTMAX_LK - 5
# fp16 results: 2 ulp relative (as tests/utils.TOL), and an atol of one subnormal step (2**-24):
# probabilities are ~1/Lk ~ 1.5e-5, near fp16's subnormal range, where rounding is absolute. A
# 32-bit offset would read another row: errors of the order of the values themselves.
FP16_TOL = (2e-3, 2.0**-24)


def _softmax_keep(mask_rows: Tensor, start: int) -> Tensor:
    """The keep-mask of rows [start, start + len) as the op builds it in-kernel: the bool mask,
    keys j < length, and bottom-right causal j <= i + Lk - Lq (on the full Lq, not the chunk's)."""
    rows = torch.arange(start, start + mask_rows.shape[0])[:, None]
    keys = torch.arange(SOFTMAX_LK)[None, :]
    return mask_rows & (keys < SOFTMAX_LENGTH) & (keys <= rows + SOFTMAX_LK - SOFTMAX_LQ)


def stress_masked_softmax(gen: torch.Generator, state: dict[str, Tensor]) -> Result:
    """Forward with a full (Lq, Lk) bool mask (its offsets are 64-bit too), lengths and bottom-right
    causal; the second-to-last row is fully masked (zeros), the last one fully kept."""
    shape = (1, 1, SOFTMAX_LQ, SOFTMAX_LK)
    scores = fill_normal_(torch.empty(shape, dtype=torch.float16), gen, std=3.0)
    mask = torch.empty(SOFTMAX_LQ, SOFTMAX_LK, dtype=torch.bool)
    for start, end, _ in row_chunks(SOFTMAX_LQ, SOFTMAX_LK):
        mask[start:end] = torch.rand(end - start, SOFTMAX_LK, generator=gen) < 0.9
    mask[-2], mask[-1] = False, True
    lengths = torch.tensor([SOFTMAX_LENGTH])
    out, seconds = timed(
        lambda: mk.masked_softmax(
            scores, mask, lengths=lengths, causal="bottom_right", scale=SOFTMAX_SCALE, backend="cpu"
        )
    )
    check = Check(*FP16_TOL)
    for start, end, tail in row_chunks(SOFTMAX_LQ, SOFTMAX_LK):
        keep = _softmax_keep(mask[start:end], start)
        expected = reference.masked_softmax(scores[0, 0, start:end].float(), keep, scale=SOFTMAX_SCALE)
        check.add(out[0, 0, start:end], expected, tail)
    state["scores"], state["out"] = scores, out  # the backward reuses them (the mask goes here)
    return Result("masked_softmax fwd", shape, torch.float16, seconds, {"out": check})


def stress_masked_softmax_backward(gen: torch.Generator, state: dict[str, Tensor]) -> Result:
    """Backward through the op autograd calls (maskkern::masked_softmax_backward, cpu), on the
    forward's output; the scores' buffer is refilled as the incoming gradient (saves 4.3 GB)."""
    if "out" not in state:
        stress_masked_softmax(gen, state)
    grad, out = fill_normal_(state.pop("scores"), gen), state.pop("out")
    lengths = torch.tensor([SOFTMAX_LENGTH])
    backward = torch.ops.maskkern.masked_softmax_backward
    dx, seconds = timed(lambda: backward(grad, out, lengths, None, 2, SOFTMAX_SCALE, "cpu"))
    check = Check(*FP16_TOL)
    for start, end, tail in row_chunks(SOFTMAX_LQ, SOFTMAX_LK):
        # maskkern.reference.masked_softmax_backward's formula, kept in fp32 (it rounds at the end).
        y, g = out[0, 0, start:end].float(), grad[0, 0, start:end].float()
        yg = y * g
        expected = SOFTMAX_SCALE * (yg - y * yg.sum(-1, keepdim=True))
        check.add(dx[0, 0, start:end], expected, tail)
    return Result("masked_softmax bwd", tuple(out.shape), torch.float16, seconds, {"dx": check})


# --- pad_embedding --------------------------------------------------------------------------------

# Output (524300, 4096) bf16: 2,147,532,800 elements, 4.3 GB; tokens 524288.. lie past 2**31.
# Those tail tokens get their own id (V - 1, used by no other token): a wrong offset there shows
# in that row alone, in the forward and in the backward.
EMB_V, EMB_D = 1000, 4096
EMB_N = LIMIT // EMB_D + 12
EMB_PAD = 0


def _embedding_ids(gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    ids = torch.randint(0, EMB_V - 1, (EMB_N,), generator=gen)
    ids[::97] = EMB_PAD
    ids[LIMIT // EMB_D :] = EMB_V - 1
    return ids.to(dtype)


def stress_pad_embedding(gen: torch.Generator, state: dict[str, Tensor]) -> Result:
    """Forward twice: F.embedding semantics (a copy: exact), then zero_pad with a scale."""
    weight = fill_normal_(torch.empty(EMB_V, EMB_D, dtype=torch.bfloat16), gen)
    ids = _embedding_ids(gen, torch.int64)
    checks: dict[str, Check] = {}
    seconds = 0.0
    for name, kw in (("plain", {}), ("zero_pad,scale", {"zero_pad": True, "scale": 1.5})):
        out, s = timed(lambda kw=kw: mk.pad_embedding(ids, weight, EMB_PAD, backend="cpu", **kw))
        seconds += s
        # Bit-exact: plain is a copy; scaled, both round the exact fp32 product once.
        check = checks[name] = Check(0.0, 0.0)
        for start, end, tail in row_chunks(EMB_N, EMB_D):
            expected = reference.pad_embedding(ids[start:end], weight.float(), EMB_PAD, **kw)
            check.add(out[start:end], expected.to(torch.bfloat16), tail)
        del out
    return Result("pad_embedding fwd", (EMB_N, EMB_D), torch.bfloat16, seconds, checks)


def stress_pad_embedding_backward(gen: torch.Generator, state: dict[str, Tensor]) -> Result:
    """grad (N, D) bf16 of more than 2**31 elements into a dense (V, D) grad_weight."""
    grad = fill_normal_(torch.empty(EMB_N, EMB_D, dtype=torch.bfloat16), gen)
    ids = _embedding_ids(gen, torch.int32)
    backward = torch.ops.maskkern.pad_embedding_backward
    grad_weight, seconds = timed(lambda: backward(grad, ids, EMB_V, EMB_PAD, 1.0, False, "cpu"))
    expected = torch.zeros(EMB_V, EMB_D)
    for start, end, _ in row_chunks(EMB_N, EMB_D):
        keep = ids[start:end] != EMB_PAD
        expected.index_add_(0, ids[start:end][keep].long(), grad[start:end][keep].float())
    # bf16 rounding of fp32 sums of ~500 tokens (2 ulp, as tests/utils.TOL), plus fp32 summation
    # order (the reference adds chunk by chunk): ~1e-4 absolute on rows of |sum| ~ 20.
    check = Check(1.6e-2, 1e-3)
    check.add(grad_weight[: EMB_V - 1], expected[: EMB_V - 1], tail=False)
    check.add(grad_weight[EMB_V - 1 :], expected[EMB_V - 1 :], tail=True)  # the tail tokens' row
    return Result("pad_embedding bwd", (EMB_N, EMB_D), torch.bfloat16, seconds, {"grad_weight": check})


# --- masked_cross_entropy -------------------------------------------------------------------------

# Logits (42800, 50257) bf16: 2,151,000,... elements, 4.3 GB; rows 42730.. lie past 2**31. The
# last row's target is the last class: the tensor's very last element.
CE_N, CE_C = 42800, 50257
CE_SMOOTHING, CE_Z = 0.1, 1e-4
# bf16: 2 ulp relative (as tests/utils.TOL); atol a thousandth of a typical probability 1/C (the
# gradient p - ε/C cancels to ~0 where p ~ ε/C, leaving fp32 noise far below that).
BF16_CE_TOL = (1.6e-2, 1e-3 / CE_C)


def _ce_targets(gen: torch.Generator, n: int, n_classes: int) -> Tensor:
    target = torch.randint(0, n_classes, (n,), generator=gen)
    target[::7] = -100
    target[-1] = n_classes - 1
    return target


def stress_masked_cross_entropy(gen: torch.Generator, state: dict[str, Tensor]) -> Result:
    """Forward (loss and logits gradient in one pass) and backward, reduction "none"."""
    logits = fill_normal_(torch.empty(CE_N, CE_C, dtype=torch.bfloat16), gen, std=2.0).requires_grad_()
    target = _ce_targets(gen, CE_N, CE_C)
    kw = {"label_smoothing": CE_SMOOTHING, "z_loss": CE_Z, "reduction": "none"}

    def run() -> tuple[Tensor, Tensor]:
        loss = mk.masked_cross_entropy(logits, target, backend="cpu", **kw)
        (grad,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
        return loss, grad

    (loss, grad), seconds = timed(run)
    checks = {"loss": Check(*BF16_CE_TOL), "grad": Check(*BF16_CE_TOL)}
    for start, end, tail in row_chunks(CE_N, CE_C):
        x = logits.detach()[start:end].float().requires_grad_()
        expected = reference.masked_cross_entropy(x, target[start:end], **kw)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
        checks["loss"].add(loss.detach()[start:end], expected, tail)
        checks["grad"].add(grad[start:end], expected_grad, tail)
    return Result("masked_cross_entropy", (CE_N, CE_C), torch.bfloat16, seconds, checks)


# --- linear_cross_entropy -------------------------------------------------------------------------

# One chunk of all N tokens: its (N, V) bf16 logits, 2,151,000,... elements, go through the same
# row kernel; H is small so that the matmuls stay cheap.
LCE_N, LCE_V, LCE_H = 42800, 50257, 16


def stress_linear_cross_entropy(gen: torch.Generator, state: dict[str, Tensor]) -> Result:
    hidden = fill_normal_(torch.empty(LCE_N, LCE_H, dtype=torch.bfloat16), gen).requires_grad_()
    weight = fill_normal_(torch.empty(LCE_V, LCE_H, dtype=torch.bfloat16), gen, LCE_H**-0.5).requires_grad_()
    target = _ce_targets(gen, LCE_N, LCE_V)
    kw = {"label_smoothing": CE_SMOOTHING, "z_loss": CE_Z}

    def run() -> tuple[Tensor, Tensor, Tensor]:
        loss = mk.linear_cross_entropy(hidden, weight, target, chunk_size=LCE_N, backend="cpu", **kw)
        return loss, *torch.autograd.grad(loss, (hidden, weight))

    (loss, grad_h, grad_w), seconds = timed(run)
    # The reference: fp32 logits a chunk at a time, the "mean" assembled from per-chunk sums.
    count = int((target != -100).sum())
    w32 = weight.detach().float().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    # bf16 logits, logits gradients and matmul outputs (as eager) against fp32: a few bf16 ulps.
    # The gradients sum terms of size 1/count (times |h| ~ 1 or |W| ~ H**-0.5) that may cancel: an
    # atol of 2 bf16 ulps of one term. A wrong offset makes errors of a whole term.
    term = 2.0**-6 / count
    checks = {
        "loss": Check(1.6e-2, 1e-3),
        "grad_hidden": Check(3e-2, term * LCE_H**-0.5),
        "grad_weight": Check(3e-2, term),
    }
    for start, end, tail in row_chunks(LCE_N, LCE_V):
        h32 = hidden.detach()[start:end].float().requires_grad_()
        part = reference.masked_cross_entropy(h32 @ w32.T, target[start:end], reduction="sum", **kw) / count
        total += part.detach().double()
        part.backward()
        checks["grad_hidden"].add(grad_h[start:end], h32.grad, tail)
    # z_loss under "mean" divides by the count too: the per-chunk sums / count add up to the mean.
    checks["loss"].add(loss.detach(), total, tail=True)
    checks["grad_weight"].add(grad_w, w32.grad, tail=True)
    return Result("linear_cross_entropy", (LCE_N, LCE_V), torch.bfloat16, seconds, checks)


# --- driver ---------------------------------------------------------------------------------------

# name -> (function, GiB it holds at its peak)
STRESS: dict[str, tuple[Callable[[torch.Generator, dict[str, Tensor]], Result], float]] = {
    "softmax_fwd": (stress_masked_softmax, 12.0),
    "softmax_bwd": (stress_masked_softmax_backward, 14.0),
    "embedding_fwd": (stress_pad_embedding, 6.0),
    "embedding_bwd": (stress_pad_embedding_backward, 6.0),
    "cross_entropy": (stress_masked_cross_entropy, 11.0),
    "linear_cross_entropy": (stress_linear_cross_entropy, 7.0),
}


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / (1 << 20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(STRESS), help="run only these")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not mk.backends()["cpu"].available:
        print(f"the cpu backend is not available: {mk.backends()['cpu'].reason}")
        return 1
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {available_gib():.1f} GiB available"
    )
    gen = torch.Generator().manual_seed(0)
    state: dict[str, Tensor] = {}  # the softmax forward hands its tensors to the backward
    failed = False
    for name in args.only or list(STRESS):
        fn, needs = STRESS[name]
        have = available_gib() + sum(t.nbytes for t in state.values()) / GIB
        if have < needs:
            print(f"{name:<22} SKIP: needs ~{needs:.0f} GiB, {have:.1f} GiB available")
            continue
        start = time.perf_counter()
        result = fn(gen, state)
        print(f"{result}  ({time.perf_counter() - start:.0f} s with data and reference)", flush=True)
        failed |= not result.ok
    print("FAIL" if failed else "all PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
