"""Property tests: every public op on every backend that runs on CPU here, for hypothesis-drawn
arguments, against maskkern.reference evaluated in fp64 on fp64 copies of the same inputs.

One strategy per op draws a ``Case``: shapes with 0-, 1- and odd-sized dims, a dtype, memory layouts
(permuted, sliced out of a NaN-filled buffer, broadcast by stride 0) and the op's options. The one
test runs the op, compares its values and the gradients of its float inputs for one random output
gradient with the reference (attention's: q·kᵀ -> reference.masked_softmax -> ·v), and checks that
no input was modified. Tolerances are tests/utils.TOL per dtype; where an op rounds more than once,
the atol is scaled and the comment says why.

Tensor values come from a torch generator seeded by a hypothesis draw, so an example replays from
hypothesis' database or its printed blob; hypothesis shrinks shapes and options, not the values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import maskkern as mk
from maskkern import reference

from .utils import FLOAT_DTYPES, TOL, assert_close, available_backends

BACKENDS = available_backends("cpu")

# Dims are drawn from these (0 and 1; odd sizes below and across the 8/16-lane vector widths of
# the CPU kernels) or as any integer up to the same bound.
SIZES = (0, 1, 2, 3, 5, 17, 33)
MAX_SIZE = max(SIZES)
# The product of the dims that make rows or programs (batch dims, queries, tokens, CE rows,
# embedding rows). Interpreted Triton costs 1-3 ms per program on this machine: it gets small ones.
ROW_BUDGET = {"triton": 12}
DEFAULT_ROW_BUDGET = 300
EXAMPLES = 50

INDEX_DTYPES = (torch.int32, torch.int64)
# Options drawn from a few meaningful values or from a continuous range.
scales = st.one_of(st.sampled_from([1.0, 0.125, 2.0]), st.floats(-3.0, 3.0))


# --- the drawn example ----------------------------------------------------------------------------


@dataclass
class Case:
    """One example: ``getattr(mk, op)(**inputs, **args)`` against ``REFERENCES[op]``.

    ``inputs`` are the float tensors the test differentiates (in ``dtype``, or their own dtype for
    an additive mask); ``args`` everything else, tensors or not. ``out_scale``/``grad_scale``
    multiply TOL's atol for the values and for the gradients; ``fan_in[name]`` is how many terms,
    each rounded to the dtype, the op sums into one element of that input's gradient (beyond what
    the reference does in fp64): a broadcast factor, or the tokens of a matmul over rounded
    logits gradients.
    """

    op: str
    dtype: torch.dtype
    gen: torch.Generator
    inputs: dict[str, Tensor]
    args: dict[str, object] = field(default_factory=dict)
    out_scale: float = 1.0
    grad_scale: float = 1.0
    fan_in: dict[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        # What hypothesis prints for a failing example: shapes, dtypes, strides and options.
        parts = [f"{k}={_show(v)}" for k, v in {**self.inputs, **self.args}.items()]
        return f"{self.op}({', '.join(parts)})  [dtype={_show(self.dtype)}, seed={self.gen.initial_seed()}]"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))  # hypothesis' printer would list the dataclass fields instead


def _show(x: object) -> str:
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if not isinstance(x, Tensor):
        return repr(x)
    text = f"{_show(x.dtype)}{tuple(x.shape)}"
    if not x.is_contiguous():
        text += f" strides={x.stride()}"
    if not x.is_floating_point() and x.numel() <= 12:
        text += f" {x.tolist()}"
    return text


# --- shared strategies and tensor factories --------------------------------------------------------


def sizes(cap: int) -> st.SearchStrategy[int]:
    """A dim size in [0, cap]: one of SIZES, or any integer."""
    cap = min(cap, MAX_SIZE)
    return st.one_of(st.sampled_from([s for s in SIZES if s <= cap]), st.integers(0, cap))


@st.composite
def shapes(draw: st.DrawFn, ndim: int, budget: int) -> tuple[int, ...]:
    """``ndim`` sizes whose product stays within ``budget``, in a drawn order."""
    dims = []
    for _ in range(ndim):
        dims.append(draw(sizes(budget)))
        budget //= max(dims[-1], 1)
    return tuple(draw(st.permutations(dims)))


def fan_in(shape: tuple[int, ...], full_shape: tuple[int, ...]) -> int:
    """How many elements of ``full_shape`` each element of ``shape`` (broadcast to it) meets."""
    n = math.prod(shape)
    return max(1, math.prod(full_shape) // n) if n else 1


@st.composite
def broadcast_shapes(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``shape`` without growing it: a suffix, some dims set to 1."""
    ndim = draw(st.integers(0, len(shape)))
    return tuple(1 if draw(st.booleans()) else s for s in shape[len(shape) - ndim :])


