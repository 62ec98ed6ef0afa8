"""pad_embedding: an embedding lookup that knows its padding id — ``F.embedding`` by default, the
pad mask folded in with ``zero_pad``, a fused output ``scale``, and a dense, deterministic backward
that skips the pad tokens.

Layers, top to bottom: the public function (argument checks, normalisation), the opaque custom op
``maskkern::pad_embedding`` and its backward op (id range check; backend dispatch; fakes; autograd),
the per-backend kernels, which all see the same normalised arguments, and the module:

    fwd(ids (N,) int32|int64 contiguous, weight (V, D) with unit column stride, pad -1|[0, V),
        zero_pad, scale) -> out (N, D)
    bwd(grad (N, D) contiguous, ids (N,), V, pad, scale_grad_by_freq, scale) -> grad_weight (V, D)

Ids are checked to lie in [0, V) before any kernel runs (an IndexError naming the first bad id);
with ``check_ids=False`` the kernels still never read out of bounds: an out-of-range id gives a
zero row and no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import reference
from .._backend import native_extension_loaded, resolve_backend
from ._common import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_dtype,
    check_finite_number,
    check_ids_in_range,
    check_same_device,
    check_tensor,
)


def pad_embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    *,
    zero_pad: bool = False,
    scale: float | None = None,
    scale_grad_by_freq: bool = False,
    check_ids: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Looks up the rows of ``weight`` for the ids in ``input``.

    Replaces ``F.embedding(input, weight, padding_idx, scale_grad_by_freq=...)``, and with
    ``zero_pad=True, scale=s`` the eager ``F.embedding(input, weight) * s * (input != pad)[..., None]``.

    Args:
        input: int32/int64 ids of any shape, each in [0, V).
        weight: (V, D) float16/bfloat16/float32/float64, any strides.
        padding_idx: the pad id (negative counts from V, like nn.Embedding) or None. The pad row
            gets no gradient; by default the output at a pad position is the pad row, as in PyTorch.
        zero_pad: pad positions output exact zeros, without reading the weight.
        scale: multiplies the output (e.g. ``D ** 0.5``), fused into the lookup.
        scale_grad_by_freq: scale each row's gradient by 1 / (its id's count in ``input``).
        check_ids: check that every id is in [0, V) and raise IndexError otherwise. On CUDA the check
            synchronises with the host; ``False`` skips it, and an out-of-range id then gives a zero
            output row and no gradient (never an out-of-bounds access), on every backend alike.
        backend: "triton", "cuda", "cpu", "torch" or None (the default for weight's device).

    Returns:
        ``input.shape + (D,)`` in weight's dtype. Its gradient w.r.t. ``weight`` is dense: per row
        the sum of the row's tokens' gradients (pad tokens skipped), accumulated in fp32 (fp64 for
        fp64), in a fixed order — the same bits on every run.
    """
    check_tensor(input, "input")
    check_dtype(input, "input", INDEX_DTYPES)
    check_tensor(weight, "weight")
    check_dtype(weight, "weight", FLOAT_DTYPES)
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight.shape)}"
        )
    check_same_device(input, "input", weight, "weight")
    pad = _normalise_padding_idx(padding_idx, weight.shape[0])
    scale = 1.0 if scale is None else check_finite_number(scale, "scale")
    backend = resolve_backend(backend, weight.device, "weight")
    return torch.ops.maskkern.pad_embedding(
        input, weight, pad, bool(zero_pad), scale, bool(scale_grad_by_freq), bool(check_ids), backend
    )


def _normalise_padding_idx(padding_idx: int | None, num_embeddings: int) -> int:
    """-1 for None, else the pad id in [0, V) (negative values count from the end)."""
    if padding_idx is None:
        return -1
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise IndexError(
            f"padding_idx must be in [-{num_embeddings}, {num_embeddings}) = [-V, V) for weight with "
            f"V = {num_embeddings} rows, got {padding_idx}"
        )
    return padding_idx % num_embeddings


