"""The bad-input catalogue (docs/design.md, Errors): every public op and module, on every backend that runs
on CPU here, raises the documented exception — ValueError, TypeError or IndexError — with a message
that names the argument, before any kernel runs.

One list, CASES, holds the catalogue. The ``torch`` backend is pure Python and runs it in-process.
The native backends (the C++ ``cpu`` kernels, interpreted ``triton``) run it in a subprocess, one per
backend, all started together once per module (``python -m tests.test_bad_inputs BACKEND`` prints one
JSON line per case): a check that lets bad input through to a kernel that then segfaults fails that
case, with the subprocess's return code and stderr, instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import maskkern as mk

from .utils import available_backends

BACKENDS = available_backends("cpu")
IN_PROCESS = {"torch"}  # no native code behind it: a failure cannot take pytest down
ROOT = Path(__file__).resolve().parent.parent
LINE_PREFIX = "CASE "
SUBPROCESS_TIMEOUT_S = 300

V = 5  # rows of every embedding weight, classes of every cross-entropy
HUGE = 2**40  # does not fit in 32 bits: a check that truncates ids/targets to int32 misses it


class Case(NamedTuple):
    id: str
    call: Callable[[str], object]  # makes the bad call on the given backend
    exc: type[Exception]
    match: str  # re.search'ed in the message: names the argument (and the bad value where useful)


def _call(fn: Callable, defaults: dict, overrides: dict) -> Callable[[str], object]:
    """``fn`` on valid ``defaults`` with some arguments replaced or added; on the backend under test
    unless ``overrides`` names one."""
    args = defaults | overrides
    return lambda backend: fn(**({"backend": backend} | args))


def _softmax(**kw):
    return _call(mk.masked_softmax, {"scores": torch.randn(2, 3, 4)}, kw)


def _attention(**kw):
    qkv = {name: torch.randn(2, 3, 4) for name in "qkv"}
    return _call(mk.attention, qkv, kw)


def _embedding(**kw):
    return _call(
        mk.pad_embedding, {"input": torch.tensor([[0, V - 1], [1, 2]]), "weight": torch.randn(V, 4)}, kw
    )


def _cross_entropy(**kw):
    return _call(
        mk.masked_cross_entropy, {"input": torch.randn(3, V), "target": torch.tensor([0, V - 1, 1])}, kw
    )


def _linear_ce(**kw):
    defaults = {
        "hidden": torch.randn(3, 4),
        "weight": torch.randn(V, 4),
        "target": torch.tensor([0, V - 1, 1]),
    }
    return _call(mk.linear_cross_entropy, defaults, kw)


def _module(cls: type, init: dict, *inputs, **forward_kw) -> Callable[[str], object]:
    """Constructs ``cls(**init)`` (on the backend under test) and calls it: a bad argument may be
    caught by either step."""
    return lambda backend: cls(**({"backend": backend} | init))(*inputs, **forward_kw)


def _meta(*shape, dtype=torch.float32):
    """A tensor on another device than the CPU ones next to it (there is no GPU here)."""
    return torch.empty(shape, dtype=dtype, device="meta")


LONG, INT, BOOL, F64 = torch.int64, torch.int32, torch.bool, torch.float64
NAN, INF = float("nan"), float("inf")
T = torch.tensor
# Valid inputs the module cases call with: scores, embedding sizes, logits and targets, hidden and head.
S = torch.randn(2, 3, 4)
EMB = {"num_embeddings": V, "embedding_dim": 4}
X, Y = torch.randn(3, V), T([0, 1, 2])
H, W = torch.randn(3, 4), torch.randn(V, 4)

# fmt: off
CASES = [
    # --- masked_softmax: scores (2, 3, 4) ---------------------------------------------------------
    Case("softmax-int-scores", _softmax(scores=torch.ones(2, 3, 4, dtype=LONG)), TypeError,
         r"^scores .*int64"),
    Case("softmax-bool-scores", _softmax(scores=torch.ones(2, 3, 4, dtype=BOOL)), TypeError,
         r"^scores .*bool"),
    Case("softmax-complex-scores", _softmax(scores=torch.ones(2, 3, 4, dtype=torch.complex64)), TypeError,
         r"^scores .*complex64"),
    Case("softmax-1d-scores", _softmax(scores=torch.randn(4)), ValueError, r"^scores .*\(4,\)"),
    Case("softmax-list-scores", _softmax(scores=[[1.0, 2.0]]), TypeError, r"^scores .*list"),
    Case("softmax-mask-no-broadcast", _softmax(mask=torch.ones(3, 5, dtype=BOOL)), ValueError,
         r"^mask .*\(3, 5\)"),
    Case("softmax-mask-wrong-rank", _softmax(mask=torch.ones(1, 2, 3, 4, dtype=BOOL)), ValueError,
         r"^mask .*\(1, 2, 3, 4\)"),
    Case("softmax-int-mask", _softmax(mask=torch.ones(3, 4, dtype=INT)), TypeError, r"^mask .*int32"),
    Case("softmax-list-mask", _softmax(mask=[[True] * 4] * 3), TypeError, r"^mask .*list"),
    Case("softmax-mask-other-device", _softmax(mask=_meta(3, 4, dtype=BOOL)), ValueError, r"^mask .*meta"),
    Case("softmax-float-lengths", _softmax(lengths=T([1.0, 2.0])), TypeError, r"^lengths .*float32"),
    Case("softmax-bool-lengths", _softmax(lengths=T([True, False])), TypeError, r"^lengths .*bool"),
    Case("softmax-int-lengths", _softmax(lengths=3), TypeError, r"^lengths .*int"),
    Case("softmax-lengths-wrong-shape", _softmax(lengths=T([1, 2, 3])), ValueError, r"^lengths .*\(3,\)"),
    Case("softmax-lengths-2d", _softmax(lengths=T([[1], [2]])), ValueError, r"^lengths .*\(2, 1\)"),
    Case("softmax-lengths-for-2d-scores", _softmax(scores=torch.randn(3, 4), lengths=T([1, 2])), ValueError,
         r"^lengths .*\(2,\)"),
    Case("softmax-lengths-negative", _softmax(lengths=T([1, -1])), ValueError, r"^lengths .*-1"),
    Case("softmax-lengths-very-negative", _softmax(lengths=T([-HUGE, 1])), ValueError,
         rf"^lengths .*-{HUGE}"),
    Case("softmax-lengths-other-device", _softmax(lengths=_meta(2, dtype=LONG)), ValueError,
         r"^lengths .*cpu"),
    Case("softmax-float-query-lengths", _softmax(query_lengths=T([1.0, 2.0])), TypeError, r"^query_lengths "),
    Case("softmax-query-lengths-wrong-shape", _softmax(query_lengths=T([1])), ValueError, r"^query_lengths "),
    Case("softmax-query-lengths-negative", _softmax(query_lengths=T([-5, 1])), ValueError,
         r"^query_lengths .*-5"),
    Case("softmax-causal-unknown", _softmax(causal="diagonal"), ValueError, r"^causal .*diagonal"),
    Case("softmax-causal-int", _softmax(causal=2), ValueError, r"^causal .*2"),
    Case("softmax-scale-nan", _softmax(scale=NAN), ValueError, r"^scale .*nan"),
    Case("softmax-scale-inf", _softmax(scale=INF), ValueError, r"^scale .*inf"),
    Case("softmax-scale-minus-inf", _softmax(scale=-INF), ValueError, r"^scale .*-inf"),
    Case("softmax-scale-str", _softmax(scale="2"), TypeError, r"^scale .*str"),
    Case("softmax-backend-unknown", _softmax(backend="fast"), ValueError, r"^backend .*fast"),
    Case("softmax-backend-not-str", _softmax(backend=1), ValueError, r"^backend "),
    # --- attention: q, k, v (2, 3, 4) -----------------------------------------------------------
    Case("attention-int-q", _attention(q=torch.ones(2, 3, 4, dtype=LONG)), TypeError, r"^q .*int64"),
    Case("attention-bool-q", _attention(q=torch.ones(2, 3, 4, dtype=BOOL)), TypeError, r"^q .*bool"),
    Case("attention-1d-q", _attention(q=torch.randn(4)), ValueError, r"^q .*\(4,\)"),
    Case("attention-list-k", _attention(k=[[1.0] * 4] * 3), TypeError, r"^k .*list"),
    Case("attention-k-dtype", _attention(k=torch.randn(2, 3, 4, dtype=F64)), TypeError, r"^k .*float64"),
    Case("attention-v-dtype", _attention(v=torch.randn(2, 3, 4, dtype=torch.float16)), TypeError,
         r"^v .*float16"),
    Case("attention-k-head-dim", _attention(k=torch.randn(2, 3, 5)), ValueError, r"^k .*\(2, 3, 5\)"),
    Case("attention-v-rows", _attention(v=torch.randn(2, 5, 4)), ValueError, r"^v .*\(2, 5, 4\)"),
    Case("attention-batch-no-broadcast", _attention(k=torch.randn(3, 3, 4), v=torch.randn(3, 3, 4)),
         ValueError, r"\bq\b.*\bk\b.*\bv\b.*broadcast"),
    Case("attention-v-other-device", _attention(v=_meta(2, 3, 4)), ValueError, r"^v .*meta"),
    Case("attention-mask-no-broadcast", _attention(mask=torch.ones(3, 5, dtype=BOOL)), ValueError,
         r"^mask .*\(3, 5\)"),
    Case("attention-int-mask", _attention(mask=torch.ones(3, 3, dtype=torch.uint8)), TypeError,
         r"^mask .*uint8"),
    Case("attention-float-lengths", _attention(lengths=T([1.0, 2.0])), TypeError, r"^lengths "),
    Case("attention-lengths-wrong-shape", _attention(lengths=T([1, 2, 3])), ValueError, r"^lengths .*\(3,\)"),
    Case("attention-lengths-for-2d-scores", _attention(q=torch.randn(3, 4), k=torch.randn(3, 4),
         v=torch.randn(3, 4), lengths=T([1, 2])), ValueError, r"^lengths .*\(2,\)"),
    Case("attention-lengths-negative", _attention(lengths=T([-1, 1])), ValueError, r"^lengths .*-1"),
    Case("attention-query-lengths-negative", _attention(query_lengths=T([2, -HUGE])), ValueError,
         rf"^query_lengths .*-{HUGE}"),
    Case("attention-causal-unknown", _attention(causal="bottom-right"), ValueError,
         r"^causal .*bottom-right"),
    Case("attention-scale-inf", _attention(scale=INF), ValueError, r"^scale .*inf"),
    Case("attention-scale-nan", _attention(scale=NAN), ValueError, r"^scale .*nan"),
    Case("attention-backend-unknown", _attention(backend="fast"), ValueError, r"^backend .*fast"),
    # --- pad_embedding: ids (2, 2) in [0, V), weight (V, 4) -------------------------------------
    Case("embedding-float-ids", _embedding(input=T([[0.0, 1.0]])), TypeError, r"^input .*float32"),
    Case("embedding-bool-ids", _embedding(input=T([True, False])), TypeError, r"^input .*bool"),
    Case("embedding-list-ids", _embedding(input=[0, 1]), TypeError, r"^input .*list"),
    Case("embedding-id-equal-V", _embedding(input=T([[0, V]])), IndexError, rf"^input .*\b{V}\b"),
    Case("embedding-id-negative", _embedding(input=T([[0, -1]])), IndexError, r"^input .*-1"),
    Case("embedding-id-huge", _embedding(input=T([HUGE, 0])), IndexError, rf"^input .*\b{HUGE}\b"),
    Case("embedding-id-very-negative", _embedding(input=T([0, -HUGE])), IndexError, rf"^input .*-{HUGE}"),
    Case("embedding-int32-id-max", _embedding(input=T([2**31 - 1], dtype=INT)), IndexError,
         r"^input .*2147483647"),
    Case("embedding-int-weight", _embedding(weight=torch.ones(V, 4, dtype=LONG)), TypeError,
         r"^weight .*int64"),
    Case("embedding-1d-weight", _embedding(weight=torch.randn(V)), ValueError, r"^weight .*\(5,\)"),
    Case("embedding-3d-weight", _embedding(weight=torch.randn(V, 4, 2)), ValueError,
         r"^weight .*\(5, 4, 2\)"),
    Case("embedding-list-weight", _embedding(weight=[[1.0] * 4] * V), TypeError, r"^weight .*list"),
    Case("embedding-ids-other-device", _embedding(input=_meta(2, dtype=LONG)), ValueError, r"^input .*meta"),
    Case("embedding-padding-idx-V", _embedding(padding_idx=V), IndexError, rf"^padding_idx .*got {V}"),
    Case("embedding-padding-idx-below", _embedding(padding_idx=-V - 1), IndexError,
         rf"^padding_idx .*got -{V + 1}"),
    Case("embedding-padding-idx-huge", _embedding(padding_idx=HUGE), IndexError,
         rf"^padding_idx .*got {HUGE}"),
    Case("embedding-padding-idx-float", _embedding(padding_idx=1.5), TypeError, r"^padding_idx .*float"),
    Case("embedding-padding-idx-bool", _embedding(padding_idx=True), TypeError, r"^padding_idx .*bool"),
    Case("embedding-scale-nan", _embedding(scale=NAN), ValueError, r"^scale .*nan"),
    Case("embedding-scale-inf", _embedding(scale=INF), ValueError, r"^scale .*inf"),
    Case("embedding-scale-bool", _embedding(scale=True), TypeError, r"^scale .*bool"),
    Case("embedding-backend-unknown", _embedding(backend="fast"), ValueError, r"^backend .*fast"),
    # --- masked_cross_entropy: logits (3, V), target (3,) ---------------------------------------
    Case("ce-int-input", _cross_entropy(input=torch.ones(3, V, dtype=LONG)), TypeError, r"^input .*int64"),
    Case("ce-bool-input", _cross_entropy(input=torch.ones(3, V, dtype=BOOL)), TypeError, r"^input .*bool"),
    Case("ce-0d-input", _cross_entropy(input=T(1.0)), ValueError, r"^input .*0-d"),
    Case("ce-float-target", _cross_entropy(target=T([0.0, 1.0, 2.0])), TypeError, r"^target .*float32"),
    Case("ce-list-target", _cross_entropy(target=[0, 1, 2]), TypeError, r"^target .*list"),
    Case("ce-target-wrong-shape", _cross_entropy(target=T([0, 1])), ValueError, r"^target .*\(2,\)"),
    Case("ce-target-equal-C", _cross_entropy(target=T([0, V, 1])), IndexError, rf"^target .*got {V}$"),
    Case("ce-target-negative", _cross_entropy(target=T([0, -1, 1])), IndexError, r"^target .*got -1$"),
    Case("ce-target-huge", _cross_entropy(target=T([HUGE, 0, 1])), IndexError, rf"^target .*got {HUGE}$"),
    Case("ce-target-very-negative", _cross_entropy(target=T([0, 1, -HUGE])), IndexError,
         rf"^target .*got -{HUGE}$"),
    Case("ce-uint8-target-out-of-range", _cross_entropy(target=T([0, 255, 1], dtype=torch.uint8)), IndexError,
         r"^target .*got 255$"),
    Case("ce-int32-target-max", _cross_entropy(target=T([0, 2**31 - 1, 1], dtype=INT)), IndexError,
         r"^target .*got 2147483647$"),
    Case("ce-target-out-of-range-3d",
         _cross_entropy(input=torch.randn(2, V, 3), target=T([[0, 1, 2], [3, 4, 7]])),
         IndexError, r"^target .*got 7$"),
    Case("ce-target-other-device", _cross_entropy(target=_meta(3, dtype=LONG)), ValueError,
         r"^target .*meta"),
    Case("ce-weight-wrong-size", _cross_entropy(weight=torch.ones(V + 1)), ValueError, r"^weight .*\(6,\)"),
    Case("ce-int-weight", _cross_entropy(weight=torch.ones(V, dtype=LONG)), TypeError, r"^weight .*int64"),
    Case("ce-weight-other-device", _cross_entropy(weight=_meta(V)), ValueError, r"^weight .*meta"),
    Case("ce-list-weight", _cross_entropy(weight=[1.0] * V), TypeError, r"^weight .*list"),
    Case("ce-float-mask", _cross_entropy(mask=torch.ones(3)), TypeError, r"^mask .*float32"),
    Case("ce-mask-wrong-shape", _cross_entropy(mask=torch.ones(4, dtype=BOOL)), ValueError,
         r"^mask .*\(4,\)"),
    Case("ce-reduction-unknown", _cross_entropy(reduction="avg"), ValueError, r"^reduction .*avg"),
    Case("ce-reduction-none-object", _cross_entropy(reduction=None), ValueError, r"^reduction .*None"),
    Case("ce-label-smoothing-negative", _cross_entropy(label_smoothing=-0.1), ValueError,
         r"^label_smoothing .*-0.1"),
    Case("ce-label-smoothing-above-one", _cross_entropy(label_smoothing=1.5), ValueError,
         r"^label_smoothing .*1.5"),
    Case("ce-label-smoothing-nan", _cross_entropy(label_smoothing=NAN), ValueError,
         r"^label_smoothing .*nan"),
    Case("ce-z-loss-negative", _cross_entropy(z_loss=-1.0), ValueError, r"^z_loss .*-1"),
    Case("ce-ignore-index-float", _cross_entropy(ignore_index=1.5), TypeError, r"^ignore_index .*float"),
    Case("ce-ignore-index-bool", _cross_entropy(ignore_index=True), TypeError, r"^ignore_index .*bool"),
    Case("ce-backend-unknown", _cross_entropy(backend="fast"), ValueError, r"^backend .*fast"),
    # --- linear_cross_entropy: hidden (3, 4), weight (V, 4), target (3,) ------------------------
    Case("lce-int-hidden", _linear_ce(hidden=torch.ones(3, 4, dtype=LONG)), TypeError, r"^hidden .*int64"),
    Case("lce-0d-hidden", _linear_ce(hidden=T(1.0)), ValueError, r"^hidden .*0-d"),
    Case("lce-weight-wrong-hidden-size", _linear_ce(weight=torch.randn(V, 3)), ValueError,
         r"^weight .*\(5, 3\)"),
    Case("lce-weight-dtype", _linear_ce(weight=torch.randn(V, 4, dtype=F64)), TypeError,
         r"^weight .*float64"),
    Case("lce-weight-other-device", _linear_ce(weight=_meta(V, 4)), ValueError, r"^weight .*meta"),
    Case("lce-list-weight", _linear_ce(weight=[[0.0] * 4] * V), TypeError, r"^weight .*list"),
    Case("lce-int-weight", _linear_ce(weight=torch.ones(V, 4, dtype=LONG)), TypeError, r"^weight .*int64"),
    Case("lce-bias-wrong-shape", _linear_ce(bias=torch.randn(V + 1)), ValueError, r"^bias .*\(6,\)"),
    Case("lce-bias-other-device", _linear_ce(bias=_meta(V)), ValueError, r"^bias .*meta"),
    Case("lce-list-bias", _linear_ce(bias=[0.0] * V), TypeError, r"^bias .*list"),
    Case("lce-float-target", _linear_ce(target=T([0.0, 1.0, 2.0])), TypeError, r"^target .*float32"),
    Case("lce-target-wrong-shape", _linear_ce(target=T([[0, 1, 2]])), ValueError, r"^target .*\(1, 3\)"),
    Case("lce-target-other-device", _linear_ce(target=_meta(3, dtype=LONG)), ValueError, r"^target .*meta"),
    Case("lce-target-equal-V", _linear_ce(target=T([0, V, 1])), IndexError, rf"^target .*got {V}$"),
    Case("lce-target-huge", _linear_ce(target=T([0, 1, HUGE])), IndexError, rf"^target .*got {HUGE}$"),
    Case("lce-target-very-negative", _linear_ce(target=T([-HUGE, 1, 2])), IndexError,
         rf"^target .*got -{HUGE}$"),
    Case("lce-target-negative-none-reduction", _linear_ce(target=T([0, -2, 1]), reduction="none"), IndexError,
         r"^target .*got -2$"),
    Case("lce-reduction-unknown", _linear_ce(reduction="avg"), ValueError, r"^reduction .*avg"),
    Case("lce-label-smoothing-negative", _linear_ce(label_smoothing=-0.5), ValueError,
         r"^label_smoothing .*-0.5"),
    Case("lce-label-smoothing-above-one", _linear_ce(label_smoothing=2.0), ValueError,
         r"^label_smoothing .*2.0"),
    Case("lce-ignore-index-float", _linear_ce(ignore_index=0.5), TypeError, r"^ignore_index .*float"),
    Case("lce-z-loss-inf", _linear_ce(z_loss=INF), ValueError, r"^z_loss .*inf"),
    Case("lce-chunk-size-zero", _linear_ce(chunk_size=0), ValueError, r"^chunk_size .*0"),
    Case("lce-backend-unknown", _linear_ce(backend="fast"), ValueError, r"^backend .*fast"),
    # --- modules: constructed on the backend under test, then called on valid inputs ------------
    Case("MaskedSoftmax-causal-unknown", _module(mk.nn.MaskedSoftmax, {"causal": "diagonal"}), ValueError,
         r"^causal .*diagonal"),
    Case("MaskedSoftmax-dim", _module(mk.nn.MaskedSoftmax, {"dim": 1}), ValueError, r"^dim .*1"),
    Case("MaskedSoftmax-scale-nan", _module(mk.nn.MaskedSoftmax, {"scale": NAN}, S), ValueError,
         r"^scale .*nan"),
    Case("MaskedSoftmax-lengths-negative", _module(mk.nn.MaskedSoftmax, {}, S, lengths=T([0, -3])),
         ValueError, r"^lengths .*-3"),
    Case("MaskedSoftmax-int-scores", _module(mk.nn.MaskedSoftmax, {}, S.to(INT)), TypeError,
         r"^scores .*int32"),
    Case("MaskedSoftmax-backend-unknown", _module(mk.nn.MaskedSoftmax, {"backend": "fast"}, S), ValueError,
         r"^backend .*fast"),
    Case("PadEmbedding-padding-idx-V", _module(mk.nn.PadEmbedding, EMB | {"padding_idx": V}), IndexError,
         rf"^padding_idx .*got {V}"),
    Case("PadEmbedding-padding-idx-below", _module(mk.nn.PadEmbedding, EMB | {"padding_idx": -V - 1}),
         IndexError, rf"^padding_idx .*got -{V + 1}"),
    Case("PadEmbedding-padding-idx-float", _module(mk.nn.PadEmbedding, EMB | {"padding_idx": 1.5}), TypeError,
         r"^padding_idx .*float"),
    Case("PadEmbedding-sparse", _module(mk.nn.PadEmbedding, EMB | {"sparse": True}), ValueError, r"^sparse "),
    Case("PadEmbedding-float-ids", _module(mk.nn.PadEmbedding, EMB, T([0.0, 1.0])), TypeError,
         r"^input .*float32"),
    Case("PadEmbedding-id-huge", _module(mk.nn.PadEmbedding, EMB, T([0, HUGE])), IndexError,
         rf"^input .*\b{HUGE}\b"),
    Case("PadEmbedding-scale-inf", _module(mk.nn.PadEmbedding, EMB | {"scale": INF}, T([0, 1])), ValueError,
         r"^scale .*inf"),
    Case("MaskedCrossEntropyLoss-reduction-unknown",
         _module(mk.nn.MaskedCrossEntropyLoss, {"reduction": "avg"}), ValueError, r"^reduction .*avg"),
    Case("MaskedCrossEntropyLoss-z-loss-negative", _module(mk.nn.MaskedCrossEntropyLoss, {"z_loss": -0.5}),
         ValueError, r"^z_loss .*-0.5"),
    Case("MaskedCrossEntropyLoss-label-smoothing-above-one",
         _module(mk.nn.MaskedCrossEntropyLoss, {"label_smoothing": 1.01}, X, Y), ValueError,
         r"^label_smoothing .*1.01"),
    Case("MaskedCrossEntropyLoss-weight-wrong-size",
         _module(mk.nn.MaskedCrossEntropyLoss, {"weight": torch.ones(V - 1)}, X, Y), ValueError,
         r"^weight .*\(4,\)"),
    Case("MaskedCrossEntropyLoss-float-target", _module(mk.nn.MaskedCrossEntropyLoss, {}, X, Y.float()),
         TypeError, r"^target .*float32"),
    Case("MaskedCrossEntropyLoss-target-huge", _module(mk.nn.MaskedCrossEntropyLoss, {}, X, T([0, HUGE, 2])),
         IndexError, rf"^target .*got {HUGE}$"),
    Case("MaskedCrossEntropyLoss-mask-wrong-shape",
         _module(mk.nn.MaskedCrossEntropyLoss, {}, X, Y, torch.ones(3, 1, dtype=BOOL)), ValueError,
         r"^mask .*\(3, 1\)"),
    Case("LinearCrossEntropyLoss-reduction-unknown",
         _module(mk.nn.LinearCrossEntropyLoss, {"reduction": "max"}), ValueError, r"^reduction .*max"),
    Case("LinearCrossEntropyLoss-label-smoothing-negative",
         _module(mk.nn.LinearCrossEntropyLoss, {"label_smoothing": -1.0}), ValueError,
         r"^label_smoothing .*-1"),
    Case("LinearCrossEntropyLoss-z-loss-nan", _module(mk.nn.LinearCrossEntropyLoss, {"z_loss": NAN}),
         ValueError, r"^z_loss .*nan"),
    Case("LinearCrossEntropyLoss-chunk-size-zero",
         _module(mk.nn.LinearCrossEntropyLoss, {"chunk_size": 0}, H, W, Y), ValueError, r"^chunk_size .*0"),
    Case("LinearCrossEntropyLoss-target-very-negative",
         _module(mk.nn.LinearCrossEntropyLoss, {}, H, W, T([0, -HUGE, 2])), IndexError,
         rf"^target .*got -{HUGE}$"),
]
# fmt: on


def outcome(case: Case, backend: str) -> dict:
    """What ``case`` raised on ``backend``: the exception's class names (its MRO, so that a subclass
    of the documented type passes) and its message; no names when nothing was raised."""
    try:
        case.call(backend)
    except Exception as exc:
        return {"id": case.id, "types": [t.__name__ for t in type(exc).__mro__], "message": str(exc)}
    return {"id": case.id, "types": [], "message": "(no exception raised)"}


class NativeRun(NamedTuple):
    outcomes: dict[str, dict]
    returncode: int | None
    stderr: str


@pytest.fixture(scope="module")
def native_runs() -> dict[str, NativeRun]:
    """The catalogue on each native backend, each in its own subprocess, the subprocesses running
    at the same time; whatever lines a crashed one printed before dying are kept."""
    native = [b for b in BACKENDS if b not in IN_PROCESS]
    # The subprocess imports the maskkern this process imported (under `make sanitize`, the
    # instrumented copy), then finds this checkout's tests package.
    package_root = str(Path(mk.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (package_root, str(ROOT), os.environ.get("PYTHONPATH")) if p)
    procs = {
        b: subprocess.Popen(
            [sys.executable, "-m", "tests.test_bad_inputs", b],
            cwd=package_root,
            env={**os.environ, "PYTHONPATH": path},  # and TRITON_INTERPRET, which conftest.py set
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for b in native
    }
    runs = {}
    for backend, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += f"\n(killed after {SUBPROCESS_TIMEOUT_S} s)"
        lines = [
            json.loads(s.removeprefix(LINE_PREFIX)) for s in stdout.splitlines() if s.startswith(LINE_PREFIX)
        ]
        runs[backend] = NativeRun({o["id"]: o for o in lines}, proc.returncode, stderr)
    return runs


def test_catalogue_is_well_formed():
    """Ids name the tests and key the subprocess's lines; only the documented types are expected."""
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert {c.exc for c in CASES} <= {ValueError, TypeError, IndexError}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, backend: str, request):
    """The documented exception type (or a subclass), with the argument's name in its message."""
    if backend in IN_PROCESS:
        result = outcome(case, backend)
    else:
        run = request.getfixturevalue("native_runs")[backend]
        if case.id not in run.outcomes:
            pytest.fail(
                f"the {backend} subprocess gave no result for {case.id}: return code {run.returncode}, "
                f"stderr:\n{run.stderr[-4000:]}"
            )
        result = run.outcomes[case.id]
    assert case.exc.__name__ in result["types"], (
        f"expected {case.exc.__name__}, got {result['types'][:1] or 'no exception'}: {result['message']}"
    )
    assert re.search(case.match, result["message"]), (
        f"{case.match!r} not in the message {result['message']!r}"
    )


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in IN_PROCESS])
def test_native_subprocess_exits_cleanly(backend: str, native_runs):
    """A crash after the last case (at exit, in a destructor) is a crash too."""
    run = native_runs[backend]
    assert run.returncode == 0, f"return code {run.returncode}, stderr:\n{run.stderr[-4000:]}"


if __name__ == "__main__":
    # The native-backend half of the catalogue (see native_runs): one line per case, flushed at once
    # so that the lines before a crash survive it.
    print(f"maskkern from {mk.__file__}", file=sys.stderr)  # in the failure report
    for c in CASES:
        print(LINE_PREFIX + json.dumps(outcome(c, sys.argv[1])), flush=True)