@st.composite
def generators(draw: st.DrawFn) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))


def randn(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, std: float = 1.0) -> Tensor:
    """Normal values drawn in fp64, rounded once to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def rand(gen: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def randint(gen: torch.Generator, high: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.randint(0, max(high, 1), shape, generator=gen).to(dtype)


def _fill_value(dtype: torch.dtype) -> float | int | bool:
    """What surrounds a sliced view: NaN for floats and an out-of-range id for integers, so that a
    kernel reading outside the view shows it in its result (bool: a wrong True is all we can do)."""
    if dtype.is_floating_point:
        return math.nan
    return True if dtype == torch.bool else torch.iinfo(dtype).min


@st.composite
def layouts(draw: st.DrawFn, x: Tensor, expand: bool = True) -> Tensor:
    """``x`` in a drawn memory layout: contiguous; its dims permuted in memory (a transposed view);
    every other element of one dim of a larger buffer (a strided slice); or, with ``expand``, some
    dims broadcast from size 1 by stride 0, as ``expand`` gives (this one changes the values: use
    what it returns)."""
    kinds = ["contiguous"]
    if x.dim():
        kinds += ["permuted", "sliced"] + (["expanded"] if expand and any(s > 1 for s in x.shape) else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "permuted":
        perm = draw(st.permutations(range(x.dim())))
        inverse = sorted(range(x.dim()), key=perm.__getitem__)
        return x.permute(perm).contiguous().permute(inverse)
    if kind == "sliced":
        dim = draw(st.integers(0, x.dim() - 1))
        big = list(x.shape)
        big[dim] = 2 * x.shape[dim] + 1
        index = [slice(None)] * x.dim()
        index[dim] = slice(1, None, 2)
        return torch.full(big, _fill_value(x.dtype), dtype=x.dtype)[tuple(index)].copy_(x)
    if kind == "expanded":
        wide = [d for d, s in enumerate(x.shape) if s > 1]
        narrow = x
        for d in draw(st.lists(st.sampled_from(wide), min_size=1, unique=True)):
            narrow = narrow.narrow(d, 0, 1)
        return narrow.expand(x.shape)
    return x


@st.composite
def lengths_for(draw: st.DrawFn, scores_shape: tuple[int, ...], limit: int) -> Tensor:
    """int ``lengths`` for scores of ``scores_shape``: (B,) with B = scores_shape[0], or 0-d / (1,)
    for 2-D scores; values in [0, limit + 3] (0 and > L included)."""
    shape = draw(st.sampled_from([(), (1,)])) if len(scores_shape) == 2 else (scores_shape[0],)
    n = math.prod(shape)
    values = draw(st.lists(st.integers(0, limit + 3), min_size=n, max_size=n))
    lengths = torch.tensor(values, dtype=draw(st.sampled_from(INDEX_DTYPES))).reshape(shape)
    return draw(layouts(lengths))


@st.composite
def softmax_masks(
    draw: st.DrawFn, gen: torch.Generator, scores_shape: tuple[int, ...], dtype: torch.dtype
) -> Tensor | None:
    """None, a bool keep-mask, or an additive mask (scores' dtype or fp32, -inf where masked) of
    any shape that broadcasts to the scores."""
    kind = draw(st.sampled_from([None, "bool", "additive"]))
    if kind is None:
        return None
    shape = draw(broadcast_shapes(scores_shape))
    keep = rand(gen, shape) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    if kind == "bool":
        return draw(layouts(keep))
    # A large finite fill (HF's finfo.min) is left out: on a row it fills entirely, fp32 math loses
    # the scores' low bits next to it, and the fp64 reference does not — not a kernel error.
    additive = randn(gen, shape, draw(st.sampled_from([dtype, torch.float32]))).masked_fill(~keep, -math.inf)
    return draw(layouts(additive))


@st.composite
def masking_args(
    draw: st.DrawFn, gen: torch.Generator, scores_shape: tuple[int, ...], dtype: torch.dtype
) -> dict[str, object]:
    """The masking arguments shared by masked_softmax and attention: mask, lengths,
    query_lengths, causal (each maybe absent)."""
    *_, lq, lk = scores_shape
    args: dict[str, object] = {"causal": draw(st.sampled_from([False, True, "top_left", "bottom_right"]))}
    mask = draw(softmax_masks(gen, scores_shape, dtype))
    if mask is not None:
        args["mask"] = mask
    for name, limit in (("lengths", lk), ("query_lengths", lq)):
        if draw(st.booleans()):
            args[name] = draw(lengths_for(scores_shape, limit))
    return args


def differentiate_mask(draw: st.DrawFn, inputs: dict[str, Tensor], args: dict[str, object]) -> None:
    """Moves an additive mask into the differentiated inputs, half of the time."""
    mask = args.get("mask")
    if isinstance(mask, Tensor) and mask.is_floating_point() and draw(st.booleans()):
        inputs["mask"] = args.pop("mask")


@st.composite
def class_targets(
    draw: st.DrawFn, gen: torch.Generator, shape: tuple[int, ...], n_classes: int
) -> dict[str, object]:
    """``target`` in [0, C) with some set to a drawn ``ignore_index`` (-100, inside [0, C) or
    outside it on either side)."""
    ignore_index = draw(
        st.one_of(st.sampled_from([-100, -1, n_classes, n_classes + 5]), st.integers(0, n_classes - 1))
    )
    target = randint(gen, n_classes, shape, draw(st.sampled_from(INDEX_DTYPES)))
    ignored = rand(gen, shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))
    target = target.masked_fill(ignored, ignore_index)
    return {"target": draw(layouts(target)), "ignore_index": ignore_index}


@st.composite
def loss_options(draw: st.DrawFn) -> dict[str, object]:
    """reduction, label_smoothing and z_loss, shared by the two cross-entropy ops."""
    return {
        "reduction": draw(st.sampled_from(["none", "sum", "mean"])),
        "label_smoothing": draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0))),
        "z_loss": draw(st.sampled_from([0.0, 1e-3, 0.1])),
    }


# --- one strategy per op ------------------------------------------------------------------------------


@st.composite
def masked_softmax_cases(draw: st.DrawFn, backend: str) -> Case:
    gen, dtype = draw(generators()), draw(st.sampled_from(FLOAT_DTYPES))
    row_budget = ROW_BUDGET.get(backend, DEFAULT_ROW_BUDGET)
    rows = draw(shapes(draw(st.integers(1, 4)), row_budget))  # 0 to 3 batch dims, then Lq
    shape = (*rows, draw(sizes(MAX_SIZE)))
    inputs = {"scores": draw(layouts(randn(gen, shape, dtype, std=3.0)))}
    args = draw(masking_args(gen, shape, dtype))
    args["scale"] = draw(scales)
    differentiate_mask(draw, inputs, args)
    fans = {"mask": fan_in(inputs["mask"].shape, shape)} if "mask" in inputs else {}
    # dX = scale·Y⊙(dY − ΣY⊙dY) from the rounded Y: a difference of O(|dY|) terms (the atol is on
    # that scale, as in test_masked_softmax), times |scale|.
    grad_scale = 10.0 * max(1.0, abs(args["scale"]))
    return Case("masked_softmax", dtype, gen, inputs, args, grad_scale=grad_scale, fan_in=fans)


windows = st.one_of(st.none(), st.tuples(*[st.integers(-1, MAX_SIZE + 2)] * 2))


@st.composite
def heads(draw: st.DrawFn) -> tuple[int, int, bool]:
    """(Hq, Hkv, enable_gqa): Hq a multiple of Hkv, equal when enable_gqa is False."""
    hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    gqa = group > 1 or draw(st.booleans())
    return hkv * group if gqa else hkv, hkv, gqa


def attention_budgets(scale: float | None, d: int, dv: int) -> tuple[float, float]:
    """(out_scale, grad_scale) of an attention case. Three roundings to the input dtype (scaled
    q·kᵀ, probabilities, output) where masked_softmax has one (test_attention measured fp16/bf16
    errors up to ~7x the plain TOL), and a score's rounding error (up to ε/2·|s|, with
    |s| ~ |scale|·√D for q, k ~ N(0, 1)) passes unchanged into the probabilities' relative error.
    Over 1000 random examples the errors reached up to ~0.5x of this budget. The probabilities'
    gradient dY·vᵀ sums Dv products (v, dY ~ N(0, 1)): it, and the error of its rounding, grow with
    √Dv."""
    scale = scale if scale is not None else d**-0.5 if d else 1.0
    budget = 20.0 * max(1.0, abs(scale) * math.sqrt(d))
    return budget, budget * max(1.0, math.sqrt(dv))


@st.composite
def attention_cases(draw: st.DrawFn, backend: str) -> Case:
    gen, dtype = draw(generators()), draw(st.sampled_from(FLOAT_DTYPES))
    row_budget = ROW_BUDGET.get(backend, DEFAULT_ROW_BUDGET)
    hq, hkv, gqa = draw(st.one_of(st.just((1, 1, False)), heads()))
    if gqa:  # heads at dim -3 of q, k and v (q has every batch dim: enable_gqa needs 4 or more)
        *batch, lq = draw(shapes(draw(st.integers(2, 3)), max(row_budget // hq, 1)))
        q_heads, kv_heads = (hq,), (hkv,)
        qb = tuple(1 if draw(st.booleans()) else s for s in batch)
    else:
        *batch, lq = draw(shapes(draw(st.integers(1, 3)), row_budget))  # 0 to 2 batch dims, then Lq
        q_heads = kv_heads = ()
        qb = draw(broadcast_shapes(tuple(batch)))
    lk, d, dv = (draw(sizes(MAX_SIZE)) for _ in range(3))
    # q, k and v each get a batch shape that broadcasts to the drawn one (as in torch.matmul).
    kb, vb = (draw(broadcast_shapes(tuple(batch))) for _ in range(2))
    shapes_of = (
        ("q", (*qb, *q_heads, lq, d)),
        ("k", (*kb, *kv_heads, lk, d)),
        ("v", (*vb, *kv_heads, lk, dv)),
    )
    inputs = {name: draw(layouts(randn(gen, shape, dtype))) for name, shape in shapes_of}
    scores_shape = (*torch.broadcast_shapes(qb, kb, vb), *q_heads, lq, lk)
    args = draw(masking_args(gen, scores_shape, dtype))
    args |= {"scale": draw(st.one_of(st.none(), scales)), "window": draw(windows), "enable_gqa": gqa}
    differentiate_mask(draw, inputs, args)
    # k and v's gradients sum over the query heads of their group too.
    fans = {name: fan_in(x.shape[:-2], scores_shape[:-2]) for name, x in inputs.items() if name != "mask"}
    if "mask" in inputs:
        fans["mask"] = fan_in(inputs["mask"].shape, scores_shape)
    budget, grad_budget = attention_budgets(args["scale"], d, dv)
    return Case("attention", dtype, gen, inputs, args, out_scale=budget, grad_scale=grad_budget, fan_in=fans)


@st.composite
def varlen_attention_cases(draw: st.DrawFn, backend: str) -> Case:
    gen, dtype = draw(generators()), draw(st.sampled_from(FLOAT_DTYPES))
    hq, hkv, gqa = draw(heads())
    # Sequences of 0 or more rows; the rows of all of them times the query heads within budget.
    cap = max(ROW_BUDGET.get(backend, DEFAULT_ROW_BUDGET) // hq, 1)
    lengths_q = draw(st.lists(sizes(MAX_SIZE), max_size=4).filter(lambda n: sum(n) <= cap))
    same = draw(st.booleans())  # cu_seqlens_k None: k's sequences are q's
    lengths_k = lengths_q if same else [draw(sizes(MAX_SIZE)) for _ in lengths_q]
    d, dv = draw(sizes(MAX_SIZE)), draw(sizes(MAX_SIZE))
    shapes_of = (
        ("q", (sum(lengths_q), hq, d)),
        ("k", (sum(lengths_k), hkv, d)),
        ("v", (sum(lengths_k), hkv, dv)),
    )
    inputs = {name: draw(layouts(randn(gen, shape, dtype))) for name, shape in shapes_of}
    cu_dtype = draw(st.sampled_from(INDEX_DTYPES))
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=cu_dtype) for n in (lengths_q, lengths_k))
    args = {
        "cu_seqlens_q": cu_q,
        "cu_seqlens_k": None if same else cu_k,
        "causal": draw(st.sampled_from([False, True, "bottom_right"])),
        "scale": draw(st.one_of(st.none(), scales)),
        "window": draw(windows),
        "enable_gqa": gqa,
    }
    budget, grad_budget = attention_budgets(args["scale"], d, dv)
    fans = {"k": hq // hkv, "v": hq // hkv}  # the query heads of a kv head's group
    return Case(
        "varlen_attention", dtype, gen, inputs, args, out_scale=budget, grad_scale=grad_budget, fan_in=fans
    )


@st.composite
def pad_embedding_cases(draw: st.DrawFn, backend: str) -> Case:
    gen, dtype = draw(generators()), draw(st.sampled_from(FLOAT_DTYPES))
    row_budget = ROW_BUDGET.get(backend, DEFAULT_ROW_BUDGET)
    ids_shape = draw(shapes(draw(st.integers(0, 3)), row_budget))
    # V = 0 only works with no ids (every id must be in [0, V)); V counts as rows (Triton's
    # backward runs a program per row).
    n_rows = draw(sizes(row_budget).filter(lambda v: v > 0 or math.prod(ids_shape) == 0))
    dim = draw(sizes(MAX_SIZE))
    padding_idx = draw(st.one_of(st.none(), st.integers(-n_rows, n_rows - 1))) if n_rows else None
    ids = randint(gen, n_rows, ids_shape, draw(st.sampled_from(INDEX_DTYPES)))
    if padding_idx is not None:
        pads = rand(gen, ids_shape) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        ids = ids.masked_fill(pads, padding_idx % n_rows)
    args = {
        "input": draw(layouts(ids)),
        "padding_idx": padding_idx,
        "zero_pad": draw(st.booleans()),
        "scale": draw(st.one_of(st.none(), scales)),
        "scale_grad_by_freq": draw(st.booleans()),
    }
    inputs = {"weight": draw(layouts(randn(gen, (n_rows, dim), dtype)))}
    # The kernels sum a row's tokens in fp32, then scale once; eager scales each token: not the
    # same roundings (as in test_pad_embedding).
    return Case("pad_embedding", dtype, gen, inputs, args, grad_scale=10.0)


@st.composite
def masked_cross_entropy_cases(draw: st.DrawFn, backend: str) -> Case:
    gen, dtype = draw(generators()), draw(st.sampled_from(FLOAT_DTYPES))
    row_budget = ROW_BUDGET.get(backend, DEFAULT_ROW_BUDGET)
    n_classes = draw(sizes(MAX_SIZE).filter(bool))  # a class index needs a class
    # Layouts (C,), (N, C) and (N, C, d1, ...): target () / (N,) / (N, d1, ...).
    target_shape = draw(shapes(draw(st.integers(0, 3)), row_budget))
    input_shape = (n_classes,) if not target_shape else (target_shape[0], n_classes, *target_shape[1:])
    args = draw(class_targets(gen, target_shape, n_classes)) | draw(loss_options())
    if draw(st.booleans()):
        mask = rand(gen, target_shape) < draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
        # A target that does not count is never read: out of range there is fine.
        args["mask"] = mask = draw(layouts(mask))
        garbage = draw(st.sampled_from([None, -3, n_classes + 7]))
        if garbage is not None:
            # Not expanded after this: that would copy garbage to where the mask keeps the target.
            args["target"] = draw(layouts(args["target"].masked_fill(~mask, garbage), expand=False))
    if draw(st.booleans()):
        args["weight"] = draw(layouts((rand(gen, (n_classes,)) + 0.25).to(dtype)))
    inputs = {"input": draw(layouts(randn(gen, input_shape, dtype, std=3.0)))}
    # The logits gradient is a difference of O(1/C) terms: an atol on the scale of the incoming
    # gradient (as in test_masked_cross_entropy).
    return Case("masked_cross_entropy", dtype, gen, inputs, args, grad_scale=10.0)


@st.composite
def linear_cross_entropy_cases(draw: st.DrawFn, backend: str) -> Case:
    gen, dtype = draw(generators()), draw(st.sampled_from(FLOAT_DTYPES))
    row_budget = ROW_BUDGET.get(backend, DEFAULT_ROW_BUDGET)
    lead = draw(shapes(draw(st.integers(0, 2)), row_budget))  # hidden (..., H)
    hidden_size, vocab = draw(sizes(MAX_SIZE)), draw(sizes(MAX_SIZE).filter(bool))
    inputs = {
        "hidden": draw(layouts(randn(gen, (*lead, hidden_size), dtype))),
        "weight": draw(layouts(randn(gen, (vocab, hidden_size), dtype, std=max(hidden_size, 1) ** -0.5))),
    }
    if draw(st.booleans()):
        inputs["bias"] = draw(layouts(randn(gen, (vocab,), dtype)))
    args = draw(class_targets(gen, lead, vocab)) | draw(loss_options())
    tokens = math.prod(lead)
    args["chunk_size"] = draw(st.one_of(st.none(), st.integers(1, tokens + 2)))
    # The chunk's logits gradient is rounded to the dtype before the matmuls, as in eager: the
    # hidden gradient sums V of those rounded terms, the weight and bias gradients N (tokens).
    fans = {"hidden": vocab, "weight": tokens, "bias": tokens}
    return Case("linear_cross_entropy", dtype, gen, inputs, args, grad_scale=10.0, fan_in=fans)


STRATEGIES: dict[str, Callable[[str], st.SearchStrategy[Case]]] = {
    "masked_softmax": masked_softmax_cases,
    "attention": attention_cases,
    "varlen_attention": varlen_attention_cases,
    "pad_embedding": pad_embedding_cases,
    "masked_cross_entropy": masked_cross_entropy_cases,
    "linear_cross_entropy": linear_cross_entropy_cases,
}


# --- the fp64 references ------------------------------------------------------------------------


def _as_op_sees_it(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The op casts an additive mask to the scores' dtype before anything else: so does the
    reference, then computes in fp64 (the cast is differentiable: the mask's gradient passes)."""
    return mask.to(dtype).double() if mask is not None and mask.is_floating_point() else mask