# --- per-backend kernels ------------------------------------------------------------------------


# The reference (F.embedding) fails on an id outside [0, V): the torch kernels give such an id what
# the native ones do (a zero row, no gradient), for the check_ids=False that skipped the check.


def _torch_fwd(ids, weight, pad, zero_pad, scale):
    num_weights = weight.shape[0]
    ok = (ids >= 0) & (ids < num_weights)
    out = reference.pad_embedding(
        ids.where(ok, 0), weight, None if pad < 0 else pad, zero_pad=zero_pad,
        scale=None if scale == 1.0 else scale,
    )  # fmt: skip
    return out.masked_fill(~ok[:, None], 0)


def _torch_bwd(grad, ids, num_weights, pad, scale_grad_by_freq, scale):
    # Out-of-range ids go to one extra row, dropped: no other row's gradient (or count) changes.
    spare = ids.where((ids >= 0) & (ids < num_weights), num_weights)
    gw = reference.pad_embedding_backward(grad, spare, num_weights + 1, pad, scale, scale_grad_by_freq)
    return gw[:num_weights]


def _kernels(backend: str):
    if backend in ("cpu", "cuda"):
        return torch.ops.maskkern.pad_embedding_fwd, torch.ops.maskkern.pad_embedding_bwd
    if backend == "triton":
        from ..triton_kernels import pad_embedding as tk

        return tk.pad_embedding_fwd, tk.pad_embedding_bwd
    return _torch_fwd, _torch_bwd


def _unit_column_stride(weight: Tensor) -> Tensor:
    """The kernels read rows through weight.stride(0) but need contiguous rows."""
    return weight if weight.stride(1) == 1 or weight.shape[1] <= 1 else weight.contiguous()


# --- the custom ops -----------------------------------------------------------------------------


@torch.library.custom_op("maskkern::pad_embedding", mutates_args=())
def _pad_embedding_op(
    input: Tensor,
    weight: Tensor,
    padding_idx: int,
    zero_pad: bool,
    scale: float,
    scale_grad_by_freq: bool,
    check_ids: bool,
    backend: str,
) -> Tensor:
    num_embeddings, dim = weight.shape
    if check_ids:
        check_ids_in_range(input, num_embeddings)
    if input.numel() == 0 or dim == 0:
        return weight.new_empty((*input.shape, dim))
    fwd = _kernels(backend)[0]
    out = fwd(input.reshape(-1).contiguous(), _unit_column_stride(weight), padding_idx, zero_pad, scale)
    return out.view(*input.shape, dim)


@_pad_embedding_op.register_fake
def _(input, weight, padding_idx, zero_pad, scale, scale_grad_by_freq, check_ids, backend):
    return weight.new_empty((*input.shape, weight.shape[1]))


@torch.library.custom_op("maskkern::pad_embedding_backward", mutates_args=())
def _pad_embedding_backward_op(
    grad: Tensor,
    input: Tensor,
    num_weights: int,
    padding_idx: int,
    scale: float,
    scale_grad_by_freq: bool,
    backend: str,
) -> Tensor:
    dim = grad.shape[-1]
    if input.numel() == 0 or dim == 0:
        return grad.new_zeros((num_weights, dim))
    bwd = _kernels(backend)[1]
    # Autograd may hand us an expanded or strided grad; the kernels read its rows contiguously.
    g = grad.reshape(-1, dim).contiguous()
    return bwd(g, input.reshape(-1).contiguous(), num_weights, padding_idx, scale_grad_by_freq, scale)


@_pad_embedding_backward_op.register_fake
def _(grad, input, num_weights, padding_idx, scale, scale_grad_by_freq, backend):
    return grad.new_empty((num_weights, grad.shape[-1]))