def _masked_softmax_reference(dtype: torch.dtype, scores: Tensor, mask: Tensor | None = None, **kw) -> Tensor:
    return reference.masked_softmax(scores, _as_op_sees_it(mask, dtype), **kw)


def _attention_reference(dtype: torch.dtype, mask: Tensor | None = None, **kw) -> Tensor:
    return reference.attention(mask=_as_op_sees_it(mask, dtype), **kw)


def _linear_cross_entropy_reference(dtype: torch.dtype, chunk_size: int | None = None, **kw) -> Tensor:
    return reference.linear_cross_entropy(**kw)  # holds all the logits: no chunks


REFERENCES: dict[str, Callable[..., Tensor]] = {
    "masked_softmax": _masked_softmax_reference,
    "attention": _attention_reference,
    "varlen_attention": lambda dtype, **kw: reference.varlen_attention(**kw),
    "pad_embedding": lambda dtype, **kw: reference.pad_embedding(**kw),
    # The class weight is used as drawn: the reference converts it to the compute dtype.
    "masked_cross_entropy": lambda dtype, **kw: reference.masked_cross_entropy(**kw),
    "linear_cross_entropy": _linear_cross_entropy_reference,
}


# --- the test -----------------------------------------------------------------------------------------


def _gradients(out: Tensor, inputs: dict[str, Tensor], grad: Tensor) -> dict[str, Tensor]:
    """d(out·grad)/d(input) for each input; zeros for an input the output does not depend on."""
    if not out.requires_grad:
        return {k: torch.zeros_like(x) for k, x in inputs.items()}
    grads = torch.autograd.grad(out, list(inputs.values()), grad, materialize_grads=True)
    return dict(zip(inputs, grads, strict=True))