def _setup_context(ctx, inputs, output):
    input, weight, padding_idx, _zero_pad, scale, scale_grad_by_freq, _check_ids, backend = inputs
    ctx.save_for_backward(input)
    ctx.num_weights = weight.shape[0]
    ctx.padding_idx, ctx.scale, ctx.scale_grad_by_freq, ctx.backend = (
        padding_idx,
        scale,
        scale_grad_by_freq,
        backend,
    )


def _backward(ctx, grad):
    (input,) = ctx.saved_tensors
    dweight = None
    if ctx.needs_input_grad[1]:
        # zero_pad does not enter: it only changes pad positions, whose gradient is dropped anyway.
        dweight = torch.ops.maskkern.pad_embedding_backward(
            grad, input, ctx.num_weights, ctx.padding_idx, ctx.scale, ctx.scale_grad_by_freq, ctx.backend
        )
    return None, dweight, None, None, None, None, None, None


_pad_embedding_op.register_autograd(_backward, setup_context=_setup_context)


def _register_native_fakes() -> None:
    """The C++ kernel ops are called inside the opaque ops above, but get fakes too so that
    opcheck and tracing can see them on their own."""

    @torch.library.register_fake("maskkern::pad_embedding_fwd")
    def _(ids, weight, pad, zero_pad, scale):
        return weight.new_empty((ids.shape[0], weight.shape[1]))

    @torch.library.register_fake("maskkern::pad_embedding_bwd")
    def _(grad, ids, num_weights, pad, scale_grad_by_freq, scale):
        return grad.new_empty((num_weights, grad.shape[1]))


# --- module -------------------------------------------------------------------------------------


class PadEmbedding(nn.Embedding):
    """``nn.Embedding`` on ``pad_embedding``: the same constructor, init (the pad row zeroed) and
    state_dict, plus ``zero_pad``, ``scale`` and ``backend``. ``max_norm`` renormalises the looked-up
    rows in place as nn.Embedding does; ``sparse`` gradients are not supported."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        _weight: Tensor | None = None,
        _freeze: bool = False,
        device=None,
        dtype=None,
        *,
        zero_pad: bool = False,
        scale: float | None = None,
        backend: str | None = None,
    ) -> None:
        if sparse:
            raise ValueError("sparse must be False: pad_embedding computes a dense gradient")
        # nn.Embedding only asserts the range (an AssertionError, gone under -O): the documented
        # TypeError/IndexError, as the function raises them, come first.
        _normalise_padding_idx(padding_idx, num_embeddings)
        super().__init__(
            num_embeddings,
            embedding_dim,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            _weight,
            _freeze,
            device,
            dtype,
        )
        self.zero_pad, self.scale, self.backend = zero_pad, scale, backend

    def forward(self, input: Tensor) -> Tensor:
        if self.max_norm is not None:
            # What F.embedding does: the rows looked up are renormalised in place, outside autograd.
            with torch.no_grad():
                torch.embedding_renorm_(self.weight, input.contiguous(), self.max_norm, self.norm_type)
        return pad_embedding(
            input,
            self.weight,
            self.padding_idx,
            zero_pad=self.zero_pad,
            scale=self.scale,
            scale_grad_by_freq=self.scale_grad_by_freq,
            backend=self.backend,
        )

    @classmethod
    def from_pretrained(
        cls,
        embeddings: Tensor,
        freeze: bool = True,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        *,
        zero_pad: bool = False,
        scale: float | None = None,
        backend: str | None = None,
    ) -> PadEmbedding:
        """``nn.Embedding.from_pretrained`` plus this module's keyword arguments."""
        module = super().from_pretrained(
            embeddings, freeze, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
        )
        module.zero_pad, module.scale, module.backend = zero_pad, scale, backend
        return module

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.zero_pad:
            extra += ", zero_pad=True"
        if self.scale is not None:
            extra += f", scale={self.scale}"
        if self.backend is not None:
            extra += f", backend={self.backend!r}"
        return extra


if native_extension_loaded():
    _register_native_fakes()