def check_against_reference(case: Case, backend: str) -> None:
    """The op's values and input gradients against the fp64 reference; inputs unchanged."""
    tensors = {**case.inputs, **{k: v for k, v in case.args.items() if isinstance(v, Tensor)}}
    before = {k: v.clone() for k, v in tensors.items()}

    leaves = {k: x.detach().requires_grad_() for k, x in case.inputs.items()}  # same layout
    out = getattr(mk, case.op)(**leaves, **case.args, backend=backend)
    ref_leaves = {k: x.detach().double().requires_grad_() for k, x in case.inputs.items()}
    expected = REFERENCES[case.op](case.dtype, **ref_leaves, **case.args)
    assert out.shape == expected.shape and out.dtype == case.dtype
    assert_close(out.double(), expected, case.dtype, scale=case.out_scale)

    grad = randn(case.gen, tuple(out.shape), case.dtype)
    got = _gradients(out, leaves, grad)
    want = _gradients(expected, ref_leaves, grad.double())
    for name in leaves:
        assert got[name].shape == leaves[name].shape, name
        # A gradient that sums fan_in terms, each rounded to the dtype (as eager does too), has
        # their independent rounding errors added up: a random walk, √fan_in times one term's.
        scale = case.grad_scale * math.sqrt(max(1, case.fan_in.get(name, 1)))
        # An input of lower precision than the op's dtype (an fp32 mask on fp64 scores) gets its
        # gradient rounded to its own dtype: its tolerance.
        dtype = max(case.dtype, leaves[name].dtype, key=lambda t: TOL[t][0])
        try:
            assert_close(got[name].double(), want[name], dtype, scale=scale)
        except AssertionError as exc:
            raise AssertionError(f"gradient of {name}: {exc}") from None

    for name, was in before.items():
        assert torch.equal(tensors[name], was), f"{name} was modified"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(STRATEGIES))
# Other settings (derandomize) come from the profile conftest loads; interpreted Triton runs make
# some examples slow: no deadline.
@settings(max_examples=EXAMPLES, deadline=None)
@given(data=st.data())
def test_matches_fp64_reference(op: str, backend: str, data: st.DataObject) -> None:
    """The strategy depends on the backend (Triton gets smaller shapes): drawn inside."""
    check_against_reference(data.draw(STRATEGIES[op](backend), label=op), backend)
